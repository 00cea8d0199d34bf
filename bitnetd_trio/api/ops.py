"""The operations endpoints (http-api §2) and the models list (http-api §1.3): health,
metrics, models, tokenize/detokenize, apply-template, props, slots, model_info.

Each handler is `async (app, request)`, registered in `asgi.App`'s route table; none generates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from bitnetd_trio import __version__
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import Request
from bitnetd_trio.api.ops_requests import parse_apply_template, parse_detokenize, parse_tokenize
from bitnetd_trio.api.prompts import render_chat
from bitnetd_trio.api.schema import check_model_id
from bitnetd_trio.api.served_model import (
    accepted_model_ids,
    model_aliases,
    served_model_id,
    shown_model_path,
)
from bitnetd_trio.api.serving import ServingApp
from bitnetd_trio.api.sse import json_bytes
from bitnetd_trio.engine.chat import bitnet_format_as_jinja
from bitnetd_trio.engine.constraints import supported_kinds
from bitnetd_trio.engine.inference import InferenceThread

__all__ = [
    "apply_template",
    "detokenize",
    "health",
    "live",
    "metrics",
    "model_by_id",
    "model_info",
    "models",
    "props",
    "slots",
    "tokenize",
    "tokenizer_info",
]


async def health(app: ServingApp, req: Request) -> None:
    """GET/HEAD /health and /health/ready (readiness): 200 {"status": "ok"} once a model is
    loaded; 503 "loading" before, and 503 "draining" from the first stop signal on, so a load
    balancer sends no new work while running generations finish."""
    engine = app.engine
    if app.draining:
        err = ApiError.unavailable("the server is shutting down", retry_after=5)
        status = "draining"
    elif engine is None or not engine.ready:
        err = ApiError.unavailable("the model is loading", retry_after=2)
        status = "loading"
    else:
        await req.resp.send_json(200, {"status": "ok"})
        return
    await req.resp.send_json(503, {"status": status, **err.envelope()}, err.headers)
    req.resp.error_type = err.type


async def live(app: ServingApp, req: Request) -> None:
    """GET/HEAD /health/live (liveness): 200 while the process answers HTTP, whether it is
    loading, serving or draining."""
    await req.resp.send_json(200, {"status": "alive"})


async def metrics(app: ServingApp, req: Request) -> None:
    """GET /metrics: Prometheus text (or OpenMetrics when the Accept header asks for it)."""
    data, content_type = app.metrics.render(req.header("accept"))
    await req.resp.send_text(200, data, content_type)


def _model_card(app: ServingApp, model_id: str, engine: InferenceThread) -> dict:
    info = engine.info
    return {
        "id": model_id,
        "object": "model",
        "created": int(info.loaded_at),
        "owned_by": "bitnetd",
        # Other names requests may use for this model (http-api §1.3).
        "aliases": model_aliases(engine, app.config.model.alias),
        "meta": {
            # "embedding" (POST /v1/embeddings only) or "generation" (http-api §1.3)
            "kind": info.kind,
            "architecture": info.hparams.architecture,
            "n_ctx_train": info.hparams.n_ctx_train,
            "n_ctx": info.n_ctx,
            "n_vocab": info.hparams.n_vocab,
            "n_embd": info.hparams.n_embd,
            "n_layer": info.hparams.n_layer,
            "n_params": info.hparams.n_params,
            "size": info.hparams.file_size,
            "parallel": info.n_slots,
            "demo": info.is_demo,
            "path": shown_model_path(engine, app.config.model.expose_path),
            "name": info.name,
            # constrained output kinds requests may use (http-api §1.6)
            "constraints": supported_kinds(),
        },
    }


async def models(app: ServingApp, req: Request) -> None:
    """GET /v1/models: one card, under the served id (the alias is listed in its `aliases`)."""
    engine = app.require_engine()
    data = [_model_card(app, served_model_id(engine), engine)]
    await req.resp.send_json(200, {"object": "list", "data": data})


async def model_by_id(app: ServingApp, req: Request) -> None:
    """GET /v1/models/{id}: the card under any name the model answers to, else 404."""
    engine = app.require_engine()
    model_id = check_model_id(
        req.path_params["id"], accepted_model_ids(engine, app.config.model.alias)
    )
    await req.resp.send_json(200, _model_card(app, model_id, engine))


async def _answer_off_thread(
    app: ServingApp, req: Request, reply: Callable[[ServingApp, Request], dict], *, always: bool = False
) -> None:
    """200 with `reply(app, req)` as JSON, computed and encoded on app.cpu: a worker thread
    when the body is large (or `always`), since the work grows with the request."""

    def encoded() -> bytes:
        return json_bytes(reply(app, req))

    size = math.inf if always else len(req.body)
    await req.resp.send_json_data(200, await app.cpu.run(size, encoded))


async def tokenize(app: ServingApp, req: Request) -> None:
    """POST /tokenize: token ids, or {"id", "piece"} objects (a piece that is not whole UTF-8
    as its byte values)."""
    await _answer_off_thread(app, req, _tokenize)


def _tokenize(app: ServingApp, req: Request) -> dict:
    engine = app.require_engine()
    t = parse_tokenize(req.json())
    tok = engine.tokenizer
    ids = tok.encode(t.content, add_bos=t.add_special, parse_special=t.parse_special)
    if t.with_pieces:
        tokens: list[Any] = []
        for i in ids:
            data = tok.token_bytes(i)
            try:
                piece: Any = data.decode("utf-8")
            except UnicodeDecodeError:
                piece = list(data)
            tokens.append({"id": i, "piece": piece})
    else:
        tokens = ids
    # count and max_model_len: vLLM's /tokenize answers them too
    return {"tokens": tokens, "count": len(ids), "max_model_len": engine.info.n_ctx}


async def detokenize(app: ServingApp, req: Request) -> None:
    """POST /detokenize: the text of token ids, as llama.cpp (`content`) and vLLM (`prompt`)
    name it."""
    await _answer_off_thread(app, req, _detokenize)


def _detokenize(app: ServingApp, req: Request) -> dict:
    engine = app.require_engine()
    d = parse_detokenize(req.json(), engine.info.hparams.n_vocab)
    text = engine.tokenizer.decode(d.tokens)
    return {"content": text, "prompt": text}


#: What /tokenizer_info calls the tokenizer: not a Hugging Face class, the daemon's own
#: byte-level BPE built from the GGUF vocabulary and merges (model-format §6).
TOKENIZER_CLASS = "GGUFByteLevelBPETokenizer"


async def tokenizer_info(app: ServingApp, req: Request) -> None:
    """GET /tokenizer_info: vLLM's tokenizer description (the fields of a tokenizer_config.json
    plus `tokenizer_class`), which lm-evaluation-harness's remote tokenizer reads."""
    engine = app.require_engine()
    tok = engine.tokenizer
    template = engine.chat_template
    bos_token = _piece_or_none(engine, tok.bos_id)
    body: dict[str, Any] = {
        "tokenizer_class": TOKENIZER_CLASS,
        "bos_token": bos_token,
        "eos_token": _piece_or_none(engine, tok.eos_id),
        "pad_token": None,  # the GGUF names none; requests are never padded
        "unk_token": None,  # byte-level BPE encodes every byte
        "add_bos_token": tok.add_bos_default,
        "add_eos_token": False,
        "model_max_length": engine.info.n_ctx,
        "vocab_size": engine.info.hparams.n_vocab,
        "chat_template": template.source
        if template.source is not None
        else bitnet_format_as_jinja(bos_token or ""),
        "chat_template_kind": template.kind,
    }
    await req.resp.send_json(200, body)


async def apply_template(app: ServingApp, req: Request) -> None:
    """POST /apply-template: the prompt the chat template makes of the messages."""
    # A Jinja template renders in a worker process: waiting for it blocks, whatever the size.
    jinja = app.require_engine().chat_template.kind == "jinja"
    await _answer_off_thread(app, req, _apply_template, always=jinja)


def _apply_template(app: ServingApp, req: Request) -> dict:
    engine = app.require_engine()
    a = parse_apply_template(req.json())
    prompt = render_chat(engine, a.messages, a.add_generation_prompt, a.template_kwargs)
    return {"prompt": prompt}


def _piece_or_none(engine: InferenceThread, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


async def props(app: ServingApp, req: Request) -> None:
    """GET /props: llama.cpp's server properties (default settings, slots, template)."""
    engine = app.require_engine()
    info = engine.info
    m = app.config.model
    await req.resp.send_json(
        200,
        {
            "default_generation_settings": {
                "n_ctx": info.n_ctx,
                "params": {
                    "temperature": m.temperature,
                    "top_k": m.top_k,
                    "top_p": m.top_p,
                    "min_p": m.min_p,
                    "n_predict": -1 if m.max_tokens_default is None else m.max_tokens_default,
                },
            },
            "total_slots": info.n_slots,
            "model_path": shown_model_path(engine, m.expose_path),
            "model_alias": m.alias or served_model_id(engine),
            "chat_template": engine.chat_template.source,  # None: the BitNet trained format
            "chat_template_kind": engine.chat_template.kind,
            "bos_token": _piece_or_none(engine, engine.tokenizer.bos_id),
            "eos_token": _piece_or_none(engine, engine.tokenizer.eos_id),
            "build_info": f"bitnetd-trio {__version__} ({info.kernel})",
            "demo_model": info.is_demo,
            "model_kind": info.kind,  # "embedding" or "generation", as /v1/models' meta.kind
            "modalities": {"vision": False, "audio": False},
            "constraints": supported_kinds(),  # response_format, tools, grammar, json_schema
        },
    )


async def slots(app: ServingApp, req: Request) -> None:
    """GET /slots: what each engine slot is doing."""
    engine = app.require_engine()
    n_ctx = engine.info.n_ctx
    data = [
        {
            "id": s.id,
            "n_ctx": n_ctx,
            "state": "busy" if s.busy else "idle",
            "is_processing": s.busy,
            "job_id": s.job_id,
            "n_past": s.n_past,
            "n_prompt_tokens": s.n_prompt,
            "n_decoded": s.n_generated,
        }
        for s in engine.snapshot_slots()
    ]
    await req.resp.send_json(200, data)


async def model_info(app: ServingApp, req: Request) -> None:
    """GET /model_info: the loaded model and how it runs."""
    engine = app.require_engine()
    info = engine.info
    await req.resp.send_json(
        200,
        {
            "model": served_model_id(engine),
            "model_path": shown_model_path(engine, app.config.model.expose_path),
            "architecture": info.hparams.architecture,
            "kind": info.kind,
            "n_params": info.hparams.n_params,
            "file_size": info.hparams.file_size,
            "context_size": info.n_ctx,
            "n_ctx_train": info.hparams.n_ctx_train,
            "threads": info.n_threads,
            "instances": info.n_slots,
            "kernel": info.kernel,
            "demo": info.is_demo,
            "loaded": engine.ready,
        },
    )
