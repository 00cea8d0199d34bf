"""bitnetd-bench: engine speed against the machine's memory-bandwidth limit (model-format §9).

Measures the read bandwidth of the machine, single-stream decode at 1 and N threads, aggregate
decode for batches of several sequences, and prefill. The machine's speed drifts by tens of
percent within seconds when anything else runs, so the variants are interleaved at the finest
grain: every round runs one bandwidth pass and one decode step of every variant back to back
(in a rotating order), each decode step at a fixed position (the slots are truncated back after
every step). The report gives medians over rounds, and the ratios that matter (decode against
the bandwidth limit, batch B against batch 1) as medians of the per-round ratios.

    bitnetd-bench MODEL.gguf
    bitnetd-bench --synthetic            # full-size 2B-4T shape with random weights (cached)
    bitnetd-bench --synthetic --embeddings 64   # embeddings/s for 64-token inputs
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import time
from collections.abc import Callable
from pathlib import Path

from bitnetd_trio.engine import native as engine


def tensor_sizes(path: Path) -> dict[str, int]:
    """Bytes of every tensor of a GGUF file (model-format §1), from its tensor directory: the
    distance to the next tensor's data (or the end of the file), so any weight format counts
    as stored, I2_S's trailing scale and Q2_0's per-block scales included; alignment padding
    (under general.alignment bytes per tensor) is counted too."""
    scalar = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
    string, array = 8, 9

    with open(path, "rb") as f:

        def u(fmt: str) -> int:
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def skip(vtype: int) -> None:
            if vtype in scalar:
                f.seek(scalar[vtype], os.SEEK_CUR)
            elif vtype == string:
                f.seek(u("<Q"), os.SEEK_CUR)
            elif vtype == array:
                etype, count = u("<I"), u("<Q")
                if etype in scalar:
                    f.seek(scalar[etype] * count, os.SEEK_CUR)
                else:
                    for _ in range(count):
                        skip(etype)
            else:
                raise ValueError(f"{path}: unknown GGUF value type {vtype}")

        if f.read(4) != b"GGUF":
            raise ValueError(f"{path}: not a GGUF file")
        u("<I")  # version
        n_tensors, n_kv = u("<Q"), u("<Q")
        align = 32
        for _ in range(n_kv):
            key = f.read(u("<Q")).decode("utf-8", "replace")
            vtype = u("<I")
            if key == "general.alignment" and vtype == 4:
                align = u("<I")
            else:
                skip(vtype)
        offsets: dict[str, int] = {}
        for _ in range(n_tensors):
            name = f.read(u("<Q")).decode("utf-8", "replace")
            f.seek(8 * u("<I"), os.SEEK_CUR)  # dimensions
            u("<I")  # type
            offsets[name] = u("<Q")
        data_start = (f.tell() + align - 1) // align * align
    end = os.path.getsize(path) - data_start
    order = sorted(offsets, key=offsets.__getitem__)
    ends = [offsets[n] for n in order[1:]] + [end]
    return {n: e - offsets[n] for n, e in zip(order, ends, strict=True)}


def bytes_per_token(
    hp: engine.HParams, sizes: dict[str, int], kv_positions: float
) -> tuple[float, float, float]:
    """(weights, head, kv) bytes streamed from memory for one decoded token: every layer
    tensor and the output norm as stored (sizes: tensor_sizes), one row of token_embd, the
    whole head (output.weight, or token_embd when tied), and K and V (F32) up to the
    position."""
    embd = sizes.get("token_embd.weight", 0)
    head = sizes.get("output.weight", embd)
    weights = sum(b for n, b in sizes.items() if n not in ("token_embd.weight", "output.weight"))
    weights += embd / max(hp.n_vocab, 1)
    kv = 2 * hp.n_layer * kv_positions * hp.n_head_kv * hp.head_dim * 4
    return weights, head, kv


def synthetic_model(path: Path | None, preset: str = "full") -> Path:
    """The full-size synthetic model of a writer preset at path (default: the cache), written
    once. "full" is 2B-4T (with the Llama-3 vocabulary when available); the other presets
    use their family's tiny vocabulary, padded."""
    from bitnetd_trio.engine import gguf_writer as gw
    name = "bench-full-2b4t-seed0.gguf" if preset == "full" else f"bench-{preset}-seed0.gguf"
    target = path or gw.cache_dir() / name
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    shape = gw.PRESETS[preset]
    vocab = None
    if preset == "full":
        vocab = "tiny"
        try:
            gw.llama3_vocab()
            vocab = "llama3"
        except RuntimeError:
            pass
    elif shape.is_llama:
        vocab = "tiny-falcon3"
    print(f"writing the synthetic full-size model to {target} ...", flush=True)
    t0 = time.perf_counter()
    tmp = target.with_name(target.name + ".partial")
    gw.write_model(tmp, shape, 0, vocab=vocab,  # type: ignore[arg-type]
                   pre=gw.PRESET_PRE_TOKENIZER.get(preset))
    tmp.replace(target)
    print(f"  written in {time.perf_counter() - t0:.1f} s", flush=True)
    return target


def prompt_tokens(n: int, n_vocab: int, salt: int) -> list[int]:
    return [(salt * 7919 + i * 104729) % n_vocab for i in range(n)]


class DecodeVariant:
    """`batch` sequences in slots [first, first+batch) of ctx, decoding at a fixed position."""

    def __init__(
        self, ctx: engine.Context, first: int, batch: int, start: int, n_vocab: int
    ) -> None:
        self.ctx, self.slots, self.start = ctx, list(range(first, first + batch)), start
        ctx.forward(
            [engine.BatchEntry(s, prompt_tokens(start, n_vocab, s + 2), "none") for s in self.slots]
        )
        self.tokens = [1] * batch

    def step(self) -> float:
        """Seconds for one decode step of every sequence (token selection included)."""
        ctx = self.ctx
        t0 = time.perf_counter()
        ctx.forward(
            [
                engine.BatchEntry(s, [t], "last")
                for s, t in zip(self.slots, self.tokens, strict=True)
            ]
        )
        self.tokens = [int(ctx.logits(i, 0).argmax()) for i in range(len(self.slots))]
        dt = time.perf_counter() - t0
        for s in self.slots:
            ctx.truncate(s, self.start)
        return dt


def run_embeddings(model: engine.Model, args: argparse.Namespace) -> int:
    """Embeddings/s for inputs of args.embeddings tokens, as the daemon computes them: batches
    of --batch inputs fed as one step of hidden-state entries (model-format §5.3.1), mean
    pooling (the model's, model-format §10.5.4) and normalisation included."""
    from bitnetd_trio.engine.embedding import pool, pooling_of_model

    hp = model.hparams
    pooling = pooling_of_model(model.metadata, hp.architecture, hp.pooling)
    n = args.embeddings
    batch = args.batch
    n_threads = args.threads or os.cpu_count() or 1
    print(
        f"embeddings of {n} tokens, batches of {batch}, {n_threads} threads, {pooling} pooling, "
        f"kernel {engine.kernel_name()} ({hp.n_layer} layers, n_embd {hp.n_embd})"
    )
    with engine.Context(model, batch, n, n_threads) as ctx:

        def one_batch(salt: int) -> float:
            t0 = time.perf_counter()
            entries = [
                engine.BatchEntry(s, prompt_tokens(n, hp.n_vocab, salt + s), "hidden_all")
                for s in range(batch)
            ]
            for s in range(batch):
                ctx.reset(s)
            ctx.forward(entries)
            for i in range(batch):
                pool([ctx.hidden(i, t) for t in range(n)], pooling)
            return batch / (time.perf_counter() - t0)

        one_batch(0)  # warm up: first touch of the mapping
        rates = [one_batch(r * batch) for r in range(args.rounds)]
    med = statistics.median
    print(
        f"  {med(rates):.2f} embeddings/s ({med(rates) * n:.0f} tokens/s), median of "
        f"{args.rounds} batches [{min(rates):.2f} .. {max(rates):.2f}]"
    )
    return 0


def run(args: argparse.Namespace, summary: dict | None = None) -> int:
    """Measure and print; the medians also go into summary when one is given (for
    bitnetd_trio.tools.families_bench)."""
    if args.kernel:
        engine.select_kernel(args.kernel)
    if args.synthetic:
        path = synthetic_model(args.model, args.preset)
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
    if args.embeddings:
        try:
            return run_embeddings(model, args)
        finally:
            model.close()
    hp = model.hparams
    n_threads = args.threads or os.cpu_count() or 1
    batches = sorted({int(b) for b in args.batches.split(",")} - {1})
    n_ctx = max(args.prompt, args.start + 1)
    sizes = tensor_sizes(path)
    per_token = sum(bytes_per_token(hp, sizes, args.start + 1))
    weights, head, _ = bytes_per_token(hp, sizes, 0)
    print(
        f"model {path} ({hp.n_layer} layers, n_embd {hp.n_embd}, vocab {hp.n_vocab}), "
        f"kernel {engine.kernel_name()}, threads 1 and {n_threads}"
    )
    print(
        f"bytes per decoded token: weights {weights / 1e6:.1f} MB + head {head / 1e6:.1f} MB "
        f"+ KV {(per_token - weights - head) / 1e6:.2f} MB = {per_token / 1e9:.3f} GB"
    )

    slots = 1 + sum(batches)
    ctx = engine.Context(model, slots, n_ctx, n_threads)
    ctx1 = engine.Context(model, 1, n_ctx, 1)
    probe = engine.BandwidthProbe(args.bw_mb << 20, n_threads)
    probe1 = engine.BandwidthProbe(args.bw_mb << 20, 1)
    decoders = {
        ("t1", 1): DecodeVariant(ctx1, 0, 1, args.start, hp.n_vocab),
        (f"t{n_threads}", 1): DecodeVariant(ctx, 0, 1, args.start, hp.n_vocab),
    }
    first = 1
    for b in batches:
        decoders[(f"t{n_threads}", b)] = DecodeVariant(ctx, first, b, args.start, hp.n_vocab)
        first += b
    for d in decoders.values():  # warm up: first touch of the mapping, thread start
        d.step()

    tasks: dict[str, Callable[[], float]] = {
        "bw": lambda: probe.run(args.streams),
        "bw1": lambda: probe1.run(args.streams),
    }
    for (t, b), d in decoders.items():
        tasks[f"{t}b{b}"] = lambda d=d, b=b: b / d.step()  # tok/s of this step
    results: dict[str, list[float]] = {k: [] for k in tasks}
    names = list(tasks)
    for r in range(args.rounds):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            results[name].append(tasks[name]())

    # prefill: a few runs, each bracketed by bandwidth passes
    prefill, prefill_bw = [], []
    toks = prompt_tokens(args.prompt, hp.n_vocab, 1)
    for _ in range(args.prefill_runs):
        ctx.reset(0)
        bw0 = probe.run(args.streams)
        t0 = time.perf_counter()
        ctx.forward([engine.BatchEntry(0, toks, "last")])
        prefill.append(args.prompt / (time.perf_counter() - t0))
        prefill_bw.append((bw0 + probe.run(args.streams)) / 2)
    for c in (ctx, ctx1):
        c.close()
    model.close()

    med = statistics.median
    tn = f"t{n_threads}"
    bw = results["bw"]
    limit = [b * 1e9 / per_token for b in bw]
    single = results[f"{tn}b1"]
    print(f"\n{args.rounds} interleaved rounds (median, [min .. max]):")

    def show(label: str, values: list[float], unit: str) -> None:
        print(f"  {label:<28}{med(values):8.1f} {unit}   [{min(values):.1f} .. {max(values):.1f}]")

    show(f"read bandwidth, {n_threads} threads", bw, "GB/s")
    show("read bandwidth, 1 thread", results["bw1"], "GB/s")
    show("bandwidth limit", limit, "tok/s")
    show("decode, 1 thread", results["t1b1"], "tok/s")
    show(f"decode, {n_threads} threads", single, "tok/s")
    for b in batches:
        show(f"decode, batch {b} (aggregate)", results[f"{tn}b{b}"], "tok/s")
    show(f"prefill, {args.prompt} tokens", prefill, "tok/s")
    print("ratios (median of per-round ratios):")
    print(f"  single-stream / limit       {med([s / lim for s, lim in zip(single, limit)]):8.0%}")
    print(
        f"  1 thread / 1-thread limit   "
        f"{med([s * per_token / (b * 1e9) for s, b in zip(results['t1b1'], results['bw1'])]):8.0%}"
    )
    for b in batches:
        ratio = med([x / s for x, s in zip(results[f"{tn}b{b}"], single)])
        print(f"  batch {b} / batch 1           {ratio:8.2f}x")
    if summary is not None:
        summary.update(
            path=str(path),
            kernel=engine.kernel_name(),
            threads=n_threads,
            bytes_per_token=per_token,
            bandwidth=med(bw),
            limit=med(limit),
            decode_1=med(results["t1b1"]),
            decode_n=med(single),
            share_n=med([s / lim for s, lim in zip(single, limit)]),
            share_1=med(
                [s * per_token / (b * 1e9) for s, b in zip(results["t1b1"], results["bw1"])]
            ),
            batches={b: med(results[f"{tn}b{b}"]) for b in batches},
            prefill=med(prefill) if prefill else None,
        )
    # Rounds in which the other CPUs were free: N threads read clearly faster than one.
    quiet = [i for i in range(args.rounds) if bw[i] >= 1.5 * results["bw1"][i]]
    if n_threads > 1 and quiet:
        print(
            f"rounds with the other CPUs free (N-thread bandwidth >= 1.5x one thread's): "
            f"{len(quiet)} of {args.rounds}"
        )
        print(f"  read bandwidth              {med([bw[i] for i in quiet]):8.1f} GB/s")
        print(
            f"  decode, {n_threads} threads           {med([single[i] for i in quiet]):8.1f} tok/s"
        )
        print(f"  single-stream / limit       {med([single[i] / limit[i] for i in quiet]):8.0%}")
        for b in batches:
            agg = [results[f"{tn}b{b}"][i] for i in quiet]
            ratio = med([results[f"{tn}b{b}"][i] / single[i] for i in quiet])
            print(f"  batch {b}: {med(agg):.1f} tok/s aggregate, {ratio:.2f}x batch 1")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="bitnetd-bench", description=__doc__.split("\n\n")[0])
    p.add_argument(
        "model",
        nargs="?",
        type=Path,
        help="GGUF model (with --synthetic: where to keep the synthetic model)",
    )
    p.add_argument(
        "--synthetic",
        action="store_true",
        help="use (and write once) a full-size 2B-4T model with random weights",
    )
    p.add_argument(
        "--preset",
        default="full",
        help="with --synthetic: the writer preset (full = 2B-4T; falcon3-1b, falcon3-10b, "
        "bitnet-embed-0.6b, ...)",
    )
    p.add_argument("--threads", type=int, default=0, help="N threads (default: all CPUs)")
    p.add_argument("--prompt", type=int, default=128, help="prefill length")
    p.add_argument("--prefill-runs", type=int, default=3)
    p.add_argument("--start", type=int, default=16, help="position of the decode steps")
    p.add_argument("--batches", default="1,4,8", help="batch sizes for aggregate decode")
    p.add_argument("--rounds", type=int, default=20, help="interleaved rounds")
    p.add_argument("--bw-mb", type=int, default=1024, help="bandwidth probe buffer (MiB)")
    p.add_argument("--streams", type=int, default=8, help="read streams per thread in the probe")
    p.add_argument(
        "--embeddings",
        type=int,
        default=0,
        metavar="TOKENS",
        help="measure embeddings/s for inputs of this many tokens instead",
    )
    p.add_argument("--batch", type=int, default=8, help="inputs per step with --embeddings")
    p.add_argument("--kernel", help="force a kernel set (scalar, avx2, avx512vnni, amx)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
