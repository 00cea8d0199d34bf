"""What the two OpenAI dialects share (http-api §1.1, §1.2, §1.5): the finish reason, the
envelope of a whole response, and a stream's finish chunk, usage chunk and `[DONE]`."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import DialectStream
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.sse import SSE_DONE, ChatChunks, CompletionChunks, sse_event

__all__ = ["OpenAIStream", "chunk_identity", "finish_reason", "whole_body"]


def finish_reason(choice: Choice) -> str:
    """OpenAI's finish_reason: "stop", else "length". A "cancelled" generation only reaches a
    client that is still there on a timeout or a shutdown: it was cut short, which OpenAI
    calls "length"."""
    return "stop" if choice.finish_reason == "stop" else "length"


def whole_body(reply: Reply, object_name: str, choices: list[dict]) -> dict:
    """A non-streamed OpenAI response around its `choices`."""
    return {
        "id": reply.id,
        "object": object_name,
        "created": reply.created,
        "model": reply.model_id,
        "system_fingerprint": reply.fingerprint,
        "choices": choices,
        "usage": reply.usage(),
    }


class OpenAIStream(DialectStream):
    """A stream of OpenAI chunks: every choice ends with its last piece and a finish chunk,
    the stream with the usage chunk (when asked for) and `[DONE]`."""

    def __init__(self, reply: Reply, chunks: ChatChunks | CompletionChunks) -> None:
        super().__init__(reply)
        self.chunks = chunks

    def finish(self, choice: Choice, last: Piece) -> bytes:
        return self.piece(choice, last) + sse_event(
            self.chunks.finish(choice.index, finish_reason(choice))
        )

    def closing(self) -> bytes:
        usage = b""
        if self.reply.request.include_usage:
            usage = sse_event(self.chunks.usage(self.reply.usage()))
        return usage + SSE_DONE


def chunk_identity(reply: Reply) -> tuple[str, int, str, str, bool]:
    """The arguments every chunk builder of one stream takes: id, created, model,
    fingerprint, include_usage."""
    return (
        reply.id,
        reply.created,
        reply.model_id,
        reply.fingerprint,
        reply.request.include_usage,
    )
