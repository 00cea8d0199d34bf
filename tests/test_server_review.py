"""Hostile-client regressions found in review: each test fails without its fix."""

from __future__ import annotations

import trio
from conftest import running_server, server_config


async def _read_until_closed(stream: trio.SocketStream) -> bytes:
    data = b""
    while True:
        chunk = await stream.receive_some(65536)
        if not chunk:
            return data
        data += chunk


async def test_a_withheld_body_ends_with_408_and_frees_the_request(server_model_path):
    """Headers sent, body never completed (slowloris): request_timeout answers 408 and closes,
    instead of holding the request (and a max_connections place) forever."""
    config = server_config(server_model_path, server_request_timeout=0.5)
    async with running_server(config) as srv:
        stream = await trio.open_tcp_stream("127.0.0.1", srv.port)
        await stream.send_all(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100\r\n\r\n{\"prompt\":"
        )
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            reply = await _read_until_closed(stream)
        await stream.aclose()
        assert reply.startswith(b"HTTP/1.1 408 ")
        assert b"timeout_error" in reply
        assert srv.app._active_requests == 0


def test_a_stop_string_longer_than_the_limit_is_a_400_naming_it():
    """The stop matcher's per-token work grows with the stop strings' length (on the inference
    thread, holding the GIL): a request may not make it unbounded."""
    import pytest

    from bitnetd_trio import api_schema
    from bitnetd_trio.errors import ApiError

    defaults = api_schema.SchemaDefaults()
    limit = api_schema.MAX_STOP_CHARS
    ok = api_schema.parse_completion({"prompt": "hi", "stop": ["x" * limit]}, defaults)
    assert ok.stop == ["x" * limit]
    for stop, param in ((["ab", "a" * 20000 + "b"], "stop[1]"), ("a" * 20000, "stop")):
        with pytest.raises(ApiError) as info:
            api_schema.parse_completion({"prompt": "hi", "stop": stop}, defaults)
        assert info.value.status == 400 and info.value.param == param
        with pytest.raises(ApiError):
            api_schema.parse_llama_completion({"prompt": "hi", "stop": stop}, defaults)
