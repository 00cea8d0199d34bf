"""The systemd service protocols, spoken directly (no libsystemd).

* Readiness notification (sd_notify(3)): newline-separated ``KEY=VALUE`` lines in one datagram
  sent to the unix socket named by ``NOTIFY_SOCKET`` (a leading ``@`` names the abstract
  namespace).
* Watchdog: ``WATCHDOG_USEC`` (and ``WATCHDOG_PID``) say how often ``WATCHDOG=1`` is expected.
* Socket activation (sd_listen_fds(3)): ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES``
  describe listening sockets inherited from file descriptor 3 onwards.

Everything here except run_watchdog is synchronous and never blocks: the notify socket is
non-blocking and a datagram that cannot be sent is dropped (systemd not listening must never
stall the server).
"""

from __future__ import annotations

import errno
import os
import socket
import time
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass

__all__ = [
    "SD_LISTEN_FDS_START",
    "InheritedSocket",
    "Notifier",
    "ProgressWatch",
    "listen_fds",
    "monotonic_usec",
    "run_watchdog",
    "watchdog_interval",
]

SD_LISTEN_FDS_START = 3


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


def _socket_address(value: str) -> str | bytes:
    """Turn a NOTIFY_SOCKET value into an address for sendto()."""
    if value.startswith("@"):
        # Abstract namespace: a leading NUL byte instead of '@'.
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends sd_notify messages; every method is a no-op when NOTIFY_SOCKET is unset.

    The environment variable is read once, at construction. With ``unset_environment`` the
    variable is removed so that child processes do not talk to systemd in our name.
    """

    def __init__(
        self,
        environ: MutableMapping[str, str] | None = None,
        *,
        unset_environment: bool = False,
    ) -> None:
        env = os.environ if environ is None else environ
        value = env.get("NOTIFY_SOCKET") or None
        if unset_environment:
            env.pop("NOTIFY_SOCKET", None)
        self.address: str | None = value
        self._sock: socket.socket | None = None
        if value is not None and not value.startswith(("/", "@")):
            # sd_notify(3) only accepts absolute paths and abstract names (vsock is not
            # supported here); anything else is ignored rather than guessed at.
            self.address = None
        self._connected = False
        if self.address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)
            # Connect now: the path is checked with our current credentials, so notifications
            # still reach systemd after the privilege drop (the socket's directory may not be
            # searchable by the unprivileged user).
            self._connect()
        self.sent = 0  # datagrams successfully sent (for status lines and tests)
        self.dropped = 0

    def _connect(self) -> bool:
        assert self._sock is not None and self.address is not None
        try:
            self._sock.connect(_socket_address(self.address))
        except OSError:
            self._connected = False
        else:
            self._connected = True
        return self._connected

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def notify(self, *lines: str) -> bool:
        """Send one datagram made of ``lines`` (each ``KEY=VALUE``). True if it was sent."""
        if self._sock is None or self.address is None or not lines:
            return False
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(f"bad sd_notify line {line!r}")
        payload = "\n".join(lines).encode()
        try:
            try:
                if not self._connected and not self._connect():
                    self._sock.sendto(payload, _socket_address(self.address))
                else:
                    self._sock.send(payload)
            except ConnectionRefusedError:
                # The receiver was restarted (a new socket at the same address): reconnect.
                if not self._connect():
                    raise
                self._sock.send(payload)
        except OSError as exc:
            # ECONNREFUSED/ENOENT: nobody listens (yet); EAGAIN: the receiver's queue is full.
            # Notifications are advisory: drop and carry on.
            if exc.errno not in (
                errno.ECONNREFUSED,
                errno.ENOENT,
                errno.EAGAIN,
                errno.ENOBUFS,
                errno.EPERM,
                errno.EACCES,
            ):
                raise
            self.dropped += 1
            return False
        self.sent += 1
        return True

    # -- the messages the daemon uses -------------------------------------------------

    def ready(self, status: str | None = None, *, mainpid: int | None = None) -> bool:
        lines = ["READY=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        if mainpid is not None:
            lines.append(f"MAINPID={mainpid}")
        return self.notify(*lines)

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={_one_line(text)}")

    def reloading(self, status: str | None = None) -> bool:
        lines = ["RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def stopping(self, status: str | None = None) -> bool:
        lines = ["STOPPING=1"]
        if status is not None:
            lines.append(f"STATUS={_one_line(status)}")
        return self.notify(*lines)

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """Ask systemd for ``seconds`` more before it gives up on start-up/shutdown."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(1, int(seconds * 1_000_000))}")

    def mainpid(self, pid: int) -> bool:
        return self.notify(f"MAINPID={pid}")

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())


def watchdog_interval(
    environ: Mapping[str, str] | None = None, *, pid: int | None = None
) -> float | None:
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when not asked for.

    systemd sets WATCHDOG_PID when the watchdog is meant for one process only: a different
    pid means the value was inherited and is not ours.
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    try:
        usec = int(raw)
    except ValueError:
        return None
    if usec <= 0:
        return None
    wpid = env.get("WATCHDOG_PID")
    if wpid:
        try:
            if int(wpid) != (os.getpid() if pid is None else pid):
                return None
        except ValueError:
            return None
    return usec / 2 / 1_000_000


@dataclass(frozen=True)
class InheritedSocket:
    fd: int
    name: str  # from LISTEN_FDNAMES; "unknown" when systemd gave none (its own default)

    @property
    def bind(self) -> str:
        """The hypercorn bind string for this socket."""
        return f"fd://{self.fd}"


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    unset_environment: bool = True,
) -> list[InheritedSocket]:
    """The sockets passed by socket activation, or [] when none were passed to this process.

    LISTEN_PID must match our pid (otherwise the variables were inherited by accident).
    The variables are removed by default so that children do not take the fds for theirs.
    Each fd gets FD_CLOEXEC.
    """
    env = os.environ if environ is None else environ
    raw_pid = env.get("LISTEN_PID")
    raw_fds = env.get("LISTEN_FDS")
    raw_names = env.get("LISTEN_FDNAMES")
    if unset_environment:
        for key in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            env.pop(key, None)
    if not raw_pid or not raw_fds:
        return []
    try:
        listen_pid = int(raw_pid)
        count = int(raw_fds)
    except ValueError:
        return []
    if listen_pid != (os.getpid() if pid is None else pid) or count <= 0:
        return []
    names = raw_names.split(":") if raw_names else []
    result = []
    for i in range(count):
        fd = SD_LISTEN_FDS_START + i
        try:
            os.set_inheritable(fd, False)
        except OSError as exc:
            raise OSError(exc.errno, f"LISTEN_FDS says fd {fd} is inherited, but: {exc.strerror}")
        name = names[i] if i < len(names) and names[i] else "unknown"
        result.append(InheritedSocket(fd=fd, name=name))
    return result


class ProgressWatch:
    """Decides whether the server deserves a WATCHDOG=1 ping.

    ``probe()`` returns (alive, busy, progress_counter) for the inference thread. Healthy
    means alive and, when there is work, the counter moved within ``stall_after`` seconds.
    An idle thread makes no progress and is still healthy.
    """

    def __init__(
        self,
        probe: Callable[[], tuple[bool, bool, int]],
        stall_after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._probe = probe
        self._stall_after = stall_after
        self._clock = clock
        self._last_counter: int | None = None
        self._last_change = clock()
        self.reason = ""

    def healthy(self) -> bool:
        alive, busy, counter = self._probe()
        now = self._clock()
        if counter != self._last_counter or not busy:
            self._last_counter = counter
            self._last_change = now
        if not alive:
            self.reason = "inference thread is not running"
            return False
        if now - self._last_change > self._stall_after:
            self.reason = f"inference thread made no progress for {now - self._last_change:.1f} s"
            return False
        self.reason = ""
        return True


async def run_watchdog(
    notifier: Notifier,
    interval: float,
    healthy: Callable[[], bool],
    on_unhealthy: Callable[[], None] | None = None,
) -> None:
    """Send WATCHDOG=1 every ``interval`` seconds while ``healthy()``; runs until cancelled.

    A missed ping is the point: systemd then restarts the service.
    """
    import trio

    while True:
        if healthy():
            notifier.watchdog()
        elif on_unhealthy is not None:
            on_unhealthy()
        await trio.sleep(interval)
