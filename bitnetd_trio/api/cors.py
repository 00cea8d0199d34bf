"""CORS (http-api §6.1): browser apps on other origins may call the API when `[server]
cors_origins` allows their origin.

Off by default (an empty list). For an allowed origin, every response (streams included) gets
`Access-Control-Allow-Origin` and `Vary: Origin`, and a preflight `OPTIONS` on any route is
answered with 204 and the route's methods, the headers asked for and a max age, before access
checks (browsers never send credentials on a preflight). A preflight from an origin that is not
allowed is 403; without CORS configured, OPTIONS stays what it was (405).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from typing import Any

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import Receive, Responder, Scope, Send, header

log = logging.getLogger("bitnetd.app")

__all__ = ["MAX_AGE", "allowed_origin", "serve_with_cors", "warn_if_open"]

#: Seconds a browser may cache a preflight answer.
MAX_AGE = 600


def allowed_origin(origins: Iterable[str], origin: str | None) -> str | None:
    """The Access-Control-Allow-Origin value for a request's Origin, or None (not allowed)."""
    if origin is None:
        return None
    allowed = list(origins)
    if "*" in allowed:
        return "*"
    return origin if origin in allowed else None


def warn_if_open(origins: Iterable[str], api_keys: Iterable[str]) -> None:
    """Log a warning when any web page may drive the daemon: `*` without an API key."""
    if "*" in list(origins) and not list(api_keys):
        log.warning(
            "[server] cors_origins = * without api_keys: any web page a local user opens can "
            "use this daemon"
        )


def _route_methods(routes: Mapping[str, Any], path: str) -> set[str] | None:
    route = routes.get(path)
    if route is None and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
        return {"GET", "HEAD"}
    if route is None:
        return None
    methods = set(route.methods)
    return methods | {"HEAD"} if "GET" in methods else methods


async def _preflight(
    scope: Scope, send: Send, routes: Mapping[str, Any], allow: str | None
) -> None:
    resp = Responder(send)
    path = scope.get("path", "")
    methods = _route_methods(routes, path)
    if methods is None:
        await resp.send_error(ApiError.route_not_found("OPTIONS", path))
        return
    if allow is None:
        await resp.send_error(ApiError(403, "this origin may not call the API (cors_origins)",
                                       type="permission_error"))
        return
    asked = header(scope, "access-control-request-headers") or ""
    headers = [
        (b"access-control-allow-origin", allow.encode("latin-1")),
        (b"vary", b"Origin"),
        (b"access-control-allow-methods", ", ".join(sorted(methods | {"OPTIONS"})).encode()),
        (b"access-control-max-age", str(MAX_AGE).encode()),
        (b"content-length", b"0"),
    ]
    if asked.strip():
        headers.append((b"access-control-allow-headers", asked.strip().encode("latin-1")))
    await resp.start(204, headers)
    await resp.body(b"")


async def serve_with_cors(
    scope: Scope,
    receive: Receive,
    send: Send,
    origins: list[str],
    routes: Mapping[str, Any],
    inner: Callable[[Scope, Receive, Send], Awaitable[None]],
) -> None:
    """Run `inner` for an HTTP request, adding CORS as `origins` allows."""
    origin = header(scope, "origin")
    if not origins or origin is None:
        await inner(scope, receive, send)
        return
    allow = allowed_origin(origins, origin)
    if scope["method"] == "OPTIONS" and header(scope, "access-control-request-method"):
        await _preflight(scope, send, routes, allow)
        return
    if allow is None:
        await inner(scope, receive, send)
        return
    extra = [(b"access-control-allow-origin", allow.encode("latin-1")), (b"vary", b"Origin"),
             (b"access-control-expose-headers", b"Retry-After")]

    async def send_with_cors(message: dict) -> None:
        if message["type"] == "http.response.start":
            message = {**message, "headers": [*message.get("headers", ()), *extra]}
        await send(message)

    await inner(scope, receive, send_with_cors)
