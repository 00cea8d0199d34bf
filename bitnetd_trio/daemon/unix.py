"""Classic Unix daemon plumbing: daemonizing, the pidfile, logging, privilege drop.

Everything here is synchronous and runs before Trio starts (daemonize, pidfile, logging setup)
or between two awaits on the Trio thread (log reopen, privilege drop): none of it blocks for
long.
"""

from __future__ import annotations

import errno
import fcntl
import grp
import logging
import logging.handlers
import os
import pwd
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from bitnetd_trio.config import LOG_LEVELS, NOTICE, log_level_name

__all__ = [
    "Credentials",
    "DaemonError",
    "LogSetup",
    "PidFile",
    "ReconnectingSysLogHandler",
    "ReopenableFileHandler",
    "StartupReport",
    "daemonize",
    "drop_privileges",
    "parse_log_level",
    "read_pidfile",
    "resolve_credentials",
    "setup_logging",
]

log = logging.getLogger("bitnetd.daemon")


class DaemonError(Exception):
    """A start-up problem the operator must fix; the message says what and where."""


# ---- pidfile -------------------------------------------------------------------------------


class PidFile:
    """A pidfile held with an exclusive flock for the daemon's whole life.

    The lock, not the file's existence, says whether a daemon runs: a pidfile left behind by a
    crash is simply taken over. The open file descriptor keeps the lock across fork(), so the
    file can be acquired before daemonizing (errors reach the terminal) and rewritten with the
    daemon's pid afterwards.
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self) -> None:
        """Create and lock the pidfile, writing our pid; DaemonError if another instance runs."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise DaemonError(f"cannot open pidfile {self.path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            other = _read_pid_fd(fd)
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                who = f"pid {other}" if other else "another process"
                raise DaemonError(
                    f"another bitnetd is already running ({who} holds the lock on "
                    f"pidfile {self.path}); stop it first or use another [daemon] pidfile"
                ) from None
            raise DaemonError(f"cannot lock pidfile {self.path}: {exc.strerror}") from None
        self._fd = fd
        self.write(os.getpid())

    def write(self, pid: int) -> None:
        """(Re)write the pid, e.g. in the daemon after fork()."""
        if self._fd is None:
            raise RuntimeError("pidfile not acquired")
        data = f"{pid}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        """Remove the pidfile and drop the lock.

        After a privilege drop the directory may not be writable any more: the file is then
        emptied through the descriptor we still hold (its lock goes away with it, so nothing
        takes it for a live daemon).
        """
        if self._fd is None:
            return
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove pidfile %s (%s); leaving it empty", self.path, exc.strerror)
            try:
                os.ftruncate(self._fd, 0)
            except OSError:
                pass
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> Self:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid_fd(fd: int) -> int | None:
    try:
        text = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def read_pidfile(path: str | os.PathLike[str]) -> tuple[int | None, bool]:
    """(pid written in the file or None, whether a process holds its lock).

    Used by bitnetctl: a pid in a file whose lock nobody holds is stale.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None, False
    try:
        pid = _read_pid_fd(fd)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EACCES):
                return pid, True
            raise
        fcntl.flock(fd, fcntl.LOCK_UN)
        return pid, False
    finally:
        os.close(fd)


# ---- daemonizing ---------------------------------------------------------------------------


class StartupReport:
    """The daemon's side of a pipe to the process that launched it.

    The launching process waits on the pipe so that `bitnetd` returns only when the daemon
    serves (exit 0) or has failed to start (exit 1, the reason printed on its stderr).
    In the foreground this object does nothing.
    """

    def __init__(self, fd: int | None) -> None:
        self._fd = fd

    def _send(self, data: bytes) -> None:
        if self._fd is None:
            return
        try:
            os.write(self._fd, data)
        except OSError:
            pass  # the launcher went away: nobody to tell
        os.close(self._fd)
        self._fd = None

    def ok(self) -> None:
        self._send(b"OK\n")

    def fail(self, message: str) -> None:
        self._send(b"ERR " + message.encode("utf-8", "replace") + b"\n")


def _wait_for_daemon(read_fd: int) -> int:
    """In the launching process: relay the daemon's start-up outcome; return the exit code."""
    chunks = []
    while True:
        try:
            data = os.read(read_fd, 65536)
        except InterruptedError:
            continue
        if not data:
            break
        chunks.append(data)
    os.close(read_fd)
    text = b"".join(chunks).decode("utf-8", "replace")
    if text.startswith("OK"):
        return 0
    if text.startswith("ERR "):
        sys.stderr.write(f"bitnetd: {text[4:].rstrip()}\n")
    else:
        sys.stderr.write("bitnetd: the daemon exited during start-up (see its log)\n")
    sys.stderr.flush()
    return 1


def daemonize(*, umask: int = 0o022, workdir: str = "/") -> StartupReport:
    """Detach from the terminal: fork, setsid, fork again; stdio to /dev/null.

    Must run before any thread starts (fork() copies only the calling thread). Returns in the
    daemon only; the launching process waits for the daemon's StartupReport and exits with
    its outcome; the intermediate process exits at once so that the daemon is not a session
    leader and can never acquire a controlling terminal again.
    """
    read_fd, write_fd = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid > 0:
        os.close(write_fd)
        # Reap the intermediate child (it exits right away) so it does not linger as a zombie.
        os.waitpid(pid, 0)
        os._exit(_wait_for_daemon(read_fd))
    os.close(read_fd)
    os.setsid()
    pid = os.fork()
    if pid > 0:
        os._exit(0)
    os.chdir(workdir)
    os.umask(umask)
    _stdio_to_devnull()
    os.set_inheritable(write_fd, False)
    return StartupReport(write_fd)


def _stdio_to_devnull() -> None:
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
    if null > 2:
        os.close(null)


# ---- logging -------------------------------------------------------------------------------

def parse_log_level(name: str | int) -> int:
    """A logging level from a config value (syslog names accepted); ValueError otherwise."""
    if isinstance(name, int):
        return name
    if logging.getLevelName(NOTICE) != "NOTICE":
        logging.addLevelName(NOTICE, "NOTICE")
    return LOG_LEVELS[log_level_name(name)]


class ReopenableFileHandler(logging.StreamHandler):
    """Appends to a file and reopens it on request (SIGUSR1 after logrotate moved it).

    WatchedFileHandler stats the path on every record, which misses a rename when a new file
    has not been created yet and costs a syscall per line; an explicit reopen is what
    logrotate's postrotate expects.
    """

    def __init__(self, path: str | os.PathLike[str], mode: int = 0o640) -> None:
        self.path = os.path.abspath(path)
        self.file_mode = mode
        super().__init__(self._open())

    def _open(self):  # type: ignore[no-untyped-def]
        fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, self.file_mode
        )
        return open(fd, "a", encoding="utf-8", errors="backslashreplace", buffering=1)

    def reopen(self) -> None:
        """Close and reopen the path; on failure keep writing to the old file and raise."""
        new_stream = self._open()
        self.acquire()
        try:
            old, self.stream = self.stream, new_stream
        finally:
            self.release()
        try:
            old.close()
        except OSError:
            pass

    def close(self) -> None:
        self.acquire()
        try:
            try:
                self.flush()
                self.stream.close()
            except (OSError, ValueError):
                pass
        finally:
            self.release()
        logging.Handler.close(self)


class ReconnectingSysLogHandler(logging.handlers.SysLogHandler):
    """SysLogHandler on a unix socket that tolerates a missing syslog daemon.

    Records are dropped silently while the socket is absent (a daemon has nowhere else to
    report it) and the connection is retried on the next record; reopen() forces a reconnect
    (useful after syslogd/journald restarted).
    """

    def __init__(self, address: str = "/dev/log", ident: str = "bitnetd") -> None:
        super().__init__(address=address, facility=logging.handlers.SysLogHandler.LOG_DAEMON)
        self.ident = f"{ident}[{os.getpid()}]: "

    def emit(self, record: logging.LogRecord) -> None:
        if not self.socket:
            self.createSocket()
            if not self.socket:
                return
        super().emit(record)

    def handleError(self, record: logging.LogRecord) -> None:
        # A failed syslog write must not print to stderr (which is /dev/null or the journal).
        pass

    def reopen(self) -> None:
        self.acquire()
        try:
            if self.socket:
                self.socket.close()
            self.socket = None  # type: ignore[assignment]
            self.createSocket()
        finally:
            self.release()

    def set_pid(self, pid: int) -> None:
        self.ident = f"bitnetd[{pid}]: "


class _Formatter(logging.Formatter):
    """ISO 8601 UTC timestamps with milliseconds."""

    converter = time.gmtime

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        t = time.strftime("%Y-%m-%dT%H:%M:%S", self.converter(record.created))
        return f"{t}.{int(record.msecs):03d}Z"


FILE_FORMAT = "%(asctime)s bitnetd[%(process)d] %(levelname)s %(name)s: %(message)s"
STDERR_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
SYSLOG_FORMAT = "%(levelname)s %(name)s: %(message)s"


@dataclass
class LogSetup:
    """What setup_logging installed; reopen() is the SIGUSR1 action."""

    handlers: list[logging.Handler]
    level: int
    description: str

    def reopen(self) -> list[str]:
        """Reopen every file/syslog handler; returns error messages (empty on success)."""
        errors = []
        for handler in self.handlers:
            reopen: Callable[[], None] | None = getattr(handler, "reopen", None)
            if reopen is None:
                continue
            try:
                reopen()
            except OSError as exc:
                target = getattr(handler, "path", None) or getattr(handler, "address", "")
                errors.append(f"cannot reopen {target}: {exc.strerror or exc}")
        return errors

    def fatal_log_target(self) -> tuple[int, str] | None:
        """A descriptor (log file or syslog socket) and line prefix for a last message written
        from a signal handler, where the logging module cannot run; None when stderr is all."""
        pid = os.getpid()
        for handler in self.handlers:
            if isinstance(handler, ReopenableFileHandler) and handler.stream:
                return handler.stream.fileno(), f"bitnetd[{pid}] CRITICAL: "
            if isinstance(handler, ReconnectingSysLogHandler) and handler.socket:
                priority = handler.encodePriority(handler.facility, "critical")
                return handler.socket.fileno(), f"<{priority}>bitnetd[{pid}]: "
        return None

    def chown_files(self, uid: int, gid: int) -> None:
        """Hand log files to the unprivileged user before a privilege drop (so reopen works)."""
        for handler in self.handlers:
            path = getattr(handler, "path", None)
            if isinstance(handler, ReopenableFileHandler) and path:
                try:
                    os.chown(path, uid, gid)
                except OSError as exc:
                    log.warning("cannot chown log file %s: %s", path, exc.strerror)

    def close(self) -> None:
        root = logging.getLogger()
        for handler in self.handlers:
            root.removeHandler(handler)
            handler.close()


def setup_logging(
    *,
    level: str | int = "info",
    logfile: str | None = None,
    foreground: bool = True,
    syslog_address: str = "/dev/log",
) -> LogSetup:
    """Install the daemon's log handlers on the root logger.

    ``logfile``: None or "" -> syslog when daemonized, stderr in the foreground;
    "syslog" -> syslog; "stderr" or "-" -> stderr; anything else is a file path.
    In the foreground stderr is always used, plus a configured file or syslog.
    Raises DaemonError when the log file cannot be opened.
    """
    lvl = parse_log_level(level)
    handlers: list[logging.Handler] = []
    parts = []
    target = (logfile or "").strip()
    if foreground or target in ("stderr", "-"):
        h: logging.Handler = logging.StreamHandler(sys.stderr)
        h.setFormatter(_Formatter(STDERR_FORMAT))
        handlers.append(h)
        parts.append("stderr")
    if target == "syslog" or (not target and not foreground):
        h = ReconnectingSysLogHandler(syslog_address)
        h.setFormatter(logging.Formatter(SYSLOG_FORMAT))
        handlers.append(h)
        parts.append(f"syslog ({syslog_address})")
    elif target and target not in ("stderr", "-"):
        try:
            h = ReopenableFileHandler(target)
        except OSError as exc:
            raise DaemonError(f"[daemon] logfile: cannot open {target}: {exc.strerror}") from None
        h.setFormatter(_Formatter(FILE_FORMAT))
        handlers.append(h)
        parts.append(target)
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    for h in handlers:
        h.setLevel(lvl)
        root.addHandler(h)
    root.setLevel(lvl)
    logging.captureWarnings(True)
    return LogSetup(handlers, lvl, ", ".join(parts))


# ---- privilege drop ------------------------------------------------------------------------


@dataclass(frozen=True)
class Credentials:
    user: str | None
    uid: int | None
    group: str | None
    gid: int | None


def resolve_credentials(user: str | None, group: str | None) -> Credentials:
    """Look up [daemon] user/group (names or numbers); DaemonError naming the bad one."""
    uid = gid = None
    user_name = group_name = None
    if user:
        try:
            pw = pwd.getpwuid(int(user)) if user.isdigit() else pwd.getpwnam(user)
        except (KeyError, OverflowError):
            raise DaemonError(f"[daemon] user: no such user {user!r}") from None
        uid, user_name = pw.pw_uid, pw.pw_name
        gid = pw.pw_gid
    if group:
        try:
            gr = grp.getgrgid(int(group)) if group.isdigit() else grp.getgrnam(group)
        except (KeyError, OverflowError):
            raise DaemonError(f"[daemon] group: no such group {group!r}") from None
        gid, group_name = gr.gr_gid, gr.gr_name
    elif user_name is not None and gid is not None:
        try:
            group_name = grp.getgrgid(gid).gr_name
        except KeyError:
            group_name = str(gid)
    return Credentials(user_name, uid, group_name, gid)


def drop_privileges(creds: Credentials) -> str:
    """Switch to the configured user/group for good; returns a description for the log.

    Only root can switch. A non-root daemon keeps its identity (with a warning when a
    different user was asked for). As root with a user configured, any failure raises
    DaemonError: the daemon must not go on serving as root.
    """
    if creds.uid is None and creds.gid is None:
        return f"no [daemon] user/group configured; keeping uid {os.getuid()}"
    if os.geteuid() != 0:
        if creds.uid is not None and creds.uid != os.geteuid():
            log.warning(
                "not running as root: cannot switch to user %s; staying uid %d",
                creds.user,
                os.geteuid(),
            )
        return f"not root; keeping uid {os.geteuid()}"
    try:
        if creds.user is not None and creds.gid is not None:
            os.initgroups(creds.user, creds.gid)
        elif creds.gid is not None:
            os.setgroups([creds.gid])
        if creds.gid is not None:
            os.setgid(creds.gid)
        if creds.uid is not None:
            os.setuid(creds.uid)
    except OSError as exc:
        raise DaemonError(
            f"cannot drop privileges to user {creds.user} group {creds.group}: {exc.strerror}"
        ) from None
    if creds.uid is not None:
        # Paranoia, as the classic daemons do it: the switch must be irreversible.
        if os.getuid() != creds.uid or os.geteuid() != creds.uid:
            raise DaemonError(f"privilege drop to {creds.user} did not take effect")
        if creds.uid != 0:
            try:
                os.setuid(0)
            except PermissionError:
                pass
            else:
                raise DaemonError(
                    "privilege drop is reversible (setuid(0) succeeded); refusing to run"
                )
    if creds.gid is not None and (os.getgid() != creds.gid or os.getegid() != creds.gid):
        raise DaemonError(f"group switch to {creds.group} did not take effect")
    return f"running as user {creds.user or os.getuid()} group {creds.group or os.getgid()}"
