"""The daemon's side of the chat-template worker process (see template_sandbox).

Why a process: a template can loop over a long string or build gigabytes with `join` or
`format`, and nothing inside one Python process can stop a thread that is busy in C or bound
its memory. A separate process can be given an address-space limit and can be killed. It is
started by exec (subprocess), never by a plain fork: the daemon has threads. One worker
serves every ChatTemplate; a lock lets one render at a time use it (renders take well under
a millisecond, and run in threads of trio.to_thread, never the Trio thread).

- A render that has no reply by its deadline: the worker is killed (SIGKILL, then reaped)
  and the request gets "took longer than N s".
- A worker that ran out of memory exits with EXIT_OUT_OF_MEMORY: "used more than N MB".
- Any other death (a crash, a kill from outside): "the template worker stopped".
In every case the next render starts a fresh worker. The worker is closed at interpreter
exit; if the daemon dies without that, an idle worker sees end of input and exits, and a
busy one dies at its CPU limit.
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from bitnetd_trio.engine import template_sandbox
from bitnetd_trio.engine.template_sandbox import (
    EXIT_OUT_OF_MEMORY,
    HEADER,
    READY,
    REPLY_ERROR,
    REPLY_TEXT,
    ChatTemplateError,
)

#: How long a new worker may take to import jinja2 and say it is ready (a loaded machine).
STARTUP_SECONDS = 30.0
#: How long a closing worker may take to exit on its own before it is killed.
CLOSE_SECONDS = 1.0

# Loads the sandbox by file path with the daemon's sys.path: the worker then runs this very
# file and finds jinja2 where the daemon does, without importing the package.
_BOOTSTRAP = (
    "import json, runpy, sys; paths, script = sys.argv[1:3]; sys.argv[:3] = [script]; "
    "sys.path[:] = json.loads(paths); runpy.run_path(script, run_name='__main__')"
)


class _Timeout(Exception):
    pass


class _Died(Exception):
    pass


class TemplateWorker:
    """One worker process, started when first needed and again after each failure."""

    def __init__(self, memory_mb: int) -> None:
        self.memory_mb = memory_mb
        self._lock = threading.Lock()
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0  # workers started so far (for tests and logs)

    def render(self, source: str, context: dict[str, Any], *, output_limit: int, origin: str,
               deadline_seconds: float) -> str:
        """The template's output, or ChatTemplateError (its own failure, or a limit)."""
        try:
            request = pickle.dumps((source, context, output_limit, origin, deadline_seconds),
                                   protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # a message field that is not plain data
            raise ChatTemplateError(f"chat template: messages are not plain data: {exc}") from exc
        # The reply is the prompt, at most 4 UTF-8 bytes a character, or a short error.
        max_reply = 1 + 4 * output_limit + 16 * 1024
        with self._lock:
            proc = self._running()
            deadline = time.monotonic() + deadline_seconds
            try:
                _write_all(proc.stdin, HEADER.pack(len(request)) + request, deadline)
                size = HEADER.unpack(_read_exact(proc.stdout, HEADER.size, deadline))[0]
                if not 1 <= size <= max_reply:
                    raise _Died
                reply = _read_exact(proc.stdout, size, deadline)
                if reply[:1] not in (REPLY_TEXT, REPLY_ERROR):
                    raise _Died
            except _Timeout:
                self._discard(proc)
                raise ChatTemplateError(_too_long(deadline_seconds)) from None
            except _Died:
                raise self._death(proc, deadline_seconds) from None
        text = reply[1:].decode("utf-8", "surrogatepass")
        if reply[:1] == REPLY_ERROR:
            raise ChatTemplateError(text)
        return text

    def close(self) -> None:
        """Stop the worker: end of input, then SIGKILL if it does not exit at once."""
        if not self._lock.acquire(timeout=CLOSE_SECONDS):
            # A render holds the worker (at exit, in a thread nobody waits for): end the
            # process; the pipes stay open for that render, which sees end of input.
            proc = self._proc
            if proc is not None:
                proc.kill()
                proc.wait()
            return
        try:
            proc, self._proc = self._proc, None
            if proc is None:
                return
            proc.stdin.close()
            try:
                proc.wait(CLOSE_SECONDS)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            proc.stdout.close()
        finally:
            self._lock.release()

    @property
    def pid(self) -> int | None:
        """The running worker's process id, if there is one."""
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    # ---- with the lock held ----

    def _running(self) -> subprocess.Popen[bytes]:
        if self._proc is not None and self._proc.poll() is not None:
            self._discard(self._proc)  # died between renders (killed from outside)
        if self._proc is None:
            self._proc = self._start()
        return self._proc

    def _start(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-c", _BOOTSTRAP, json.dumps([str(p) for p in sys.path]),
             os.path.abspath(template_sandbox.__file__), str(self.memory_mb)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True, bufsize=0,
        )
        os.set_blocking(proc.stdin.fileno(), False)
        try:
            ready = _read_exact(proc.stdout, len(READY), time.monotonic() + STARTUP_SECONDS)
        except (_Timeout, _Died):
            ready = b""
        if ready != READY:
            _end(proc)
            raise ChatTemplateError("chat template: the template worker did not start")
        self.starts += 1
        return proc

    def _discard(self, proc: subprocess.Popen[bytes]) -> None:
        """Kill and reap `proc`; the next render starts a fresh worker."""
        if self._proc is proc:
            self._proc = None
        _end(proc)

    def _death(self, proc: subprocess.Popen[bytes],
               deadline_seconds: float) -> ChatTemplateError:
        """The error for a worker that stopped in the middle of a render or broke the
        protocol; it is killed and reaped."""
        try:
            code = proc.wait(CLOSE_SECONDS)
        except subprocess.TimeoutExpired:
            code = None  # it broke the protocol but lives on
        self._discard(proc)
        if code == EXIT_OUT_OF_MEMORY:
            return ChatTemplateError(f"chat template: used more than {self.memory_mb} MB")
        if code == -signal.SIGXCPU:
            return ChatTemplateError(_too_long(deadline_seconds))
        if code is None:
            return ChatTemplateError("chat template: the template worker sent a malformed reply")
        return ChatTemplateError(
            f"chat template: the template worker stopped (exit status {code})"
        )


def _end(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()  # reaped: no zombie
    proc.stdin.close()
    proc.stdout.close()


def _too_long(deadline_seconds: float) -> str:
    return f"chat template: took longer than {deadline_seconds:g} s"


def _wait(fd: int, events: int, deadline: float) -> None:
    poller = select.poll()
    poller.register(fd, events)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            raise _Timeout
        if poller.poll(left * 1000):
            return


def _write_all(pipe: Any, data: bytes, deadline: float) -> None:
    fd = pipe.fileno()
    view = memoryview(data)
    while view:
        _wait(fd, select.POLLOUT, deadline)
        try:
            n = os.write(fd, view)
        except BlockingIOError:
            continue
        except (BrokenPipeError, OSError) as exc:
            raise _Died from exc
        view = view[n:]


def _read_exact(pipe: Any, n: int, deadline: float) -> bytes:
    fd = pipe.fileno()
    chunks: list[bytes] = []
    while n:
        _wait(fd, select.POLLIN, deadline)
        chunk = os.read(fd, min(n, 1 << 20))
        if not chunk:
            raise _Died
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


_shared: TemplateWorker | None = None
_shared_lock = threading.Lock()


def shared_worker(memory_mb: int) -> TemplateWorker:
    """The process's worker, created on first use and closed at exit. A new `memory_mb`
    replaces it (tests change the limit)."""
    global _shared
    with _shared_lock:
        if _shared is None or _shared.memory_mb != memory_mb:
            if _shared is None:
                atexit.register(_close_shared)
            else:
                _shared.close()
            _shared = TemplateWorker(memory_mb)
        return _shared


def _close_shared() -> None:
    if _shared is not None:
        _shared.close()
