"""Admission counts sequences, over HTTP with the real engine: `[model] parallel` +
`[server] max_queue` bound prompts x n, not requests."""

from __future__ import annotations

import httpx
import trio
from conftest import poll_until, running_server, server_config


async def test_a_request_for_more_sequences_than_the_daemon_holds_is_a_400(server_model_path):
    """parallel 4 + max_queue 8 hold 12 sequences. 32 prompts x n 8 (256 sequences) would take
    every slot from everyone: 400 naming the limit, before anything is tokenized or queued."""
    config = server_config(server_model_path, model_parallel=4, server_max_queue=8)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        r = await c.post("/v1/completions",
                         json={"prompt": [f"p{i}" for i in range(32)], "n": 8, "max_tokens": 1})
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == "prompt"
        assert "256 sequences" in err["message"] and "at most 12" in err["message"]
        assert "max_queue 8" in err["message"]
        r = await c.post("/v1/completions", json={"prompt": "x", "n": 13, "max_tokens": 1})
        assert r.status_code == 400 and r.json()["error"]["param"] == "n"
        assert s.app.engine.in_system == 0  # type: ignore[attr-defined]

        # exactly parallel + max_queue sequences: admitted, every choice answered
        r = await c.post("/v1/completions",
                         json={"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 2})
        assert r.status_code == 200, r.text
        assert sorted(ch["index"] for ch in r.json()["choices"]) == list(range(12))


async def test_a_request_that_does_not_fit_now_gets_503(server_model_path):
    """With one sequence running, a request for all 12 sequences does not fit now: 503 with
    Retry-After (it would fit in an empty daemon, so it is not a 400)."""
    config = server_config(server_model_path, model_parallel=4, server_max_queue=8)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        stream = await trio.open_tcp_stream("127.0.0.1", s.port)
        body = (b'{"prompt": "x", "max_tokens": 16000, "ignore_eos": true, "stream": true}')
        await stream.send_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        await poll_until(lambda: s.app.engine.in_system == 1,  # type: ignore[attr-defined]
                          "the long request to run")
        r = await c.post("/v1/completions",
                         json={"prompt": ["a", "b", "c"], "n": 4, "max_tokens": 1})
        assert r.status_code == 503, r.text
        assert int(r.headers["retry-after"]) >= 1
        assert "sequences" in r.json()["error"]["message"]
        await stream.aclose()
        await poll_until(lambda: s.app.engine.in_system == 0,  # type: ignore[attr-defined]
                          "the long request to end")
