"""Hostile or unusual clients at the HTTP level: withheld bodies, keyless floods, oversized
stop strings, a logit_bias banning everything, HEAD, timeouts counted, pipelining after early
errors. Each test fails without the fix it guards."""

from __future__ import annotations

import httpx
import trio
from conftest import poll_until, running_server, server_config

KEY = "hostile-test-key"
AUTH = {"authorization": f"Bearer {KEY}"}
WITHHELD = (
    b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 100\r\n\r\n"
)


def _gauge(app: object, name: str) -> float:
    return getattr(app.metrics, name)._value.get()  # type: ignore[attr-defined]


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk


async def test_a_withheld_body_ends_with_408_and_frees_the_request(server_model_path):
    """Headers sent, body never completed (slowloris): body_timeout (not the much longer
    request_timeout) answers 408 and closes, instead of holding the request forever."""
    config = server_config(server_model_path, server_body_timeout=0.5,
                           server_request_timeout=600.0)
    async with running_server(config) as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        await stream.send_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b'Content-Length: 100\r\n\r\n{"prompt":'
        )
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            reply = await _read_until_closed(stream)
        await stream.aclose()
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"timeout_error" in reply
        assert srv.app._active_requests == 0


async def test_keyless_clients_never_lock_out_key_holders(server_model_path):
    """Ten keyless clients send headers announcing a body they never send, reconnecting in a
    loop. Each is refused with 401 at once (Connection: close, no wait for the body) and takes
    no max_connections place, so every authenticated request meanwhile succeeds."""
    config = server_config(server_model_path, server_max_connections=2, server_api_keys=[KEY])
    refused = 0
    replies_without_close: list[bytes] = []
    stop = trio.Event()

    async def keyless(port: int) -> None:
        nonlocal refused
        while not stop.is_set():
            stream = await trio.open_tcp_stream("127.0.0.1", port)
            await stream.send_all(WITHHELD)
            with trio.fail_after(30):  # a hang guard, not a timing assertion
                reply = await _read_until_closed(stream)
            await stream.aclose()
            assert reply.startswith(b"HTTP/1.1 401 "), reply[:200]
            if b"\r\nconnection: close\r\n" not in reply.lower():
                replies_without_close.append(reply)
            refused += 1

    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=30) as c:
        async with trio.open_nursery() as nursery:
            for _ in range(10):
                nursery.start_soon(keyless, s.port)
            await poll_until(lambda: refused >= 20, "the keyless flood to be under way")
            statuses = []
            for i in range(20):
                body = {"prompt": f"x {i}", "max_tokens": 1}
                statuses.append((await c.post("/v1/completions", json=body, headers=AUTH))
                                .status_code)
                statuses.append((await c.get("/v1/models", headers=AUTH)).status_code)
            refused_meanwhile = refused
            stop.set()
        assert statuses == [200] * 40
        assert refused_meanwhile > 40  # the flood went on during the authenticated requests
        assert not replies_without_close
        assert s.app._active_requests == 0  # type: ignore[attr-defined]


async def test_withheld_bodies_hold_no_place_and_get_408_after_body_timeout(server_model_path):
    """max_connections + 1 clients send their headers and withhold the body: they take no
    place while the body is awaited, so a normal request meanwhile succeeds; after
    body_timeout (not request_timeout) each gets 408 with Connection: close."""
    config = server_config(server_model_path, server_max_connections=2,
                           server_body_timeout=1.0, server_request_timeout=600.0)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=30) as c:
        withholding = []
        for _ in range(3):
            stream = await trio.open_tcp_stream("127.0.0.1", s.port)
            await stream.send_all(WITHHELD + b'{"prompt":')
            withholding.append(stream)
        # all three are inside the application, reading their bodies, holding no place
        await poll_until(lambda: _gauge(s.app, "active_connections") == 3,
                          "the three requests to arrive")
        assert s.app._active_requests == 0  # type: ignore[attr-defined]
        r = await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1})
        assert r.status_code == 200
        for stream in withholding:
            with trio.fail_after(30):  # a hang guard (request_timeout is 600 s)
                reply = await _read_until_closed(stream)
            await stream.aclose()
            assert reply.startswith(b"HTTP/1.1 408 "), reply[:200]
            assert b"\r\nconnection: close\r\n" in reply.lower()
            assert b"timeout_error" in reply and b"within 1 s" in reply


def test_a_stop_string_longer_than_the_limit_is_a_400_naming_it():
    """The stop matcher's per-token work grows with the stop strings' length (on the inference
    thread, holding the GIL): a request may not make it unbounded."""
    import pytest

    from bitnetd_trio.api import schema as api_schema
    from bitnetd_trio.api.dialects.llamacpp_completion import parse_llama_completion
    from bitnetd_trio.api.dialects.openai_completions import parse_completion
    from bitnetd_trio.api.errors import ApiError

    defaults = api_schema.SchemaDefaults()
    limit = api_schema.MAX_STOP_CHARS
    ok = parse_completion({"prompt": "hi", "stop": ["x" * limit]}, defaults)
    assert ok.stop == ["x" * limit]
    for stop, param in ((["ab", "a" * 20000 + "b"], "stop[1]"), ("a" * 20000, "stop")):
        with pytest.raises(ApiError) as info:
            parse_completion({"prompt": "hi", "stop": stop}, defaults)
        assert info.value.status == 400 and info.value.param == param
        with pytest.raises(ApiError):
            parse_llama_completion({"prompt": "hi", "stop": stop}, defaults)


async def test_a_logit_bias_banning_every_token_is_a_client_error(server_model_path):
    """A client mistake is a 4xx, never a 5xx: banning the whole vocabulary (false biases,
    or every other token with ignore_eos) used to come back as a 500 from the sampler."""
    import httpx

    async with (
        running_server(server_config(server_model_path)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=60) as client,
    ):
        n_vocab = srv.app.engine.info.hparams.n_vocab
        stop_ids = srv.app.engine.tokenizer.stop_ids
        everything = [[i, False] for i in range(n_vocab)]
        all_but_stops = [[i, False] for i in range(n_vocab) if i not in stop_ids]
        for body in (
            {"prompt": "hi", "n_predict": 3, "logit_bias": everything},
            {"prompt": "hi", "n_predict": 3, "logit_bias": all_but_stops, "ignore_eos": True},
        ):
            r = await client.post("/completion", json=body)
            assert r.status_code == 400, r.text
            assert r.json()["error"]["param"] == "logit_bias"
        # banning all but the stop tokens without ignore_eos is fine: it stops at once
        r = await client.post(
            "/completion", json={"prompt": "hi", "n_predict": 3, "logit_bias": all_but_stops}
        )
        assert r.status_code == 200, r.text


async def test_head_works_wherever_get_does(server_model_path):
    """RFC 9110: a server supporting GET supports HEAD (same status and headers, no body);
    405 answers list HEAD beside GET."""
    import httpx

    async with (
        running_server(server_config(server_model_path)) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=60) as client,
    ):
        for path in ("/v1/models", "/props", "/metrics", "/health"):
            get = await client.get(path)
            head = await client.head(path)
            assert head.status_code == get.status_code == 200, path
            assert head.content == b""
            assert head.headers["content-type"] == get.headers["content-type"]
        r = await client.delete("/v1/models")
        assert r.status_code == 405
        assert r.headers["allow"] == "GET, HEAD"


async def test_every_timed_out_generation_counts_as_cancelled(server_model_path):
    """bitnetd_requests_cancelled_total counts requests whose time ran out, including those
    answered 504 because nothing was produced (they left through an exception before)."""
    import httpx

    config = server_config(server_model_path, server_request_timeout=0.3, model_parallel=1)
    async with (
        running_server(config) as srv,
        httpx.AsyncClient(base_url=srv.url, timeout=60) as client,
    ):
        a_id = (await client.post("/tokenize", json={"content": "a"})).json()["tokens"][-1]
        body = {"prompt": "hello", "max_tokens": 16000, "logit_bias": {str(a_id): 100}}
        replies: list[httpx.Response] = []

        async def one() -> None:
            replies.append(await client.post("/v1/completions", json=body))

        # one slot, four never-ending requests submitted together: those still waiting
        # when their time runs out get 504, the one running ends with "length"
        async with trio.open_nursery() as nursery:
            for _ in range(4):
                nursery.start_soon(one)
        timed_out = 0
        for r in replies:
            if r.status_code == 504:
                timed_out += 1
            else:
                assert r.status_code == 200, r.text
                if r.json()["usage"]["completion_tokens"] < 16000:
                    timed_out += 1
        assert any(r.status_code == 504 for r in replies)
        while srv.app._active_requests:  # handlers finish just after their last byte
            await trio.sleep(0.01)
        cancelled = srv.app.metrics.registry.get_sample_value("bitnetd_requests_cancelled_total")
        assert cancelled == timed_out


async def test_pipelined_request_after_an_early_error_is_answered(server) -> None:
    """A POST refused before its body is read (unknown route, wrong method, bad content type),
    with the client's next request already sent on the same connection: the refused body is
    consumed, both requests get their answer, and the connection stays usable."""
    early_errors = [
        (b"POST /no-such-route HTTP/1.1\r\n", b"application/json", b"404"),
        (b"POST /health HTTP/1.1\r\n", b"application/json", b"405"),
        (b"POST /v1/completions HTTP/1.1\r\n", b"application/xml", b"415"),
    ]
    for _ in range(10):
        for request_line, content_type, status in early_errors:
            stream = await trio.open_tcp_stream("127.0.0.1", server.port)
            body = b'{"prompt": "x"}'
            await stream.send_all(
                request_line
                + b"Host: t\r\nContent-Type: "
                + content_type
                + b"\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
                + b"GET /health HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n"
            )
            with trio.fail_after(10):
                got = await _read_until_closed(stream)
            assert got.startswith(b"HTTP/1.1 " + status), got[:200]
            assert got.count(b"HTTP/1.1 ") == 2 and b"HTTP/1.1 200" in got, got
