"""A model file changed under a running engine (model-format §1: the weights are read in place
from a mapping of the file): truncated or overwritten in place, the process ends with one line
naming the file and exit status 75 instead of dying by SIGBUS without a word; replaced by
rename, the engine keeps serving from the file it opened."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bitnetd_trio.engine import gguf_writer as gw

REPO = Path(__file__).resolve().parents[1]

# Load, run a step, then let the test change the file, then run more steps.
_CHILD = textwrap.dedent(
    """
    import faulthandler, sys
    faulthandler.enable()  # as pytest and many deployments have it: ours must still win
    from bitnetd_trio.engine.native import BatchEntry, Context, Model
    model = Model.load(sys.argv[1])
    ctx = Context(model, 1, 64, 1)
    ctx.forward([BatchEntry(0, [1, 2, 3], "none")])
    print("ready", flush=True)
    sys.stdin.readline()  # the test changes the file now
    for i in range(20):
        ctx.forward([BatchEntry(0, [4 + i], "none")])
    print("still serving", flush=True)
    """
)


def _truncate(path: Path, _tmp: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(4096)


def _run_with_change(tmp_path: Path, change, child: str = _CHILD) -> subprocess.CompletedProcess:
    """Run `child` on a fresh model file; `change(path, tmp_path)` once it has served a step."""
    path = tmp_path / "model.gguf"
    gw.write_model(path, gw.TINY, 0)
    proc = subprocess.Popen(
        [sys.executable, "-c", child, str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.stdout.readline().strip() == "ready", proc.stderr.read()
    change(path, tmp_path)
    out, err = proc.communicate("go\n", timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_truncated_in_place_exits_75_with_one_line(tmp_path):
    r = _run_with_change(tmp_path, _truncate)
    assert r.returncode == 75, (r.returncode, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"bitnetd: the model file {tmp_path / 'model.gguf'} changed")
    assert "renaming a new file over the old one" in lines[0]
    assert "still serving" not in r.stdout


def test_copied_over_in_place_exits_75(tmp_path):
    """`cp other.gguf model.gguf`: the usual step before a reload truncates, then rewrites."""
    other = gw.write_model(tmp_path / "other.gguf", gw.SMALLEST, 1)

    def copy_over(path: Path, _tmp: Path) -> None:
        with open(other, "rb") as src, open(path, "r+b") as dst:
            dst.truncate(0)
            shutil.copyfileobj(src, dst)

    r = _run_with_change(tmp_path, copy_over)
    assert r.returncode == 75, (r.returncode, r.stderr)
    assert "changed or shrank" in r.stderr


def test_replaced_by_rename_keeps_serving(tmp_path):
    def rename_over(path: Path, tmp: Path) -> None:
        new = gw.write_model(tmp / "new.gguf", gw.SMALLEST, 1)
        os.replace(new, path)

    r = _run_with_change(tmp_path, rename_over)
    assert r.returncode == 0, r.stderr
    assert "still serving" in r.stdout


@pytest.mark.parametrize("prefix", ["<26>bitnetd[7]: ", ""])
def test_the_line_also_goes_to_the_fatal_log_descriptor(tmp_path, prefix):
    log = tmp_path / "fatal.log"
    child = _CHILD.replace(
        "model = Model.load(sys.argv[1])",
        "import os\n"
        "from bitnetd_trio._native import lib\n"
        f"fd = os.open({str(log)!r}, os.O_WRONLY | os.O_CREAT | os.O_APPEND)\n"
        f"lib.bn_set_fatal_log(fd, {prefix!r}.encode())\n"
        "model = Model.load(sys.argv[1])",
    )
    r = _run_with_change(tmp_path, _truncate, child)
    assert r.returncode == 75, r.stderr
    text = log.read_text()
    assert text.startswith(prefix + "the model file ") and text.count("\n") == 1


# ---- the daemon ------------------------------------------------------------------------------


def _start_daemon(tmp_path: Path):
    import httpx
    import trio
    from daemon_harness import Daemon, wait_http, write_config

    model = gw.write_model(tmp_path / "served.gguf", gw.TINY, 0)
    log = tmp_path / "bitnetd.log"
    with __import__("socket").socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    conf = write_config(tmp_path / "d.conf", model=model, sections={
        "daemon": {"logfile": log}, "server": {"listen": f"127.0.0.1:{port}"}})
    d = Daemon(conf)
    d.port = port
    return d, model, log, httpx, trio, wait_http


@pytest.mark.parametrize("change", ["truncate", "rewrite-same-size"])
async def test_daemon_ends_with_one_line_when_its_model_file_changes(tmp_path, change):
    d, model, log, httpx, trio, wait_http = _start_daemon(tmp_path)
    try:
        with trio.fail_after(60):
            while (await wait_http(d.base_url() + "/health")).status_code != 200:
                await trio.sleep(0.05)
        size = model.stat().st_size
        with open(model, "r+b") as f:
            if change == "truncate":
                f.truncate(4096)
            else:  # the same size, other bytes: no SIGBUS, a silent mix of two models
                f.seek(size // 2)
                f.write(bytes(4096))
        await trio.sleep(1.2)  # the watch looks at the file at most once a second
        async with httpx.AsyncClient(timeout=30) as client:
            try:
                await client.post(d.base_url() + "/v1/completions",
                                  json={"prompt": "hello", "max_tokens": 8})
            except httpx.TransportError:
                pass  # the daemon may be gone before it answers
        assert await d.wait(60) == 75, d.stderr
        named = [line for line in d.stderr.splitlines()
                 if f"the model file {model} changed" in line]
        assert len(named) == 1, d.stderr
        assert "renaming a new file over the old one" in named[0]
        assert "Traceback" not in d.stderr and "Fatal Python error" not in d.stderr
        assert f"the model file {model} changed" in log.read_text()
    finally:
        d.kill()
