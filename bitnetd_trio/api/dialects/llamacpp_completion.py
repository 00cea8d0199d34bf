"""POST /completion of llama.cpp's server (http-api §3): one choice; stream events
`{"content", "stop": false, ...}` and a final object with `stop: true`, the generation
settings, `stop_type` and timings; logprobs as `completion_probabilities` (n_probs)."""

from __future__ import annotations

from bitnetd_trio.api.dialects.base import Dialect, DialectStream
from bitnetd_trio.api.logprobs import llama_probabilities
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults, parse_llama_completion
from bitnetd_trio.api.sse import sse_event
from bitnetd_trio.engine.inference import TokenResult

__all__ = ["LlamaCppCompletion", "final_object"]


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
        out["completion_probabilities"] = llama_probabilities(tokens, reply.token_bytes)
    return out


class _LlamaStream(DialectStream):
    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
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
                piece.tokens, self.reply.token_bytes
            )
        return sse_event(event)

    def finish(self, choice: Choice, last: Piece) -> bytes:
        # the final event carries the last step's text, as llama.cpp's does
        return sse_event(
            final_object(self.reply, choice, last.text, last.tokens, last.token_ids)
        )
