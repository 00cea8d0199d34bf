"""POST /generate of the older BitNet HTTP servers (http-api §3): one choice, answered as
`{"generated_text", "tokens_generated", "tokens_processed"}`; no logprobs, no stream pieces
(a stream, were one asked for, is that object as its single event)."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import Dialect, DialectStream
from bitnetd_trio.api.json_body import Fields, invalid
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import (
    INT32_MAX,
    LLAMA_MAX_STOP,
    GenerationRequest,
    SchemaDefaults,
    parse_logit_bias,
    parse_min_tokens,
    parse_sampling,
    parse_seed,
    parse_stop,
)
from bitnetd_trio.api.sse import sse_event

__all__ = ["BitNetGenerate", "parse_generate"]


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


# ---- the request -------------------------------------------------------------------------------


GENERATE_SYSTEM_PROMPT = (
    "You are a helpful, harmless, and honest AI assistant. "
    "Answer the user's questions truthfully and helpfully."
)
GENERATE_MAX_TOKENS = 256
GENERATE_TEMPERATURE = 0.7
GENERATE_TOP_P = 0.9


def parse_generate(d: dict, defaults: SchemaDefaults | None = None) -> GenerationRequest:
    """POST /generate of the Docker BitNet server.

    With `conversation_mode` (default true) the prompt is the user turn after `system_prompt`,
    rendered with the chat template; with false the prompt is completed as raw text.
    """
    defaults = defaults or SchemaDefaults()
    f = Fields(d)
    prompt = f.str("prompt")
    if prompt is None:
        raise invalid("prompt", "is required")
    system_prompt = f.str("system_prompt", GENERATE_SYSTEM_PROMPT)
    conversation = f.bool("conversation_mode", True)
    if conversation:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt:
            messages.insert(0, {"role": "system", "content": system_prompt})
        prompts = None
    else:
        messages, prompts = None, [prompt]
    max_tokens = f.int("max_tokens", 1, INT32_MAX, GENERATE_MAX_TOKENS)
    return GenerationRequest(
        endpoint="generate",
        messages=messages,
        prompts=prompts,
        max_tokens=max_tokens,
        min_tokens=parse_min_tokens(f, max_tokens),
        ignore_eos=f.bool("ignore_eos"),
        sampling=parse_sampling(
            f, defaults, temperature=GENERATE_TEMPERATURE, top_p=GENERATE_TOP_P,
            logit_bias=parse_logit_bias(f, defaults.n_vocab), seed=parse_seed(f),
        ),
        stop=parse_stop(f, LLAMA_MAX_STOP),
        context_size=f.int("context_size", 1, 1 << 24),
        threads=f.int("threads", 1, 1024),
    )
