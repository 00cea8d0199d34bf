"""Running the real bitnetd as a subprocess in tests: config files, a notify socket bound by
the test (path or abstract namespace), HTTP helpers. Used by tests/test_daemon_process.py."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import trio

REPO = Path(__file__).resolve().parents[1]
CHILD_ENV = {
    **{
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("BITNETD_", "NOTIFY_", "WATCHDOG_", "LISTEN_"))
        and k not in ("MAX_THREADS", "MODEL_INSTANCES")
    },
    "PYTHONPATH": str(REPO),
    "PYTHONUNBUFFERED": "1",
}
BITNETD = [sys.executable, "-m", "bitnetd_trio.daemon.cli"]
BITNETCTL = [sys.executable, "-m", "bitnetd_trio.tools.control"]


def run_bitnetd(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """`bitnetd ARGS` to its end: the exit status and its output as text."""
    return subprocess.run(
        [*BITNETD, *args], env=CHILD_ENV, capture_output=True, text=True, timeout=timeout,
        check=False,
    )


def write_config(
    path: Path,
    *,
    model: Path,
    sections: dict[str, dict[str, object]] | None = None,
) -> Path:
    """A bitnetd.conf for tests: small and fast, every value overridable."""
    conf: dict[str, dict[str, object]] = {
        "daemon": {"loglevel": "info"},
        "model": {"path": model, "threads": 1, "parallel": 4, "ctx_size": 0},
        "server": {"listen": "127.0.0.1:0", "drain_timeout": 10},
    }
    for section, values in (sections or {}).items():
        conf.setdefault(section, {}).update(values)
    lines = []
    for section, values in conf.items():
        lines.append(f"[{section}]")
        for key, value in values.items():
            if value is not None:
                lines.append(f"{key} = {value}")
        lines.append("")
    path.write_text("\n".join(lines))
    return path


@dataclass
class Notification:
    at: float  # trio.current_time()
    fields: list[tuple[str, str]]

    def has(self, key: str, value: str | None = None) -> bool:
        return any(k == key and (value is None or v == value) for k, v in self.fields)

    def get(self, key: str, default: str | None = None) -> str | None:
        for k, v in self.fields:
            if k == key:
                return v
        return default


@dataclass
class NotifySocket:
    """A datagram socket standing in for systemd's notification socket."""

    address: str
    sock: trio.socket.SocketType
    messages: list[Notification] = field(default_factory=list)
    _changed: trio.Event = field(default_factory=trio.Event)

    @classmethod
    def bind(cls, tmp_path: Path, abstract: bool) -> NotifySocket:
        sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"bitnetd-test-{uuid.uuid4().hex}"
            sock._sock.bind(b"\0" + name.encode())  # sync bind: no resolution needed
            return cls("@" + name, sock)
        path = str(tmp_path / "notify.sock")
        sock._sock.bind(path)
        return cls(path, sock)

    async def collect(self) -> None:
        while True:
            data = await self.sock.recv(65536)
            fields = [
                tuple(line.split("=", 1)) for line in data.decode().split("\n") if "=" in line
            ]
            self.messages.append(Notification(trio.current_time(), fields))  # type: ignore[arg-type]
            self._changed.set()
            self._changed = trio.Event()

    async def wait_for(
        self, pred: Callable[[Notification], bool], *, after: int = 0, timeout: float = 60
    ) -> int:
        """Index of the first message from `after` on that satisfies pred."""
        with trio.fail_after(timeout):
            while True:
                for i in range(after, len(self.messages)):
                    if pred(self.messages[i]):
                        return i
                await self._changed.wait()


class Daemon:
    """A bitnetd subprocess and the ways to talk to it."""

    def __init__(
        self,
        config: Path,
        *,
        extra_args: list[str] | None = None,
        env: dict[str, str] | None = None,
        foreground: bool = True,
        argv: list[str] | None = None,
    ) -> None:
        self.config = config
        args = (argv or BITNETD) + (["-f"] if foreground else []) + ["-c", str(config)]
        args += extra_args or []
        # stderr into a file, not a pipe: a daemon that logs a lot must never block on it.
        # (Held for the daemon's whole life, closed with the object: no with-block.)
        self._err = tempfile.TemporaryFile(  # noqa: SIM115
            mode="w+", encoding="utf-8", errors="replace"
        )
        self.proc = subprocess.Popen(
            args, env={**CHILD_ENV, **(env or {})}, stdout=subprocess.DEVNULL, stderr=self._err
        )
        self.port: int | None = None

    @property
    def stderr(self) -> str:
        self._err.seek(0)
        return self._err.read()

    @property
    def pid(self) -> int:
        return self.proc.pid

    def base_url(self) -> str:
        assert self.port is not None
        return f"http://127.0.0.1:{self.port}"

    def set_port_from_status(self, status: str) -> None:
        m = re.search(r"127\.0\.0\.1:(\d+)", status)
        assert m, status
        self.port = int(m.group(1))

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    async def wait(self, timeout: float = 60) -> int:
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(0.02)
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


async def wait_http(url: str, timeout: float = 60) -> httpx.Response:
    """Poll until something answers at url (any status)."""
    async with httpx.AsyncClient(timeout=5) as client:
        with trio.fail_after(timeout):
            while True:
                try:
                    return await client.get(url)
                except httpx.TransportError:
                    await trio.sleep(0.05)


@dataclass
class StreamResult:
    chunks: list[dict]
    done: bool
    status: int

    @property
    def finish_reasons(self) -> list[str]:
        return [
            c["choices"][0]["finish_reason"]
            for c in self.chunks
            if c.get("choices") and c["choices"][0].get("finish_reason")
        ]

    @property
    def completion_tokens(self) -> int | None:
        for c in self.chunks:
            if c.get("usage"):
                return c["usage"]["completion_tokens"]
        return None

    @property
    def text(self) -> str:
        return "".join(c["choices"][0].get("text", "") for c in self.chunks if c.get("choices"))


async def stream_completion(
    client: httpx.AsyncClient,
    base: str,
    *,
    max_tokens: int,
    on_chunk: Callable[[int], None] | None = None,
    prompt: str = "The quick brown fox",
) -> StreamResult:
    body = {
        "prompt": prompt,
        "max_tokens": max_tokens,
        "stream": True,
        "ignore_eos": True,
        "temperature": 0.0,
        "stream_options": {"include_usage": True},
    }
    chunks: list[dict] = []
    done = False
    async with client.stream("POST", base + "/v1/completions", json=body) as resp:
        if resp.status_code != 200:
            await resp.aread()
            return StreamResult([], False, resp.status_code)
        async for line in resp.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                done = True
                continue
            chunks.append(json.loads(payload))
            if on_chunk is not None:
                on_chunk(len(chunks))
    return StreamResult(chunks, done, resp.status_code)


def read_proc_ids(pid: int) -> list[tuple[str, list[int], list[int]]]:
    """(task id, Uid line, Gid line) for every thread of pid, from /proc."""
    out = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")):
        uid = gid = []
        with open(f"/proc/{pid}/task/{tid}/status") as f:
            for line in f:
                if line.startswith("Uid:"):
                    uid = [int(x) for x in line.split()[1:]]
                elif line.startswith("Gid:"):
                    gid = [int(x) for x in line.split()[1:]]
        out.append((tid, uid, gid))
    return out


def wait_until(pred: Callable[[], bool], timeout: float = 30) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(0.02)
    return pred()


def has_ipv6() -> bool:
    """This machine can bind ::1 (some containers have no IPv6 loopback)."""
    try:
        with socket.socket(socket.AF_INET6) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False
