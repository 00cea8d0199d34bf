"""hypercorn on Trio, configured from our [server] section.

Shared by the daemon's lifecycle and the tests, which start the same server on port 0.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio

from bitnetd_trio.config import Config

__all__ = ["hypercorn_config", "serve"]


def hypercorn_config(config: Config, binds: Sequence[str] | None = None) -> object:
    """hypercorn's Config for our [server] section (`binds` overrides listen/unix_socket)."""
    from hypercorn.config import Config as HypercornConfig

    hc = HypercornConfig()
    if binds is None:
        binds = list(config.server.listen)
        if config.server.unix_socket:
            binds.append(f"unix:{config.server.unix_socket}")
    hc.bind = list(binds)
    hc.backlog = config.server.backlog
    hc.startup_timeout = 3600.0  # a large model takes a while to map and check
    hc.graceful_timeout = config.server.drain_timeout
    hc.keep_alive_timeout = 75.0
    hc.h11_max_incomplete_size = 64 * 1024
    hc.include_server_header = False
    return hc


async def serve(app: object, hc: object,
                shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
                task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
    """Run hypercorn on Trio until `shutdown_trigger` returns."""
    from hypercorn.trio import serve as hypercorn_serve

    await hypercorn_serve(app, hc, shutdown_trigger=shutdown_trigger,  # type: ignore[arg-type]
                          task_status=task_status)
