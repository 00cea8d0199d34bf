"""POST /v1/chat/completions (http-api §1.1): `chat.completion` bodies and
`chat.completion.chunk` streams with a role delta first; chat logprobs (`logprobs.content`)."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import Dialect
from bitnetd_trio.api.dialects.openai_common import (
    OpenAIStream,
    chunk_identity,
    finish_reason,
    whole_body,
)
from bitnetd_trio.api.logprobs import chat_content, chat_logprobs
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults, parse_chat_completion
from bitnetd_trio.api.sse import ChatChunks, sse_event

__all__ = ["OpenAIChat"]


class OpenAIChat(Dialect):
    """The OpenAI chat completions dialect."""

    name = "chat"
    id_prefix = "chatcmpl-"
    logprob_format = "openai-chat"

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_chat_completion(body, defaults)

    def whole(self, reply: Reply) -> dict:
        logprobs = reply.request.logprobs
        choices = [
            {
                "index": c.index,
                # `refusal` is required by OpenAI's schema (nullable); this server never refuses.
                "message": {"role": "assistant", "content": "".join(c.text), "refusal": None},
                "logprobs": chat_logprobs(chat_content(c.tokens, reply.token_bytes))
                if logprobs
                else None,
                "finish_reason": finish_reason(c),
            }
            for c in reply.choices
        ]
        return whole_body(reply, "chat.completion", choices)

    def stream(self, reply: Reply) -> _ChatStream:
        return _ChatStream(reply)


class _ChatStream(OpenAIStream):
    def __init__(self, reply: Reply) -> None:
        self.chat = ChatChunks(*chunk_identity(reply))
        super().__init__(reply, self.chat)

    def opening(self) -> bytes:
        # Every choice starts with its role delta, before any content (http-api §1.5).
        return b"".join(sse_event(self.chat.role(c.index)) for c in self.reply.choices)

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        lps = None
        if self.reply.request.logprobs:
            lps = chat_content(piece.tokens, self.reply.token_bytes)
        return sse_event(self.chat.content(choice.index, piece.text, lps))
