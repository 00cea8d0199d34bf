"""`bitnetd [-c FILE] [-f] [-t] [-v]`: the daemon's command line.

main() parses the arguments, loads the configuration and hands over to lifecycle.py, which
runs the server (foreground or daemon mode, signals, sd_notify) or, with -t, only checks.
hypercorn_config() and serve() are shared by lifecycle.py and the tests.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence

import trio

from . import __version__
from .config import Config, load_config
from .errors import ConfigError

log = logging.getLogger("bitnetd")

__all__ = ["hypercorn_config", "load_or_report", "main", "parse_args", "serve"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="bitnetd",
        description="Serve a BitNet b1.58 model over an OpenAI-compatible HTTP API.",
    )
    p.add_argument("-c", "--config", metavar="FILE",
                   help="configuration file (default: $BITNETD_CONFIG, else built-in defaults)")
    p.add_argument("-f", "--foreground", action="store_true",
                   help="stay in the foreground and log to stderr")
    p.add_argument("-t", "--test", action="store_true",
                   help="check the configuration and that the model file opens, print every "
                        "problem, and exit")
    # -v is the version, as in the C bitnetd; debug logging is the long option only.
    p.add_argument("-v", "--version", action="version", version=f"bitnetd {__version__}")
    p.add_argument("--verbose", action="store_true", help="log debug messages")
    return p.parse_args(argv)


def load_or_report(path: str | None) -> Config | None:
    """The configuration, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"bitnetd: {exc}", file=sys.stderr)
        return None


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    # ---- daemon operations (lifecycle.py): -t, daemon mode, signals, sd_notify ----
    from . import lifecycle

    if args.test:
        return lifecycle.check(args.config)
    config = load_or_report(args.config)
    if config is None:
        return 2
    # The absolute path, re-read on SIGHUP (daemon mode changes the directory to /).
    config_path = str(config.source_path) if config.source_path else None
    return lifecycle.run(config, config_path, foreground=args.foreground, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
