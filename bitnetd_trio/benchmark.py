"""bitnetd-bench: engine speed against the machine's memory-bandwidth limit (spec section 9).

Measures prefill tok/s, single-stream decode tok/s at 1 and N threads, aggregate decode tok/s
for batches of several sequences, and the read bandwidth of the machine. The machine's speed
drifts by tens of percent within minutes, so every round runs all variants back to back and
the figures that matter are the ratios within a round (decode / bandwidth limit, batch B / batch
1); the medians over rounds are printed at the end.

    bitnetd-bench MODEL.gguf
    bitnetd-bench --synthetic            # full-size 2B-4T shape with random weights (cached)
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bitnetd_trio import engine


@dataclass
class Round:
    bandwidth: dict[int, float] = field(default_factory=dict)   # threads -> GB/s
    prefill: float = 0.0                                         # tok/s at N threads
    decode: dict[tuple[int, int], float] = field(default_factory=dict)  # (threads, batch) -> tok/s


def bytes_per_token(hp: engine.HParams, kv_positions: float) -> tuple[float, float, float]:
    """(ternary, head, kv) bytes streamed from memory for one decoded token."""
    e, f, kvd = hp.n_embd, hp.n_ff, hp.n_head_kv * hp.head_dim
    per_layer = (e * e * 2 + e * kvd * 2 + e * f * 3) / 4 + 7 * 32
    ternary = per_layer * hp.n_layer
    head = hp.n_vocab * e * 2
    kv = 2 * hp.n_layer * kv_positions * kvd * 4   # K and V, F32
    return ternary, head, kv


def synthetic_model(path: Path | None) -> Path:
    from bitnetd_trio import gguf_writer as gw

    target = path or gw.cache_dir() / "bench-full-2b4t-seed0.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    vocab = "tiny"
    try:
        gw.llama3_vocab()
        vocab = "llama3"
    except RuntimeError:
        pass
    print(f"writing the synthetic full-size model to {target} ...", flush=True)
    t0 = time.perf_counter()
    tmp = target.with_suffix(".partial")
    gw.write_model(tmp, gw.FULL_2B4T, 0, vocab=vocab)
    tmp.replace(target)
    print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def prompt_tokens(n: int, n_vocab: int, salt: int) -> list[int]:
    return [(salt * 7919 + i * 104729) % n_vocab for i in range(n)]


def time_prefill(ctx: engine.Context, n_tokens: int, n_vocab: int) -> float:
    ctx.reset(0)
    toks = prompt_tokens(n_tokens, n_vocab, 1)
    t0 = time.perf_counter()
    ctx.forward([engine.BatchEntry(0, toks, "last")])
    dt = time.perf_counter() - t0
    ctx.reset(0)
    return n_tokens / dt


def time_decode(ctx: engine.Context, batch: int, steps: int, start: int, n_vocab: int) -> float:
    """Aggregate tok/s of `batch` sequences decoding together after a `start`-token prompt."""
    for s in range(batch):
        ctx.reset(s)
    ctx.forward([engine.BatchEntry(s, prompt_tokens(start, n_vocab, s + 2), "last")
                 for s in range(batch)])
    nxt = [1] * batch
    t0 = time.perf_counter()
    for _ in range(steps):
        ctx.forward([engine.BatchEntry(s, [nxt[s]], "last") for s in range(batch)])
        nxt = [int(ctx.logits(s, 0).argmax()) for s in range(batch)]
    dt = time.perf_counter() - t0
    return batch * steps / dt


def run(args: argparse.Namespace) -> int:
    if args.synthetic:
        path = synthetic_model(args.model)
    elif args.model is None:
        print("bitnetd-bench: give a model path or --synthetic", file=sys.stderr)
        return 2
    else:
        path = args.model
    try:
        model = engine.Model.load(path)
    except engine.ModelLoadError as exc:
        print(f"bitnetd-bench: {exc}", file=sys.stderr)
        return 1
    hp = model.hparams
    n_threads = args.threads or os.cpu_count() or 1
    batches = sorted({int(b) for b in args.batches.split(",")})
    max_batch = max(batches)
    n_ctx = max(args.prompt, args.start + args.steps) + 1
    ctx = engine.Context(model, max_batch, n_ctx, n_threads)
    ternary, head, _ = bytes_per_token(hp, 0)
    kv_mean = args.start + args.steps / 2
    per_token = sum(bytes_per_token(hp, kv_mean))
    print(f"model {path} ({hp.n_layer} layers, n_embd {hp.n_embd}, vocab {hp.n_vocab}), "
          f"kernel {engine.kernel_name()}, threads 1 and {n_threads}")
    print(f"bytes per decoded token: ternary {ternary / 1e6:.1f} MB + head {head / 1e6:.1f} MB "
          f"+ KV {(per_token - ternary - head) / 1e6:.2f} MB = {per_token / 1e9:.3f} GB")
    print(f"bandwidth probe: {args.bw_mb} MB buffer, {args.streams} streams per thread")

    # warm the mapping (first touch of 1.2 GB would otherwise land in round 1)
    time_decode(ctx, 1, 2, 4, hp.n_vocab)
    rounds: list[Round] = []
    thread_set = sorted({1, n_threads})
    for r in range(args.rounds):
        rd = Round()
        for t in thread_set:
            rd.bandwidth[t] = engine.measure_read_bandwidth(args.bw_mb << 20, t, args.streams, 3)
        ctx.set_threads(n_threads)
        rd.prefill = time_prefill(ctx, args.prompt, hp.n_vocab)
        for t in thread_set:
            ctx.set_threads(t)
            rd.decode[(t, 1)] = time_decode(ctx, 1, args.steps, args.start, hp.n_vocab)
        ctx.set_threads(n_threads)
        for b in batches:
            if b != 1:
                rd.decode[(n_threads, b)] = time_decode(ctx, b, args.steps, args.start,
                                                        hp.n_vocab)
        rounds.append(rd)
        bw = rd.bandwidth[n_threads]
        limit = bw * 1e9 / per_token
        line = [f"round {r + 1}: bw {bw:.1f} GB/s (1 thread {rd.bandwidth[1]:.1f}), "
                f"limit {limit:.1f} tok/s | prefill {rd.prefill:.1f} tok/s"]
        for (t, b), v in sorted(rd.decode.items()):
            line.append(f"decode t{t} b{b} {v:.1f}")
        single = rd.decode[(n_threads, 1)]
        line.append(f"| single/limit {single / limit:.0%}")
        for b in batches:
            if b != 1:
                line.append(f"b{b}/b1 {rd.decode[(n_threads, b)] / single:.2f}x")
        print(" ".join(line), flush=True)
    ctx.close()
    model.close()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print("\nmedians over rounds:")
    bw = med([rd.bandwidth[n_threads] for rd in rounds])
    print(f"  read bandwidth        {bw:.1f} GB/s at {n_threads} threads, "
          f"{med([rd.bandwidth[1] for rd in rounds]):.1f} GB/s at 1")
    print(f"  bandwidth limit       {bw * 1e9 / per_token:.1f} tok/s "
          f"({per_token / 1e9:.3f} GB per token)")
    print(f"  prefill ({args.prompt} tokens)  {med([rd.prefill for rd in rounds]):.1f} tok/s")
    for t in thread_set:
        print(f"  decode, {t} thread(s)   {med([rd.decode[(t, 1)] for rd in rounds]):.1f} tok/s")
    for b in batches:
        if b != 1:
            print(f"  decode, batch {b:<2}      "
                  f"{med([rd.decode[(n_threads, b)] for rd in rounds]):.1f} tok/s aggregate")
    ratio = med([rd.decode[(n_threads, 1)] * per_token / (rd.bandwidth[n_threads] * 1e9)
                 for rd in rounds])
    print(f"  single-stream / limit {ratio:.0%} (per-round ratios, median)")
    for b in batches:
        if b != 1:
            rb = med([rd.decode[(n_threads, b)] / rd.decode[(n_threads, 1)] for rd in rounds])
            print(f"  batch {b} / batch 1    {rb:.2f}x")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitnetd-bench", description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", type=Path, help="GGUF model (or the cache path with "
                   "--synthetic)")
    p.add_argument("--synthetic", action="store_true",
                   help="use (and write once) a full-size 2B-4T model with random weights")
    p.add_argument("--threads", type=int, default=0, help="N threads (default: all CPUs)")
    p.add_argument("--prompt", type=int, default=128, help="prefill length")
    p.add_argument("--start", type=int, default=16, help="prompt length before decoding")
    p.add_argument("--steps", type=int, default=16, help="decode steps per measurement")
    p.add_argument("--batches", default="1,4,8", help="batch sizes for aggregate decode")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds")
    p.add_argument("--bw-mb", type=int, default=1024, help="bandwidth probe buffer (MB)")
    p.add_argument("--streams", type=int, default=8, help="read streams per thread in the probe")
    p.add_argument("--kernel", help="force a kernel set (scalar, avx2, ...)")
    args = p.parse_args(argv)
    if args.kernel:
        engine.select_kernel(args.kernel)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
