"""HTTP plumbing of the raw ASGI application: the ASGI callable types, the sender of one
response, a routed request, the body reader, the disconnect watcher and header helpers.

Disconnects: once a request body is read, every later `receive()` can only return
`http.disconnect`, so a watcher task blocked on it cancels the handler's scope (and, through
the handler's callback, sets its jobs' cancel flags: the engine drops those sequences before
their next step). A request is marked complete before its final send, because hypercorn may
report the disconnect during that send.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import trio

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import parse_json_body
from bitnetd_trio.api.sse import json_bytes

__all__ = [
    "ClientGone",
    "DisconnectWatch",
    "Receive",
    "Request",
    "Responder",
    "Scope",
    "Send",
    "bearer_token",
    "header",
    "read_body",
]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


def header(scope: Scope, name: str) -> str | None:
    """The first value of request header `name` (any case), or None."""
    key = name.lower().encode("latin-1")
    for k, v in scope.get("headers", ()):
        if k == key:
            return v.decode("latin-1")
    return None


def bearer_token(scope: Scope) -> str | None:
    """The API key a client sent: `Authorization: Bearer <key>` or `X-Api-Key: <key>`,
    whichever comes first; None for neither (or another Authorization scheme)."""
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            text = v.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
        if k == b"x-api-key":
            return v.decode("latin-1").strip()
    return None


class Responder:
    """Sends one HTTP response; remembers its status and error type for the metrics."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.status = 0
        self.error_type: str | None = None
        # the error body of the route's API (Anthropic's differs from OpenAI's envelope)
        self.error_body: Callable[[ApiError], dict] = ApiError.envelope

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """Send the status line and headers."""
        self.status = status
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        """Send body bytes; the last call (more=False) ends the response."""
        if not more:
            self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def send_json(
        self,
        status: int,
        obj: Any,
        headers: dict[str, str] | None = None,
        before_final: Callable[[], None] | None = None,
    ) -> None:
        """A whole JSON response; `before_final` runs between the headers and the body."""
        await self.send_json_data(status, json_bytes(obj), headers, before_final)

    async def send_json_data(
        self,
        status: int,
        data: bytes,
        headers: dict[str, str] | None = None,
        before_final: Callable[[], None] | None = None,
    ) -> None:
        """`send_json` with the body already encoded (large bodies are encoded off the Trio
        thread)."""
        hdrs = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        for k, v in (headers or {}).items():
            hdrs.append((k.lower().encode("latin-1"), v.encode("latin-1")))
        await self.start(status, hdrs)
        if before_final is not None:
            before_final()
        await self.body(data)

    async def send_error(
        self, exc: ApiError, before_final: Callable[[], None] | None = None
    ) -> None:
        """The error envelope of `exc` with its status and headers."""
        self.error_type = exc.type
        await self.send_json(exc.status, self.error_body(exc), exc.headers, before_final)

    async def send_text(self, status: int, data: bytes, content_type: str) -> None:
        """A whole response of another content type (the metrics exposition)."""
        await self.start(
            status,
            [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(data)).encode()),
            ],
        )
        await self.body(data)


@dataclass
class Request:
    """A routed request whose body has been read."""

    scope: Scope
    receive: Receive
    resp: Responder
    body: bytes = b""
    path_params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        """The first value of request header `name`, or None."""
        return header(self.scope, name)

    def json(self) -> dict:
        """The body as a JSON object (ApiError 400 if it is not one)."""
        return parse_json_body(self.body)


async def read_body(receive: Receive, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    """The whole request body, counting bytes as they arrive (413 beyond `limit`)."""
    for k, v in headers:
        if k == b"content-length":
            try:
                declared = int(v)
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
            if declared > limit:
                raise ApiError.body_too_large(limit)
    parts: list[bytes] = []
    total = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise ApiError.body_too_large(limit)
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


class DisconnectWatch:
    """Cancels the handler's scope when the client disconnects (see the module docstring)."""

    def __init__(self, on_disconnect: Callable[[], None]) -> None:
        self.completed = False  # set before the final send: a disconnect then is not an error
        self.disconnected = False
        self._on_disconnect = on_disconnect

    async def run(self, receive: Receive, body: Callable[[], Awaitable[None]]) -> None:
        """Run `body` while watching `receive` for the client's disconnect."""
        error: Exception | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        if not self.completed:
                            self.disconnected = True
                            self._on_disconnect()
                            nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                await body()
            except Exception as exc:  # noqa: BLE001 - re-raised below, not wrapped in a group
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error
