"""POST /v1/embeddings (http-api §1.8): the OpenAI embeddings API over the engine's final
hidden state (model-format §5.3.1).

Each input becomes one embedding job: its tokens are prefilled through the same
continuous-batching inference thread as every generation, with the hidden-state output mode
instead of logits, no sampling; the slot is freed as soon as the prompt is in. The vector is
pooled as the model's GGUF says (mean over the tokens for a decoder model) and L2-normalised.
The jobs of one request are fed to the engine in a window as wide as its slots, so a long list
of inputs never overflows the wait queue.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import trio

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import DisconnectWatch, Request
from bitnetd_trio.api.json_body import invalid, json_type
from bitnetd_trio.api.schema import check_model_id
from bitnetd_trio.api.served_model import accepted_model_ids, served_model_id
from bitnetd_trio.api.serving import ServingApp
from bitnetd_trio.engine.inference import InferenceThread, Job, QueueFull, Update
from bitnetd_trio.engine.sampling import SamplingParams

__all__ = [
    "MAX_INPUTS",
    "EmbeddingRequest",
    "embeddings",
    "parse_embedding_request",
    "query_text",
]

#: Most inputs one request may carry (OpenAI's own limit).
MAX_INPUTS = 2048


@dataclass
class EmbeddingRequest:
    """A validated embeddings request: each input as text or as token ids."""

    inputs: list[str | list[int]]
    model: str | None
    base64: bool
    instruction: str | None = None  # the task of query inputs (`query_text`)


#: Most characters of an `instruction`.
MAX_INSTRUCTION_CHARS = 4096


def query_text(instruction: str, text: str) -> str:
    """A query as Qwen3-Embedding's model card builds it, `Instruct: {task}\nQuery:{query}`
    (no space after `Query:`). BitNet-embedding-0.6B is a Qwen3-Embedding-style model whose own
    query format is not published; this is the format of its base family (http-api §1.8)."""
    return f"Instruct: {instruction}\nQuery:{text}"


def _token_list(v: list, param: str, n_vocab: int) -> list[int]:
    for i, t in enumerate(v):
        if isinstance(t, bool) or not isinstance(t, int):
            raise invalid(param, f"must hold only token ids (integers); item {i} is {json_type(t)}")
        if not 0 <= t < n_vocab:
            raise invalid(param, f"token id {t} at index {i} is out of range 0..{n_vocab - 1}")
    return list(v)


def _inputs(v: Any, n_vocab: int) -> list[str | list[int]]:
    """`input`: a string, an array of strings, an array of token ids, or an array of such
    arrays."""
    if v is None:
        raise invalid("input", "is required")
    if isinstance(v, str):
        items: list[Any] = [v]
    elif isinstance(v, list):
        if not v:
            raise invalid("input", "must not be an empty array")
        if all(isinstance(t, int) and not isinstance(t, bool) for t in v):
            return [_token_list(v, "input", n_vocab)]
        items = v
    else:
        raise invalid(
            "input", f"must be a string or an array of strings or token ids, got {json_type(v)}"
        )
    if len(items) > MAX_INPUTS:
        raise invalid("input", f"must hold at most {MAX_INPUTS} inputs, got {len(items)}")
    out: list[str | list[int]] = []
    for i, item in enumerate(items):
        if isinstance(item, str):
            if not item:
                raise invalid("input", f"item {i} is an empty string")
            out.append(item)
        elif isinstance(item, list):
            if not item:
                raise invalid("input", f"item {i} is an empty array of token ids")
            out.append(_token_list(item, "input", n_vocab))
        else:
            raise invalid(
                "input",
                f"item {i} must be a string or an array of token ids, got {json_type(item)}",
            )
    return out


def parse_embedding_request(
    body: dict, *, n_vocab: int, n_embd: int, model_ids: set[str]
) -> EmbeddingRequest:
    """Validate an embeddings body (ApiError 400/404 naming the field)."""
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise invalid("model", f"must be a string, got {json_type(model)}")
    if model:
        check_model_id(model, model_ids)
    fmt = body.get("encoding_format", "float")
    if fmt is None:
        fmt = "float"
    if fmt not in ("float", "base64"):
        raise invalid("encoding_format", "must be 'float' or 'base64'")
    dims = body.get("dimensions")
    if dims is not None:
        if isinstance(dims, bool) or not isinstance(dims, int):
            raise invalid("dimensions", f"must be an integer, got {json_type(dims)}")
        if dims != n_embd:
            raise invalid(
                "dimensions",
                f"this model's embeddings have {n_embd} dimensions and cannot be shortened",
            )
    user = body.get("user")
    if user is not None and not isinstance(user, str):
        raise invalid("user", f"must be a string, got {json_type(user)}")
    inputs = _inputs(body.get("input"), n_vocab)
    instruction = body.get("instruction")
    if instruction is not None:
        if not isinstance(instruction, str):
            raise invalid("instruction", f"must be a string, got {json_type(instruction)}")
        if not instruction.strip():
            raise invalid("instruction", "must not be empty")
        if len(instruction) > MAX_INSTRUCTION_CHARS:
            raise invalid("instruction",
                          f"must be at most {MAX_INSTRUCTION_CHARS} characters long")
        if any(not isinstance(item, str) for item in inputs):
            raise invalid("instruction", "applies to text inputs only; token-id inputs must "
                          "carry their instruction's tokens themselves")
        inputs = [query_text(instruction, item) for item in inputs]  # type: ignore[arg-type]
    return EmbeddingRequest(inputs, model or None, fmt == "base64", instruction)


def _tokenize(engine: InferenceThread, r: EmbeddingRequest) -> list[list[int]]:
    tok = engine.tokenizer
    n_ctx = engine.info.n_ctx
    prompts = []
    for i, item in enumerate(r.inputs):
        ids = tok.encode(item, add_bos=tok.add_bos_default, add_eos=tok.add_eos_default,
                         parse_special=False) if isinstance(item, str) else item
        if not ids:
            raise invalid("input", f"item {i} has no tokens")
        if len(ids) > n_ctx:
            raise ApiError(
                400,
                f"input item {i} has {len(ids)} tokens, more than this model's maximum context "
                f"length of {n_ctx} tokens. Please shorten it.",
                param="input",
                code="context_length_exceeded",
            )
        prompts.append(ids)
    return prompts


async def _run_jobs(
    engine: InferenceThread, prompts: list[list[int]], timeout: float
) -> list[np.ndarray]:
    """Each prompt's embedding, at most as many jobs in the engine at once as it has slots."""
    send_ch, recv_ch = trio.open_memory_channel[Update](math.inf)
    jobs = [
        Job(prompt=ids, params=SamplingParams(), max_tokens=None, sink=send_ch, index=i,
            cache_prompt=False, embed=engine.info.pooling)
        for i, ids in enumerate(prompts)
    ]
    results: list[np.ndarray | None] = [None] * len(jobs)
    window = max(1, engine.settings.n_slots)
    submitted = in_flight = 0
    try:
        with recv_ch, trio.fail_after(timeout if timeout > 0 else math.inf):
            while submitted < len(jobs) or in_flight:
                if submitted < len(jobs) and in_flight < window:
                    batch = jobs[submitted : submitted + window - in_flight]
                    try:
                        engine.submit(batch)
                    except QueueFull as exc:
                        if not in_flight:  # nothing of ours will free a place
                            raise ApiError.unavailable(f"server busy: {exc}") from None
                    else:
                        submitted += len(batch)
                        in_flight += len(batch)
                        continue
                upd = await recv_ch.receive()
                if not upd.final:
                    continue
                in_flight -= 1
                if upd.embedding is None:
                    raise ApiError(500, f"embedding failed: {upd.error or upd.finish_reason}")
                results[upd.job.index] = upd.embedding
    except trio.TooSlowError:
        raise ApiError(504, "the embeddings were not ready in time", type="timeout_error") from None
    finally:
        for job in jobs:  # any way out frees the slots of the jobs still running
            job.cancel.set()
    return [r for r in results if r is not None]


def _encode(vec: np.ndarray, as_base64: bool) -> Any:
    if as_base64:  # little-endian float32, as OpenAI's clients decode it
        return base64.b64encode(vec.astype("<f4").tobytes()).decode("ascii")
    return vec.tolist()


async def embeddings(app: ServingApp, req: Request) -> None:
    """POST /v1/embeddings."""
    engine = app.require_engine()
    if app.draining:
        raise ApiError.unavailable("the server is shutting down", retry_after=5)
    info = engine.info
    r = parse_embedding_request(
        req.json(),
        n_vocab=info.hparams.n_vocab,
        n_embd=info.hparams.n_embd,
        model_ids=accepted_model_ids(engine, app.config.model.alias),
    )
    prompts = _tokenize(engine, r)
    vectors: list[np.ndarray] = []

    async def run() -> None:
        vectors.extend(await _run_jobs(engine, prompts, app.config.server.request_timeout))

    watch = DisconnectWatch(lambda: None)  # leaving run() cancels the jobs
    await watch.run(req.receive, run)
    if watch.disconnected:
        req.resp.status = req.resp.status or 499
        return
    n_tokens = sum(len(p) for p in prompts)
    body = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": _encode(v, r.base64)}
            for i, v in enumerate(vectors)
        ],
        "model": r.model or served_model_id(engine),
        "usage": {"prompt_tokens": n_tokens, "total_tokens": n_tokens},
    }
    await req.resp.send_json(200, body)
