"""The import path `hypercorn -k trio bitnetd_trio.app:app` serves.

`app` reads the configuration ($BITNETD_CONFIG, else the defaults and the environment) on first
use, so hypercorn can import this module before anything is configured. The application itself
is `bitnetd_trio.api.asgi.App`.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn

from bitnetd_trio.api.asgi import App, Receive, Scope, Send, create_app
from bitnetd_trio.config import ConfigError, load_config

__all__ = ["app", "create_app"]

log = logging.getLogger("bitnetd.app")


#: Exit status of a worker whose start-up failed (configuration or model), as `bitnetd` uses.
STARTUP_FAILED_EXIT = 2


class _ConfiguredApp:
    """The module-level `app` for `hypercorn -k trio bitnetd_trio.app:app`: reads the
    configuration ($BITNETD_CONFIG, else defaults and the environment) on first use.

    A start-up that fails (a bad configuration, a model that does not load) ends the process
    with one logged line and status 2. Reporting `lifespan.startup.failed` instead would make
    hypercorn print a traceback of its own and exit 0.
    """

    def __init__(self) -> None:
        self._app: App | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._app is None:
            try:
                self._app = create_app(load_config(None, os.environ))
            except ConfigError as exc:
                _exit_startup_failed(str(exc))
        if scope["type"] != "lifespan":
            await self._app(scope, receive, send)
            return

        async def send_or_exit(message: dict) -> None:
            if message["type"] == "lifespan.startup.failed":  # the App has logged why
                _exit_startup_failed(None)
            await send(message)

        await self._app(scope, receive, send_or_exit)


def _exit_startup_failed(reason: str | None) -> NoReturn:
    if reason is not None:
        log.critical("bitnetd: %s", reason)
    logging.shutdown()  # flush: os._exit skips the interpreter's clean-up
    sys.stderr.flush()
    os._exit(STARTUP_FAILED_EXIT)


app = _ConfiguredApp()
