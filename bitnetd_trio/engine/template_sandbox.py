"""The code that runs untrusted chat templates, and the worker process it runs in.

Chat templates come from model files downloaded from the internet. Jinja's sandbox refuses
unsafe attribute access and mutation, and the budget below stops the common runaways early
with a precise message (loops over `range` and the messages, `*` / `**` results, output
size). Neither can bound everything a template may do: a loop over a long string, a `join`
or `format` that builds gigabytes. So the daemon never renders a template itself; it sends
each render to a worker process running `main()` below, which caps its own address space
(RLIMIT_AS), and the daemon kills it when a render passes its deadline
(`template_worker.TemplateWorker`).

This module imports only the standard library and jinja2: the worker loads it by file path,
not as part of the package, so that starting it costs no more than Python and jinja2.

Protocol over the worker's stdin/stdout, each message a 4-byte big-endian length and a body:
- the worker writes one byte, READY, once it has set its limits;
- a request is a pickle of `(source, context, output_limit, origin, deadline_seconds)` (the
  daemon is the trusted side, so the worker may unpickle what it sends);
- a reply is one status byte and UTF-8 text (lone surrogates kept): REPLY_TEXT and the
  rendered prompt, or REPLY_ERROR and the error message. The daemon never unpickles what the
  worker sends: a template that found a way out of the sandbox must not reach the daemon.
- on MemoryError the worker exits with EXIT_OUT_OF_MEMORY instead of replying (it might not
  have the memory to reply, and a fresh process is cleaner than a fragmented heap).
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import signal
import struct
import sys
from collections import OrderedDict
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

#: Limits inside the sandbox: they stop the common runaways with a precise message.
MAX_ITERATIONS = 1_000_000  # loop steps over range() and message lists, in all
MAX_VALUE_SIZE = 1 << 20  # items of a str/list made by * in a template
MAX_RANGE = 100_000  # items of one range()

READY = b"R"
REPLY_TEXT = b"T"
REPLY_ERROR = b"E"
EXIT_OUT_OF_MEMORY = 3
HEADER = struct.Struct(">I")

#: Compiled templates the worker keeps, by source (a daemon has one or two).
_CACHE_SIZE = 16
#: Error messages can quote template values (raise_exception's argument): keep them readable.
_MAX_ERROR_CHARS = 2000


class ChatTemplateError(ValueError):
    """A template that cannot be compiled or fails (or refuses) to render these messages."""


# ---- the budget ----


class _Budget:
    def __init__(self, max_iterations: int) -> None:
        self.left = max_iterations

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise ChatTemplateError("chat template exceeded its loop budget")


# One render at a time per worker process, so a module global is enough.
_budget: _Budget | None = None


def _spend(n: int = 1) -> None:
    if _budget is not None:
        _budget.spend(n)


class _CountedList(list):
    """A list whose iteration (and that of its slices) draws on the render budget."""

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            _spend()
            yield item

    def __getitem__(self, key: Any) -> Any:
        item = super().__getitem__(key)
        return _CountedList(item) if isinstance(key, slice) else item


def _counted(value: Any) -> Any:
    """`value` with every list inside it made a _CountedList."""
    if isinstance(value, dict):
        return {k: _counted(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return _CountedList(_counted(v) for v in value)
    return value


def _budgeted_range(*args: int) -> range:
    r = range(*args)
    if len(r) > MAX_RANGE:
        raise ChatTemplateError("chat template: range() too large")
    _spend(len(r))
    return r


# ---- the environment ----


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the request: {message}")


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > 256 and not (
                isinstance(left, (int, float)) and abs(left) <= 1
            ):
                raise ChatTemplateError("chat template: exponent too large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > MAX_VALUE_SIZE:
                        raise ChatTemplateError("chat template: repeated value too large")
        return super().call_binop(context, operator, left, right)


def _environment() -> jinja2.Environment:
    env = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True,
                           extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _budgeted_range
    return env


def compile_template(source: str, origin: str) -> jinja2.Template:
    """The compiled template, or ChatTemplateError naming `origin` if it does not compile."""
    try:
        return _environment().from_string(source)
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template ({origin}) does not compile: {exc}") from exc
    except RecursionError as exc:
        raise ChatTemplateError(
            f"chat template ({origin}) does not compile: nested too deeply"
        ) from exc


# ---- one render ----


def render(template: jinja2.Template, context: dict[str, Any], output_limit: int,
           origin: str) -> str:
    """The template's output for `context`; every failure is a ChatTemplateError, except
    MemoryError, which the caller handles (in the worker: by exiting)."""
    global _budget
    _budget = _Budget(MAX_ITERATIONS)
    chunks: list[str] = []
    size = 0
    try:
        for chunk in template.generate(_counted(context)):
            size += len(chunk)
            if size > output_limit:
                raise ChatTemplateError(
                    f"chat template output exceeds {output_limit} characters"
                )
            chunks.append(chunk)
            _spend()
    except (ChatTemplateError, MemoryError):
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"chat template ({origin}) failed: {exc}") from exc
    except RecursionError as exc:
        raise ChatTemplateError(f"chat template ({origin}) recursed too deeply") from exc
    except Exception as exc:  # the template's own bug (a TypeError, ...): the same for users
        raise ChatTemplateError(
            f"chat template ({origin}) failed: {type(exc).__name__}: {exc}"
        ) from exc
    finally:
        _budget = None
    return "".join(chunks)


# ---- the worker process ----


def _read_exact(stream: Any, n: int) -> bytes | None:
    """n bytes, or None at end of input (the daemon closed the pipe or went away)."""
    data = stream.read(n)
    if data is None or len(data) < n:
        return None
    return data


def _set_limits(memory_mb: int) -> None:
    cap = memory_mb << 20
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    # SIGXCPU (the CPU limit, set per render) and SIGABRT would otherwise write core files.
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


def _limit_cpu(seconds: float) -> None:
    """Let this render use `seconds` more of CPU time and then die of SIGXCPU. The daemon's
    deadline kills a runaway render first; this one catches a render that outlives the daemon
    (an orphan has nobody to kill it)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    used = usage.ru_utime + usage.ru_stime
    _, hard = resource.getrlimit(resource.RLIMIT_CPU)
    soft = int(used + seconds) + 1
    if hard != resource.RLIM_INFINITY:
        soft = min(soft, hard)
    resource.setrlimit(resource.RLIMIT_CPU, (soft, hard))


def main(argv: list[str]) -> None:
    """The worker: `python <this file> MEMORY_MB`, started by template_worker."""
    memory_mb = int(argv[0])
    # The daemon decides when this process ends (it closes the pipe or kills it); a Ctrl-C
    # sent to the terminal's process group is for the daemon.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Keep the protocol's pipes to ourselves: fds 0 and 1 become /dev/null, so nothing that
    # prints can corrupt a reply.
    requests = os.fdopen(os.dup(0), "rb")
    replies = os.fdopen(os.dup(1), "wb")
    null = os.open(os.devnull, os.O_RDWR)
    os.dup2(null, 0)
    os.dup2(null, 1)
    os.close(null)
    _set_limits(memory_mb)
    cache: OrderedDict[str, jinja2.Template] = OrderedDict()
    replies.write(READY)
    replies.flush()
    while True:
        header = _read_exact(requests, HEADER.size)
        if header is None:
            return
        body = _read_exact(requests, HEADER.unpack(header)[0])
        if body is None:
            return
        reply = _serve(body, cache)
        del body
        replies.write(HEADER.pack(len(reply)))
        replies.write(reply)
        replies.flush()
        del reply


def _serve(request: bytes, cache: OrderedDict[str, jinja2.Template]) -> bytes:
    """The reply to one request. MemoryError ends the process (see the module docstring)."""
    source, context, output_limit, origin, deadline = pickle.loads(request)
    _limit_cpu(deadline + 2)
    try:
        template = cache.get(source)
        if template is None:
            template = compile_template(source, origin)
            cache[source] = template
            if len(cache) > _CACHE_SIZE:
                cache.popitem(last=False)
        cache.move_to_end(source)
        text = render(template, context, output_limit, origin)
        return REPLY_TEXT + text.encode("utf-8", "surrogatepass")
    except MemoryError:
        os._exit(EXIT_OUT_OF_MEMORY)
    except ChatTemplateError as exc:
        return REPLY_ERROR + str(exc)[:_MAX_ERROR_CHARS].encode("utf-8", "surrogatepass")

if __name__ == "__main__":
    try:
        main(sys.argv[1:])
    except MemoryError:
        os._exit(EXIT_OUT_OF_MEMORY)
