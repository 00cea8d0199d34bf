"""sd_notify protocol, watchdog settings and socket activation (sdnotify.py), without systemd."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import uuid

import pytest
import trio

from bitnetd_trio.daemon import sdnotify


def _receiver(path_or_abstract: str) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if path_or_abstract.startswith("@"):
        sock.bind(b"\0" + path_or_abstract[1:].encode())
    else:
        sock.bind(path_or_abstract)
    sock.settimeout(5)
    return sock


@pytest.fixture(params=["path", "abstract"])
def notify_socket(request, tmp_path):
    address = (
        str(tmp_path / "notify.sock")
        if request.param == "path"
        else f"@bitnetd-test-{uuid.uuid4().hex}"
    )
    sock = _receiver(address)
    yield address, sock
    sock.close()


def test_messages_reach_the_socket(notify_socket):
    address, sock = notify_socket
    n = sdnotify.Notifier({"NOTIFY_SOCKET": address})
    assert n.enabled
    before = sdnotify.monotonic_usec()
    assert n.status("loading model x")
    assert n.extend_timeout(2.5)
    assert n.ready("serving on 127.0.0.1:8080")
    assert n.reloading("reloading\nconfiguration")
    assert n.watchdog()
    assert n.stopping("draining")
    msgs = [sock.recv(4096).decode() for _ in range(6)]
    assert msgs[0] == "STATUS=loading model x"
    assert msgs[1] == "EXTEND_TIMEOUT_USEC=2500000"
    assert msgs[2] == "READY=1\nSTATUS=serving on 127.0.0.1:8080"
    lines = msgs[3].split("\n")
    assert lines[0] == "RELOADING=1"
    assert lines[1].startswith("MONOTONIC_USEC=")
    usec = int(lines[1].split("=", 1)[1])
    assert before <= usec <= sdnotify.monotonic_usec()
    assert lines[2] == "STATUS=reloading configuration"  # newlines never split a STATUS
    assert msgs[4] == "WATCHDOG=1"
    assert msgs[5] == "STOPPING=1\nSTATUS=draining"
    assert n.sent == 6
    n.close()


def test_disabled_without_notify_socket():
    env: dict[str, str] = {}
    n = sdnotify.Notifier(env)
    assert not n.enabled
    assert n.ready() is False
    # Relative paths are not an sd_notify address: ignored rather than guessed at.
    assert not sdnotify.Notifier({"NOTIFY_SOCKET": "relative/sock"}).enabled


def test_unset_environment_and_missing_receiver(tmp_path):
    env = {"NOTIFY_SOCKET": str(tmp_path / "nobody-listens")}
    n = sdnotify.Notifier(env, unset_environment=True)
    assert "NOTIFY_SOCKET" not in env
    assert n.enabled
    assert n.ready() is False  # dropped, never raised
    assert n.dropped == 1


def test_bad_lines_are_refused(notify_socket):
    address, _ = notify_socket
    n = sdnotify.Notifier({"NOTIFY_SOCKET": address})
    with pytest.raises(ValueError):
        n.notify("READY=1\nSTATUS=x")
    with pytest.raises(ValueError):
        n.notify("no equals sign")


def test_watchdog_interval():
    pid = os.getpid()
    assert sdnotify.watchdog_interval({}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "400000"}) == pytest.approx(0.2)
    assert sdnotify.watchdog_interval(
        {"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(pid)}
    ) == pytest.approx(0.2)
    assert (
        sdnotify.watchdog_interval({"WATCHDOG_USEC": "400000", "WATCHDOG_PID": str(pid + 1)})
        is None
    )
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert sdnotify.watchdog_interval({"WATCHDOG_USEC": "garbage"}) is None


def test_listen_fds_ignores_other_pids():
    env = {"LISTEN_PID": str(os.getpid() + 1), "LISTEN_FDS": "2"}
    assert sdnotify.listen_fds(env) == []
    assert env == {}  # unset by default
    assert sdnotify.listen_fds({}) == []


_CHILD = r"""
import json, os, socket
from bitnetd_trio.daemon import sdnotify
fds = sdnotify.listen_fds()
out = []
for item in fds:
    s = socket.socket(fileno=item.fd)
    out.append([item.fd, item.name, item.bind, s.getsockname()[1],
                os.get_inheritable(item.fd)])
    s.detach()
print(json.dumps({"fds": out, "env_left": [k for k in os.environ if k.startswith("LISTEN_")]}))
"""


def test_listen_fds_in_a_child_with_matching_pid():
    """The child sees fds 3 and 4 with their names, the way systemd passes them."""
    import json

    socks = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        socks.append(s)

    def to_3_and_4() -> None:
        # Runs in the child between fork and exec: put the sockets where systemd puts them.
        os.dup2(socks[0].fileno(), 3)
        os.dup2(socks[1].fileno(), 4)

    # sh sets LISTEN_PID to its own pid, then execs python (same pid), as systemd does.
    cmd = [
        "sh",
        "-c",
        'LISTEN_PID=$$ LISTEN_FDS=2 LISTEN_FDNAMES=web:admin exec "$0" -c "$1"',
        sys.executable,
        _CHILD,
    ]
    out = subprocess.run(
        cmd,
        preexec_fn=to_3_and_4,
        close_fds=False,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    data = json.loads(out.stdout)
    ports = [s.getsockname()[1] for s in socks]
    assert data["fds"] == [
        [3, "web", "fd://3", ports[0], False],
        [4, "admin", "fd://4", ports[1], False],
    ]
    assert data["env_left"] == []
    for s in socks:
        s.close()


def test_progress_watch():
    state = {"alive": True, "busy": False, "counter": 0}
    now = [100.0]
    watch = sdnotify.ProgressWatch(
        lambda: (state["alive"], state["busy"], state["counter"]),
        stall_after=1.0,
        clock=lambda: now[0],
    )
    assert watch.healthy()
    now[0] += 5  # idle for a long time: still healthy
    assert watch.healthy()
    state["busy"] = True
    now[0] += 0.5
    assert watch.healthy()
    now[0] += 0.6  # busy and stuck for 1.1 s
    assert not watch.healthy()
    assert "no progress" in watch.reason
    state["counter"] += 1  # a step happened
    assert watch.healthy()
    state["alive"] = False
    assert not watch.healthy()
    assert "not running" in watch.reason


async def test_run_watchdog_pings_only_while_healthy(notify_socket):
    address, sock = notify_socket
    sock.setblocking(False)
    n = sdnotify.Notifier({"NOTIFY_SOCKET": address})
    healthy = [True]
    unhealthy_calls = []

    def drain() -> list[bytes]:
        got = []
        while True:
            try:
                got.append(sock.recv(100))
            except BlockingIOError:
                return got

    async with trio.open_nursery() as nursery:
        nursery.start_soon(
            sdnotify.run_watchdog, n, 0.01, lambda: healthy[0], lambda: unhealthy_calls.append(1)
        )
        while n.sent < 3:
            await trio.sleep(0.01)
        healthy[0] = False
        await trio.sleep(0.05)  # let any in-flight iteration finish
        pings = drain()
        assert pings and all(p == b"WATCHDOG=1" for p in pings)
        sent = n.sent
        while len(unhealthy_calls) < 3:
            await trio.sleep(0.01)
        assert n.sent == sent and drain() == []
        nursery.cancel_scope.cancel()


def test_receiver_restart_is_survived(tmp_path):
    path = str(tmp_path / "n.sock")
    first = _receiver(path)
    n = sdnotify.Notifier({"NOTIFY_SOCKET": path})
    assert n.status("one")
    assert first.recv(100) == b"STATUS=one"
    first.close()
    os.unlink(path)
    assert n.status("lost") is False  # nobody there: dropped, not raised
    second = _receiver(path)
    assert n.status("two")
    assert second.recv(100) == b"STATUS=two"
    second.close()


_AFTER_DROP = r"""
import os, sys
from bitnetd_trio.daemon import sdnotify
n = sdnotify.Notifier({"NOTIFY_SOCKET": sys.argv[1]})
os.setgid(65534); os.setuid(65534)
sys.exit(0 if n.ready("after drop") else 1)
"""


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_notifications_still_arrive_after_a_privilege_drop(tmp_path):
    """systemd's socket directory may not be searchable by the service user: the notifier
    connects while still privileged."""
    private = tmp_path / "private"
    private.mkdir(mode=0o700)
    path = str(private / "notify.sock")
    sock = _receiver(path)
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    subprocess.run(
        [sys.executable, "-c", _AFTER_DROP, path], env=env, check=True, timeout=60, cwd="/"
    )
    assert sock.recv(100) == b"READY=1\nSTATUS=after drop"
    sock.close()
