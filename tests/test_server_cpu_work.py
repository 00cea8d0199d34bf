"""Work that grows with the request (JSON parsing, chat templates, tokenizing) runs in worker
threads, not on the Trio thread, so one large prompt cannot stall every other request. Shown by
order of events, not by timings: the tokenizer's encode is held inside its worker thread until
the test has seen /health answered; on the Trio thread it could not be."""

from __future__ import annotations

import json
import threading

import httpx
import trio
from conftest import poll_until, running_server, server_config

from bitnetd_trio.api.cpu_work import INLINE_BYTES

LARGE = 1_000_000  # characters of prompt: a body just under the default max_body_size (1 MiB)


class HeldEncode:
    """Wraps a tokenizer's encode: records the thread of each large call and, while `hold` is
    on, keeps that call waiting until the test releases it (at most `guard` seconds)."""

    def __init__(self, tokenizer: object, guard: float = 30.0) -> None:
        self._real = tokenizer.encode  # type: ignore[attr-defined]
        self.threads: list[int] = []
        self.started = threading.Event()
        self.release = threading.Event()
        self.released_in_time: list[bool] = []
        self.finished = threading.Event()
        self._guard = guard

    def __call__(self, text: str, **kw: object) -> list[int]:
        if len(text) < INLINE_BYTES:
            return self._real(text, **kw)
        self.threads.append(threading.get_ident())
        self.started.set()
        self.released_in_time.append(self.release.wait(self._guard))
        try:
            return self._real(text, **kw)
        finally:
            self.finished.set()


async def _until(event: threading.Event) -> None:
    await trio.to_thread.run_sync(event.wait, 30)
    assert event.is_set()


async def test_health_is_answered_while_a_large_prompt_is_tokenized(server_model_path):
    async with running_server(server_config(server_model_path)) as s:
        held = HeldEncode(s.app.engine.tokenizer)  # type: ignore[attr-defined]
        s.app.engine.tokenizer.encode = held  # type: ignore[attr-defined]
        trio_thread = threading.get_ident()
        prompt = " ".join(["word"] * (LARGE // 5))
        order: list[str] = []
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:

            async def big_request() -> None:
                r = await c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 1})
                order.append(f"large request answered {r.status_code}")

            async with trio.open_nursery() as nursery:
                nursery.start_soon(big_request)
                await _until(held.started)
                order.append("tokenizing")
                for _ in range(3):
                    r = await c.get("/health")
                    order.append(f"health {r.status_code}")
                assert not held.finished.is_set()
                held.release.set()
        assert held.threads and all(t != trio_thread for t in held.threads)
        assert held.released_in_time == [True]
        # the prompt is longer than the context: a 400 after its tokens were counted
        assert order == ["tokenizing", "health 200", "health 200", "health 200",
                         "large request answered 400"]


async def test_tokenize_and_apply_template_run_off_the_trio_thread(server_model_path):
    async with running_server(server_config(server_model_path)) as s:
        held = HeldEncode(s.app.engine.tokenizer)  # type: ignore[attr-defined]
        held.release.set()  # record only
        s.app.engine.tokenizer.encode = held  # type: ignore[attr-defined]
        text = "some text " * 20_000
        async with httpx.AsyncClient(base_url=s.url, timeout=60) as c:
            r = await c.post("/tokenize", json={"content": text})
            assert r.status_code == 200 and len(r.json()["tokens"]) > 1000
            r = await c.post("/v1/chat/completions",
                             json={"messages": [{"role": "user", "content": text}],
                                   "max_tokens": 1})
            # longer than the context: refused once its tokens were counted
            assert r.status_code == 400, r.text
            assert r.json()["error"]["code"] == "context_length_exceeded"
        assert len(held.threads) == 2
        assert threading.get_ident() not in held.threads


async def test_a_client_leaving_during_tokenization_leaves_no_job(server_model_path):
    """The request ends as soon as its client leaves, while its prompt is still being
    tokenized; the tokenization, abandoned, finishes in its thread and submits nothing."""
    async with running_server(server_config(server_model_path)) as s:
        app = s.app
        held = HeldEncode(app.engine.tokenizer)  # type: ignore[attr-defined]
        app.engine.tokenizer.encode = held  # type: ignore[attr-defined]
        cancelled_before = app.metrics.requests_cancelled_total._value.get()  # type: ignore
        body = json.dumps({"prompt": "word " * 50_000, "max_tokens": 5}).encode()
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        await stream.send_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await _until(held.started)
        await stream.aclose()  # the client leaves while its prompt is tokenized
        # the request ends, its tokenization still held
        await poll_until(lambda: app.metrics.active_connections._value.get() == 0,  # type: ignore
                         "the request to end")
        assert not held.finished.is_set()
        assert app.metrics.requests_cancelled_total._value.get() == cancelled_before + 1  # type: ignore
        held.release.set()
        await _until(held.finished)
        # the abandoned thread gives its limiter place back when it ends
        await poll_until(lambda: app.cpu.limiter.borrowed_tokens == 0,  # type: ignore
                         "the abandoned thread to end")
        assert app.engine.in_system == 0  # type: ignore[attr-defined]
        assert all(not slot.busy and slot.n_past == 0
                   for slot in app.engine.snapshot_slots())  # type: ignore[attr-defined]
