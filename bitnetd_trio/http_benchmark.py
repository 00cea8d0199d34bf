"""HTTP serving benchmark: tokens/s through the daemon's streaming API against the raw engine.

    python -m bitnetd_trio.http_benchmark [--model FILE | --shape medium] [--tokens 256]
                                          [--threads N] [--clients 1,4,8] [--runs 3]

1. Raw engine, in this process: one sequence, greedy, `Context.forward` + `Sampler` per token
   (no HTTP, no tokenizer): decode tokens/s and time to first token.
2. The daemon (`bitnetd -f` in a child process, on 127.0.0.1) with the same model, threads
   and prompt: one streaming /v1/completions client, decode tokens/s measured between the first
   and the last streamed token, time to first token from sending the request; then 1, 4 and 8
   concurrent streaming clients, aggregate tokens/s = all tokens / wall time.

The ratio HTTP/raw is the cost of the server path (target >= 0.97). A benchmark prints
figures; it asserts nothing.
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

from . import gguf_writer as gw

#: A shape with real work per token (about 1/8 of the 2B model's layer width), tiny vocabulary.
MEDIUM = gw.ModelShape(n_vocab=gw.TINY_VOCAB_SIZE, n_embd=1024, n_head=16, n_head_kv=4,
                       n_ff=2816, n_layer=8, n_ctx=2048)
SHAPES = {"tiny": dataclasses.replace(gw.TINY, n_ctx=2048), "medium": MEDIUM, "full": gw.FULL_2B4T}


def model_for(shape_name: str) -> Path:
    path = gw.cache_dir() / f"bench-{shape_name}.gguf"
    if not path.is_file():
        print(f"writing the {shape_name} benchmark model to {path} ...", flush=True)
        tmp = path.with_suffix(".tmp")
        gw.write_model(tmp, SHAPES[shape_name], seed=5,
                       vocab="llama3" if shape_name == "full" else "tiny")
        os.replace(tmp, path)
    return path


def prompt_ids(n: int, n_vocab: int) -> list[int]:
    return [(17 + 31 * i) % min(n_vocab, 256) + 1 for i in range(n)]


# ---- raw engine ----------------------------------------------------------------------------


def bench_raw(model_path: Path, prompt: list[int], n_tokens: int, threads: int,
              batch: int = 1) -> tuple[float, float]:
    """(decode tokens/s over all sequences, time to first token) of the bare engine."""
    from . import engine
    from .sampling import Sampler, SamplingParams

    model = engine.Model.load(model_path)
    ctx = engine.Context(model, batch, len(prompt) + n_tokens + 8, threads)
    try:
        samplers = [Sampler(SamplingParams(temperature=0.0), model.hparams.n_vocab)
                    for _ in range(batch)]
        t0 = time.perf_counter()
        ctx.forward([engine.BatchEntry(s, prompt, "last", None) for s in range(batch)])
        tokens = [ctx.sample(s, samplers[s]) for s in range(batch)]
        t_first = time.perf_counter()
        for _ in range(n_tokens - 1):
            ctx.forward([engine.BatchEntry(s, [tokens[s]], "last", None) for s in range(batch)])
            for s in range(batch):
                samplers[s].accept(tokens[s])
                tokens[s] = ctx.sample(s, samplers[s])
        t_end = time.perf_counter()
        return batch * (n_tokens - 1) / (t_end - t_first), t_first - t0
    finally:
        ctx.close()
        model.close()


# ---- the daemon over HTTP ------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_daemon(model_path: Path, threads: int, parallel: int, n_ctx: int,
                 workdir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    conf = workdir / "bench.conf"
    conf.write_text(
        "[model]\n"
        f"path = {model_path}\nthreads = {threads}\nparallel = {parallel}\nctx_size = {n_ctx}\n"
        "[server]\n"
        f"listen = 127.0.0.1:{port}\nmax_queue = 64\nrequest_timeout = 3600\n"
    )
    log = open(workdir / "bitnetd.log", "wb")  # noqa: SIM115 - lives as long as the child
    proc = subprocess.Popen([sys.executable, "-m", "bitnetd_trio.cli", "-f", "-c", str(conf)],
                            stdout=log, stderr=subprocess.STDOUT)
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


async def stream_once(client: httpx.AsyncClient, prompt: list[int], n_tokens: int
                      ) -> StreamResult:
    body = {"prompt": prompt, "max_tokens": n_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = 0.0
    tokens = 0
    async with client.stream("POST", "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            now = time.perf_counter()
            if chunk["choices"] and chunk["choices"][0]["text"]:
                if not first:
                    first = now
                last = now
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return StreamResult(sent, first, last, tokens)


async def bench_http(url: str, prompt: list[int], n_tokens: int, clients: list[int],
                     runs: int) -> tuple[list[StreamResult], dict[int, float]]:
    async with httpx.AsyncClient(base_url=url, timeout=3600,
                                 limits=httpx.Limits(max_connections=64)) as c:
        await stream_once(c, prompt, 8)  # warm-up
        singles = [await stream_once(c, prompt, n_tokens) for _ in range(runs)]
        aggregate: dict[int, float] = {}
        for n in clients:
            results: list[StreamResult] = []

            async def one() -> None:
                results.append(await stream_once(c, prompt, n_tokens))

            start = time.perf_counter()
            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(one)
            wall = time.perf_counter() - start
            aggregate[n] = sum(r.tokens for r in results) / wall
        return singles, aggregate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bitnetd-http-benchmark", description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, help="a GGUF file (default: a generated model)")
    p.add_argument("--shape", choices=sorted(SHAPES), default="medium",
                   help="shape of the generated model (default: medium)")
    p.add_argument("--tokens", type=int, default=256, help="tokens generated per request")
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--clients", default="1,4,8", help="concurrent streaming clients")
    p.add_argument("--runs", type=int, default=3, help="single-stream runs (median reported)")
    args = p.parse_args(argv)
    clients = [int(x) for x in args.clients.split(",") if x]
    model_path = args.model or model_for(args.shape)

    from . import engine

    m = engine.Model.load(model_path)
    n_vocab, n_params = m.hparams.n_vocab, m.hparams.n_params
    m.close()
    prompt = prompt_ids(args.prompt_tokens, n_vocab)
    print(f"model {model_path} ({n_params:,} params), kernel {engine.kernel_name()}, "
          f"threads {args.threads}, prompt {len(prompt)} tokens, {args.tokens} generated")

    raw = [bench_raw(model_path, prompt, args.tokens, args.threads) for _ in range(args.runs)]
    raw_rate = statistics.median(r[0] for r in raw)
    raw_ttft = statistics.median(r[1] for r in raw)
    raw_batched = {n: bench_raw(model_path, prompt, args.tokens, args.threads, batch=n)[0]
                   for n in clients if n > 1}

    with tempfile.TemporaryDirectory(prefix="bitnetd-bench-") as tmp:
        proc, url = start_daemon(model_path, args.threads, max(clients),
                                 len(prompt) + args.tokens + 16, Path(tmp))
        try:
            singles, aggregate = trio.run(bench_http, url, prompt, args.tokens, clients,
                                          args.runs)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()

    http_rate = statistics.median(r.decode_rate for r in singles)
    http_ttft = statistics.median(r.ttft for r in singles)
    print()
    print(f"{'':32}{'raw engine':>14}{'HTTP stream':>14}{'ratio':>8}")
    print(f"{'decode tokens/s, 1 sequence':32}{raw_rate:14.1f}{http_rate:14.1f}"
          f"{http_rate / raw_rate:8.3f}")
    print(f"{'time to first token, ms':32}{raw_ttft * 1e3:14.1f}{http_ttft * 1e3:14.1f}")
    for n in clients:
        raw_n = raw_batched.get(n, raw_rate)
        print(f"{f'aggregate tokens/s, {n} clients':32}{raw_n:14.1f}{aggregate[n]:14.1f}"
              f"{aggregate[n] / raw_n:8.3f}")
    print("\n(raw aggregate = one engine batch of n sequences, decode only; HTTP aggregate = all "
          "tokens / wall time, prefill included)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
