"""`bitnetd [-c FILE] [-f] [-t] [-v]`: the daemon's command line.

main() parses the arguments, loads the configuration and hands over to lifecycle.py, which
runs the server (foreground or daemon mode, signals, sd_notify) or, with -t, only checks.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from bitnetd_trio import __version__
from bitnetd_trio.config import Config, ConfigError, load_config
from bitnetd_trio.daemon.lifecycle import check, run

log = logging.getLogger("bitnetd")

__all__ = ["load_or_report", "main", "parse_args"]


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


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
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
