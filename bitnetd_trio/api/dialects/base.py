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
from bitnetd_trio.engine.tool_syntax import ToolCallParser

__all__ = ["CallEvents", "Dialect", "DialectStream", "tool_call_parser"]


def tool_call_parser(reply: Reply) -> ToolCallParser | None:
    """A fresh reader of tool calls in a choice's text when the request may call tools (its
    `tools` with a `tool_choice` other than none), in the syntax the request was served with
    (http-api §1.7); None otherwise."""
    tools = reply.request.tools
    if tools is None or not tools.calls_possible:
        return None
    return ToolCallParser(tools.syntax)


class CallEvents(ABC):
    """The output of an answer that may call tools, built from the tool-call reader's events
    (("content", text), ("call", index, name), ("arguments", index, fragment)); each step
    returns the stream events it implies (dialect-shaped dicts), so a whole answer and a
    stream of the same text are built alike."""

    def apply(self, events: list[tuple]) -> list[dict]:
        out: list[dict] = []
        for ev in events:
            if ev[0] == "content":
                if ev[1]:
                    out += self.text(ev[1])
            elif ev[0] == "call":
                out += self.call(ev[2])
            else:
                out += self.arguments(ev[2])
        return out

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
