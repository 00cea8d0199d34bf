"""bitnetd-bench-families: every supported model family at full size, in one run.

Runs bitnetd-bench (bitnetd_trio.tools.benchmark) on the full-size synthetic file of each
family in turn: BitNet-b1.58-2B-4T first, as the yardstick, then the Llama graph in I2_S
(Falcon3-10B-1.58bit, Falcon-E-3B), the BitNet embedding graph (BitNet-embedding-0.6B) and
Ternary Bonsai in Q2_0 (Bonsai-8B). Each model's decode speed is set against the memory-
bandwidth limit measured in the same rounds as its own decode steps (model-format §9), so the
share of the limit compares across families even though the machine drifts between them. The
files are written once (random weights, the real dimensions) and kept in --dir.

    python -m bitnetd_trio.tools.families_bench --dir /var/tmp/bitnetd-bench
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bitnetd_trio.tools import benchmark

#: (family, writer preset), in the order they are measured
FAMILIES: list[tuple[str, str]] = [
    ("BitNet b1.58 2B-4T", "full"),
    ("Llama I2_S: Falcon3-10B-1.58bit", "falcon3-10b"),
    ("Llama I2_S: Falcon-E-3B", "falcon-e-3b"),
    ("BitNet-embedding-0.6B", "bitnet-embed-0.6b"),
    ("Ternary Bonsai-8B (Q2_0)", "bonsai-8b"),
]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitnetd-bench-families",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", type=Path, default=None,
                   help="where the synthetic files are kept (default: the writer's cache)")
    p.add_argument("--only", default="",
                   help="comma-separated presets to run (default: all of "
                        + ", ".join(preset for _, preset in FAMILIES) + ")")
    p.add_argument("--threads", type=int, default=0, help="N threads (default: all CPUs)")
    p.add_argument("--rounds", type=int, default=6, help="interleaved rounds per model")
    p.add_argument("--batches", default="1,4", help="batch sizes for aggregate decode")
    p.add_argument("--prefill-runs", type=int, default=1)
    p.add_argument("--kernel", help="force a kernel set (scalar, avx2, avx512vnni, amx)")
    args = p.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    unknown = only - {preset for _, preset in FAMILIES}
    if unknown:
        p.error(f"unknown preset(s): {', '.join(sorted(unknown))}")

    rows = []
    for family, preset in FAMILIES:
        if only and preset not in only:
            continue
        print(f"\n=== {family} (preset {preset}) ===", flush=True)
        path = None
        if args.dir is not None:
            args.dir.mkdir(parents=True, exist_ok=True)
            path = args.dir / f"bench-{preset}-seed0.gguf"
        bench_argv = [
            "--synthetic", "--preset", preset, "--rounds", str(args.rounds),
            "--batches", args.batches, "--prefill-runs", str(args.prefill_runs),
            "--threads", str(args.threads),
        ]
        if path is not None:
            bench_argv.insert(0, str(path))
        if args.kernel:
            bench_argv += ["--kernel", args.kernel]
        summary: dict = {}
        rc = benchmark.run(benchmark.parse_args(bench_argv), summary)
        if rc != 0:
            return rc
        rows.append((family, summary))

    if not rows:
        return 0
    n = rows[0][1]["threads"]
    batches = sorted(rows[0][1]["batches"])
    print(f"\nsummary (medians; kernel {rows[0][1]['kernel']}; 'share' = decode / the "
          f"bandwidth limit measured in the same rounds)")
    head = (f"  {'family':<34}{'GB/tok':>7}{'GB/s':>7}{'limit':>8}{'1 thr':>8}{'share':>7}"
            f"{f'{n} thr':>8}{'share':>7}" + "".join(f"{f'b{b} agg':>9}" for b in batches)
            + f"{'prefill':>9}")
    print(head)
    for family, s in rows:
        prefill = f"{s['prefill']:9.1f}" if s["prefill"] is not None else f"{'-':>9}"
        print(f"  {family:<34}{s['bytes_per_token'] / 1e9:7.3f}{s['bandwidth']:7.1f}"
              f"{s['limit']:8.1f}{s['decode_1']:8.1f}{s['share_1']:7.0%}"
              f"{s['decode_n']:8.1f}{s['share_n']:7.0%}"
              + "".join(f"{s['batches'][b]:9.1f}" for b in batches) + prefill)
    print("  (tok/s except GB/tok and GB/s; the 1-thread share is against the 1-thread "
          "bandwidth)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
