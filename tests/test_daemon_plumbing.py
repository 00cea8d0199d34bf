"""daemon.py and listeners.py on their own: pidfile lock, logging and reopen, privilege drop,
double fork, socket binding. The whole daemon is exercised in test_daemon_process.py."""

from __future__ import annotations

import logging
import os
import socket
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from daemon_harness import has_ipv6

from bitnetd_trio.daemon import listeners
from bitnetd_trio.daemon import unix as daemon
from bitnetd_trio.daemon.sdnotify import InheritedSocket

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = {**os.environ, "PYTHONPATH": REPO}

# ---- pidfile -------------------------------------------------------------------------------


def test_pidfile_lock_refuses_a_second_holder(tmp_path):
    path = tmp_path / "bitnetd.pid"
    first = daemon.PidFile(path)
    first.acquire()
    assert path.read_text() == f"{os.getpid()}\n"
    assert daemon.read_pidfile(path) == (os.getpid(), True)
    # flock belongs to the open file description: a second open in this very process conflicts
    # just as another process would.
    second = daemon.PidFile(path)
    with pytest.raises(daemon.DaemonError) as err:
        second.acquire()
    msg = str(err.value)
    assert "already running" in msg and f"pid {os.getpid()}" in msg and str(path) in msg
    first.write(12345)
    assert path.read_text() == "12345\n"
    first.release()
    assert not path.exists()
    assert daemon.read_pidfile(path) == (None, False)


def test_stale_pidfile_is_taken_over(tmp_path):
    path = tmp_path / "bitnetd.pid"
    path.write_text("999999\n")
    assert daemon.read_pidfile(path) == (999999, False)
    with daemon.PidFile(path) as pf:
        assert pf.held
        assert path.read_text() == f"{os.getpid()}\n"
    assert not path.exists()


def test_pidfile_in_missing_directory(tmp_path):
    with pytest.raises(daemon.DaemonError, match="cannot open pidfile"):
        daemon.PidFile(tmp_path / "nope" / "x.pid").acquire()


def test_pidfile_lock_seen_from_another_process(tmp_path):
    path = tmp_path / "p.pid"
    code = textwrap.dedent(f"""
        import sys, time
        from bitnetd_trio.daemon.unix import PidFile
        pf = PidFile({str(path)!r}); pf.acquire()
        print("locked", flush=True)
        sys.stdin.read()
        pf.release()
    """)
    child = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert child.stdout.readline().strip() == "locked"
        assert daemon.read_pidfile(path) == (child.pid, True)
        with pytest.raises(daemon.DaemonError, match=f"pid {child.pid}"):
            daemon.PidFile(path).acquire()
    finally:
        child.stdin.close()
        assert child.wait(timeout=30) == 0
    assert not path.exists()


# ---- logging -------------------------------------------------------------------------------


@pytest.fixture
def restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    yield
    for h in list(root.handlers):
        root.removeHandler(h)
    for h in saved[0]:
        root.addHandler(h)
    root.setLevel(saved[1])


def test_log_file_reopen_after_move(tmp_path, restore_logging):
    path = tmp_path / "bitnetd.log"
    setup = daemon.setup_logging(level="info", logfile=str(path), foreground=False)
    log = logging.getLogger("bitnetd.test")
    log.info("before rotation")
    log.debug("debug is below the level")
    os.rename(path, tmp_path / "bitnetd.log.1")
    log.info("still into the moved file")
    assert setup.reopen() == []
    log.warning("after reopen")
    setup.close()
    old = (tmp_path / "bitnetd.log.1").read_text()
    new = path.read_text()
    assert "before rotation" in old and "still into the moved file" in old
    assert "debug is below" not in old
    assert "after reopen" in new and "before rotation" not in new
    assert f"bitnetd[{os.getpid()}] WARNING bitnetd.test: after reopen" in new
    assert stat.S_IMODE(os.stat(path).st_mode) & 0o007 == 0  # not world-readable


def test_log_reopen_failure_keeps_the_old_file(tmp_path, restore_logging):
    logdir = tmp_path / "logs"
    logdir.mkdir()
    path = logdir / "b.log"
    setup = daemon.setup_logging(level="info", logfile=str(path), foreground=False)
    os.rename(logdir, tmp_path / "gone")  # the path's directory disappears
    errors = setup.reopen()
    assert len(errors) == 1 and "cannot reopen" in errors[0]
    logging.getLogger("x").info("kept writing")
    setup.close()
    assert "kept writing" in (tmp_path / "gone" / "b.log").read_text()


def test_bad_log_file_is_a_clear_error(tmp_path, restore_logging):
    with pytest.raises(daemon.DaemonError, match="logfile"):
        daemon.setup_logging(logfile=str(tmp_path / "no" / "dir.log"), foreground=False)


def test_syslog_handler(tmp_path, restore_logging):
    addr = str(tmp_path / "devlog")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(addr)
    receiver.settimeout(5)
    setup = daemon.setup_logging(level="notice", foreground=False, syslog_address=addr)
    assert "syslog" in setup.description
    logging.getLogger("bitnetd.x").info("info is below notice")
    logging.getLogger("bitnetd.x").log(25, "a notice")
    logging.getLogger("bitnetd.x").error("an error")
    first = receiver.recv(4096)
    second = receiver.recv(4096)
    # facility daemon (3): <3*8+severity>; NOTICE maps to syslog's warning-or-lower class.
    assert first.startswith(b"<") and b"bitnetd[%d]: " % os.getpid() in first
    assert b"a notice" in first
    assert second.startswith(b"<27>") and b"an error" in second  # 3*8 + 3 (err)
    # syslog going away and coming back: records are dropped, then reconnect works.
    receiver.close()
    os.unlink(addr)
    logging.getLogger("bitnetd.x").error("lost")
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(addr)
    receiver.settimeout(5)
    assert setup.reopen() == []
    logging.getLogger("bitnetd.x").error("back")
    assert b"back" in receiver.recv(4096)
    setup.close()
    receiver.close()


def test_missing_syslog_socket_is_not_fatal(tmp_path, restore_logging, capsys):
    setup = daemon.setup_logging(foreground=False, syslog_address=str(tmp_path / "none"))
    logging.getLogger("bitnetd.x").error("nowhere to go")
    setup.close()
    assert capsys.readouterr().err == ""


def test_parse_log_level():
    assert daemon.parse_log_level("debug") == logging.DEBUG
    assert daemon.parse_log_level("WARN") == logging.WARNING
    assert daemon.parse_log_level("notice") == 25
    assert daemon.parse_log_level("crit") == daemon.parse_log_level("critical") == logging.CRITICAL
    with pytest.raises(ValueError, match="not a log level"):
        daemon.parse_log_level("loud")


# ---- privilege drop ------------------------------------------------------------------------


def test_resolve_credentials():
    c = daemon.resolve_credentials("nobody", None)
    assert c.user == "nobody" and c.uid == 65534 and c.gid is not None
    c = daemon.resolve_credentials("nobody", "nogroup")
    assert c.group == "nogroup" and c.gid == 65534
    assert daemon.resolve_credentials(None, None) == daemon.Credentials(None, None, None, None)
    with pytest.raises(daemon.DaemonError, match=r"\[daemon\] user: no such user"):
        daemon.resolve_credentials("no-such-user-bitnetd", None)
    with pytest.raises(daemon.DaemonError, match=r"\[daemon\] group: no such group"):
        daemon.resolve_credentials("nobody", "no-such-group-bitnetd")


_DROP = r"""
import json, os
from bitnetd_trio.daemon import unix as daemon
creds = daemon.resolve_credentials("nobody", "nogroup")
desc = daemon.drop_privileges(creds)
try:
    os.setuid(0)
    back = True
except PermissionError:
    back = False
print(json.dumps({"uid": os.getuid(), "euid": os.geteuid(), "gid": os.getgid(),
                  "groups": os.getgroups(), "back": back, "desc": desc}))
"""


def _python_in_root_dir(code: str) -> str:
    """Run `code` in a child Python whose directory is / (a dropped user can read it); its
    standard output."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
        cwd="/", env=CHILD_ENV,
    ).stdout


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_drop_privileges_to_nobody():
    import json

    data = json.loads(_python_in_root_dir(_DROP))
    assert data["uid"] == data["euid"] == 65534
    assert data["gid"] == 65534
    assert 0 not in data["groups"]
    assert data["back"] is False
    assert "nobody" in data["desc"]


def test_drop_privileges_as_non_root_keeps_identity():
    if os.geteuid() == 0:
        # Run the non-root branch in a child that first becomes nobody.
        # (Everything is imported before the switch: this machine's Python lives under /root.)
        code = (
            "import os; from bitnetd_trio.daemon import unix as daemon;"
            "c = daemon.resolve_credentials('root', None);"
            "os.setgid(65534); os.setuid(65534);"
            "print(daemon.drop_privileges(c))"
        )
        assert _python_in_root_dir(code).startswith("not root")
    else:
        desc = daemon.drop_privileges(daemon.resolve_credentials("nobody", None))
        assert desc.startswith("not root")


# ---- daemonize -----------------------------------------------------------------------------

_DAEMON = r"""
import os, sys, time
from bitnetd_trio.daemon import unix as daemon
pidfile = daemon.PidFile(sys.argv[1])
pidfile.acquire()
mode = sys.argv[2]
report = daemon.daemonize()
pidfile.write(os.getpid())
if mode == "fail":
    report.fail("model file is broken")
    pidfile.release()
    sys.exit(1)
if mode == "die":
    os._exit(3)
info = " ".join(str(v) for v in (os.getpid(), os.getsid(0), os.getpgid(0), os.getcwd(),
                                  os.umask(0), sys.stdout.isatty()))
with open(sys.argv[3], "w") as f:
    f.write(info)
report.ok()
time.sleep(60)
"""


def test_daemonize_double_fork(tmp_path):
    pidpath, infopath = tmp_path / "d.pid", tmp_path / "info"
    proc = subprocess.run(
        [sys.executable, "-c", _DAEMON, str(pidpath), "ok", str(infopath)],
        capture_output=True,
        text=True,
        timeout=60,
        env=CHILD_ENV,
        check=False,
    )
    # The launcher returns only once the daemon reported it is up.
    assert proc.returncode == 0, proc.stderr
    pid, sid, pgid, cwd, umask, _ = infopath.read_text().split()
    pid = int(pid)
    try:
        assert daemon.read_pidfile(pidpath) == (pid, True)
        assert int(sid) != pid  # not a session leader: it can never get a tty again
        assert int(sid) == int(pgid)  # the session made by setsid in the first child
        assert cwd == "/" and int(umask) == 0o022
        fds = {os.readlink(f"/proc/{pid}/fd/{n}") for n in (0, 1, 2)}
        assert fds == {"/dev/null"}
    finally:
        os.kill(pid, 15)
    for _ in range(500):
        if not daemon.read_pidfile(pidpath)[1]:
            break
        time.sleep(0.01)
    assert not daemon.read_pidfile(pidpath)[1]


def test_daemonize_reports_failure(tmp_path):
    pidpath = tmp_path / "d.pid"

    def daemon(how: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", _DAEMON, str(pidpath), how, "x"],
            capture_output=True, text=True, timeout=60, env=CHILD_ENV, check=False,
        )

    proc = daemon("fail")
    assert proc.returncode == 1
    assert "bitnetd: model file is broken" in proc.stderr
    proc = daemon("die")
    assert proc.returncode == 1
    assert "exited during start-up" in proc.stderr


# ---- listeners -----------------------------------------------------------------------------


def test_parse_listen_address():
    assert listeners.parse_listen_address("127.0.0.1:8080") == (socket.AF_INET, "127.0.0.1", 8080)
    assert listeners.parse_listen_address("*:80") == (socket.AF_INET, "0.0.0.0", 80)
    assert listeners.parse_listen_address("[::1]:0") == (socket.AF_INET6, "::1", 0)
    for bad in (
        "8080",
        "[::1]8080",
        "1.2.3.4:99999",
        "1.2.3.4:x",
        "::1:80",
        "no.such.host.invalid:1",
    ):
        with pytest.raises(ValueError):
            listeners.parse_listen_address(bad)


def test_open_listeners_tcp_and_unix(tmp_path):
    path = str(tmp_path / "b.sock")
    addrs = ["127.0.0.1:0"] + (["[::1]:0"] if has_ipv6() else [])
    ls = listeners.open_listeners(
        addrs,
        path,
        unix_socket_mode=0o640,
        unix_socket_owner="nobody:nogroup" if os.geteuid() == 0 else None,
    )
    try:
        assert [li.unix_path for li in ls] == [None] * len(addrs) + [path]
        assert ls[0].description.startswith("127.0.0.1:") and ls[0].port > 0
        st = os.stat(path)
        assert stat.S_ISSOCK(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o640
        if os.geteuid() == 0:
            assert (st.st_uid, st.st_gid) == (65534, 65534)
        # Bound, not yet listening: a client is refused until hypercorn calls listen().
        with socket.socket() as c, pytest.raises(ConnectionRefusedError):
            c.connect(("127.0.0.1", ls[0].port))
        bind = ls[0].hypercorn_bind()
        assert bind.startswith("fd://") and ls[0].sock is None
        adopted = socket.socket(fileno=int(bind[5:]))
        adopted.listen(5)
        with socket.socket() as c:
            c.connect(("127.0.0.1", ls[0].port))
        adopted.close()
    finally:
        listeners.close_listeners(ls)
    assert not os.path.exists(path)


def test_ipv4_and_ipv6_wildcards_coexist():
    if not has_ipv6():
        pytest.skip("no IPv6")
    first = listeners.open_listeners(["0.0.0.0:0"])
    port = first[0].port
    try:
        second = listeners.open_listeners([f"[::]:{port}"])  # V6ONLY makes this possible
        listeners.close_listeners(second)
    finally:
        listeners.close_listeners(first)


def test_bind_errors_name_the_key(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(daemon.DaemonError, match=r"\[server\] listen: cannot bind"):
            listeners.open_listeners([f"127.0.0.1:{port}"])
    with pytest.raises(daemon.DaemonError, match=r"\[server\] unix_socket"):
        listeners.open_listeners([], str(tmp_path / "missing" / "s.sock"))
    with pytest.raises(daemon.DaemonError, match="nothing to serve on"):
        listeners.open_listeners([])
    # A regular file in the way is never deleted.
    f = tmp_path / "file"
    f.write_text("keep")
    with pytest.raises(daemon.DaemonError):
        listeners.open_listeners([], str(f))
    assert f.read_text() == "keep"


def test_stale_unix_socket_is_replaced(tmp_path):
    path = str(tmp_path / "s.sock")
    old = socket.socket(socket.AF_UNIX)
    old.bind(path)
    old.close()  # the file stays behind, as after a crash
    ls = listeners.open_listeners([], path)
    listeners.close_listeners(ls)
    assert not os.path.exists(path)


def test_live_unix_socket_is_not_stolen(tmp_path):
    path = str(tmp_path / "s.sock")
    live = socket.socket(socket.AF_UNIX)
    live.bind(path)
    live.listen()
    with pytest.raises(daemon.DaemonError, match="in use by another process"):
        listeners.open_listeners([], path)
    assert os.path.exists(path)
    live.close()


def test_adopt_inherited_checks_the_fds():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    dup = os.dup(s.fileno())
    got = listeners.adopt_inherited([InheritedSocket(dup, "web")])
    assert got[0].description == f"127.0.0.1:{s.getsockname()[1]} (fd {dup}, web)"
    assert got[0].unix_path is None  # systemd's socket file is never ours to remove
    listeners.close_listeners(got)
    r, w = os.pipe()
    with pytest.raises(daemon.DaemonError, match="not a socket"):
        listeners.adopt_inherited([InheritedSocket(r, "x")])
    os.close(r)
    os.close(w)
    s.close()
