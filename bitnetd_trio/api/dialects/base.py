"""The interface between the generation flow and the endpoint dialects.

The flow owns the engine, the deadlines and the sockets; a dialect only turns a `Reply` into
bytes and JSON: `whole()` for a non-streamed response, and for a stream a `DialectStream`
giving the opening events, one event per piece of text, a finish per choice and the closing.
Everything is plain and synchronous, tested without a server (tests/test_dialects.py).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import ClassVar

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults
from bitnetd_trio.api.sse import sse_event
from bitnetd_trio.engine.reasoning import ThinkSplitter
from bitnetd_trio.engine.tool_syntax import ToolCallParser

__all__ = ["AnswerReader", "CallEvents", "Dialect", "DialectStream", "tool_call_parser"]


def tool_call_parser(reply: Reply) -> ToolCallParser | None:
    """A fresh reader of tool calls in a choice's text when the request may call tools (its
    `tools` with a `tool_choice` other than none), in the syntax the request was served with
    (http-api §1.7); None otherwise."""
    tools = reply.request.tools
    if tools is None or not tools.calls_possible:
        return None
    return ToolCallParser(tools.syntax)


class AnswerReader:
    """Reads one choice's generated text, piece by piece as a stream delivers it, into
    events: ("reasoning", text) out of the think block of a template that marks thinking
    (engine/reasoning.py), then ("content", text), and, when the request may call tools,
    ("call", index, name) and ("arguments", index, fragment) read from the content after the
    block (http-api §1.7). Without either, every piece of text is one content event."""

    def __init__(self, reply: Reply) -> None:
        self.splitter = None
        if reply.reasoning is not None:
            self.splitter = ThinkSplitter(opened=reply.reasoning == "open")
        self.parser = tool_call_parser(reply)

    @property
    def plain(self) -> bool:
        """Nothing is read out of the text: it is all content, as generated."""
        return self.splitter is None and self.parser is None

    @property
    def calls(self) -> list[list[str]]:
        """[name, arguments] of every call read so far."""
        return self.parser.calls if self.parser is not None else []

    @property
    def reasoning(self) -> str | None:
        """The think block's text so far; None when there was none."""
        s = self.splitter
        return s.reasoning if s is not None and s.saw_block else None

    def feed(self, text: str) -> list[tuple]:
        return self._read(self.splitter.feed(text) if self.splitter else [("content", text)])

    def finish(self) -> list[tuple]:
        """Whatever is still held back, at the end of the text."""
        out = self._read(self.splitter.finish()) if self.splitter is not None else []
        return out + (self.parser.finish() if self.parser is not None else [])

    def read(self, text: str) -> list[tuple]:
        """The events of a whole text."""
        return self.feed(text) + self.finish()

    def _read(self, events: list[tuple[str, str]]) -> list[tuple]:
        out: list[tuple] = []
        for kind, text in events:
            if kind == "content" and self.parser is not None:
                out += self.parser.feed(text)
            elif text:
                out.append((kind, text))
        return out


class CallEvents(ABC):
    """The output of an answer, built from an `AnswerReader`'s events (("reasoning", text),
    ("content", text), ("call", index, name), ("arguments", index, fragment)); each step
    returns the stream events it implies (dialect-shaped dicts), so a whole answer and a
    stream of the same text are built alike."""

    def apply(self, events: list[tuple]) -> list[dict]:
        out: list[dict] = []
        for ev in events:
            if ev[0] == "reasoning":
                out += self.reasoning(ev[1])
            elif ev[0] == "content":
                if ev[1]:
                    out += self.text(ev[1])
            elif ev[0] == "call":
                out += self.call(ev[2])
            else:
                out += self.arguments(ev[2])
        return out

    @abstractmethod
    def reasoning(self, text: str) -> list[dict]:
        """Thinking (never empty)."""

    @abstractmethod
    def text(self, text: str) -> list[dict]:
        """Free text (never empty)."""

    @abstractmethod
    def call(self, name: str) -> list[dict]:
        """A call of `name` begins."""

    @abstractmethod
    def arguments(self, fragment: str) -> list[dict]:
        """The next piece of the current call's arguments (JSON text)."""


class DialectStream(ABC):
    """The server-sent events of one streamed response, in the order the flow asks for them:
    `opening()`, then `piece()` for each non-final engine step and `finish()` once per choice
    (with the choice's last piece), then `closing()`. Each returns SSE bytes (maybe none)."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply

    def opening(self) -> bytes:
        """Events before any generated text (OpenAI chat: the role deltas)."""
        return b""

    def piece(self, choice: Choice, piece: Piece) -> bytes:
        """Events for text (and logprobs) one engine step added to `choice`; nothing for a step
        that carries neither text nor logprobs the request asked for."""
        if not piece.carries_anything(self.reply.request.logprobs):
            return b""
        return self.shape_piece(choice, piece)

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        """The events of a piece worth sending; by default none (a dialect that streams only
        its final event)."""
        return b""

    @abstractmethod
    def finish(self, choice: Choice, last: Piece) -> bytes:
        """Events ending `choice`: `last` is its final step's piece (empty when a deadline or
        a drain cut it short), `choice.finish_reason` is set."""

    def closing(self) -> bytes:
        """Events after every choice finished (OpenAI: the usage chunk and `[DONE]`)."""
        return b""

    def error_event(self, err: ApiError) -> bytes:
        """The last event of a stream that fails after its status was sent (http-api §1.5)."""
        return sse_event(err.envelope())


class Dialect(ABC):
    """One family of generating endpoints: its request parser and its response shapes."""

    name: ClassVar[str]  # for logs
    id_prefix: ClassVar[str] = "cmpl-"  # of the response id
    # Which logprob format responses carry (see bitnetd_trio.api.logprobs); None: no logprobs.
    logprob_format: ClassVar[str | None] = None

    @staticmethod
    def error_body(err: ApiError) -> dict:
        """The JSON body of an error answered on this dialect's routes."""
        return err.envelope()

    @abstractmethod
    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        """The validated request (ApiError 400/404 naming the offending field)."""

    @abstractmethod
    def whole(self, reply: Reply) -> dict:
        """The JSON body of a non-streamed response once every choice is done."""

    @abstractmethod
    def stream(self, reply: Reply) -> DialectStream:
        """A fresh event shaper for one streamed response."""
