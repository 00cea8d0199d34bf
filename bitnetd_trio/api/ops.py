"""The operations endpoints (http-api §2) and the models list (http-api §1.3): health,
metrics, models, tokenize/detokenize, apply-template, props, slots, model_info.

Each handler is `async (app, request)`, registered in `App`'s route table; none generates.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from bitnetd_trio import __version__
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import Request
from bitnetd_trio.api.prompts import render_chat
from bitnetd_trio.api.schema import (
    check_model_id,
    parse_apply_template,
    parse_detokenize,
    parse_tokenize,
)
from bitnetd_trio.api.served_model import accepted_model_ids, listed_model_ids, served_model_id
from bitnetd_trio.engine.inference import InferenceThread

if TYPE_CHECKING:  # the app imports this module to build its routes
    from bitnetd_trio.api.asgi import App

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
]


async def health(app: App, req: Request) -> None:
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


async def live(app: App, req: Request) -> None:
    """GET/HEAD /health/live (liveness): 200 while the process answers HTTP, whether it is
    loading, serving or draining."""
    await req.resp.send_json(200, {"status": "alive"})


async def metrics(app: App, req: Request) -> None:
    """GET /metrics: Prometheus text (or OpenMetrics when the Accept header asks for it)."""
    data, content_type = app.metrics.render(req.header("accept"))
    await req.resp.send_text(200, data, content_type)


def _model_card(model_id: str, engine: InferenceThread) -> dict:
    info = engine.info
    return {
        "id": model_id,
        "object": "model",
        "created": int(info.loaded_at),
        "owned_by": "bitnetd",
        "meta": {
            "architecture": info.architecture,
            "n_ctx_train": info.n_ctx_train,
            "n_ctx": info.n_ctx,
            "n_vocab": info.n_vocab,
            "n_embd": info.n_embd,
            "n_layer": info.n_layer,
            "n_params": info.n_params,
            "size": info.file_size,
            "parallel": info.n_slots,
            "demo": info.is_demo,
            "path": info.path,
            "name": info.name,
        },
    }


async def models(app: App, req: Request) -> None:
    """GET /v1/models: a card for the served id and one for the alias."""
    engine = app.require_engine()
    data = [_model_card(i, engine) for i in listed_model_ids(engine, app.config.model.alias)]
    await req.resp.send_json(200, {"object": "list", "data": data})


async def model_by_id(app: App, req: Request) -> None:
    """GET /v1/models/{id}: the card under any name the model answers to, else 404."""
    engine = app.require_engine()
    model_id = check_model_id(
        req.path_params["id"], accepted_model_ids(engine, app.config.model.alias)
    )
    await req.resp.send_json(200, _model_card(model_id, engine))


async def tokenize(app: App, req: Request) -> None:
    """POST /tokenize: token ids, or {"id", "piece"} objects (a piece that is not whole UTF-8
    as its byte values)."""
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
    await req.resp.send_json(200, {"tokens": tokens})


async def detokenize(app: App, req: Request) -> None:
    """POST /detokenize: the text of token ids."""
    engine = app.require_engine()
    d = parse_detokenize(req.json(), engine.info.n_vocab)
    await req.resp.send_json(200, {"content": engine.tokenizer.decode(d.tokens)})


async def apply_template(app: App, req: Request) -> None:
    """POST /apply-template: the prompt the chat template makes of the messages."""
    engine = app.require_engine()
    a = parse_apply_template(req.json())
    prompt = render_chat(engine, a.messages, a.add_generation_prompt)
    await req.resp.send_json(200, {"prompt": prompt})


def _piece_or_none(engine: InferenceThread, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    return engine.tokenizer.token_bytes(token_id).decode("utf-8", errors="replace")


async def props(app: App, req: Request) -> None:
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
            "model_path": info.path,
            "model_alias": m.alias or served_model_id(engine),
            "chat_template": engine.chat_template.source,  # None: the BitNet trained format
            "chat_template_kind": engine.chat_template.kind,
            "bos_token": _piece_or_none(engine, engine.tokenizer.bos_id),
            "eos_token": _piece_or_none(engine, engine.tokenizer.eos_id),
            "build_info": f"bitnetd-trio {__version__} ({info.kernel})",
            "demo_model": info.is_demo,
            "modalities": {"vision": False, "audio": False},
        },
    )


async def slots(app: App, req: Request) -> None:
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


async def model_info(app: App, req: Request) -> None:
    """GET /model_info: the loaded model and how it runs."""
    engine = app.require_engine()
    info = engine.info
    await req.resp.send_json(
        200,
        {
            "model": served_model_id(engine),
            "model_path": info.path,
            "architecture": info.architecture,
            "n_params": info.n_params,
            "file_size": info.file_size,
            "context_size": info.n_ctx,
            "n_ctx_train": info.n_ctx_train,
            "threads": info.n_threads,
            "instances": info.n_slots,
            "kernel": info.kernel,
            "demo": info.is_demo,
            "loaded": engine.ready,
        },
    )
