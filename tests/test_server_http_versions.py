"""HTTP framing at the socket (http-api §0): the daemon speaks HTTP/1.1 only, and a request it
cannot frame is a client mistake (400), never a 5xx. Real sockets against the real server; each
test fails on the server that answered 501 and switched to HTTP/2."""

from __future__ import annotations

import json

import httpx
import pytest
import trio
from conftest import server_config


async def _exchange(port: int, request: bytes) -> bytes:
    """Send `request` on a fresh connection and read until the server closes it."""
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    try:
        await stream.send_all(request)
        data = b""
        with trio.fail_after(30):  # a hang guard, not a timing assertion
            while chunk := await stream.receive_some(65536):
                data += chunk
        return data
    finally:
        await stream.aclose()


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"bogus", b"chunked, chunked"])
async def test_a_transfer_encoding_the_server_cannot_decode_is_a_400(server, coding):
    """h11 suggests 501 for a transfer coding other than exactly `chunked`; the request is the
    client's mistake, so the answer is 400, and the connection closes (its framing is lost)."""
    reply = await _exchange(
        server.port,
        b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: " + coding + b"\r\n\r\n" + b'5\r\n{"a":\r\n0\r\n\r\n',
    )
    assert reply.startswith(b"HTTP/1.1 400 "), reply[:80]
    assert b"connection: close" in reply.lower()


async def test_the_http2_prior_knowledge_preface_is_refused_with_505(server):
    reply = await _exchange(server.port, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 505 "), reply[:80]


async def test_an_http2_client_with_prior_knowledge_gets_no_http2_connection(server):
    """httpx with http2 only on an http:// URL sends the preface; the server never answers
    with HTTP/2 frames, so the client fails instead of being served, and the server keeps
    serving HTTP/1.1 clients."""
    async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
        with pytest.raises(httpx.HTTPError):
            await client.get(f"{server.url}/health")
    async with httpx.AsyncClient(timeout=30) as client:
        r = await client.get(f"{server.url}/health")
    assert r.status_code == 200 and r.http_version == "HTTP/1.1"


async def test_an_h2c_upgrade_offer_is_ignored_and_answered_in_http11(server):
    """`Upgrade: h2c` gets no 101: the request is answered as HTTP/1.1 (RFC 9110 §7.8 lets a
    server ignore the offer) and the connection stays usable for the next request."""
    offer = (
        b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
        b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAARAAAAAAAIAAAAA\r\n\r\n"
    )
    last = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    reply = await _exchange(server.port, offer + last)
    assert not reply.startswith(b"HTTP/1.1 101"), reply[:80]
    assert reply.count(b"HTTP/1.1 200 ") == 2, reply
    assert b"upgrade" not in reply.lower()


async def test_the_app_refuses_http2_under_another_server_with_505(server_model_path):
    """Under plain hypercorn (`hypercorn -k trio bitnetd_trio.app:app`), which does serve
    HTTP/2, the application itself answers HTTP/2 requests with 505 and says to use HTTP/1.1."""
    from hypercorn.trio import serve as hypercorn_serve

    from bitnetd_trio.api.asgi import create_app
    from bitnetd_trio.daemon.http_server import hypercorn_config

    config = server_config(server_model_path)
    hc = hypercorn_config(config, binds=["127.0.0.1:0"])
    hc.graceful_timeout = 1.0
    stop = trio.Event()
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(
            lambda task_status: hypercorn_serve(
                create_app(config), hc, shutdown_trigger=stop.wait, task_status=task_status
            )
        )
        url = next(b for b in binds if b.startswith("http://"))
        try:
            async with httpx.AsyncClient(http1=False, http2=True, timeout=30) as client:
                r = await client.get(f"{url}/v1/models")
            assert r.http_version == "HTTP/2"
            assert r.status_code == 505
            error = json.loads(r.content)["error"]
            assert "HTTP/1.1" in error["message"]
            assert error["code"] == "http_version_not_supported"
        finally:
            stop.set()
