"""Work whose CPU cost grows with the request (parsing a large JSON body, rendering a chat
template, tokenizing a prompt, decoding ids) runs in worker threads, never on the Trio thread:
there it would stall every other request, /health included, for seconds on a 1 MB prompt.

One `CpuWork` belongs to the application; its CapacityLimiter bounds the threads doing such
work at once to the number of CPUs, so many large requests queue for a thread instead of
starting one each. Small requests (under INLINE_BYTES of body) run inline: a thread hand-over
costs more than their work.

Cancellation: a request cancelled while its work runs (the client left) stops waiting at once;
the thread finishes the call on its own, its result is dropped, and it keeps its limiter place
until then, so abandoned work still counts against the limit. The work must therefore only
compute and return: no engine jobs or other state may be created inside it.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TypeVar

import trio

__all__ = ["INLINE_BYTES", "CpuWork"]

T = TypeVar("T")

#: Requests with a body below this size do their work on the Trio thread.
INLINE_BYTES = 64 * 1024


class CpuWork:
    """Runs request-sized CPU work in a bounded set of worker threads."""

    def __init__(self, threads: int | None = None) -> None:
        self.limiter = trio.CapacityLimiter(threads or os.cpu_count() or 2)

    async def run(self, size: float, fn: Callable[..., T], *args: object) -> T:
        """`fn(*args)`, in a worker thread when `size` (the request body's bytes) is at least
        INLINE_BYTES, else inline. Exceptions propagate as if called directly."""
        if size < INLINE_BYTES:
            return fn(*args)
        return await trio.to_thread.run_sync(
            fn, *args, limiter=self.limiter, abandon_on_cancel=True
        )
