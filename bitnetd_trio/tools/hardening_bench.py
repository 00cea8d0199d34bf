"""Hardening benchmark: how the daemon holds up against idle connections, huge prompts and
keyless clients.

    python -m bitnetd_trio.tools.hardening_bench [--package-root DIR] [--seconds 10]
                                                 [--connections 4000]

Starts `bitnetd -f` (tools/http_benchmark.start_daemon) on a free port with a generated tiny
model, API key "bench-key" and `max_connections` 8, then prints:

1. the daemon's RSS before and after opening N idle TCP connections, and after closing them;
2. the median and worst /health latency while two clients send 1 MB prompts in a loop;
3. the success rate of one authenticated client calling GET /v1/models while ten keyless
   clients send request heads with `Content-Length: 100` and no body, reconnecting.

`--package-root` runs another checkout (an older one too: its command line at
bitnetd_trio.cli), for before/after figures. A benchmark prints figures; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import resource
import socket
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import httpx
import trio

from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.tools.http_benchmark import start_daemon

KEY = "bench-key"
MAX_CONNECTIONS = 8  # fewer places than the keyless flood has clients
PROMPT_BYTES = 1_000_000  # the body stays under the default max_body_size (1 MiB)


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def raise_open_file_limit(needed: int) -> int:
    """Soft RLIMIT_NOFILE up to the hard limit (the daemon inherits it); the limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, needed)
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def idle_connections(pid: int, port: int, count: int) -> None:
    """RSS around `count` idle connections (non-blocking connects: beyond the daemon's accept
    limit they wait in the kernel's backlog or retry their SYN)."""
    before = rss_mib(pid)
    socks = []
    for _ in range(count):
        s = socket.socket()
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
        socks.append(s)
    time.sleep(3.0)
    opened = rss_mib(pid)
    for s in socks:
        s.close()
    time.sleep(3.0)
    closed = rss_mib(pid)
    print(f"RSS with {count} idle connections: before {before:.1f} MiB, open {opened:.1f} MiB "
          f"(+{opened - before:.1f}), after closing {closed:.1f} MiB")


async def health_under_large_prompts(url: str, seconds: float) -> None:
    words = ("lorem ipsum dolor sit amet consectetur adipiscing elit " * (PROMPT_BYTES // 50))
    body = json.dumps({"prompt": words[: PROMPT_BYTES - 100], "max_tokens": 1}).encode()
    headers = {"authorization": f"Bearer {KEY}", "content-type": "application/json"}
    latencies: list[float] = []
    large_done = 0
    end = time.monotonic() + seconds

    async def sender(client: httpx.AsyncClient) -> None:
        nonlocal large_done
        while time.monotonic() < end:
            await client.post("/v1/completions", content=body, headers=headers)
            large_done += 1

    async with httpx.AsyncClient(base_url=url, timeout=120) as c1, \
            httpx.AsyncClient(base_url=url, timeout=120) as c2, \
            httpx.AsyncClient(base_url=url, timeout=120) as probe:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(sender, c1)
            nursery.start_soon(sender, c2)
            while time.monotonic() < end:
                t0 = time.monotonic()
                await probe.get("/health")
                latencies.append(time.monotonic() - t0)
                await trio.sleep(0.01)
    print(f"/health during 2 clients sending 1 MB prompts for {seconds:g} s: "
          f"median {statistics.median(latencies) * 1000:.1f} ms, "
          f"worst {max(latencies) * 1000:.1f} ms ({len(latencies)} probes, "
          f"{large_done} large requests answered)")


async def keyless_flood(url: str, port: int, seconds: float) -> None:
    head = (b"POST /v1/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n")
    end = time.monotonic() + seconds
    refused = 0
    outcomes: list[int] = []

    async def keyless() -> None:
        nonlocal refused
        while time.monotonic() < end:
            try:
                stream = await trio.open_tcp_stream("127.0.0.1", port)
                await stream.send_all(head)
                with trio.move_on_after(max(0.0, end - time.monotonic())):
                    while await stream.receive_some(65536):
                        pass
                await stream.aclose()
                refused += 1
            except OSError:
                await trio.sleep(0.01)

    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(keyless)
            while time.monotonic() < end:
                try:
                    r = await client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"})
                    outcomes.append(r.status_code)
                except httpx.HTTPError:
                    outcomes.append(0)
                await trio.sleep(0.02)
    ok = sum(1 for s in outcomes if s == 200)
    print(f"authenticated GET /v1/models under a 10-client keyless flood for {seconds:g} s: "
          f"{ok}/{len(outcomes)} succeeded ({100 * ok / max(1, len(outcomes)):.0f}%; "
          f"statuses {sorted(set(outcomes))}), {refused} keyless connections ended")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--package-root", type=Path, help="run the daemon from this checkout")
    p.add_argument("--seconds", type=float, default=10.0, help="length of phases 2 and 3")
    p.add_argument("--connections", type=int, default=4000, help="idle connections in phase 1")
    args = p.parse_args(argv)
    limit = raise_open_file_limit(args.connections + 256)
    connections = min(args.connections, limit - 256)
    with tempfile.TemporaryDirectory(prefix="hardening-bench-") as tmp:
        model = gw.write_model(Path(tmp) / "tiny.gguf", gw.TINY, seed=5)
        extra = f"api_keys = {KEY}\nmax_connections = {MAX_CONNECTIONS}\n"
        proc, url = start_daemon(model, 2, 4, 4096, Path(tmp), server_extra=extra,
                                 package_root=args.package_root)
        port = int(url.rsplit(":", 1)[1])
        print(f"daemon from {args.package_root or 'this checkout'}, pid {proc.pid}, {url}, "
              f"max_connections {MAX_CONNECTIONS}, open file limit {limit}")
        try:
            idle_connections(proc.pid, port, connections)
            trio.run(health_under_large_prompts, url, args.seconds)
            trio.run(keyless_flood, url, port, args.seconds)
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
