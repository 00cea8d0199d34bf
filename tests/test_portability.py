"""Portability of the build: nothing targets the build machine's CPU; the wheel (`pip wheel .`)
installed in a fresh virtual environment gives bit-identical logits with every kernel set this
CPU can run; the engine cross-compiled for aarch64 and run under qemu-user (scalar kernels)
gives the same logits bit for bit.

The wheel test builds the engine (about half a minute); the aarch64 test runs only where
Debian's gcc-aarch64-linux-gnu, libc6-arm64-cross and qemu-user are installed.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import venv
from pathlib import Path

import numpy as np
import pytest

from bitnetd_trio.engine import gguf_writer as gw

REPO = Path(__file__).resolve().parents[1]
KERNELS = ("scalar", "avx2", "avx512vnni", "amx")
TOKENS = list(range(3, 43))  # what tests/c/forward_dump.c feeds

CROSS_CC = shutil.which("aarch64-linux-gnu-gcc")
QEMU = shutil.which("qemu-aarch64") or shutil.which("qemu-aarch64-static")
SYSROOT = Path("/usr/aarch64-linux-gnu")


def _build_native():  # noqa: ANN202 - the module at the repository's root
    import importlib.util

    spec = importlib.util.spec_from_file_location("build_native", REPO / "build_native.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nothing_in_the_build_targets_the_build_machine() -> None:
    """One binary for every x86-64: no -march/-mtune of the build machine anywhere in the
    build; the SIMD kernels carry their own target attributes, chosen at run time."""
    build_native = _build_native()

    for flag in build_native.C_FLAGS:
        assert not flag.startswith(("-march", "-mtune", "-mcpu", "-mavx", "-mfma")), flag
    build_files = [REPO / "build_native.py", REPO / "setup.py", REPO / "pyproject.toml",
                   REPO / "Containerfile"]
    sources = sorted((REPO / "native").rglob("*.[ch]"))
    for path in build_files + sources:
        text = path.read_text()
        assert not re.search(r"(march|mtune|mcpu)=native|arch=native", text), path
        assert "#pragma GCC target" not in text, path


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return gw.write_model(tmp_path_factory.mktemp("m") / "tiny.gguf", gw.TINY, 0)


def host_logits(model_path: Path, kernel: str = "scalar") -> np.ndarray:
    from bitnetd_trio.engine import native as engine

    previous = engine.kernel_name()
    model = engine.Model.load(model_path)
    try:
        engine.select_kernel(kernel)
        with engine.Context(model, 1, 128, 2) as ctx:
            ctx.forward([engine.BatchEntry(0, TOKENS, "all")])
            return np.stack([np.array(ctx.logits(0, t)) for t in range(len(TOKENS))])
    finally:
        engine.select_kernel(previous)
        model.close()


def host_greedy(model_path: Path, n: int = 8) -> list[int]:
    """Greedy continuation of TOKENS (argmax, as the sampler at temperature 0)."""
    from bitnetd_trio.engine import native as engine

    model = engine.Model.load(model_path)
    try:
        with engine.Context(model, 1, 128, 2) as ctx:
            ctx.forward([engine.BatchEntry(0, TOKENS, "last")])
            out: list[int] = []
            for _ in range(n):
                tok = int(np.argmax(ctx.logits(0, 0 if out else len(TOKENS) - 1)))
                out.append(tok)
                ctx.forward([engine.BatchEntry(0, [tok], "last")])
            return out
    finally:
        model.close()


WHEEL_SCRIPT = r"""
import json, sys
import numpy as np
import bitnetd_trio
from bitnetd_trio.engine import native as engine
from bitnetd_trio.api.asgi import create_app  # every subpackage made it into the wheel
model_path, out_dir = sys.argv[1], sys.argv[2]
report = {"file": bitnetd_trio.__file__, "default": engine.kernel_name(), "ran": [],
          "unavailable": []}
model = engine.Model.load(model_path)
for k in ("scalar", "avx2", "avx512vnni", "amx"):
    try:
        engine.select_kernel(k)
    except ValueError:
        report["unavailable"].append(k)
        continue
    with engine.Context(model, 1, 128, 2) as ctx:
        ctx.forward([engine.BatchEntry(0, list(range(3, 43)), "all")])
        np.save(f"{out_dir}/{k}.npy", np.stack([np.array(ctx.logits(0, t)) for t in range(40)]))
    report["ran"].append(k)
model.close()
print(json.dumps(report))
"""


def test_wheel_in_a_fresh_venv_same_logits_with_every_kernel(tmp_path, tiny_model) -> None:
    src = tmp_path / "src"
    shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
        ".git", "build", "dist", "*.so", "__pycache__", "*.egg-info", ".*"))
    wheels = tmp_path / "wheels"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(wheels), str(src)],
        capture_output=True, text=True, timeout=900, check=False, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    (wheel,) = wheels.glob("bitnetd_trio-*.whl")
    # One wheel per CPU architecture (and CPython version), not per CPU model.
    assert re.search(r"-linux_(x86_64|aarch64)\.whl$", wheel.name), wheel.name

    # The dependencies come from this interpreter's site-packages; the package from the wheel.
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True, system_site_packages=True, clear=True).create(env_dir)
    py = env_dir / "bin" / "python"
    proc = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BITNETD_"))}
    out = tmp_path / "logits"
    out.mkdir()
    proc = subprocess.run([str(py), "-c", WHEEL_SCRIPT, str(tiny_model), str(out)],
                          capture_output=True, text=True, timeout=300, check=False,
                          cwd=tmp_path, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["file"].startswith(str(env_dir)), report  # not this checkout's package
    print(f"\nwheel {wheel.name}: default kernel {report['default']}, ran {report['ran']}, "
          f"not on this CPU: {report['unavailable']}")
    assert report["ran"][0] == "scalar" and report["default"] in report["ran"]
    reference = host_logits(tiny_model)
    for k in report["ran"]:
        np.testing.assert_array_equal(np.load(out / f"{k}.npy"), reference, err_msg=k)


@pytest.mark.cross
@pytest.mark.skipif(CROSS_CC is None or QEMU is None or not SYSROOT.is_dir(),
                    reason="needs gcc-aarch64-linux-gnu, libc6-arm64-cross and qemu-user")
def test_aarch64_build_runs_under_qemu_with_identical_logits(tmp_path, tiny_model) -> None:
    build_native = _build_native()

    exe = tmp_path / "forward_dump"
    sources = [str(p) for p in build_native.SOURCES] + [str(REPO / "tests/c/forward_dump.c")]
    proc = subprocess.run(
        [CROSS_CC, *build_native.C_FLAGS, "-I", str(REPO / "native"), *sources, "-lm",
         "-o", str(exe)],
        capture_output=True, text=True, timeout=600, check=False)
    assert proc.returncode == 0, proc.stderr[-5000:]
    out = tmp_path / "logits.bin"
    proc = subprocess.run([QEMU, "-L", str(SYSROOT), str(exe), str(tiny_model), str(out), "2"],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    fields = proc.stdout.split()
    assert fields[:3] == ["kernel", "scalar", "greedy"], proc.stdout
    logits = np.fromfile(out, dtype="<f4").reshape(len(TOKENS), -1)
    # The same numbers as this machine's engine, bit for bit (any of its kernel sets).
    np.testing.assert_array_equal(logits, host_logits(tiny_model))
    assert [int(t) for t in fields[3:]] == host_greedy(tiny_model)
