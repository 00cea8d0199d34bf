"""POST /v1/completions (http-api §1.2): `text_completion` bodies and chunks, echo of the
prompt, and the legacy logprob lists (with the prompt's logprobs when echo scores it)."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import Dialect
from bitnetd_trio.api.dialects.openai_common import (
    OpenAIStream,
    chunk_identity,
    finish_reason,
    whole_body,
)
from bitnetd_trio.api.logprobs import legacy_lists
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults, parse_completion
from bitnetd_trio.api.sse import CompletionChunks, sse_event
from bitnetd_trio.engine.inference import TokenResult

__all__ = ["OpenAICompletions"]


class OpenAICompletions(Dialect):
    """The OpenAI legacy completions dialect."""

    name = "completions"
    id_prefix = "cmpl-"
    logprob_format = "openai-legacy"

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_completion(body, defaults)

    def whole(self, reply: Reply) -> dict:
        g = reply.request
        choices = []
        for c in reply.choices:
            prefix = reply.prompt_texts[reply.prompt_index(c)] if g.echo else ""
            choices.append(
                {
                    "index": c.index,
                    "text": prefix + "".join(c.text),
                    "logprobs": _whole_logprobs(reply, c) if g.logprobs else None,
                    "finish_reason": finish_reason(c),
                }
            )
        return whole_body(reply, "text_completion", choices)

    def stream(self, reply: Reply) -> _CompletionsStream:
        return _CompletionsStream(reply)


def _whole_logprobs(reply: Reply, c: Choice) -> dict:
    """A choice's logprob lists; with echo the prompt's tokens come first (logprob None where
    the engine did not score the prompt)."""
    entries: list[TokenResult] = []
    if reply.request.echo and c.prompt_logprobs is not None:
        entries.extend(c.prompt_logprobs)
    elif reply.request.echo:
        entries.extend((t, None, []) for t in reply.prompts[reply.prompt_index(c)])
    entries.extend(c.tokens)
    return legacy_lists(entries, reply.token_bytes)


class _CompletionsStream(OpenAIStream):
    def __init__(self, reply: Reply) -> None:
        self.cmpl = CompletionChunks(*chunk_identity(reply))
        super().__init__(reply, self.cmpl)
        # where each choice's next text starts, for text_offset
        self.text_offsets = [0] * len(reply.choices)

    def opening(self) -> bytes:
        if not self.reply.request.echo:
            return b""
        out = bytearray()
        for c in self.reply.choices:
            text = self.reply.prompt_texts[self.reply.prompt_index(c)]
            self.text_offsets[c.index] = len(text)
            out += sse_event(self.cmpl.text(c.index, text))
        return bytes(out)

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        g = self.reply.request
        i = choice.index
        lps = None
        if g.logprobs:
            lps = legacy_lists(piece.tokens, self.reply.token_bytes, self.text_offsets[i])
            if g.echo and piece.prompt_logprobs:  # the echoed prompt's, at offset 0
                head = legacy_lists(piece.prompt_logprobs, self.reply.token_bytes)
                lps = {k: head[k] + lps[k] for k in lps}
        self.text_offsets[i] += len(piece.text)
        return sse_event(self.cmpl.text(i, piece.text, lps))
