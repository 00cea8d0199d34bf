"""bitnetctl on its own: transport over TCP and a unix socket, output formats, exit codes,
reload/stop through the pidfile. Against the real daemon: test_daemon_process.py."""

from __future__ import annotations

import http.server
import json
import os
import signal
import socket
import socketserver
import subprocess
import sys
import textwrap
import threading

import pytest

from bitnetd_trio.api.metrics import Metrics
from bitnetd_trio.tools import control

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHILD_ENV = {**os.environ, "PYTHONPATH": REPO}


def _metrics_text() -> bytes:
    m = Metrics()
    m.count_request("/v1/chat/completions", 200)
    m.count_request("/v1/chat/completions", 400, "invalid_request_error")
    body, _ = m.render(None)
    return body


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers the three GETs bitnetctl makes, the way bitnetd shapes them."""

    health_status = 200

    def do_GET(self) -> None:
        if self.path == "/health":
            code = self.health_status
            body = json.dumps({"status": "ok" if code == 200 else "loading"}).encode()
            ctype = "application/json"
        elif self.path == "/v1/models":
            code, ctype = 200, "application/json"
            body = json.dumps(
                {
                    "object": "list",
                    "data": [
                        {
                            "id": "tiny",
                            "object": "model",
                            "owned_by": "bitnetd",
                            "meta": {"path": "/m/tiny.gguf", "n_ctx_train": 256},
                        }
                    ],
                }
            ).encode()
        elif self.path == "/metrics":
            code, ctype, body = 200, "text/plain; version=0.0.4", _metrics_text()
        else:
            code, ctype, body = 404, "application/json", b"{}"
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _UnixServer(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


class _TCPServer(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True


@pytest.fixture
def servers(tmp_path):
    path = str(tmp_path / "ctl.sock")
    tcp = _TCPServer(("127.0.0.1", 0), _Handler)
    unix = _UnixServer(path, _Handler)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (tcp, unix)]
    for t in threads:
        t.start()
    yield tcp.server_address[1], path
    for s in (tcp, unix):
        s.shutdown()
        s.server_close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_status_models_metrics_over_tcp_and_unix(servers, capsys):
    port, path = servers
    for where in (["-H", "127.0.0.1", "-p", str(port)], ["-U", path]):
        assert control.main([*where, "-P", "/nonexistent.pid", "status"]) == 0
        out = capsys.readouterr().out
        assert out.startswith("bitnetd is running")
        assert "model:        tiny (path=/m/tiny.gguf, n_ctx_train=256)" in out
        assert "2 HTTP requests answered" in out

        assert control.main([*where, "--json", "status"]) == 0
        data = json.loads(capsys.readouterr().out)
        assert data["running"] and data["healthy"] and data["models"][0]["id"] == "tiny"
        assert data["metrics"]["requests_total"] == 2

        assert control.main([*where, "models"]) == 0
        assert capsys.readouterr().out.splitlines()[0] == "tiny"

        assert control.main([*where, "metrics"]) == 0
        assert "bitnetd_requests_total" in capsys.readouterr().out
        assert control.main([*where, "--json", "metrics"]) == 0
        parsed = json.loads(capsys.readouterr().out)
        samples = parsed["bitnetd_requests_total"]
        assert {s["labels"]["status"]: s["value"] for s in samples} == {"200": 1.0, "400": 1.0}


def test_reader_gone_is_no_traceback(servers):
    """`bitnetctl --json metrics | head`: a closed pipe ends the tool quietly, status 0."""
    port, _ = servers
    read_end, write_end = os.pipe()
    os.close(read_end)  # the reader is gone before the first write
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bitnetd_trio.tools.control", "-p", str(port), "--json",
             "metrics"],
            stdout=write_end, stderr=subprocess.PIPE, env=CHILD_ENV, timeout=60, text=True,
        )
    finally:
        os.close(write_end)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_not_ready_is_exit_3(servers, capsys, monkeypatch):
    port, _ = servers
    monkeypatch.setattr(_Handler, "health_status", 503)
    assert control.main(["-p", str(port), "status"]) == 3
    assert "up but not ready" in capsys.readouterr().out


def test_daemon_down_is_exit_1(tmp_path, capsys):
    port = _free_port()
    for cmd in ("status", "models", "metrics"):
        assert control.main(["-p", str(port), cmd]) == 1
        assert "cannot reach bitnetd" in capsys.readouterr().err
    assert control.main(["-U", str(tmp_path / "none.sock"), "status"]) == 1
    assert control.main(["-p", str(port), "--json", "status"]) == 1
    assert json.loads(capsys.readouterr().out)["running"] is False
    for cmd in ("reload", "stop"):
        assert control.main(["-P", str(tmp_path / "none.pid"), cmd]) == 1
        assert "not running" in capsys.readouterr().err
    stale = tmp_path / "stale.pid"
    stale.write_text("999999\n")
    assert control.main(["-P", str(stale), "stop"]) == 1
    assert "stale" in capsys.readouterr().err


def test_usage_error_is_exit_2():
    proc = subprocess.run(
        [sys.executable, "-m", "bitnetd_trio.tools.control", "frobnicate"],
        capture_output=True,
        text=True,
        env=CHILD_ENV,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 2 and "invalid choice" in proc.stderr


_HOLDER = r"""
import signal, sys, time
from bitnetd_trio.daemon.unix import PidFile
pf = PidFile(sys.argv[1]); pf.acquire()
def hup(*_):
    print("HUP", flush=True)
def term(*_):
    print("TERM", flush=True)
    time.sleep(0.3)   # a short drain
    pf.release()
    sys.exit(0)
signal.signal(signal.SIGHUP, hup)
signal.signal(signal.SIGTERM, term)
print("ready", flush=True)
while True:
    time.sleep(1)
"""


def test_reload_and_stop_signal_the_pid_in_the_pidfile(tmp_path, capsys):
    pidfile = tmp_path / "d.pid"
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(pidfile)],
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert control.main(["-P", str(pidfile), "reload"]) == 0
        assert f"sent SIGHUP to bitnetd (pid {child.pid})" in capsys.readouterr().out
        assert child.stdout.readline().strip() == "HUP"
        assert control.main(["-P", str(pidfile), "--json", "stop"]) == 0
        assert json.loads(capsys.readouterr().out) == {
            "pid": child.pid,
            "signal": "SIGTERM",
            "stopped": True,
        }
        assert child.stdout.readline().strip() == "TERM"
        assert child.wait(timeout=30) == 0
        assert not pidfile.exists()
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()


def test_stop_gives_up_after_the_wait(tmp_path, capsys):
    pidfile = tmp_path / "d.pid"
    stubborn = _HOLDER.replace(
        "signal.signal(signal.SIGTERM, term)", "signal.signal(signal.SIGTERM, signal.SIG_IGN)"
    )
    child = subprocess.Popen(
        [sys.executable, "-c", stubborn, str(pidfile)],
        stdout=subprocess.PIPE,
        text=True,
        env=CHILD_ENV,
    )
    try:
        assert child.stdout.readline().strip() == "ready"
        assert control.main(["-P", str(pidfile), "--wait", "0.3", "stop"]) == 3
        assert "still running" in capsys.readouterr().err
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()


def test_prometheus_parser_handles_escapes():
    text = textwrap.dedent("""\
        # HELP x a thing
        # TYPE x counter
        x{a="q\\"uote",b="back\\\\slash"} 3
        y 4.5
        z{le="+Inf"} 7 1700000000
        bad{ 1
        """)
    parsed = control._parse_prometheus(text)
    assert parsed["x"] == [{"labels": {"a": 'q"uote', "b": "back\\slash"}, "value": 3.0}]
    assert parsed["y"][0]["value"] == 4.5
    assert parsed["z"][0]["value"] == 7.0
