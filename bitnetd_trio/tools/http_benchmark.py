"""HTTP serving benchmark: tokens/s through the daemon's streaming API against the raw engine.

    python -m bitnetd_trio.tools.http_benchmark [--model FILE | --shape medium] [--tokens 256]
                                          [--threads N] [--clients 1,4,8] [--runs 3]

1. Raw engine, in this process: one sequence, greedy, `Context.forward` + `Sampler` per token
   (no HTTP, no tokenizer): decode tokens/s and time to first token.
2. The daemon (`bitnetd -f` in a child process, on 127.0.0.1) with the same model, threads
   and prompt: one streaming /v1/completions client, decode tokens/s measured between the first
   and the last streamed token, time to first token from sending the request; then 1, 4 and 8
   concurrent streaming clients, aggregate tokens/s = all tokens / wall time, against one
   engine batch of as many sequences (prompt processing included on both sides).

The ratio HTTP/raw is the cost of the server path (target >= 0.97). A benchmark prints
figures; it asserts nothing.

With `--constrained`, the comparison is instead, in the same daemon and run: streams whose
output is constrained by a `json_schema` response_format (one long string field, so the
grammar never ends early) against unconstrained streams, at each `--clients` concurrency
(e.g. `--clients 1,8`), in interleaved rounds (`--runs`): the per-token cost of constrained
decoding as the median of the per-round ratios (target >= 0.95). Use `--model` with a file of
the real vocabulary (`bitnetd-write-model --preset full --vocab llama3`): the mask's cost
grows with the vocabulary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import trio

from bitnetd_trio.engine import gguf_writer as gw

#: A shape with real work per token (about 1/8 of the 2B model's layer width), tiny vocabulary.
MEDIUM = gw.ModelShape(
    n_vocab=gw.TINY_VOCAB_SIZE,
    n_embd=1024,
    n_head=16,
    n_head_kv=4,
    n_ff=2816,
    n_layer=8,
    n_ctx=2048,
)
#: The 2B model's layer width (so the same per-layer cost) with 6 of its 30 layers.
LARGE = dataclasses.replace(gw.FULL_2B4T, n_vocab=gw.TINY_VOCAB_SIZE, n_layer=6, n_ctx=2048)
SHAPES = {
    "tiny": dataclasses.replace(gw.TINY, n_ctx=2048),
    "medium": MEDIUM,
    "large": LARGE,
    "full": gw.FULL_2B4T,
}


def model_for(shape_name: str) -> Path:
    path = gw.cache_dir() / f"bench-{shape_name}.gguf"
    if not path.is_file():
        print(f"writing the {shape_name} benchmark model to {path} ...", flush=True)
        tmp = path.with_suffix(".tmp")
        # the tiny vocabulary, padded to the shape's n_vocab: the same head cost as the real
        # one, without needing the Llama-3 tokenizer files
        gw.write_model(tmp, SHAPES[shape_name], seed=5, vocab="tiny")
        os.replace(tmp, path)
    return path


def prompt_ids(n: int, n_vocab: int) -> list[int]:
    return [(17 + 31 * i) % min(n_vocab, 256) + 1 for i in range(n)]


def letter_bias(model: object) -> dict[int, float]:
    """A logit bias toward the one-letter tokens a-z and space, used on both sides: random
    weights would otherwise often pick tokens without text (padding, control), and a stream
    only carries tokens that have text."""
    from bitnetd_trio.engine.tokenizer import Tokenizer

    tok = Tokenizer.from_model(model)
    ids = {
        t
        for ch in "abcdefghijklmnopqrstuvwxyz "
        for t in tok.encode(ch, add_bos=False, parse_special=False)
    }
    return {i: 30.0 for i in sorted(ids)}


# ---- raw engine ----------------------------------------------------------------------------


class RawEngine:
    """The bare engine on the benchmark's model: Context.forward + Sampler, nothing else."""

    def __init__(self, model_path: Path, n_ctx: int, threads: int, max_batch: int) -> None:
        from bitnetd_trio.engine import native as engine
        self.engine = engine
        self.model = engine.Model.load(model_path)
        self.ctx = engine.Context(self.model, max_batch, n_ctx, threads)

    def run(
        self, prompt: list[int], n_tokens: int, bias: dict[int, float], batch: int = 1
    ) -> tuple[float, float, float]:
        """For `batch` sequences: (decode tokens/s over all of them, time to first token,
        all tokens / total time including the prompt)."""
        from bitnetd_trio.engine.sampling import Sampler, SamplingParams

        e, ctx = self.engine, self.ctx
        for s in range(batch):
            ctx.reset(s)
        samplers = [
            Sampler(SamplingParams(temperature=0.0, logit_bias=bias), self.model.hparams.n_vocab)
            for _ in range(batch)
        ]
        t0 = time.perf_counter()
        ctx.forward([e.BatchEntry(s, prompt, "last", None) for s in range(batch)])
        tokens = [ctx.sample(s, samplers[s]) for s in range(batch)]
        t_first = time.perf_counter()
        for _ in range(n_tokens - 1):
            ctx.forward([e.BatchEntry(s, [tokens[s]], "last", None) for s in range(batch)])
            for s in range(batch):
                samplers[s].accept(tokens[s])
                tokens[s] = ctx.sample(s, samplers[s])
        t_end = time.perf_counter()
        return (
            batch * (n_tokens - 1) / (t_end - t_first),
            t_first - t0,
            batch * n_tokens / (t_end - t0),
        )

    def close(self) -> None:
        self.ctx.close()
        self.model.close()


# ---- the daemon over HTTP ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(
    model_path: Path,
    threads: int,
    parallel: int,
    n_ctx: int,
    workdir: Path,
    *,
    server_extra: str = "",
    package_root: Path | None = None,
) -> tuple[subprocess.Popen, str]:
    """`bitnetd -f` on a free port of 127.0.0.1, once it answers /health. `server_extra`: more
    [server] lines; `package_root`: another checkout to run (default: this program's own)."""
    port = free_port()
    conf = workdir / "bench.conf"
    conf.write_text(
        "[model]\n"
        f"path = {model_path}\nthreads = {threads}\nparallel = {parallel}\nctx_size = {n_ctx}\n"
        "[server]\n"
        f"listen = 127.0.0.1:{port}\nmax_queue = 64\nrequest_timeout = 3600\n{server_extra}"
    )
    log = open(workdir / "bitnetd.log", "wb")  # noqa: SIM115 - lives as long as the child
    env = dict(os.environ)  # the same package as this program, installed or not
    root = package_root or Path(__file__).resolve().parents[2]
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(root), env.get("PYTHONPATH")]))
    # checkouts from before the package was layered have the command line at bitnetd_trio.cli
    layered = (root / "bitnetd_trio" / "daemon" / "cli.py").exists()
    cli = "bitnetd_trio.daemon.cli" if layered else "bitnetd_trio.cli"
    proc = subprocess.Popen(
        [sys.executable, "-m", cli, "-f", "-c", str(conf)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=workdir,  # python -m puts the working directory first on sys.path: not ours
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"bitnetd exited with {proc.returncode}; see {workdir}/bitnetd.log")
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    proc.kill()
    raise SystemExit("bitnetd did not become ready")


@dataclasses.dataclass
class StreamResult:
    sent: float
    first: float  # first streamed token
    last: float
    tokens: int

    @property
    def ttft(self) -> float:
        return self.first - self.sent

    @property
    def decode_rate(self) -> float:
        return (self.tokens - 1) / (self.last - self.first) if self.last > self.first else 0.0


#: The constrained runs' schema: one string, which the letter bias keeps open to the end.
BENCH_SCHEMA = {
    "type": "object",
    "properties": {"text": {"type": "string"}},
    "required": ["text"],
    "additionalProperties": False,
}


async def stream_once(
    url: str, prompt: list[int], n_tokens: int, bias: dict[int, float],
    constrained: bool = False,
) -> StreamResult:
    """One streaming /v1/completions request over a plain socket.

    A deliberately lean client (no HTTP library, JSON parsed only for the usage chunk): on a
    small machine the client shares the CPU with the server, and its cost is not the server's.
    """
    # cache_prompt off: every request processes its whole prompt, as the raw run does
    fields = {
        "prompt": prompt,
        "max_tokens": n_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "cache_prompt": False,
        "logit_bias": {str(k): v for k, v in bias.items()},
        "stream_options": {"include_usage": True},
    }
    if constrained:
        fields["response_format"] = {
            "type": "json_schema", "json_schema": {"name": "bench", "schema": BENCH_SCHEMA}}
    body = json.dumps(fields).encode()
    host, port = url.removeprefix("http://").rsplit(":", 1)
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: "
        f"application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n"
        "\r\n"
    ).encode() + body
    stream = await trio.open_tcp_stream(host, int(port))
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    buf = b""
    async with stream:
        await stream.send_all(request)
        while True:
            data = await stream.receive_some(1 << 16)
            if not data:
                break
            now = time.perf_counter()
            buf += data
            # whole events only; chunked-encoding size lines fall between events
            cut = buf.rfind(b"\n\n")
            if cut < 0:
                continue
            events, buf = buf[: cut + 2], buf[cut + 2 :]
            if b'"text":"' in events.replace(b'"text":""', b""):
                if not first:
                    first = now
                last = now
            u = events.find(b'"completion_tokens":')
            if u >= 0:
                tokens = int(events[u + 20 :].split(b",", 1)[0])
            if b"data: [DONE]" in events:
                break
    return StreamResult(sent, first, last, tokens)


async def stream_many(
    url: str, prompt: list[int], n_tokens: int, bias: dict[int, float], n: int,
    constrained: bool = False,
) -> float:
    """Aggregate tokens/s of n concurrent streams (all tokens / wall time)."""
    results: list[StreamResult] = []

    async def one() -> None:
        results.append(await stream_once(url, prompt, n_tokens, bias, constrained))

    start = time.perf_counter()
    async with trio.open_nursery() as nursery:
        for _ in range(n):
            nursery.start_soon(one)
    return sum(r.tokens for r in results) / (time.perf_counter() - start)


@dataclasses.dataclass
class Figures:
    raw_rate: list[float] = dataclasses.field(default_factory=list)
    raw_ttft: list[float] = dataclasses.field(default_factory=list)
    http_rate: list[float] = dataclasses.field(default_factory=list)
    http_ttft: list[float] = dataclasses.field(default_factory=list)
    raw_batched: dict[int, list[float]] = dataclasses.field(default_factory=dict)
    http_aggregate: dict[int, list[float]] = dataclasses.field(default_factory=dict)


async def measure(
    url: str,
    raw: RawEngine,
    prompt: list[int],
    n_tokens: int,
    bias: dict[int, float],
    clients: list[int],
    runs: int,
) -> Figures:
    """Raw and HTTP runs alternate, so a change in background load hits both alike."""
    f = Figures()
    raw.run(prompt, 8, bias)  # warm-up: first touch of the weights and the thread pool
    await stream_once(url, prompt, 8, bias)
    for _ in range(runs):
        rate, ttft, _ = raw.run(prompt, n_tokens, bias)
        f.raw_rate.append(rate)
        f.raw_ttft.append(ttft)
        r = await stream_once(url, prompt, n_tokens, bias)
        f.http_rate.append(r.decode_rate)
        f.http_ttft.append(r.ttft)
    for n in clients:
        for _ in range(max(1, runs // 2)):
            f.raw_batched.setdefault(n, []).append(raw.run(prompt, n_tokens, bias, batch=n)[2])
            f.http_aggregate.setdefault(n, []).append(
                await stream_many(url, prompt, n_tokens, bias, n)
            )
    return f


async def measure_constrained(
    url: str, prompt: list[int], n_tokens: int, bias: dict[int, float], clients: list[int],
    runs: int,
) -> dict[int, list[tuple[float, float]]]:
    """Unconstrained and json_schema-constrained streams in the same daemon, interleaved at
    the finest grain: every round runs, for each concurrency n, four runs of n streams back
    to back, free-constrained-constrained-free (constrained-free-free-constrained in every
    other round), so a drift in the machine's speed within a round cancels out and favours
    neither side. Returns per n the (free, constrained) tokens/s of each round (the mean of
    its two runs of each): for n = 1 the decode rate between the first and the last streamed
    token, for n > 1 the aggregate (all tokens / wall time, prompts included)."""
    out: dict[int, list[tuple[float, float]]] = {}
    await stream_once(url, prompt, 8, bias)  # warm-up, and the grammar compiler's first use
    await stream_once(url, prompt, 8, bias, constrained=True)

    async def rate(n: int, constrained: bool) -> float:
        if n == 1:
            return (await stream_once(url, prompt, n_tokens, bias, constrained)).decode_rate
        return await stream_many(url, prompt, n_tokens, bias, n, constrained)

    for r in range(runs):
        for n in clients:
            order = (True, False, False, True) if r % 2 else (False, True, True, False)
            got: dict[bool, list[float]] = {False: [], True: []}
            for constrained in order:
                got[constrained].append(await rate(n, constrained))
            free, con = statistics.fmean(got[False]), statistics.fmean(got[True])
            out.setdefault(n, []).append((free, con))
            print(f"  round {r + 1}: {n} stream{'s' if n > 1 else ''}: free {free:.1f}, "
                  f"json_schema {con:.1f} tokens/s, ratio {con / free:.3f}", flush=True)
    return out


def report_constrained(figs: dict[int, list[tuple[float, float]]], runs: int) -> None:
    med = statistics.median
    print()
    print(f"{'':30}{'free':>8}{'json_schema':>13}{'ratio':>8}   per-round ratios")
    for n, pairs in figs.items():
        label = "1 stream decode" if n == 1 else f"{n} streams aggregate"
        free = [f for f, _ in pairs]
        con = [c for _, c in pairs]
        ratios = sorted(c / f for f, c in pairs)
        shown = " ".join(f"{x:.2f}" for x in ratios)
        print(f"{label + ' tokens/s':30}{med(free):8.1f}{med(con):13.1f}{med(ratios):8.3f}"
              f"   [{shown}]")
    print(f"\n{runs} interleaved rounds (each ABBA: free, json_schema, json_schema, free, or "
          "the reverse); medians;\nratio: median of the per-round ratios json_schema / free "
          "(target >= 0.95).\n1 stream: decode tokens/s "
          "between the first and the last streamed token; n streams: all tokens / wall time, "
          "prompts included.")


def report(f: Figures, clients: list[int], runs: int) -> None:
    """Median and best (least disturbed) figures: on a shared machine other work only ever
    slows a run down, so the best runs are the cleanest comparison."""
    med = statistics.median
    print()
    print(
        f"{'':32}{'raw engine':>12}{'HTTP stream':>13}{'ratio':>7}   "
        f"{'best raw':>9}{'best HTTP':>10}{'ratio':>7}"
    )

    def row(label: str, raw: list[float], http: list[float], fmt: str = "12.1f") -> None:
        print(
            f"{label:32}{med(raw):{fmt}}{med(http):13.1f}{med(http) / med(raw):7.3f}   "
            f"{max(raw):9.1f}{max(http):10.1f}{max(http) / max(raw):7.3f}"
        )

    row("decode tokens/s, 1 sequence", f.raw_rate, f.http_rate)
    print(
        f"{'time to first token, ms':32}{med(f.raw_ttft) * 1e3:12.1f}"
        f"{med(f.http_ttft) * 1e3:13.1f}{'':7}   {min(f.raw_ttft) * 1e3:9.1f}"
        f"{min(f.http_ttft) * 1e3:10.1f}"
    )
    for n in clients:
        row(f"aggregate tokens/s, {n} clients", f.raw_batched[n], f.http_aggregate[n])
    print(
        f"\n{runs} alternating raw/HTTP runs (aggregates: {max(1, runs // 2)}). Aggregate: all "
        "tokens / wall time, prompts included\n(raw: one engine batch of n sequences). "
        "TTFT: prompt + first token (HTTP: from sending the request)."
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitnetd-http-benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a GGUF file (default: a generated model)")
    p.add_argument(
        "--shape",
        choices=sorted(SHAPES),
        default="medium",
        help="shape of the generated model (default: medium)",
    )
    p.add_argument("--tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--clients", default="1,4,8", help="concurrent streaming clients")
    p.add_argument("--runs", type=int, default=3, help="single-stream runs (median reported)")
    p.add_argument("--constrained", action="store_true",
                   help="compare json_schema-constrained streams with free ones instead")
    args = p.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",") if x]
    model_path = args.model or model_for(args.shape)

    from bitnetd_trio.engine import native as engine
    m = engine.Model.load(model_path)
    n_vocab, n_params = m.hparams.n_vocab, m.hparams.n_params
    bias = letter_bias(m)
    m.close()
    prompt = prompt_ids(args.prompt_tokens, n_vocab)
    print(
        f"model {model_path} ({n_params:,} params), kernel {engine.kernel_name()}, "
        f"threads {args.threads}, prompt {len(prompt)} tokens, {args.tokens} generated"
    )

    n_ctx = len(prompt) + args.tokens + 16

    def with_daemon(measure_fn, *measure_args):  # noqa: ANN001, ANN202
        with tempfile.TemporaryDirectory(prefix="bitnetd-bench-") as tmp:
            proc, url = start_daemon(model_path, args.threads, max(clients), n_ctx, Path(tmp))
            try:
                return trio.run(measure_fn, url, *measure_args)
            finally:
                proc.terminate()
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    if args.constrained:
        figs = with_daemon(measure_constrained, prompt, args.tokens, bias, clients, args.runs)
        report_constrained(figs, args.runs)
        return 0
    raw = RawEngine(model_path, n_ctx, args.threads, max(clients))
    try:
        f = with_daemon(measure, raw, prompt, args.tokens, bias, clients, args.runs)
    finally:
        raw.close()

    report(f, clients, args.runs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
