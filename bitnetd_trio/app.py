"""The import path `hypercorn -k trio bitnetd_trio.app:app` serves.

`app` reads the configuration ($BITNETD_CONFIG, else the defaults and the environment) on first
use, so hypercorn can import this module before anything is configured. The application itself
is `bitnetd_trio.api.asgi.App`.
"""

from __future__ import annotations

import logging
import os

from bitnetd_trio.api.asgi import App, Receive, Responder, Scope, Send, create_app
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.config import ConfigError, load_config

__all__ = ["app", "create_app"]

log = logging.getLogger("bitnetd.app")


class _ConfiguredApp:
    """The module-level `app` for `hypercorn -k trio bitnetd_trio.app:app`: reads the
    configuration ($BITNETD_CONFIG, else defaults and the environment) on first use."""

    def __init__(self) -> None:
        self._app: App | None = None
        self._error: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None and self._error is None:
            try:
                self._app = create_app(load_config(None, os.environ))
            except ConfigError as exc:
                self._error = str(exc)
                log.error("%s", exc)
        if self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "lifespan":
            await receive()
            await send({"type": "lifespan.startup.failed", "message": self._error or ""})
        elif scope["type"] == "http":
            err = ApiError(500, f"configuration error: {self._error}")
            await Responder(send).send_error(err)


app = _ConfiguredApp()
