"""Limits enforced where connections are accepted (daemon/http_server.py), over real sockets:
`[server] max_open_connections` and `[server] header_timeout`."""

from __future__ import annotations

import trio
from conftest import running_server, server_config

REQUEST = b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


async def _connect(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream("127.0.0.1", port)


async def _answer(stream: trio.SocketStream) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        data += chunk
    return data


async def test_connections_beyond_the_limit_wait_for_a_free_place(server_model_path):
    config = server_config(server_model_path, server_max_open_connections=4,
                           server_header_timeout=60.0)
    async with running_server(config) as s:
        idle = [await _connect(s.port) for _ in range(4)]  # every place taken, nothing sent
        await trio.sleep(0.2)
        late = await _connect(s.port)  # the kernel's backlog takes it; the server does not
        await late.send_all(REQUEST)
        with trio.move_on_after(1.0) as waited:
            await _answer(late)
        assert waited.cancelled_caught, "a connection beyond max_open_connections was served"
        await idle.pop().aclose()  # a place frees up: the waiting connection is taken soon
        with trio.fail_after(5):
            head = await _answer(late)
        assert head.startswith(b"HTTP/1.1 200")
        for stream in [*idle, late]:
            await stream.aclose()


async def test_a_client_trickling_its_header_is_cut_off(server_model_path):
    config = server_config(server_model_path, server_header_timeout=1.0)
    async with running_server(config) as s:
        stream = await _connect(s.port)
        await stream.send_all(b"GET /health HTTP/1.1\r\n")
        closed = False
        with trio.fail_after(15):
            for i in range(100):  # one header line every 0.25 s: never a complete head
                try:
                    await stream.send_all(b"X-Slow-%d: 1\r\n" % i)
                except trio.BrokenResourceError:
                    closed = True
                    break
                with trio.move_on_after(0.25):
                    if await stream.receive_some(4096) == b"":
                        closed = True
                        break
        assert closed  # within the 15 s above; the lines would have gone on for 25 s
        await stream.aclose()


async def test_an_idle_kept_alive_connection_is_closed_after_header_timeout(server_model_path):
    config = server_config(server_model_path, server_header_timeout=1.0)
    async with running_server(config) as s:
        stream = await _connect(s.port)
        await stream.send_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await _answer(stream)).startswith(b"HTTP/1.1 200")
        with trio.fail_after(10):
            while await stream.receive_some(4096) != b"":
                pass
        await stream.aclose()
