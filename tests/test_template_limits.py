"""Chat templates are bounded in time and memory whatever they do: Jinja renders run in a
worker process with an address-space limit that is killed at the deadline
(bitnetd_trio.engine.template_worker)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from bitnetd_trio.engine import chat, template_worker
from bitnetd_trio.engine.chat import ChatTemplate, ChatTemplateError

BOS, EOS = "<|begin_of_text|>", "<|end_of_text|>"
#: However loaded the machine, a bounded render ends well within this; a regression that
#: hangs fails here instead of hanging the suite.
HANG_SECONDS = 30.0
USER = [{"role": "user", "content": "hi"}]
SIMPLE = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"

HOSTILE = {
    # Loops over a string draw on no budget: 10**12 silent steps.
    "nested-loops-over-a-string":
        "{% set s='x'*1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}",
    # Methods that build gigabytes out of values the budget allows.
    "join": "{{ 'a'.join(['x'*1000000]*2000) }}",
    "format-width": "{{ '{:>1000000000}'.format(1) }}",
}


def within(seconds: float, fn: Callable[[], Any]) -> Any:
    """fn() run in a thread that must finish within `seconds`; its result or its exception."""
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            outcome["result"] = fn()
        except BaseException as exc:  # handed to the test's thread
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still running after {seconds} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["result"]


def rss_mb() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) // 1024
    raise AssertionError("no VmRSS")


def worker() -> template_worker.TemplateWorker:
    return template_worker.shared_worker(chat.MAX_MEMORY_MB)


def wait_until_dead(pid: int) -> None:
    deadline = time.monotonic() + 5
    while not dead(pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert dead(pid)


def dead(pid: int) -> bool:
    """True once `pid` no longer runs (a zombie, or reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1].startswith("Z")
    except FileNotFoundError:
        return True


def reaped(pid: int) -> bool:
    """True once `pid` is gone, zombie and all."""
    return not os.path.exists(f"/proc/{pid}")


@pytest.mark.parametrize("src", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_template_is_an_error_within_the_deadline(src):
    template = ChatTemplate.from_model(src, None, BOS, EOS)
    before = rss_mb()
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError, match=r"^chat template: (took longer than 2 s|used "
                                                r"more than 512 MB)$"):
        within(HANG_SECONDS, lambda: template.render(USER))
    assert time.monotonic() - t0 < chat.MAX_SECONDS + 10
    assert rss_mb() - before < 100  # the daemon's own memory is never the template's


def test_messages_name_the_limit_that_was_hit():
    looping = ChatTemplate.from_model(HOSTILE["nested-loops-over-a-string"], None, BOS, EOS)
    with pytest.raises(ChatTemplateError, match="took longer than 2 s"):
        within(HANG_SECONDS, lambda: looping.render(USER))
    growing = ChatTemplate.from_model(HOSTILE["join"], None, BOS, EOS)
    with pytest.raises(ChatTemplateError, match="used more than 512 MB"):
        within(HANG_SECONDS, lambda: growing.render(USER))


def test_worker_has_a_memory_limit():
    within(HANG_SECONDS, lambda: ChatTemplate(SIMPLE).render(USER))
    pid = worker().pid
    assert pid is not None
    with open(f"/proc/{pid}/limits") as f:
        line = next(line for line in f if line.startswith("Max address space"))
    assert line.split()[3:5] == [str(512 << 20)] * 2


def test_worker_recovers_after_a_hostile_template():
    normal = ChatTemplate.from_model(SIMPLE, None, BOS, EOS)
    assert within(HANG_SECONDS, lambda: normal.render(USER)) == "[user]hi"
    first = worker().pid
    for src in HOSTILE.values():
        hostile = ChatTemplate.from_model(src, None, BOS, EOS)
        with pytest.raises(ChatTemplateError):
            within(HANG_SECONDS, lambda: hostile.render(USER))
        assert reaped(first)  # killed or exited, and reaped
        assert within(HANG_SECONDS, lambda: normal.render(USER)) == "[user]hi"
        assert worker().pid != first
        first = worker().pid


def test_worker_killed_from_outside_is_replaced():
    normal = ChatTemplate.from_model(SIMPLE, None, BOS, EOS)
    within(HANG_SECONDS, lambda: normal.render(USER))
    pid = worker().pid
    os.kill(pid, signal.SIGKILL)
    wait_until_dead(pid)  # killed between renders, not in the middle of the next one
    assert within(HANG_SECONDS, lambda: normal.render(USER)) == "[user]hi"
    assert reaped(pid) and worker().pid != pid


def test_concurrent_renders_from_four_threads():
    templates = [
        ChatTemplate.from_model(SIMPLE, None, BOS, EOS),
        ChatTemplate.from_model("{{ bos_token }}{% for m in messages %}{{ m.content | upper }}"
                                "{% endfor %}", None, BOS, EOS),
    ]
    errors: list[str] = []

    def run(n: int) -> None:
        template = templates[n % 2]
        for i in range(50):
            msgs = [{"role": "user", "content": f"t{n}-{i}"}]
            expected = f"[user]t{n}-{i}" if n % 2 == 0 else f"{BOS}T{n}-{i}"
            got = template.render(msgs)
            if got != expected:
                errors.append(f"{got!r} != {expected!r}")

    threads = [threading.Thread(target=run, args=(n,), daemon=True) for n in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(HANG_SECONDS)
        assert not t.is_alive()
    assert errors == []


def test_a_slow_render_delays_others_but_they_succeed():
    hostile = ChatTemplate.from_model(HOSTILE["nested-loops-over-a-string"], None, BOS, EOS)
    normal = ChatTemplate.from_model(SIMPLE, None, BOS, EOS)
    results: list[Any] = []

    def bad() -> None:
        try:
            hostile.render(USER)
        except ChatTemplateError as exc:
            results.append(str(exc))

    t = threading.Thread(target=bad, daemon=True)
    t.start()
    time.sleep(0.2)  # the hostile render holds the worker
    assert within(HANG_SECONDS, lambda: normal.render(USER)) == "[user]hi"
    t.join(HANG_SECONDS)
    assert results == ["chat template: took longer than 2 s"]


def test_trained_format_renders_without_a_worker(monkeypatch):
    def no_worker(*args: Any) -> None:
        raise AssertionError("the trained format started a worker")

    monkeypatch.setattr(template_worker, "shared_worker", no_worker)
    assert ChatTemplate(None, bos_token=BOS).render(USER) == f"{BOS}User: hi<|eot_id|>Assistant: "


def test_close_reaps_the_worker_and_the_next_render_starts_one():
    w = template_worker.TemplateWorker(chat.MAX_MEMORY_MB)
    assert w.render(SIMPLE, {"messages": USER}, output_limit=100, origin="test",
                    deadline_seconds=chat.MAX_SECONDS) == "[user]hi"
    pid = w.pid
    w.close()
    assert reaped(pid)
    assert w.render(SIMPLE, {"messages": USER}, output_limit=100, origin="test",
                    deadline_seconds=chat.MAX_SECONDS) == "[user]hi"
    assert w.pid != pid and w.starts == 2
    w.close()


def test_worker_ends_with_the_interpreter():
    code = (
        "from bitnetd_trio.engine import chat, template_worker\n"
        f"chat.ChatTemplate({SIMPLE!r}).render([{{'role': 'user', 'content': 'x'}}])\n"
        "print(template_worker.shared_worker(chat.MAX_MEMORY_MB).pid, flush=True)\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                         timeout=HANG_SECONDS, check=True)
    pid = int(out.stdout)
    # Closed and reaped by its parent's atexit, before that parent exited.
    assert reaped(pid)


def test_close_during_a_render_ends_both():
    w = template_worker.TemplateWorker(chat.MAX_MEMORY_MB)
    errors: list[str] = []

    def render() -> None:
        try:
            w.render(HOSTILE["nested-loops-over-a-string"], {"messages": USER},
                     output_limit=100, origin="test", deadline_seconds=HANG_SECONDS)
        except ChatTemplateError as exc:
            errors.append(str(exc))

    t = threading.Thread(target=render, daemon=True)
    t.start()
    while w.pid is None:
        time.sleep(0.01)
    pid = w.pid
    time.sleep(0.2)  # the render is under way
    within(HANG_SECONDS, w.close)
    t.join(HANG_SECONDS)
    assert errors == ["chat template: the template worker stopped (exit status -9)"]
    assert reaped(pid)
