"""POST /generate of the older BitNet HTTP servers (http-api §3): one choice, answered as
`{"generated_text", "tokens_generated", "tokens_processed"}`; no logprobs, no stream pieces
(a stream, were one asked for, is that object as its single event)."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import Dialect, DialectStream
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults, parse_generate
from bitnetd_trio.api.sse import sse_event

__all__ = ["BitNetGenerate"]


class BitNetGenerate(Dialect):
    """The `/generate` dialect of the Docker "BitNet LLM HTTP Server"."""

    name = "generate"
    id_prefix = "cmpl-"
    logprob_format = None

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_generate(body, defaults)

    def whole(self, reply: Reply) -> dict:
        return _generated(reply, reply.choices[0])

    def stream(self, reply: Reply) -> _GenerateStream:
        return _GenerateStream(reply)


def _generated(reply: Reply, c: Choice) -> dict:
    return {
        "generated_text": "".join(c.text),
        "tokens_generated": c.n_generated,
        # processed: the prompt and the generated tokens
        "tokens_processed": len(reply.prompts[0]) + c.n_generated,
    }


class _GenerateStream(DialectStream):
    def finish(self, choice: Choice, last: Piece) -> bytes:
        return sse_event(_generated(self.reply, choice))
