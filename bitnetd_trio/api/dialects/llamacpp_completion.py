"""POST /completion of llama.cpp's server (http-api §3): one choice; stream events
`{"content", "stop": false, ...}` and a final object with `stop: true`, the generation
settings, `stop_type` and timings; logprobs as `completion_probabilities` (n_probs)."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import Dialect, DialectStream
from bitnetd_trio.api.json_body import Fields, invalid
from bitnetd_trio.api.logprobs import llama_probabilities
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import (
    INT32_MAX,
    LLAMA_MAX_STOP,
    MAX_N_PROBS,
    GenerationRequest,
    SchemaDefaults,
    parse_grammar_constraint,
    parse_llama_prompt,
    parse_logit_bias_llama,
    parse_min_tokens,
    parse_sampling,
    parse_seed,
    parse_stop,
    parse_token_id,
)
from bitnetd_trio.api.sse import sse_event
from bitnetd_trio.engine.inference import TokenResult
from bitnetd_trio.engine.jobs import PromptProgress

__all__ = ["LlamaCppCompletion", "final_object", "parse_llama_completion"]


class LlamaCppCompletion(Dialect):
    """llama.cpp's `/completion` dialect."""

    name = "completion"
    id_prefix = "cmpl-"
    logprob_format = "llama.cpp"

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_llama_completion(body, defaults)

    def whole(self, reply: Reply) -> dict:
        c = reply.choices[0]
        return final_object(reply, c, "".join(c.text), c.tokens, c.token_ids)

    def stream(self, reply: Reply) -> _LlamaStream:
        return _LlamaStream(reply)


def timings(reply: Reply, c: Choice) -> dict:
    """llama.cpp's `timings` of a choice so far."""
    evaluated = len(reply.prompts[0]) - c.n_cached  # the prompt tokens actually processed
    pred_n = c.n_generated
    prompt_ms = c.prompt_seconds * 1000.0
    pred_ms = c.generation_seconds * 1000.0
    return {
        "cache_n": c.n_cached,  # prompt tokens reused from the slot's cache
        "prompt_n": evaluated,
        "prompt_ms": prompt_ms,
        "prompt_per_token_ms": prompt_ms / evaluated if evaluated else 0.0,
        "prompt_per_second": evaluated / c.prompt_seconds if c.prompt_seconds else 0.0,
        "predicted_n": pred_n,
        "predicted_ms": pred_ms,
        "predicted_per_token_ms": pred_ms / pred_n if pred_n else 0.0,
        "predicted_per_second": pred_n / c.generation_seconds if c.generation_seconds else 0.0,
    }


def final_object(reply: Reply, c: Choice, content: str, tokens: list[TokenResult],
                 token_ids: list[int]) -> dict:
    """The `stop: true` object: the whole response, or a stream's last event (`content`,
    `tokens` and the logprobs then hold only the last step's). `tokens` is [] unless the
    request asked for them (return_tokens, or a stream)."""
    g = reply.request
    prompt_n = len(reply.prompts[0])
    pred_n = c.n_generated
    out = {
        "content": content,
        "tokens": token_ids,
        "id_slot": -1,
        "stop": True,
        "model": reply.model_id,
        "tokens_predicted": pred_n,
        "tokens_evaluated": prompt_n,
        "generation_settings": {
            "n_predict": g.max_tokens if g.max_tokens is not None else -1,
            "seed": g.sampling.seed,
            "temperature": g.sampling.temperature,
            "top_k": g.sampling.top_k,
            "top_p": g.sampling.top_p,
            "min_p": g.sampling.min_p,
            "stop": list(g.stop),
        },
        "prompt": reply.prompt_texts[0],
        "truncated": False,
        "stop_type": c.stop_type or ("limit" if c.finish_reason != "stop" else "eos"),
        "stopping_word": c.stopping_word,
        "tokens_cached": prompt_n + pred_n,
        "timings": timings(reply, c),
    }
    if g.logprobs:
        out["completion_probabilities"] = llama_probabilities(
            tokens, reply.token_bytes, g.post_sampling_probs
        )
    return out


def progress_event(reply: Reply, c: Choice, p: PromptProgress) -> dict:
    """The stream event of return_progress: no text yet, the prefill's `prompt_progress`."""
    return {
        "content": "",
        "stop": False,
        "id_slot": -1,
        "tokens_predicted": 0,
        "tokens_evaluated": len(reply.prompts[0]),
        "tokens": [],
        "prompt_progress": {
            "total": p.total,
            "cache": p.cache,
            "processed": p.processed,
            "time_ms": int(p.time_ms),
        },
    }


class _LlamaStream(DialectStream):
    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        if piece.progress is not None:  # a prefill chunk done (return_progress)
            return sse_event(progress_event(self.reply, choice, piece.progress))
        event = {
            "content": piece.text,
            "stop": False,
            "id_slot": -1,
            "tokens_predicted": choice.n_generated,
            "tokens_evaluated": len(self.reply.prompts[0]),
            "tokens": piece.token_ids,
        }
        if self.reply.request.dialect_options.get("timings_per_token"):
            event["timings"] = timings(self.reply, choice)
        if self.reply.request.logprobs:
            event["completion_probabilities"] = llama_probabilities(
                piece.tokens, self.reply.token_bytes, self.reply.request.post_sampling_probs
            )
        return sse_event(event)

    def finish(self, choice: Choice, last: Piece) -> bytes:
        # the final event carries the last step's text, as llama.cpp's does
        return sse_event(
            final_object(self.reply, choice, last.text, last.tokens, last.token_ids)
        )


# ---- the request -------------------------------------------------------------------------------


def parse_llama_completion(d: dict, defaults: SchemaDefaults | None = None) -> GenerationRequest:
    """POST /completion of llama.cpp's server (bitnet.cpp's `run_inference_server.py`)."""
    defaults = defaults or SchemaDefaults()
    f = Fields(d)
    prompt = d.get("prompt")
    if isinstance(prompt, str):
        prompts: list[str | list[int]] = [prompt]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(t, int) and not isinstance(t, bool) for t in prompt
    ):
        prompts = [[parse_token_id(t, "prompt", defaults.n_vocab) for t in prompt]]
    elif isinstance(prompt, list) and prompt and all(
        isinstance(t, (int, str)) and not isinstance(t, bool) for t in prompt
    ):
        prompts = [parse_llama_prompt(prompt, defaults)]
    elif prompt is None:
        raise invalid("prompt", "is required")
    else:
        raise invalid("prompt", "must be a string or a non-empty array of token ids and "
                                "strings")

    # n_predict -1 (llama.cpp's default) generates until the context is full; max_tokens is
    # llama.cpp's alias for it.
    name = "n_predict" if f.present("n_predict") else "max_tokens"
    n_predict = f.int(name, -1, INT32_MAX, -1)
    max_tokens = None if n_predict == -1 else n_predict
    if max_tokens is None:
        max_tokens = defaults.max_tokens_default

    seed = parse_seed(f)
    n_probs = f.int("n_probs", 0, MAX_N_PROBS, 0)
    stream = f.bool("stream")
    # llama.cpp's extras (http-api §3.2)
    options = {k: f.bool(k) for k in ("return_tokens", "timings_per_token",
                                      "post_sampling_probs", "return_progress")}
    return GenerationRequest(
        endpoint="completion",
        prompts=prompts,
        max_tokens=max_tokens,
        min_tokens=parse_min_tokens(f, max_tokens),
        ignore_eos=f.bool("ignore_eos"),
        # llama.cpp's seed -1 means "random".
        sampling=parse_sampling(
            f, defaults, logit_bias=parse_logit_bias_llama(f, defaults.n_vocab, defaults.tokenizer),
            seed=None if seed == -1 else seed,
        ),
        stop=parse_stop(f, LLAMA_MAX_STOP),
        stream=stream,
        logprobs=n_probs > 0,
        top_logprobs=n_probs,
        cache_prompt=f.bool("cache_prompt", True),
        constraint=parse_grammar_constraint(d, defaults),
        # stream events always carry their tokens' ids, as llama.cpp's do
        return_tokens=stream or options["return_tokens"],
        post_sampling_probs=options["post_sampling_probs"],
        return_progress=options["return_progress"],  # in a stream only, as llama.cpp's
        dialect_options=options,
    )
