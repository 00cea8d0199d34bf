"""The chat page at `/` (http-api §6.3): one static HTML file with its script and styles,
package data in `bitnetd_trio/api/web/`.

Served only when `[server] web_ui` is true; when it is not set, only when some TCP listener is a
loopback address (a page on a private machine, not one on the network by surprise). The page
needs no API key; it calls /v1/models and /v1/chat/completions like every other client, and
asks for the key when one of those answers 401.
"""

from __future__ import annotations

import functools
import ipaddress
from importlib import resources

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import Request
from bitnetd_trio.api.serving import ServingApp
from bitnetd_trio.config import ServerConfig, split_listen_address

__all__ = ["page", "page_bytes", "web_ui_enabled"]

# The page's own script and styles are inline; nothing else may load or be framed.
_HEADERS = [
    (b"content-type", b"text/html; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (
        b"content-security-policy",
        b"default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
        b"connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        b"frame-ancestors 'none'",
    ),
]


def _is_loopback(address: str) -> bool:
    try:
        host, _port = split_listen_address(address)
    except ValueError:
        return False
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def web_ui_enabled(server: ServerConfig) -> bool:
    """`[server] web_ui`, or when unset: whether a TCP listener is a loopback address."""
    if server.web_ui is not None:
        return server.web_ui
    return any(_is_loopback(a) for a in server.listen)


@functools.cache
def page_bytes() -> bytes:
    """The page (read once from the package)."""
    return resources.files("bitnetd_trio.api").joinpath("web/index.html").read_bytes()


async def page(app: ServingApp, req: Request) -> None:
    """GET / : the chat page, or 404 when the page is off."""
    if not web_ui_enabled(app.config.server):
        raise ApiError.route_not_found(req.scope["method"], req.scope.get("path", ""))
    data = page_bytes()
    await req.resp.start(200, [*_HEADERS, (b"content-length", str(len(data)).encode())])
    await req.resp.body(data)
