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
from bitnetd_trio.api.json_body import Fields, invalid
from bitnetd_trio.api.logprobs import legacy_lists
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.response_format import parse_response_format
from bitnetd_trio.api.schema import (
    COMPLETIONS_MAX_TOKENS,
    INT32_MAX,
    LLAMA_MAX_STOP,
    MAX_CHOICES_PER_REQUEST,
    MAX_LOGPROBS_COMPLETIONS,
    GenerationRequest,
    SchemaDefaults,
    parse_model,
    parse_n,
    parse_openai_common,
    parse_prompts,
)
from bitnetd_trio.api.sse import CompletionChunks, sse_event
from bitnetd_trio.engine.inference import TokenResult

__all__ = ["OpenAICompletions", "parse_completion"]


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


# ---- the request -------------------------------------------------------------------------------


def parse_completion(d: dict, defaults: SchemaDefaults | None = None) -> GenerationRequest:
    """POST /v1/completions."""
    defaults = defaults or SchemaDefaults()
    f = Fields(d)
    suffix = d.get("suffix")
    if suffix is not None and suffix != "":
        raise invalid("suffix", "is not supported by this server")
    model = parse_model(f, defaults)
    prompts = parse_prompts(d, defaults.n_vocab)

    # 0 is allowed: echo + logprobs + max_tokens 0 scores the prompt (lm-evaluation-harness).
    max_tokens = f.int("max_tokens", 0, INT32_MAX, COMPLETIONS_MAX_TOKENS)
    n = parse_n(f, defaults)
    best_of = f.int("best_of", 1, defaults.max_n, n)
    if best_of != n and best_of != 1:
        raise invalid("best_of", f"({best_of}) other than n ({n}) is not supported")
    if len(prompts) * n > MAX_CHOICES_PER_REQUEST:
        raise invalid("prompt", f"{len(prompts)} prompts x n={n} exceed the limit of "
                             f"{MAX_CHOICES_PER_REQUEST} choices per request")

    # Completions' logprobs is the number of alternatives (0..5), not a flag as in chat.
    logprobs_n = f.int("logprobs", 0, MAX_LOGPROBS_COMPLETIONS)
    return GenerationRequest(
        endpoint="completions",
        model=model,
        prompts=prompts,
        max_tokens=max_tokens,
        n=n,
        logprobs=logprobs_n is not None,
        top_logprobs=logprobs_n or 0,
        echo=f.bool("echo"),
        constraint=parse_response_format(d.get("response_format"), defaults.max_grammar_size),
        **parse_openai_common(f, defaults, max_tokens, LLAMA_MAX_STOP),
    )
