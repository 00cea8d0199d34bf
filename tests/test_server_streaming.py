"""Streaming under stress against a live server: disconnects release the engine sequence,
concurrent streams are batch-invariant, the admission queue answers 503, deadlines hold."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Awaitable, Callable

import httpx
import trio
from conftest import RunningServer, running_server, server_config

from bitnetd_trio.engine.inference import Job
from bitnetd_trio.engine.sampling import SamplingParams

LONG = 16000  # max_tokens of generations meant to be interrupted (the context holds 16384)


async def wait_until(check: Callable[[], Awaitable[bool]], what: str, tries: int = 1000) -> None:
    """Poll `check` (bounded: `tries` times, 10 ms apart) until it is true."""
    for _ in range(tries):
        if await check():
            return
        await trio.sleep(0.01)
    raise AssertionError(f"gave up waiting for {what}")


def request_bytes(path: str, body: dict) -> bytes:
    data = json.dumps(body).encode()
    head = (
        f"POST {path} HTTP/1.1\r\nHost: test\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\n\r\n"
    )
    return head.encode() + data


async def open_stream(
    server: RunningServer, body: dict, path: str = "/v1/chat/completions", events: int = 1
) -> tuple[trio.SocketStream, bytes]:
    """Send a streaming request over a raw socket and read until `events` SSE events came."""
    stream = await trio.open_tcp_stream("127.0.0.1", server.port)
    await stream.send_all(request_bytes(path, body))
    buf = b""
    while buf.count(b"data: ") < events:
        chunk = await stream.receive_some(65536)
        assert chunk, f"server closed early: {buf!r}"
        buf += chunk
    return stream, buf


def long_chat(server: RunningServer, **extra: object) -> dict:
    return {
        "model": server.app.model_id,  # type: ignore[attr-defined]
        "messages": [{"role": "user", "content": "Tell me a long story"}],
        "max_tokens": LONG,
        "ignore_eos": True,
        "stream": True,
        **extra,
    }


async def metric(c: httpx.AsyncClient, name: str) -> float:
    text = (await c.get("/metrics")).text
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
    assert m, name
    return float(m.group(1))


async def all_slots_idle(c: httpx.AsyncClient) -> bool:
    return all(s["state"] == "idle" for s in (await c.get("/slots")).json())


async def test_disconnect_releases_the_slot(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        stream, _ = await open_stream(server, long_chat(server), events=4)
        slots = (await c.get("/slots")).json()
        busy = [s for s in slots if s["state"] == "busy"]
        assert len(busy) == 1 and busy[0]["job_id"]
        await stream.aclose()
        await wait_until(lambda: all_slots_idle(c), "the slot to be released")
        assert await metric(c, "bitnetd_requests_cancelled_total") == 1
        assert await metric(c, "bitnetd_tokens_after_disconnect_total") <= 1
        # the generation was cut short, far from its max_tokens
        assert await metric(c, "bitnetd_tokens_generated_total") < LONG
        # and the server carries on
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


async def test_fifty_disconnects_leave_no_work_behind(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        for i in range(50):
            path = "/v1/chat/completions" if i % 2 else "/v1/completions"
            body = (
                long_chat(server)
                if i % 2
                else {
                    "prompt": "Hello there",
                    "max_tokens": LONG,
                    "ignore_eos": True,
                    "stream": True,
                }
            )
            stream, _ = await open_stream(server, body, path, events=2 + i % 3)
            await stream.aclose()
        await wait_until(lambda: all_slots_idle(c), "every slot to be released")
        assert server.app.engine.in_system == 0  # type: ignore[attr-defined]
        assert await metric(c, "bitnetd_requests_cancelled_total") == 50
        assert await metric(c, "bitnetd_tokens_after_disconnect_total") <= 50
        # far from 50 x LONG: each generation was cut short (the bound leaves room for a slow,
        # loaded machine)
        assert await metric(c, "bitnetd_tokens_generated_total") < 50 * LONG / 16


async def test_disconnect_of_a_whole_response_request(server: RunningServer) -> None:
    body = {**long_chat(server), "stream": False}
    async with httpx.AsyncClient(base_url=server.url) as c:
        stream = await trio.open_tcp_stream("127.0.0.1", server.port)
        await stream.send_all(request_bytes("/v1/chat/completions", body))
        await wait_until(lambda: _any_slot_busy(c), "the request to start")
        await stream.aclose()
        await wait_until(lambda: all_slots_idle(c), "the slot to be released")
        assert await metric(c, "bitnetd_requests_cancelled_total") == 1


async def _any_slot_busy(c: httpx.AsyncClient) -> bool:
    return any(s["state"] == "busy" for s in (await c.get("/slots")).json())


async def collect_stream(c: httpx.AsyncClient, body: dict) -> tuple[str, int]:
    r = await c.post("/v1/chat/completions", json=body)
    assert r.status_code == 200
    text, usage = "", 0
    for line in r.text.split("\n\n"):
        if line.startswith("data: {"):
            chunk = json.loads(line[6:])
            if chunk["choices"]:
                text += chunk["choices"][0]["delta"].get("content", "") or ""
            elif chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
    return text, usage


async def test_eight_concurrent_streams_match_their_solo_runs(server: RunningServer) -> None:
    def body(i: int) -> dict:
        return {
            "model": server.app.model_id,  # type: ignore[attr-defined]
            # prompts up to ~450 tokens: prefilled in chunks beside decoding streams
            "messages": [{"role": "user", "content": f"Story number {i}" + " go" * 64 * i}],
            "max_tokens": 24,
            "ignore_eos": True,
            "seed": 100 + i,
            "temperature": 0.9,
            "stream": True,
            "stream_options": {"include_usage": True},
        }

    async with httpx.AsyncClient(base_url=server.url, timeout=60) as c:
        alone = [await collect_stream(c, body(i)) for i in range(8)]
        together: list[tuple[str, int] | None] = [None] * 8

        async def run(i: int) -> None:
            together[i] = await collect_stream(c, body(i))

        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(run, i)
    assert together == alone
    assert all(n == 24 for _, n in alone)
    assert len({t for t, _ in alone}) > 1  # the seeds do make different texts


async def test_queue_limit_answers_503_with_retry_after(server_model_path) -> None:
    config = server_config(server_model_path, model_parallel=1, server_max_queue=1)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        running, _ = await open_stream(s, long_chat(s), events=2)
        waiting = await trio.open_tcp_stream("127.0.0.1", s.port)
        await waiting.send_all(request_bytes("/v1/chat/completions", long_chat(s)))

        async def queued() -> bool:
            return s.app.engine.in_system == 2  # type: ignore[attr-defined]

        await wait_until(queued, "the second request to wait in the queue")
        r = await c.post("/v1/chat/completions", json={**long_chat(s), "stream": False})
        assert r.status_code == 503
        assert int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "service_unavailable_error"
        await running.aclose()
        await waiting.aclose()

        async def drained() -> bool:
            return s.app.engine.in_system == 0  # type: ignore[attr-defined]

        await wait_until(drained, "both requests to leave")
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 200


async def test_request_timeout(server_model_path) -> None:
    config = server_config(server_model_path, model_parallel=1, server_request_timeout=0.3)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=30) as c:
        # Generating past the deadline: cut off with finish_reason "length".
        r = await c.post(
            "/v1/completions", json={"prompt": "x", "max_tokens": LONG, "ignore_eos": True}
        )
        body = r.json()
        assert r.status_code == 200
        assert body["choices"][0]["finish_reason"] == "length"
        assert 0 < body["usage"]["completion_tokens"] < LONG
        await wait_until(lambda: all_slots_idle(c), "the slot to be released")

        # Waiting in the queue until the deadline, nothing produced: 504. The slot is held by a
        # job submitted to the engine directly (no HTTP deadline applies to it).
        blocker, receiver = await hold_the_only_slot(s, c)
        r = await c.post("/v1/completions", json={"prompt": "y", "max_tokens": 5})
        assert r.status_code == 504
        assert r.json()["error"]["message"]
        blocker.cancel.set()
        await wait_until(lambda: all_slots_idle(c), "the blocking job to leave")
        receiver.close()


async def test_drain_ends_running_streams_cleanly(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        stream, buf = await open_stream(server, long_chat(server), events=3)
        server.app.begin_drain(trio.current_time())  # type: ignore[attr-defined]
        # chunked transfer encoding: the body ends with [DONE] and then the last-chunk marker
        while not (b"data: [DONE]\n\n" in buf and buf.endswith(b"0\r\n\r\n")):
            chunk = await stream.receive_some(65536)
            assert chunk, "the stream must end with [DONE], not be cut"
            buf += chunk
        await stream.aclose()
        finals = [
            json.loads(line[6:]) for line in buf.decode().split("\n") if line.startswith("data: {")
        ]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 503 and "retry-after" in r.headers
        await wait_until(lambda: all_slots_idle(c), "the slot to be released")


async def test_stream_waiting_in_the_queue_gets_keepalives(server_model_path) -> None:
    config = server_config(server_model_path, model_parallel=1)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        s.app.stream_keepalive = 0.05  # type: ignore[attr-defined]
        blocker, receiver = await hold_the_only_slot(s, c)
        body = {**long_chat(s), "max_tokens": 5}
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(request_bytes("/v1/chat/completions", body))
        buf = b""
        while b": ping\n\n" not in buf:  # the stream started and is being kept alive
            chunk = await stream.receive_some(65536)
            assert chunk
            buf += chunk
        assert buf.startswith(b"HTTP/1.1 200")
        blocker.cancel.set()
        while not (b"data: [DONE]\n\n" in buf and buf.endswith(b"0\r\n\r\n")):
            chunk = await stream.receive_some(65536)
            assert chunk
            buf += chunk
        await stream.aclose()
        receiver.close()
        chunks = [
            json.loads(line[6:]) for line in buf.decode().split("\n") if line.startswith("data: {")
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"
        assert sum(1 for ch in chunks if ch["choices"][0]["delta"].get("content")) >= 1


async def test_drain_ends_a_stream_still_waiting_for_its_first_token(server_model_path) -> None:
    """On shutdown a queued stream that never got a token still ends cleanly: HTTP 200, a
    finish chunk with finish_reason and [DONE] (not a 504 error)."""
    config = server_config(server_model_path, model_parallel=1)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        blocker, receiver = await hold_the_only_slot(s, c)
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(request_bytes("/v1/chat/completions", long_chat(s)))
        await wait_until(lambda: _waiting_requests(c), "the stream to wait in the queue")
        s.app.begin_drain(trio.current_time())  # type: ignore[attr-defined]
        buf = b""
        with trio.fail_after(30):
            while not (b"data: [DONE]\n\n" in buf and buf.endswith(b"0\r\n\r\n")):
                chunk = await stream.receive_some(65536)
                assert chunk, f"the stream must end with [DONE], not be cut: {buf!r}"
                buf += chunk
        await stream.aclose()
        blocker.cancel.set()
        receiver.close()
        assert buf.startswith(b"HTTP/1.1 200")
        chunks = [
            json.loads(line[6:]) for line in buf.decode().split("\n") if line.startswith("data: {")
        ]
        assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def _waiting_requests(c: httpx.AsyncClient) -> bool:
    text = (await c.get("/metrics")).text
    return re.search(r"^bitnetd_requests_waiting (\d+)", text, re.MULTILINE).group(1) != "0"  # type: ignore[union-attr]


async def hold_the_only_slot(
    s: RunningServer, c: httpx.AsyncClient
) -> tuple[Job, trio.MemoryReceiveChannel]:
    """Submit a long job straight to the engine (no HTTP deadline applies to it) and wait
    until it occupies a slot; the caller cancels it with `blocker.cancel.set()`."""
    engine = s.app.engine  # type: ignore[attr-defined]
    sink, receiver = trio.open_memory_channel(math.inf)
    blocker = Job(
        prompt=[1, 2, 3],
        params=SamplingParams(seed=1),
        max_tokens=LONG,
        sink=sink,
        ignore_eos=True,
    )
    engine.submit([blocker])
    await wait_until(lambda: _any_slot_busy(c), "the blocking job to start")
    return blocker, receiver
