"""The container image, for real with podman: built from the repository's Containerfile on a local
Debian base, run with a model volume: /health, a streamed chat, the demo model when nothing is
mounted, a non-root PID 1 that drains and exits 0 on SIGTERM.

Runs only where podman works and a base image exists or can be made (debootstrap, as root):
elsewhere (CI) the module is skipped at collection, without running anything. The base image is
made once and kept (`localhost/debian-base:bookworm`, or $BITNETD_TEST_BASE_IMAGE); the built
image is kept too, so a second run reuses podman's layer cache.

Podman settings for restricted sandboxes (see README, Deploy): runc as the runtime when it is
installed ($BITNETD_TEST_PODMAN_RUNTIME overrides, empty for podman's default), explicit ulimits
and a containers.conf without default ulimits.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import socket
import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PODMAN = shutil.which("podman")

pytestmark = [
    pytest.mark.container,
    pytest.mark.skipif(PODMAN is None, reason="podman is not installed"),
]

BASE_IMAGE = os.environ.get("BITNETD_TEST_BASE_IMAGE", "localhost/debian-base:bookworm")
IMAGE = "localhost/bitnetd-test:latest"
ULIMITS = ["--ulimit", "nofile=4096:4096", "--ulimit", "nproc=4096:4096"]


def _runtime_args() -> list[str]:
    runtime = os.environ.get("BITNETD_TEST_PODMAN_RUNTIME")
    if runtime is None:
        runtime = "runc" if shutil.which("runc") else ""
    return ["--runtime", runtime] if runtime else []


@dataclasses.dataclass
class Podman:
    env: dict[str, str]
    global_args: list[str]

    def run(self, *args: str, timeout: float = 120, check: bool = True,
            input: bytes | None = None) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [PODMAN or "podman", *self.global_args, *args], env=self.env, input=input,
            capture_output=True, timeout=timeout, check=False,
        )
        out = subprocess.CompletedProcess(
            proc.args, proc.returncode, proc.stdout.decode(errors="replace"),
            proc.stderr.decode(errors="replace"),
        )
        if check and out.returncode != 0:
            raise AssertionError(
                f"{' '.join(args[:3])} failed ({out.returncode}):\n{out.stdout[-3000:]}\n"
                f"{out.stderr[-3000:]}"
            )
        return out


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Podman:
    conf = tmp_path_factory.mktemp("podman") / "containers.conf"
    conf.write_text("[containers]\ndefault_ulimits = []\n")
    p = Podman({**os.environ, "CONTAINERS_CONF": str(conf)}, _runtime_args())
    if p.run("info", check=False, timeout=60).returncode != 0:
        pytest.skip("podman is installed but does not work here (podman info failed)")
    return p


def _make_base_image(p: Podman, tmp: Path) -> None:
    """A minimal Debian 12 root file system imported as BASE_IMAGE (about a minute)."""
    if shutil.which("debootstrap") is None or os.geteuid() != 0:
        pytest.skip(f"no base image {BASE_IMAGE}, and debootstrap (as root) cannot make one")
    rootfs = tmp / "rootfs"
    subprocess.run(
        ["debootstrap", "--variant=minbase", "bookworm", str(rootfs)],
        capture_output=True, timeout=1200, check=True,
    )
    tar = subprocess.Popen(["tar", "-C", str(rootfs), "-c", "."], stdout=subprocess.PIPE)
    try:
        subprocess.run(
            [PODMAN or "podman", *p.global_args, "import", "-", BASE_IMAGE],
            env=p.env, stdin=tar.stdout, capture_output=True, timeout=600, check=True,
        )
    finally:
        assert tar.stdout is not None
        tar.stdout.close()
        tar.wait()
    shutil.rmtree(rootfs, ignore_errors=True)


@pytest.fixture(scope="module")
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    if podman.run("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        _make_base_image(podman, tmp_path_factory.mktemp("base"))
    build = ["build", "--format", "docker", *ULIMITS, "--build-arg", f"BASE_IMAGE={BASE_IMAGE}",
             "-t", IMAGE, "-f", str(REPO / "Containerfile")]
    # Behind a TLS-intercepting proxy, pip in the build needs the CA bundle pip uses here.
    cert = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    if cert and Path(cert).is_file():
        build += ["--secret", f"id=pip_cert,src={cert}"]
    started = time.monotonic()
    podman.run(*build, str(REPO), timeout=1800)
    size = int(podman.run("image", "inspect", "--format", "{{.Size}}", IMAGE).stdout.strip())
    print(f"\nimage {IMAGE} built in {time.monotonic() - started:.1f} s: {size / 1e6:.0f} MB")
    return IMAGE


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bitnetd_trio.engine import gguf_writer as gw

    d = tmp_path_factory.mktemp("models")
    # A long context, so a stream is still running when the stop signal comes.
    gw.write_model(d / "ggml-model-i2_s.gguf", dataclasses.replace(gw.TINY, n_ctx=16384), 0)
    d.chmod(0o755)
    (d / "ggml-model-i2_s.gguf").chmod(0o644)  # the image's user is not this one
    return d


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclasses.dataclass
class Container:
    name: str
    url: str
    started: float  # time.monotonic() before `podman run`


@pytest.fixture
def run_container(podman: Podman, image: str) -> Iterator:
    names: list[str] = []

    def start(*args: str) -> Container:
        name = f"bitnetd-test-{os.getpid()}-{len(names)}"
        port = _free_port()
        started = time.monotonic()
        podman.run("run", "-d", "--name", name, *ULIMITS, "-p", f"127.0.0.1:{port}:8080",
                   *args, image)
        names.append(name)
        return Container(name, f"http://127.0.0.1:{port}", started)

    yield start
    for name in names:
        podman.run("rm", "-f", "-t", "0", name, check=False)


def _get(url: str, timeout: float = 5) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wait_ready(podman: Podman, c: Container, timeout: float = 120) -> float:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if _get(c.url + "/health", timeout=2)[0] == 200:
                return time.monotonic() - c.started
        except OSError:
            pass
        state = podman.run("inspect", "--format", "{{.State.Status}}", c.name).stdout.strip()
        if state not in ("running", "created", "configured", "initialized"):
            logs = podman.run("logs", c.name, check=False)
            raise AssertionError(f"container {state}:\n{logs.stdout}{logs.stderr}")
        time.sleep(0.05)
    raise AssertionError(f"not ready after {timeout} s")


def _post_stream(url: str, body: dict, timeout: float = 60) -> str:
    req = urllib.request.Request(url, json.dumps(body).encode(),
                                 {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        assert r.status == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        return r.read().decode()


def test_image_serves_a_mounted_model_and_stops_cleanly(podman, run_container, model_dir):
    c = run_container("-v", f"{model_dir}:/models:ro",
                      "-e", "MAX_THREADS=1", "-e", "MODEL_INSTANCES=2")
    ready = _wait_ready(podman, c)
    print(f"\nstart to ready: {ready:.2f} s")

    status, body = _get(c.url + "/health")
    assert (status, json.loads(body)) == (200, {"status": "ok"})
    assert _get(c.url + "/health/live")[0] == 200
    status, body = _get(c.url + "/v1/models")
    card = json.loads(body)["data"][0]
    assert card["id"] == "ggml-model-i2_s.gguf" and card["meta"]["demo"] is False
    assert card["meta"]["parallel"] == 2  # MODEL_INSTANCES reached the daemon
    # The image's HEALTHCHECK (kept by --format docker) passes.
    assert podman.run("healthcheck", "run", c.name, check=False).returncode == 0
    # Not root; the daemon itself is PID 1 (it gets SIGTERM directly).
    assert podman.run("exec", c.name, "id", "-u").stdout.strip() != "0"
    top = podman.run("top", c.name, "pid", "args").stdout
    assert any(line.split()[:1] == ["1"] and "bitnetd" in line for line in top.splitlines())

    text = _post_stream(c.url + "/v1/chat/completions", {
        "messages": [{"role": "user", "content": "Hello"}], "stream": True, "max_tokens": 8})
    assert text.rstrip("\n").endswith("data: [DONE]")
    assert '"chat.completion.chunk"' in text

    # SIGTERM while a long stream runs: the stream ends cleanly, the daemon exits 0.
    result: dict[str, object] = {}

    def long_stream() -> None:
        try:
            result["text"] = _post_stream(c.url + "/v1/completions", {
                "prompt": "Once", "stream": True, "max_tokens": 16000, "ignore_eos": True})
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            result["error"] = exc

    reader = threading.Thread(target=long_stream)
    reader.start()
    time.sleep(0.3)
    podman.run("stop", "-t", "30", c.name, timeout=60)
    reader.join(60)
    assert "error" not in result, result
    assert str(result["text"]).rstrip("\n").endswith("data: [DONE]")
    state = podman.run("inspect", "--format", "{{.State.ExitCode}}", c.name).stdout.strip()
    logs = podman.run("logs", c.name).stderr + podman.run("logs", c.name).stdout
    assert state == "0", logs
    assert "SIGTERM received" in logs and "draining" in logs
    assert "bitnetd stopped" in logs


def test_image_without_a_model_serves_the_demo_model(podman, run_container):
    c = run_container()
    _wait_ready(podman, c)
    card = json.loads(_get(c.url + "/v1/models")[1])["data"][0]
    assert card["id"] == "bitnet-demo" and card["meta"]["demo"] is True
    logs = podman.run("logs", c.name)
    assert "no model at /models/ggml-model-i2_s.gguf: serving the demo model" in (
        logs.stdout + logs.stderr)
