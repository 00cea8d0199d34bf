"""signals.py: each signal reaches its action inside a Trio nursery (real signals sent to this
process), reloads are serialized and coalesced, a failing reload does not stop the loop."""

from __future__ import annotations

import os
import signal

import trio

from bitnetd_trio.daemon.signals import SignalActions, serve_signals


class Recorder:
    def __init__(self) -> None:
        self.events: list[object] = []
        self.reload_started = trio.Event()
        self.release_reload = trio.Event()
        self.reloads = 0
        self.fail_next_reload = False
        self.block_reloads = False

    async def reload(self) -> None:
        self.reloads += 1
        self.events.append(("reload-start", self.reloads))
        self.reload_started.set()
        if self.block_reloads:
            await self.release_reload.wait()
        if self.fail_next_reload:
            self.fail_next_reload = False
            raise RuntimeError("bad config")
        self.events.append(("reload-done", self.reloads))

    def terminate(self, signum: int, count: int) -> None:
        self.events.append(("terminate", signum, count))

    def reopen_logs(self) -> None:
        self.events.append("reopen")

    def log_status(self) -> None:
        self.events.append("status")

    def actions(self) -> SignalActions:
        return SignalActions(self.reload, self.terminate, self.reopen_logs, self.log_status)


async def wait_for(pred) -> None:
    with trio.fail_after(10):
        while not pred():
            await trio.sleep(0.005)


async def test_each_signal_reaches_its_action():
    rec = Recorder()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_signals, rec.actions())
        os.kill(os.getpid(), signal.SIGUSR1)
        await wait_for(lambda: "reopen" in rec.events)
        os.kill(os.getpid(), signal.SIGUSR2)
        await wait_for(lambda: "status" in rec.events)
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: ("reload-done", 1) in rec.events)
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_for(lambda: ("terminate", signal.SIGTERM, 1) in rec.events)
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt while the receiver is open
        await wait_for(lambda: ("terminate", signal.SIGINT, 2) in rec.events)
        nursery.cancel_scope.cancel()
    assert rec.events == [
        "reopen",
        "status",
        ("reload-start", 1),
        ("reload-done", 1),
        ("terminate", signal.SIGTERM, 1),
        ("terminate", signal.SIGINT, 2),
    ]


async def test_reloads_are_serialized_and_coalesced_and_terminate_is_not_blocked():
    rec = Recorder()
    rec.block_reloads = True
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_signals, rec.actions())
        os.kill(os.getpid(), signal.SIGHUP)
        with trio.fail_after(10):
            await rec.reload_started.wait()
        # Three more HUPs while the first reload runs: one more reload, not three.
        for _ in range(3):
            os.kill(os.getpid(), signal.SIGHUP)
            await trio.sleep(0.02)
        # A TERM during a slow reload is acted on at once.
        os.kill(os.getpid(), signal.SIGTERM)
        await wait_for(lambda: ("terminate", signal.SIGTERM, 1) in rec.events)
        assert rec.reloads == 1
        rec.release_reload.set()
        await wait_for(lambda: ("reload-done", 2) in rec.events)
        await trio.sleep(0.05)
        assert rec.reloads == 2
        nursery.cancel_scope.cancel()


async def test_failing_reload_keeps_the_loop_alive(caplog):
    rec = Recorder()
    rec.fail_next_reload = True
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_signals, rec.actions())
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: rec.reloads == 1)
        await wait_for(lambda: any("reload failed" in r.message for r in caplog.records))
        os.kill(os.getpid(), signal.SIGHUP)
        await wait_for(lambda: ("reload-done", 2) in rec.events)
        nursery.cancel_scope.cancel()
