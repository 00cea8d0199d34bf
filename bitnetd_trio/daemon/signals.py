"""Unix signals for the daemon, handled as Trio events in the server's nursery.

    SIGHUP          reload the configuration (a new model loads beside the old one)
    SIGTERM, SIGINT drain: stop accepting, finish or cleanly end running generations, exit 0
    SIGUSR1         reopen log files
    SIGUSR2         log one status line

Reloads run one at a time in their own task so that a SIGTERM during a slow model load is
still acted on at once; HUPs arriving during a reload are folded into one more reload.
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

__all__ = ["HANDLED_SIGNALS", "SignalActions", "serve_signals"]

log = logging.getLogger("bitnetd.signals")

HANDLED_SIGNALS = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGUSR1, signal.SIGUSR2)


@dataclass
class SignalActions:
    """What the daemon does for each signal. The sync actions must be quick and not raise."""

    reload: Callable[[], Awaitable[None]]
    terminate: Callable[[int, int], None]  # (signal number, how many stop signals so far)
    reopen_logs: Callable[[], None]
    log_status: Callable[[], None]


class _ReloadRunner:
    """Runs reloads one at a time; HUPs during a reload are coalesced into one more."""

    def __init__(self, reload: Callable[[], Awaitable[None]], nursery: trio.Nursery) -> None:
        self._reload = reload
        self._nursery = nursery
        self._running = False
        self._again = False

    def request(self) -> None:
        if self._running:
            self._again = True
            return
        self._running = True
        self._nursery.start_soon(self._run)

    async def _run(self) -> None:
        try:
            while True:
                self._again = False
                try:
                    await self._reload()
                except Exception:
                    # A reload must never take the server down: the old configuration serves on.
                    log.exception("reload failed; still serving with the previous configuration")
                if not self._again:
                    break
        finally:
            self._running = False


async def serve_signals(
    actions: SignalActions, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
) -> None:
    """Receive the daemon's signals until cancelled. Start with nursery.start() so that the
    handlers are installed before the caller goes on (signals that arrive before that keep
    their default action)."""
    stop_count = 0
    with trio.open_signal_receiver(*HANDLED_SIGNALS) as receiver:
        async with trio.open_nursery() as nursery:
            reloads = _ReloadRunner(actions.reload, nursery)
            task_status.started()
            async for signum in receiver:
                name = signal.Signals(signum).name
                if signum in (signal.SIGTERM, signal.SIGINT):
                    stop_count += 1
                    log.info("%s received: shutting down", name)
                    _call(actions.terminate, signum, stop_count)
                elif signum == signal.SIGHUP:
                    log.info("SIGHUP received: reloading the configuration")
                    reloads.request()
                elif signum == signal.SIGUSR1:
                    _call(actions.reopen_logs)
                elif signum == signal.SIGUSR2:
                    _call(actions.log_status)


def _call(fn: Callable[..., None], *args: int) -> None:
    try:
        fn(*args)
    except Exception:
        log.exception("signal action %s failed", getattr(fn, "__name__", fn))
