"""Stop strings in streamed text, found across token boundaries (sans-I/O).

The inference thread feeds each sequence's decoded text through a `StopMatcher`, so text that
might still become a stop string is held back instead of being streamed to the client.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["StopMatcher"]


class StopMatcher:
    """Finds stop strings in streamed text, holding back what could still become one.

    `push(text)` returns `(emit, hit)`: `emit` is the text that is certainly not part of a stop
    string; when `hit` is true a stop string was found, `emit` is the text before it and
    everything after it is dropped. Text that might be the start of a stop string stays in the
    matcher until later text decides; `flush()` returns it at the end of generation.
    """

    def __init__(self, stops: Iterable[str]) -> None:
        self.stops: tuple[str, ...] = tuple(s for s in stops if s)
        self._held = ""
        self.hit = False
        self.matched = ""  # the stop string found

    def push(self, text: str) -> tuple[str, bool]:
        if self.hit:
            return "", True
        if not self.stops:
            return text, False
        buf = self._held + text
        first = -1
        for stop in self.stops:
            i = buf.find(stop)
            if i >= 0 and (first < 0 or i < first):
                first = i
                self.matched = stop
        if first >= 0:
            self._held = ""
            self.hit = True
            return buf[:first], True
        hold = self._longest_stop_prefix_suffix(buf)
        self._held = buf[len(buf) - hold :] if hold else ""
        return buf[: len(buf) - hold], False

    def _longest_stop_prefix_suffix(self, buf: str) -> int:
        """Length of the longest suffix of `buf` that is a proper prefix of some stop string."""
        best = 0
        for stop in self.stops:
            for k in range(min(len(stop) - 1, len(buf)), best, -1):
                if buf.endswith(stop[:k]):
                    best = k
                    break
        return best

    def flush(self) -> str:
        """The held-back text (generation ended without completing a stop string)."""
        if self.hit:
            return ""
        held, self._held = self._held, ""
        return held
