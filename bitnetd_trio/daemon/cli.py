"""`bitnetd [-c FILE] [-f] [-t] [-v]`: the daemon's command line.

main() parses the arguments, loads the configuration and hands over to lifecycle.py, which
runs the server (foreground or daemon mode, signals, sd_notify) or, with -t, only checks.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from bitnetd_trio import __version__
from bitnetd_trio.config import Config, ConfigError, load_config, parse_listen
from bitnetd_trio.daemon.lifecycle import check, run

log = logging.getLogger("bitnetd")

__all__ = ["load_or_report", "main", "parse_args"]

#: The environment override of [server] listen that --listen sets.
LISTEN_ENV = "BITNETD_SERVER_LISTEN"


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
    p.add_argument("-l", "--listen", metavar="ADDR[,ADDR...]",
                   help="listen on these addresses instead of [server] listen (e.g. "
                        "127.0.0.1:9000); the same as BITNETD_SERVER_LISTEN")
    return p.parse_args(argv)


def load_or_report(path: str | None) -> Config | None:
    """The configuration, or None after printing every problem to stderr."""
    try:
        return load_config(path)
    except ConfigError as exc:
        print(f"bitnetd: {exc}", file=sys.stderr)
        return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.listen is not None:
        try:
            parse_listen(args.listen)
        except ValueError as exc:
            print(f"bitnetd: --listen: {exc}", file=sys.stderr)
            return 2
        # Through the environment, so that a reload (SIGHUP), which reads the configuration
        # again, keeps the address given on the command line.
        os.environ[LISTEN_ENV] = args.listen
    if args.test:
        return check(args.config)
    config = load_or_report(args.config)
    if config is None:
        return 2
    # The absolute path, re-read on SIGHUP (daemon mode changes the directory to /).
    config_path = str(config.source_path) if config.source_path else None
    return run(config, config_path, foreground=args.foreground, verbose=args.verbose)


if __name__ == "__main__":
    sys.exit(main())
