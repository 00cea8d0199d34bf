"""A plain `pip install -e .` (no extras) in a fresh venv: the daemon starts on its demo model,
`man` finds the pages, and systemd-analyze finds the unit's Documentation= pages without help.

One venv for the module (building it compiles the engine and fetches the dependencies)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("venv") / "env"
    venv.EnvBuilder(with_pip=True, clear=True).create(root)
    # A copy of the repository, so the editable install cannot see this checkout's build output.
    src = tmp_path_factory.mktemp("src") / "bitnetd-trio"
    shutil.copytree(
        REPO,
        src,
        ignore=shutil.ignore_patterns(".git", "build", "*.so", "__pycache__", "*.egg-info", ".*"),
    )
    proc = subprocess.run(
        [str(root / "bin" / "python"), "-m", "pip", "install", "-q", "-e", str(src)],
        capture_output=True, text=True, timeout=1200, check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root


def _venv_env(root: Path, tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BITNETD_", "PYTHON"))}
    env.pop("MANPATH", None)
    env["PATH"] = f"{root / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}"
    env["HOME"] = str(tmp)  # the demo model is written under the user's cache directory
    env.pop("XDG_CACHE_HOME", None)
    return env


@pytest.mark.parametrize("command", ["bitnetd", "hypercorn"])
def test_plain_install_serves_the_demo_model(fresh_venv, tmp_path, command):
    """`bitnetd -f`, and hypercorn's own command, with no configuration at all."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = {
        "bitnetd": ["bitnetd", "-f", "--listen", f"127.0.0.1:{port}"],
        "hypercorn": ["hypercorn", "-k", "trio", "-b", f"127.0.0.1:{port}",
                      "bitnetd_trio.app:app"],
    }[command]
    log = tmp_path / "bitnetd.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(fresh_venv / "bin" / argv[0]), *argv[1:]],
            stdout=out, stderr=subprocess.STDOUT, env=_venv_env(fresh_venv, tmp_path),
            cwd=tmp_path,
        )
        try:
            deadline = time.monotonic() + 300
            status = None
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                        status = r.status
                        break
                except OSError:
                    time.sleep(0.2)
            assert status == 200, log.read_text()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=60) == 0, log.read_text()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert "No module named" not in log.read_text()
    assert "Traceback" not in log.read_text()


def test_write_model_tool_runs_without_extras(fresh_venv, tmp_path):
    out = tmp_path / "m.gguf"
    proc = subprocess.run(
        [str(fresh_venv / "bin" / "bitnetd-write-model"), "--preset", "tiny", str(out)],
        capture_output=True, text=True, timeout=300, check=False,
        env=_venv_env(fresh_venv, tmp_path),
    )
    assert proc.returncode == 0, proc.stderr
    assert out.read_bytes()[:4] == b"GGUF"


@pytest.mark.skipif(shutil.which("man") is None, reason="no man command on this machine")
def test_man_finds_the_installed_pages(fresh_venv, tmp_path):
    env = _venv_env(fresh_venv, tmp_path)
    for page, section in (("bitnetd", "8"), ("bitnetd.conf", "5"), ("bitnetctl", "1")):
        proc = subprocess.run(["man", "-w", section, page], capture_output=True, text=True,
                              env=env, timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip().startswith(str(fresh_venv)), proc.stdout
