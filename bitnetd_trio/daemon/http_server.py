"""The HTTP server: hypercorn's HTTP/1.1 connection handling on Trio, behind our own accept loop.

hypercorn's `serve()` accepts every connection the kernel hands it. Ours takes a connection
only while fewer than `[server] max_open_connections` are open: beyond that, new connections
wait in the listen backlog, so a flood of idle or half-sent connections costs a bounded amount
of memory. `[server] header_timeout` becomes hypercorn's keep-alive timer, which runs from the
moment a connection opens (or its last response ends) until a complete request head has
arrived: a client trickling header lines is cut off after it, as is an idle kept-alive one.

Shared by the daemon's lifecycle and the tests, which start the same server on port 0.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from bitnetd_trio.config import Config

__all__ = ["ConnectionSlots", "hypercorn_config", "serve"]


def hypercorn_config(config: Config, binds: Sequence[str] | None = None) -> HypercornConfig:
    """hypercorn's Config for our [server] section (`binds` overrides listen/unix_socket)."""
    hc = HypercornConfig()
    if binds is None:
        binds = list(config.server.listen)
        if config.server.unix_socket:
            binds.append(f"unix:{config.server.unix_socket}")
    hc.bind = list(binds)
    hc.backlog = config.server.backlog
    hc.startup_timeout = 3600.0  # a large model takes a while to map and check
    hc.graceful_timeout = config.server.drain_timeout
    hc.keep_alive_timeout = config.server.header_timeout
    hc.h11_max_incomplete_size = 64 * 1024
    hc.include_server_header = False
    # Our own setting, read by serve(); hypercorn's Config has no such key.
    hc.max_open_connections = config.server.max_open_connections
    return hc


class ConnectionSlots:
    """A place for each open client connection; `accept` waits for a free one."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._free = trio.Semaphore(limit)

    @property
    def in_use(self) -> int:
        return self.limit - self._free.value

    async def take(self) -> None:
        await self._free.acquire()

    def give_back(self) -> None:
        self._free.release()


class _SlotListener(trio.abc.Listener[trio.SocketStream]):
    """A socket listener that accepts only while a connection slot is free."""

    def __init__(self, sock: Any, slots: ConnectionSlots) -> None:
        self._inner = trio.SocketListener(trio.socket.from_stdlib_socket(sock))
        self._slots = slots

    async def accept(self) -> trio.SocketStream:
        await self._slots.take()
        try:
            return await self._inner.accept()
        except BaseException:
            self._slots.give_back()
            raise

    async def aclose(self) -> None:
        await self._inner.aclose()


class _EndOnEof:
    """A connection stream that ends its handler soon after the client closes its side.

    hypercorn treats end-of-file as a disconnect but keeps the connection's task until its
    keep-alive timer runs out; that would hold a connection place `header_timeout` long for
    every client that connects and closes.
    """

    #: Time the handler keeps after end-of-file, to close its side cleanly.
    GRACE = 1.0

    def __init__(self, stream: trio.SocketStream, scope: trio.CancelScope) -> None:
        self._stream = stream
        self._scope = scope

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def receive_some(self, max_bytes: int | None = None) -> bytes | bytearray:
        data = await self._stream.receive_some(max_bytes)
        if not data:
            self._scope.deadline = min(self._scope.deadline, trio.current_time() + self.GRACE)
        return data


async def serve(
    app: Any,
    hc: HypercornConfig,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `app` until `shutdown_trigger` returns; `task_status` gets the bound URLs.

    Order of events: lifespan startup (the model loads), listen, serve; on shutdown stop
    accepting, let open connections finish for `hc.graceful_timeout`, then lifespan shutdown.
    """
    started = trio.Event()  # the application said lifespan.startup.complete

    async def app_noting_startup(scope: dict, receive: Any, send: Any) -> None:
        async def send_noting(message: dict) -> None:
            await send(message)
            if message["type"] == "lifespan.startup.complete":
                started.set()

        await app(scope, receive, send_noting if scope["type"] == "lifespan" else send)

    wrapped = wrap_app(app_noting_startup, hc.wsgi_max_body_size, "asgi")
    lifespan_state: dict[str, Any] = {}
    lifespan = Lifespan(wrapped, hc, lifespan_state)
    slots = ConnectionSlots(getattr(hc, "max_open_connections", 1024))
    context = WorkerContext(None)

    async def handle(stream: trio.SocketStream) -> None:
        try:
            with trio.CancelScope() as scope:
                state = ConnectionState(lifespan_state.copy())
                await TCPServer(wrapped, hc, context, state, _EndOnEof(stream, scope))
        finally:
            slots.give_back()

    async with trio.open_nursery() as lifespan_nursery:
        await lifespan_nursery.start(lifespan.handle_lifespan)
        await lifespan.wait_for_startup()
        if lifespan.supported and not started.is_set():
            # A failed startup also ends the wait; its error is on the way and cancels this
            # nursery. Nothing may listen, and task_status must not say "started", meanwhile.
            await trio.sleep_forever()
        sockets = hc.create_sockets()
        listeners = []
        urls = []
        for sock in sockets.insecure_sockets:
            sock.listen(hc.backlog)
            listeners.append(_SlotListener(sock, slots))
            urls.append(f"http://{repr_socket_addr(sock.family, sock.getsockname())}")
        async with trio.open_nursery() as connections:
            async with trio.open_nursery() as accepting:
                accepting.start_soon(
                    partial(trio.serve_listeners, handle, listeners, handler_nursery=connections)
                )
                task_status.started(urls)
                await (shutdown_trigger or trio.sleep_forever)()
                accepting.cancel_scope.cancel()
            # Kept-alive idle connections close when the context says the server terminates;
            # requests still running get the grace period.
            await context.terminated.set()
            deadline = hc.graceful_timeout if hc.graceful_timeout is not None else math.inf
            connections.cancel_scope.deadline = trio.current_time() + deadline
        await lifespan.wait_for_shutdown()
        lifespan_nursery.cancel_scope.cancel()
