"""The HTTP server: hypercorn's HTTP/1.1 connection handling on Trio, behind our own accept loop.

hypercorn's `serve()` accepts every connection the kernel hands it. Ours takes a connection
only while fewer than `[server] max_open_connections` are open: beyond that, new connections
wait in the listen backlog, so a flood of idle or half-sent connections costs a bounded amount
of memory. `[server] header_timeout` becomes hypercorn's keep-alive timer, which runs from the
moment a connection opens (or its last response ends) until a complete request head has
arrived: a client trickling header lines is cut off after it, as is an idle kept-alive one.

The daemon speaks HTTP/1.1 only (http-api §0). hypercorn would switch a connection to HTTP/2 on
an `Upgrade: h2c` request or on the prior-knowledge preface `PRI * HTTP/2.0`; our connections
parse requests with `_Http11Connection`, which ignores the h2c upgrade offer and refuses any
request line whose HTTP major version is not 1 with 505. It also answers a Transfer-Encoding h11
cannot decode with 400 instead of h11's suggested 501: such a request is a client mistake.

With `[server] tls_cert` and `tls_key`, every TCP listener speaks https: its accepted streams
are wrapped in `trio.SSLStream` (ALPN offers HTTP/1.1 only); hypercorn's connection handler
does the handshake itself. Unix sockets stay plain.

Shared by the daemon's lifecycle and the tests, which start the same server on port 0.
"""

from __future__ import annotations

import math
import socket
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import Any

import h11
import trio
from hypercorn.config import Config as HypercornConfig
from hypercorn.protocol import ProtocolWrapper
from hypercorn.protocol.h11 import H11Protocol
from hypercorn.trio.lifespan import Lifespan
from hypercorn.trio.tcp_server import TCPServer
from hypercorn.trio.worker_context import WorkerContext
from hypercorn.typing import ConnectionState
from hypercorn.utils import repr_socket_addr, wrap_app

from bitnetd_trio.config import Config
from bitnetd_trio.config_values import tls_context

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
    # Ours too: the TLS context of the TCP listeners (None: plain http).
    srv = config.server
    hc.tls_context = tls_context(srv.tls_cert, srv.tls_key) if srv.tls_cert and srv.tls_key else None
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


class _Http11Connection(h11.Connection):
    """h11's server side, with the daemon's answers to requests it will not serve as HTTP/1.1.

    hypercorn answers a `RemoteProtocolError` from `next_event` with an empty response of the
    error's `error_status_hint` and closes the connection; it switches to HTTP/2 when a request
    it gets carries `Upgrade: h2c` (and no body) or is the preface `PRI * HTTP/2.0`. Both
    decisions are made on what this class returns, so adapting them here needs no other change
    to hypercorn's protocol code.
    """

    def next_event(self) -> Any:
        try:
            event = super().next_event()
        except h11.RemoteProtocolError as exc:
            # h11 suggests 501 only for a Transfer-Encoding other than exactly "chunked"
            # ("gzip, chunked", "bogus", two such headers): the client sent a request the
            # daemon cannot frame, a 400 like any other malformed request (http-api §1.4:
            # a client mistake is never a 5xx).
            if exc.error_status_hint == 501:
                exc.error_status_hint = 400
            raise
        if not isinstance(event, h11.Request):
            return event
        if not event.http_version.startswith(b"1."):
            # `PRI * HTTP/2.0` (HTTP/2 with prior knowledge) or any other major version:
            # refused before hypercorn could treat it as an HTTP/2 preface.
            raise h11.RemoteProtocolError(
                f"HTTP/{event.http_version.decode('ascii', 'replace')} is not supported: "
                "use HTTP/1.1",
                error_status_hint=505,
            )
        if _offers_h2c(event):
            # RFC 9110 §7.8: a server may ignore an upgrade offer and answer in HTTP/1.1.
            # Without the header hypercorn serves the request as the HTTP/1.1 request it is;
            # h11 sees our ordinary response as the refusal of the offer.
            event = h11.Request(
                method=event.method,
                target=event.target,
                http_version=event.http_version,
                headers=[
                    (name, value)
                    for name, value in event.headers.raw_items()
                    if name.lower() != b"upgrade"
                ],
            )
        return event


def _offers_h2c(request: h11.Request) -> bool:
    """Whether an `Upgrade` header of the request offers h2c (HTTP/2 over cleartext)."""
    return any(
        name == b"upgrade" and b"h2c" in (t.strip().lower() for t in value.split(b","))
        for name, value in request.headers
    )


class _Http11Server(TCPServer):
    """hypercorn's connection handler, parsing HTTP/1.1 with `_Http11Connection`.

    `TCPServer.run` builds the connection's protocol wrapper and assigns it to `self.protocol`
    before it reads a byte; this property swaps the fresh h11 connection for ours at that
    moment. Without TLS there is no ALPN, so the wrapper always starts with its H11Protocol.
    (The tests of http-api §0 fail if a new hypercorn stops going through here.)
    """

    @property  # type: ignore[override]
    def protocol(self) -> ProtocolWrapper:
        return self._protocol_wrapper

    @protocol.setter
    def protocol(self, wrapper: ProtocolWrapper) -> None:
        inner = wrapper.protocol
        if isinstance(inner, H11Protocol):
            inner.connection = _Http11Connection(
                h11.SERVER, max_incomplete_event_size=self.config.h11_max_incomplete_size
            )
        self._protocol_wrapper = wrapper


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
                await _Http11Server(wrapped, hc, context, state, _EndOnEof(stream, scope))
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
        listeners: list[trio.abc.Listener[Any]] = []
        urls = []
        tls = getattr(hc, "tls_context", None)
        for sock in sockets.insecure_sockets:
            sock.listen(hc.backlog)
            listener: trio.abc.Listener[Any] = _SlotListener(sock, slots)
            scheme = "http"
            if tls is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
                listener = trio.SSLListener(listener, tls, https_compatible=True)
                scheme = "https"
            listeners.append(listener)
            urls.append(f"{scheme}://{repr_socket_addr(sock.family, sock.getsockname())}")
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
