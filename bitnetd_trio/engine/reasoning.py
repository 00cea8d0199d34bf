"""Thinking blocks (model-format §6, http-api §1.1): chat templates that mark the model's
reasoning with `<think>...</think>` (Qwen3's, Ternary Bonsai's) get it kept apart from the
answer, as vLLM and llama.cpp do: `reasoning_content` beside `content`.

`template_thinks(source)` tells such templates apart (on the template source: it mentions
`<think>`); every other template is left alone. `ThinkSplitter` reads generated text
incrementally, piece by piece as a stream delivers it, into ("reasoning", text) and
("content", text) events; any split of the text into pieces gives the same joined result
(`split_reasoning` on the whole text). The rules:

- a block opens when the text starts (leading whitespace aside) with `<think>`, or at once
  when the rendered prompt itself ends with an open `<think>` (templates that open the block
  for the model);
- it closes at the first `</think>`; whitespace right after `<think>`, right before
  `</think>` and right after `</think>` is dropped (Qwen3 writes `<think>\\n...\\n</think>\\n\\n`);
- everything after the block is content; text that does not start with a block is all
  content, tags included; a block that never closes (the token limit) is all reasoning.

`think_mode(prompt)` says where the rendered prompt leaves the model: "open" (inside a block
the generation prompt opened), "off" (after a block the prompt already closed: thinking
turned off with enable_thinking false) or "closed" (the model may open one). Constrained
decoding of tool calls lets a thinking model write its block first by it (api/tools.py).
"""

from __future__ import annotations

__all__ = [
    "THINK_CLOSE",
    "THINK_OPEN",
    "ThinkSplitter",
    "split_reasoning",
    "template_thinks",
    "think_mode",
]

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"


def template_thinks(source: str | None) -> bool:
    """True for a Jinja chat template that marks thinking with `<think>`."""
    return bool(source) and THINK_OPEN in source


def think_mode(prompt_text: str) -> str:
    """Where a rendered prompt leaves the model: "open", "off" or "closed" (see the module
    docstring)."""
    head = prompt_text.rstrip()
    if head.endswith(THINK_OPEN):
        return "open"
    return "off" if head.endswith(THINK_CLOSE) else "closed"


def _partial_suffix(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ThinkSplitter:
    """Incremental reasoning/content splitter (see the module docstring). `feed(text)` and
    `finish()` return events ("reasoning", text) and ("content", text), never empty."""

    def __init__(self, opened: bool = False) -> None:
        # begin: before anything but whitespace; lead: just inside the block (dropping
        # whitespace); think: inside; after: right after </think> (dropping whitespace);
        # content: the rest
        self._state = "lead" if opened else "begin"
        self._buf = ""
        self.reasoning = ""
        self.saw_block = opened

    @property
    def closed(self) -> bool:
        """A block was opened and has ended."""
        return self.saw_block and self._state in ("after", "content")

    def feed(self, text: str) -> list[tuple[str, str]]:
        self._buf += text
        events: list[tuple[str, str]] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[tuple[str, str]]:
        """Whatever is still held back."""
        events: list[tuple[str, str]] = []
        buf, self._buf = self._buf, ""
        if self._state == "begin":
            self._emit(events, "content", buf)
        elif self._state == "think":
            self._emit(events, "reasoning", buf.rstrip())
        elif self._state == "content":
            self._emit(events, "content", buf)
        self._state = "content"
        return events

    def _emit(self, events: list[tuple[str, str]], kind: str, text: str) -> None:
        if not text:
            return
        if kind == "reasoning":
            self.reasoning += text
        events.append((kind, text))

    def _step(self, events: list[tuple[str, str]]) -> bool:
        buf = self._buf
        if self._state == "begin":
            head = buf.lstrip()
            if head.startswith(THINK_OPEN):
                self._buf = head[len(THINK_OPEN):]
                self._state = "lead"
                self.saw_block = True
                return True
            if not head or THINK_OPEN.startswith(head):
                return False  # could still open a block
            self._state = "content"
            return True
        if self._state == "lead":
            head = buf.lstrip()
            self._buf = head
            if not head:
                return False
            self._state = "think"
            return True
        if self._state == "think":
            end = buf.find(THINK_CLOSE)
            if end >= 0:
                self._emit(events, "reasoning", buf[:end].rstrip())
                self._buf = buf[end + len(THINK_CLOSE):]
                self._state = "after"
                return True
            # hold back a possible start of </think> and trailing whitespace before it
            keep = _partial_suffix(buf, THINK_CLOSE)
            body = buf[: len(buf) - keep]
            out = body.rstrip()
            self._emit(events, "reasoning", out)
            self._buf = buf[len(out):]
            return False
        if self._state == "after":
            head = buf.lstrip()
            self._buf = head
            if not head:
                return False
            self._state = "content"
            return True
        if self._state == "content":
            self._emit(events, "content", buf)
            self._buf = ""
            return False
        return False


def split_reasoning(text: str, opened: bool = False) -> tuple[str | None, str]:
    """(reasoning or None when there was no think block, content) of a whole text."""
    s = ThinkSplitter(opened)
    events = s.feed(text) + s.finish()
    content = "".join(t for k, t in events if k == "content")
    return (s.reasoning if s.saw_block else None), content
