"""The raw ASGI application: routing, lifespan, every endpoint of spec/http-api.md.

Served by hypercorn on Trio (`hypercorn -k trio bitnetd_trio.app:app`, configuration from
$BITNETD_CONFIG, or `bitnetd`, which calls `create_app(config)`). One `InferenceThread` owns
the engine; handlers validate, tokenize, submit jobs and turn the thread's updates into JSON
bodies or server-sent events.

Disconnects: once a request body is read, every later `receive()` can only return
`http.disconnect`, so a watcher task blocked on it cancels the handler's scope and sets the
jobs' cancel flags; the engine drops those sequences before their next step. A request is marked
complete before its final send, because hypercorn may report the disconnect during that send.
"""

from __future__ import annotations

import hmac
import logging
import math
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from bitnetd_trio import __version__
from bitnetd_trio.api import schema as api_schema
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.metrics import Metrics
from bitnetd_trio.api.sse import (
    SSE_DONE,
    SSE_KEEPALIVE,
    ChatChunks,
    CompletionChunks,
    chat_logprob_entry,
    json_bytes,
    sse_event,
    token_text,
    usage_object,
)
from bitnetd_trio.config import Config
from bitnetd_trio.engine.inference import (
    EngineSettings,
    InferenceThread,
    Job,
    QueueFull,
    TokenResult,
    Update,
)

log = logging.getLogger("bitnetd.app")

__all__ = ["App", "create_app"]

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]

DEMO_MODEL_ID = "bitnet-demo"


class ClientGone(Exception):
    """The client disconnected before the request body was read."""


# ---- request and response plumbing ---------------------------------------------------------


class Responder:
    """Sends one HTTP response; remembers its status for the metrics."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self.started = False
        self.finished = False
        self.status = 0
        self.error_type: str | None = None

    async def start(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        self.status = status
        self.started = True
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def body(self, data: bytes, *, more: bool = False) -> None:
        if not more:
            self.finished = True
        await self._send({"type": "http.response.body", "body": data, "more_body": more})

    async def send_json(
        self,
        status: int,
        obj: Any,
        headers: dict[str, str] | None = None,
        before_final: Callable[[], None] | None = None,
    ) -> None:
        data = json_bytes(obj)
        hdrs = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(data)).encode()),
        ]
        for k, v in (headers or {}).items():
            hdrs.append((k.lower().encode("latin-1"), v.encode("latin-1")))
        await self.start(status, hdrs)
        if before_final is not None:
            before_final()
        await self.body(data)

    async def send_error(
        self, exc: ApiError, before_final: Callable[[], None] | None = None
    ) -> None:
        self.error_type = exc.type
        await self.send_json(exc.status, exc.envelope(), exc.headers, before_final)

    async def send_text(self, status: int, data: bytes, content_type: str) -> None:
        await self.start(
            status,
            [
                (b"content-type", content_type.encode("latin-1")),
                (b"content-length", str(len(data)).encode()),
            ],
        )
        await self.body(data)


@dataclass
class Request:
    scope: Scope
    receive: Receive
    resp: Responder
    body: bytes = b""
    path_params: dict[str, str] = field(default_factory=dict)

    def header(self, name: str) -> str | None:
        key = name.lower().encode("latin-1")
        for k, v in self.scope.get("headers", ()):
            if k == key:
                return v.decode("latin-1")
        return None

    def json(self) -> dict:
        return api_schema.parse_json_body(self.body)


async def read_body(receive: Receive, headers: list[tuple[bytes, bytes]], limit: int) -> bytes:
    """The whole request body, counting bytes as they arrive (413 beyond `limit`)."""
    for k, v in headers:
        if k == b"content-length":
            try:
                declared = int(v)
            except ValueError:
                raise ApiError(400, "invalid Content-Length header") from None
            if declared > limit:
                raise ApiError.body_too_large(limit)
    parts: list[bytes] = []
    total = 0
    while True:
        msg = await receive()
        if msg["type"] == "http.disconnect":
            raise ClientGone()
        chunk = msg.get("body", b"")
        total += len(chunk)
        if total > limit:
            raise ApiError.body_too_large(limit)
        parts.append(chunk)
        if not msg.get("more_body", False):
            return b"".join(parts)


class DisconnectWatch:
    """Cancels the handler's scope when the client disconnects (see module docstring)."""

    def __init__(self, on_disconnect: Callable[[], None]) -> None:
        self.completed = False  # set before the final send: a disconnect then is not an error
        self.disconnected = False
        self._on_disconnect = on_disconnect

    async def run(self, receive: Receive, body: Callable[[], Awaitable[None]]) -> None:
        error: Exception | None = None
        async with trio.open_nursery() as nursery:

            async def watch() -> None:
                while True:
                    msg = await receive()
                    if msg["type"] == "http.disconnect":
                        if not self.completed:
                            self.disconnected = True
                            self._on_disconnect()
                            nursery.cancel_scope.cancel()
                        return

            nursery.start_soon(watch)
            try:
                await body()
            except Exception as exc:  # noqa: BLE001 - re-raised below, not wrapped in a group
                error = exc
            finally:
                nursery.cancel_scope.cancel()
        if error is not None:
            raise error


# ---- routing ---------------------------------------------------------------------------------

Handler = Callable[["App", Request], Awaitable[None]]


@dataclass(frozen=True)
class Route:
    methods: dict[str, Handler]
    public: bool = False  # no API key needed
    metrics: bool = False  # the /metrics route (API key only when configured so)


# ---- generation bookkeeping -------------------------------------------------------------------


@dataclass
class Choice:
    """What a request has received so far for one of its choices (one job)."""

    job: Job
    text: list[str] = field(default_factory=list)
    tokens: list[TokenResult] = field(default_factory=list)
    prompt_logprobs: list[TokenResult] | None = None
    finish_reason: str | None = None
    stop_type: str | None = None
    stopping_word: str = ""
    error: str | None = None
    n_generated: int = 0
    n_cached: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    def apply(self, upd: Update) -> None:
        if upd.text:
            self.text.append(upd.text)
        if upd.tokens:
            self.tokens.extend(upd.tokens)
        if upd.prompt_logprobs is not None:
            self.prompt_logprobs = upd.prompt_logprobs
        self.n_generated = max(self.n_generated, upd.n_generated)
        if upd.final:
            self.finish_reason = upd.finish_reason
            self.stop_type = upd.stop_type
            self.stopping_word = upd.stopping_word
            self.error = upd.error
            self.n_cached = upd.n_cached
            self.prompt_seconds = upd.prompt_seconds
            self.generation_seconds = upd.generation_seconds

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def openai_finish_reason(self) -> str:
        # "cancelled" only reaches a client that is still there on a timeout or a shutdown:
        # the generation was cut short, which OpenAI calls "length".
        return "stop" if self.finish_reason == "stop" else "length"


@dataclass(eq=False)
class Generation:
    """One generating request in flight: its jobs, their channel and what came back."""

    req: api_schema.GenerationRequest
    engine: InferenceThread
    prompts: list[list[int]]
    prompt_texts: list[str]
    choices: list[Choice]
    receiver: trio.MemoryReceiveChannel
    id: str
    created: int
    model_id: str
    started_at: float
    timed_out: bool = False
    wait_scope: trio.CancelScope | None = None  # the current wait for updates (drain moves it)

    def cancel_all(self) -> None:
        for c in self.choices:
            if not c.done:
                c.job.cancel.set()

    @property
    def all_done(self) -> bool:
        return all(c.done for c in self.choices)

    @property
    def anything_produced(self) -> bool:
        return any(c.n_generated or c.text or c.tokens for c in self.choices)

    def usage(self) -> dict:
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(c.n_generated for c in self.choices)
        # each prompt counts once however many choices share it (n > 1)
        n = max(1, self.req.n)
        cached = sum(c.n_cached for i, c in enumerate(self.choices) if i % n == 0)
        return usage_object(prompt_tokens, completion_tokens, cached)

    def failed(self) -> Choice | None:
        return next((c for c in self.choices if c.finish_reason == "error"), None)


# ---- the application ---------------------------------------------------------------------------


class App:
    """The ASGI application: `await app(scope, receive, send)`."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.engine: InferenceThread | None = None
        self.model_id = ""
        self._active_requests = 0
        self._generations: set[Generation] = set()  # in flight, for begin_drain
        self.drain_deadline = math.inf  # Trio time after which generations are ended
        self.draining = False
        self.stream_keepalive = 10.0  # seconds of silence before a stream sends ": ping"
        self._rate_buckets: dict[str, tuple[float, float]] = {}
        self.routes: dict[str, Route] = self._build_routes()

    # -- ASGI entry --

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    # -- lifespan and the engine --

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        msg = await receive()
        if msg["type"] != "lifespan.startup":
            return
        try:
            await self.startup()
        except Exception as exc:  # noqa: BLE001 - must become startup.failed (else hypercorn
            # serves without a model)
            log.error("startup failed: %s", exc)
            await send({"type": "lifespan.startup.failed", "message": str(exc)})
            return
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        await self.shutdown()
        await send({"type": "lifespan.shutdown.complete"})

    def engine_settings(self, config: Config) -> EngineSettings:
        """The inference thread's settings from a configuration (demo model when no path)."""
        m = config.model
        path = m.path
        is_demo = path is None
        if is_demo:
            from bitnetd_trio.engine.gguf_writer import demo_model_path

            path = str(demo_model_path())
            log.warning(
                "no [model] path configured: serving the demo model %s (random "
                "weights, for trying the API only)",
                path,
            )
        return EngineSettings(
            model_path=str(path),
            n_slots=m.parallel,
            n_ctx=m.ctx_size,
            n_threads=m.threads,
            chat_template_override=m.chat_template,
            is_demo=is_demo,
        )

    async def load_engine(self, config: Config) -> InferenceThread:
        """Start an inference thread for `config` and wait until its model is loaded."""
        settings = self.engine_settings(config)
        engine = InferenceThread(settings, self.metrics, max_queue=config.server.max_queue)
        await engine.start()
        return engine

    def use_engine(self, engine: InferenceThread, config: Config | None = None) -> None:
        """Serve new requests from `engine` (requests in flight keep the one they started on)."""
        if config is not None:
            self.config = config
        self.engine = engine
        self.metrics.model_loaded.set(1)
        self.model_id = self._model_id_for(engine)

    def _model_id_for(self, engine: InferenceThread) -> str:
        if engine.settings.is_demo:
            return DEMO_MODEL_ID
        return Path(engine.settings.model_path).name

    async def startup(self) -> None:
        engine = await self.load_engine(self.config)
        self.use_engine(engine)

    async def shutdown(self) -> None:
        engine, self.engine = self.engine, None
        self.metrics.model_loaded.set(0)
        if engine is not None:
            await engine.aclose()

    def begin_drain(self, deadline: float) -> None:
        """Stop admitting generations; end running ones cleanly (finish_reason "length",
        streams closed with their finish chunk and [DONE]) at Trio time `deadline`."""
        self.draining = True
        self.drain_deadline = min(self.drain_deadline, deadline)
        for gen in list(self._generations):
            if gen.wait_scope is not None:
                gen.wait_scope.deadline = min(gen.wait_scope.deadline, self.drain_deadline)

    async def retire_engine(self, engine: InferenceThread, grace: float | None = None) -> None:
        """Close an engine once its requests have finished (or after `grace` seconds)."""
        with trio.move_on_after(math.inf if grace is None else grace):
            while engine.in_system > 0:
                await trio.sleep(0.05)
        await engine.aclose()

    # -- HTTP --

    def _build_routes(self) -> dict[str, Route]:
        r = {
            "/v1/chat/completions": Route({"POST": App.chat_completions}),
            "/v1/completions": Route({"POST": App.completions}),
            "/v1/models": Route({"GET": App.models}),
            "/health": Route({"GET": App.health, "HEAD": App.health}, public=True),
            "/metrics": Route({"GET": App.metrics_endpoint}, metrics=True),
            "/tokenize": Route({"POST": App.tokenize}),
            "/detokenize": Route({"POST": App.detokenize}),
            "/apply-template": Route({"POST": App.apply_template}),
            "/props": Route({"GET": App.props}),
            "/slots": Route({"GET": App.slots}),
            "/generate": Route({"POST": App.generate}),
            "/model_info": Route({"GET": App.model_info}),
            "/completion": Route({"POST": App.llama_completion}),
        }
        # the unversioned spellings llama.cpp's server also answers
        r["/chat/completions"] = r["/v1/chat/completions"]
        r["/completions"] = r["/v1/completions"]
        r["/models"] = r["/v1/models"]
        r["/v1/health"] = r["/health"]
        return r

    def _route(self, method: str, path: str) -> tuple[Route, Handler, dict[str, str]]:
        params: dict[str, str] = {}
        route = self.routes.get(path)
        if route is None and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            route = Route({"GET": App.model_by_id})
            params["id"] = path[len("/v1/models/") :]
        if route is None:
            raise ApiError.route_not_found(method, path)
        handler = route.methods.get(method)
        if handler is None and method == "HEAD":
            handler = route.methods.get("GET")  # HEAD is GET without the body (hypercorn drops it)
        if handler is None:
            allowed = set(route.methods) | ({"HEAD"} if "GET" in route.methods else set())
            raise ApiError.method_not_allowed(method, path, allowed)
        return route, handler, params

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = time.monotonic()
        path = scope.get("path", "")
        resp = Responder(send)
        self._active_requests += 1
        self.metrics.active_connections.inc()
        body: bytes | None = None
        body_read_started = False
        try:
            try:
                route, handler, params = self._route(scope["method"], path)
                self._check_access(scope, route)
                if scope["method"] in ("POST", "PUT", "PATCH"):
                    api_schema.check_content_type(_header(scope, b"content-type"))
                    # A client that sends its headers and then trickles or withholds the body
                    # would otherwise hold a request (and a max_connections place) forever.
                    timeout = self.config.server.request_timeout
                    body_read_started = True
                    with trio.move_on_after(timeout if timeout > 0 else math.inf):
                        body = await read_body(
                            receive, scope.get("headers", []), self.config.server.max_body_size
                        )
                    if body is None:
                        raise ApiError(408, f"the request body did not arrive within {timeout:g} s")
                await handler(self, Request(scope, receive, resp, body or b"", params))
            except ApiError as exc:
                if not resp.started:
                    if (
                        body is None
                        and scope["method"] in ("POST", "PUT", "PATCH")
                        and (body_read_started or not await self._discard_body(scope, receive))
                    ):
                        # the body was not read (all of it): the connection cannot be reused
                        exc.headers.setdefault("connection", "close")
                    await resp.send_error(exc)
                else:
                    resp.error_type = exc.type
        except ClientGone:
            resp.status = resp.status or 499
        except Exception as exc:
            log.exception("internal error on %s %s", scope.get("method"), path)
            if not resp.started:
                await resp.send_error(ApiError(500, f"internal error: {type(exc).__name__}"))
            else:
                resp.error_type = "server_error"
        finally:
            self._active_requests -= 1
            self.metrics.active_connections.dec()
            self.metrics.count_request(path, resp.status or 499, resp.error_type)
            if path in (
                "/v1/chat/completions",
                "/v1/completions",
                "/completion",
                "/generate",
                "/chat/completions",
                "/completions",
            ):
                self.metrics.e2e_request_seconds.observe(time.monotonic() - started)

    async def _discard_body(self, scope: Scope, receive: Receive) -> bool:
        """Read and drop the body of a request refused before its body was read (unknown
        route, wrong method or content type, access). Answering before the body is consumed
        races with hypercorn's own reader when the client pipelines its next request. False
        if the body is too large or slow: the connection is then closed instead."""
        with trio.move_on_after(5.0):
            try:
                await read_body(receive, scope.get("headers", []), self.config.server.max_body_size)
            except (ApiError, ClientGone):
                return False
            return True
        return False

    def _check_access(self, scope: Scope, route: Route) -> None:
        """API key, per-client rate limit and the connection limit (in that order)."""
        if route.public:
            return
        keys = self.config.server.api_keys
        if keys and (not route.metrics or self.config.metrics.require_api_key):
            given = _bearer_token(scope)
            if given is None or not any(
                hmac.compare_digest(given.encode(), k.encode()) for k in keys
            ):
                raise ApiError.invalid_api_key()
        if route.metrics and not self.config.metrics.enabled:
            raise ApiError.route_not_found(scope["method"], scope.get("path", ""))
        rate = self.config.security.rate_limit
        if rate > 0:
            self._rate_limit(scope, rate)
        if self._active_requests > self.config.server.max_connections:
            raise ApiError.unavailable(
                f"too many requests in progress (limit {self.config.server.max_connections})"
            )

    def _rate_limit(self, scope: Scope, rate: float) -> None:
        """A token bucket per client address: `rate` requests per second, burst of rate."""
        client = scope.get("client")
        addr = client[0] if client else "unix"
        now = time.monotonic()
        burst = max(1.0, rate)
        tokens, last = self._rate_buckets.get(addr, (burst, now))
        tokens = min(burst, tokens + (now - last) * rate)
        if tokens < 1.0:
            self._rate_buckets[addr] = (tokens, now)
            wait = max(1, math.ceil((1.0 - tokens) / rate))
            raise ApiError(
                429,
                f"rate limit of {rate:g} requests per second exceeded",
                headers={"retry-after": str(wait)},
            )
        self._rate_buckets[addr] = (tokens - 1.0, now)
        if len(self._rate_buckets) > 10000:  # forget idle clients
            self._rate_buckets = {a: b for a, b in self._rate_buckets.items() if now - b[1] < 60}

    def _require_engine(self) -> InferenceThread:
        engine = self.engine
        if engine is None or not engine.ready:
            raise ApiError.unavailable("the model is loading, retry shortly", retry_after=2)
        return engine

    def _accepted_model_ids(self, engine: InferenceThread) -> set[str]:
        """Every `model` value a request may name: the id, the alias, the file's name/path."""
        path = Path(engine.settings.model_path)
        names = {self._model_id_for(engine), path.name, path.stem, str(path)}
        if self.config.model.alias:
            names.add(self.config.model.alias)
        return names

    # ---- operations endpoints ----

    async def health(self, req: Request) -> None:
        engine = self.engine
        if engine is None or not engine.ready:
            err = ApiError.unavailable("the model is loading", retry_after=2)
            body = {"status": "loading", **err.envelope()}
            await req.resp.send_json(503, body, err.headers)
            req.resp.error_type = err.type
            return
        await req.resp.send_json(200, {"status": "ok"})

    async def metrics_endpoint(self, req: Request) -> None:
        data, content_type = self.metrics.render(req.header("accept"))
        await req.resp.send_text(200, data, content_type)

    def _model_card(self, model_id: str, engine: InferenceThread) -> dict:
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

    def _model_ids(self, engine: InferenceThread) -> list[str]:
        ids = [self._model_id_for(engine)]
        alias = self.config.model.alias
        if alias and alias not in ids:
            ids.append(alias)
        return ids

    async def models(self, req: Request) -> None:
        engine = self._require_engine()
        data = [self._model_card(i, engine) for i in self._model_ids(engine)]
        await req.resp.send_json(200, {"object": "list", "data": data})

    async def model_by_id(self, req: Request) -> None:
        engine = self._require_engine()
        model_id = api_schema.check_model_id(
            req.path_params["id"], self._accepted_model_ids(engine)
        )
        await req.resp.send_json(200, self._model_card(model_id, engine))

    async def tokenize(self, req: Request) -> None:
        engine = self._require_engine()
        t = api_schema.parse_tokenize(req.json())
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

    async def detokenize(self, req: Request) -> None:
        engine = self._require_engine()
        d = api_schema.parse_detokenize(req.json(), engine.info.n_vocab)
        await req.resp.send_json(200, {"content": engine.tokenizer.decode(d.tokens)})

    async def apply_template(self, req: Request) -> None:
        engine = self._require_engine()
        a = api_schema.parse_apply_template(req.json())
        prompt = self._render_chat(engine, a.messages, a.add_generation_prompt)
        await req.resp.send_json(200, {"prompt": prompt})

    async def props(self, req: Request) -> None:
        engine = self._require_engine()
        info = engine.info
        m = self.config.model
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
                "model_alias": self.config.model.alias or self._model_id_for(engine),
                "chat_template": engine.chat_template.source,  # None: the BitNet trained format
                "chat_template_kind": engine.chat_template.kind,
                "bos_token": _piece_or_none(engine.tokenizer, engine.tokenizer.bos_id),
                "eos_token": _piece_or_none(engine.tokenizer, engine.tokenizer.eos_id),
                "build_info": f"bitnetd-trio {__version__} ({info.kernel})",
                "demo_model": info.is_demo,
                "modalities": {"vision": False, "audio": False},
            },
        )

    async def slots(self, req: Request) -> None:
        engine = self._require_engine()
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

    async def model_info(self, req: Request) -> None:
        engine = self._require_engine()
        info = engine.info
        await req.resp.send_json(
            200,
            {
                "model": self._model_id_for(engine),
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

    # ---- generation endpoints ----

    def _defaults(self, engine: InferenceThread) -> api_schema.SchemaDefaults:
        return api_schema.SchemaDefaults.from_config(
            self.config, n_vocab=engine.info.n_vocab, model_ids=self._accepted_model_ids(engine)
        )

    async def chat_completions(self, req: Request) -> None:
        engine = self._require_engine()
        g = api_schema.parse_chat_completion(req.json(), self._defaults(engine))
        await self._generate(req, g, engine)

    async def completions(self, req: Request) -> None:
        engine = self._require_engine()
        g = api_schema.parse_completion(req.json(), self._defaults(engine))
        await self._generate(req, g, engine)

    async def generate(self, req: Request) -> None:
        engine = self._require_engine()
        g = api_schema.parse_generate(req.json(), self._defaults(engine))
        await self._generate(req, g, engine)

    async def llama_completion(self, req: Request) -> None:
        engine = self._require_engine()
        g = api_schema.parse_llama_completion(req.json(), self._defaults(engine))
        await self._generate(req, g, engine)

    def _render_chat(
        self, engine: InferenceThread, messages: list[dict], add_generation_prompt: bool = True
    ) -> str:
        from bitnetd_trio.engine.chat import ChatTemplateError

        try:
            return engine.chat_template.render(
                messages, add_generation_prompt=add_generation_prompt
            )
        except ChatTemplateError as exc:
            raise ApiError(
                400, f"the chat template failed on these messages: {exc}", param="messages"
            ) from None

    def _chat_tokens(self, engine: InferenceThread, messages: list[dict]) -> list[int]:
        from bitnetd_trio.engine.chat import ChatTemplateError

        try:
            return engine.chat_template.render_tokens(messages, engine.tokenizer)
        except ChatTemplateError as exc:
            raise ApiError(
                400, f"the chat template failed on these messages: {exc}", param="messages"
            ) from None

    def _check_samplable(self, g: api_schema.GenerationRequest, engine: InferenceThread) -> None:
        """400 when logit_bias bans every token (ignore_eos and min_tokens ban the stop tokens
        too): the engine could sample nothing and would fail the request as a server error."""
        banned = {t for t, b in g.sampling.logit_bias.items() if b == -math.inf}
        if not banned:
            return
        if g.ignore_eos or g.min_tokens > 0:
            banned |= engine.tokenizer.stop_ids
        if len(banned) >= engine.info.n_vocab:
            raise ApiError(
                400, "'logit_bias' bans every token: nothing can be sampled", param="logit_bias"
            )

    def _prepare_prompts(
        self, g: api_schema.GenerationRequest, engine: InferenceThread
    ) -> tuple[list[list[int]], list[str]]:
        """Token ids and text of each prompt (chat: the rendered conversation)."""
        tok = engine.tokenizer
        if g.messages is not None:
            ids = self._chat_tokens(engine, g.messages)
            prompts, texts, param = [ids], [tok.decode(ids)], "messages"
        else:
            prompts, texts, param = [], [], "prompt"
            for p in g.prompts or []:
                if isinstance(p, str):
                    prompts.append(tok.encode(p, add_bos=tok.add_bos_default, parse_special=True))
                    texts.append(p)
                else:
                    # token ids were range-checked by the schema (SchemaDefaults.n_vocab)
                    prompts.append(list(p))
                    texts.append(tok.decode(p))
        for ids in prompts:
            if not ids:
                raise ApiError(400, "the prompt is empty (no tokens)", param=param)
            err = api_schema.check_context(len(ids), g.max_tokens, engine.info.n_ctx, param=param)
            if err is not None:
                raise err
        return prompts, texts

    async def _generate(
        self, req: Request, g: api_schema.GenerationRequest, engine: InferenceThread
    ) -> None:
        if self.draining:
            raise ApiError.unavailable("the server is shutting down", retry_after=5)
        model_id = g.model or self._model_id_for(engine)  # the schema checked g.model
        self._check_samplable(g, engine)
        prompts, texts = self._prepare_prompts(g, engine)
        send_ch, recv_ch = trio.open_memory_channel[Update](math.inf)
        max_tokens = g.max_tokens
        if max_tokens is None:
            max_tokens = self.config.model.max_tokens_default
        echo_score = g.echo and g.logprobs
        choices = []
        for p_index, ids in enumerate(prompts):
            for k in range(g.n):
                params = g.sampling
                if k > 0 and params.seed is not None:  # n seeded choices must still differ
                    params = _with_seed(params, params.seed + k)
                job = Job(
                    prompt=ids,
                    params=params,
                    max_tokens=max_tokens,
                    sink=send_ch,
                    stop=tuple(g.stop),
                    index=p_index * g.n + k,
                    min_tokens=g.min_tokens,
                    ignore_eos=g.ignore_eos,
                    logprobs=g.logprobs,
                    top_logprobs=g.top_logprobs,
                    prompt_logprobs=echo_score,
                    cache_prompt=g.cache_prompt,
                )
                choices.append(Choice(job))
        prefix = "chatcmpl-" if g.endpoint == "chat" else "cmpl-"
        gen = Generation(
            g,
            engine,
            prompts,
            texts,
            choices,
            recv_ch,
            id=prefix + uuid.uuid4().hex[:24],
            created=int(time.time()),
            model_id=model_id,
            started_at=trio.current_time(),
        )
        try:
            engine.submit([c.job for c in choices])
        except QueueFull as exc:
            raise ApiError.unavailable(f"server busy: {exc}", retry_after=1) from None
        watch = DisconnectWatch(gen.cancel_all)
        self._generations.add(gen)
        try:
            with recv_ch:
                if g.stream:
                    await watch.run(req.receive, lambda: self._stream(req, gen, watch))
                else:
                    await watch.run(req.receive, lambda: self._respond_whole(req, gen, watch))
        finally:
            self._generations.discard(gen)
            gen.cancel_all()  # any way out (error, timeout, disconnect) frees the slots
            # here, not after: a timeout with nothing produced leaves as a 504 ApiError
            if watch.disconnected or gen.timed_out:
                self.metrics.requests_cancelled_total.inc()
        if log.isEnabledFor(logging.DEBUG):
            usage = gen.usage()
            log.debug(
                "%s %s: %d prompt + %d completion tokens (%d cached), %s, %.3f s",
                gen.id,
                g.endpoint,
                usage["prompt_tokens"],
                usage["completion_tokens"],
                usage["prompt_tokens_details"]["cached_tokens"],
                "client left"
                if watch.disconnected
                else "timed out"
                if gen.timed_out
                else ",".join(sorted({c.finish_reason or "?" for c in gen.choices})),
                trio.current_time() - gen.started_at,
            )
        if watch.disconnected and not req.resp.finished:
            req.resp.status = req.resp.status or 499

    def _deadline(self, gen: Generation) -> float:
        timeout = self.config.server.request_timeout
        deadline = gen.started_at + timeout if timeout > 0 else math.inf
        return min(deadline, self.drain_deadline)

    async def _next_updates(
        self, gen: Generation, patience: float = math.inf
    ) -> list[Update] | None:
        """The next update and any already waiting behind it; [] if none came within
        `patience` seconds; None when the request's time ran out."""
        with trio.CancelScope(deadline=self._deadline(gen)) as scope:
            gen.wait_scope = scope
            with trio.move_on_after(patience):
                first = await gen.receiver.receive()
                batch = [first]
                while True:
                    try:
                        batch.append(gen.receiver.receive_nowait())
                    except trio.WouldBlock:
                        return batch
            return []
        gen.timed_out = True
        gen.cancel_all()
        return None

    def _drain_ended(self) -> bool:
        """A shutdown's drain deadline has passed: streams end cleanly (finish chunk and
        [DONE]) even when they produced nothing, instead of a timeout error."""
        return self.draining and trio.current_time() >= self.drain_deadline

    def _apply(self, gen: Generation, updates: list[Update]) -> None:
        for upd in updates:
            gen.choices[upd.job.index].apply(upd)

    # -- non-streaming --

    async def _respond_whole(self, req: Request, gen: Generation, watch: DisconnectWatch) -> None:
        while not gen.all_done:
            updates = await self._next_updates(gen)
            if updates is None:
                if not gen.anything_produced:
                    raise ApiError(
                        504,
                        "the request timed out before any token was produced",
                        type="timeout_error",
                    )
                break
            self._apply(gen, updates)
        failed = gen.failed()
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}")
        body = self._whole_body(gen)

        def complete() -> None:
            watch.completed = True

        await req.resp.send_json(200, body, before_final=complete)

    def _whole_body(self, gen: Generation) -> dict:
        g = gen.req
        if g.endpoint == "chat":
            return {
                "id": gen.id,
                "object": "chat.completion",
                "created": gen.created,
                "model": gen.model_id,
                "system_fingerprint": self._fingerprint(gen.engine),
                "choices": [
                    {
                        "index": i,
                        "message": {"role": "assistant", "content": "".join(c.text)},
                        "logprobs": self._chat_logprobs(gen, c.tokens) if g.logprobs else None,
                        "finish_reason": c.openai_finish_reason,
                    }
                    for i, c in enumerate(gen.choices)
                ],
                "usage": gen.usage(),
            }
        if g.endpoint == "completions":
            choices = []
            for i, c in enumerate(gen.choices):
                p_index = i // g.n
                text = "".join(c.text)
                prefix = gen.prompt_texts[p_index] if g.echo else ""
                choices.append(
                    {
                        "index": i,
                        "text": prefix + text,
                        "logprobs": self._completion_logprobs(gen, c, p_index)
                        if g.logprobs
                        else None,
                        "finish_reason": c.openai_finish_reason,
                    }
                )
            return {
                "id": gen.id,
                "object": "text_completion",
                "created": gen.created,
                "model": gen.model_id,
                "system_fingerprint": self._fingerprint(gen.engine),
                "choices": choices,
                "usage": gen.usage(),
            }
        c = gen.choices[0]
        if g.endpoint == "generate":
            return {
                "generated_text": "".join(c.text),
                "tokens_generated": c.n_generated,
                "tokens_processed": len(gen.prompts[0]) + c.n_generated,
            }
        return self._llama_final(gen, c, "".join(c.text))

    def _fingerprint(self, engine: InferenceThread) -> str:
        return f"bitnetd-trio-{__version__}-{engine.info.kernel}"

    def _chat_logprobs(self, gen: Generation, tokens: list[TokenResult]) -> dict:
        return {"content": self._chat_logprob_entries(gen, tokens)}

    def _chat_logprob_entries(self, gen: Generation, tokens: list[TokenResult]) -> list[dict]:
        tb = gen.engine.tokenizer.token_bytes
        return [
            chat_logprob_entry(tb(t), lp if lp is not None else 0.0, [(tb(i), v) for i, v in top])
            for t, lp, top in tokens
        ]

    def _completion_logprobs(
        self, gen: Generation, c: Choice, p_index: int, offset: int = 0
    ) -> dict:
        """The legacy `logprobs` object: tokens, token_logprobs, top_logprobs, text_offset."""
        entries: list[TokenResult] = []
        if gen.req.echo and c.prompt_logprobs is not None:
            entries.extend(c.prompt_logprobs)
        elif gen.req.echo:
            entries.extend((t, None, []) for t in gen.prompts[p_index])
        entries.extend(c.tokens)
        return self._logprob_lists(gen, entries, offset)

    def _logprob_lists(self, gen: Generation, entries: list[TokenResult], offset: int) -> dict:
        tb = gen.engine.tokenizer.token_bytes
        tokens, lps, tops, offsets = [], [], [], []
        pos = offset
        for t, lp, top in entries:
            s = token_text(tb(t))
            tokens.append(s)
            lps.append(lp)
            tops.append(None if lp is None else {token_text(tb(i)): v for i, v in top})
            offsets.append(pos)
            pos += len(tb(t).decode("utf-8", errors="replace"))
        return {
            "tokens": tokens,
            "token_logprobs": lps,
            "top_logprobs": tops,
            "text_offset": offsets,
        }

    def _llama_probs(self, gen: Generation, tokens: list[TokenResult]) -> list[dict]:
        """llama.cpp's `completion_probabilities` (n_probs) for generated tokens."""
        tb = gen.engine.tokenizer.token_bytes

        def one(t: int, lp: float | None) -> dict:
            return {"id": t, "token": token_text(tb(t)), "bytes": list(tb(t)), "logprob": lp}

        return [
            {**one(t, lp), "top_logprobs": [one(i, v) for i, v in top]} for t, lp, top in tokens
        ]

    def _llama_final(
        self, gen: Generation, c: Choice, content: str, tokens: list[TokenResult] | None = None
    ) -> dict:
        prompt_n = len(gen.prompts[0])
        evaluated = prompt_n - c.n_cached  # the prompt tokens actually processed
        pred_n = c.n_generated
        prompt_ms = c.prompt_seconds * 1000.0
        pred_ms = c.generation_seconds * 1000.0
        out = {
            "content": content,
            "id_slot": -1,
            "stop": True,
            "model": gen.model_id,
            "tokens_predicted": pred_n,
            "tokens_evaluated": prompt_n,
            "generation_settings": {
                "n_predict": gen.req.max_tokens if gen.req.max_tokens is not None else -1,
                "seed": gen.req.sampling.seed,
                "temperature": gen.req.sampling.temperature,
                "top_k": gen.req.sampling.top_k,
                "top_p": gen.req.sampling.top_p,
                "min_p": gen.req.sampling.min_p,
                "stop": list(gen.req.stop),
            },
            "prompt": gen.prompt_texts[0],
            "truncated": False,
            "stop_type": c.stop_type or ("limit" if c.finish_reason != "stop" else "eos"),
            "stopping_word": c.stopping_word,
            "tokens_cached": prompt_n + pred_n,
            "timings": {
                "prompt_n": evaluated,
                "prompt_ms": prompt_ms,
                "prompt_per_token_ms": prompt_ms / evaluated if evaluated else 0.0,
                "prompt_per_second": evaluated / c.prompt_seconds if c.prompt_seconds else 0.0,
                "predicted_n": pred_n,
                "predicted_ms": pred_ms,
                "predicted_per_token_ms": pred_ms / pred_n if pred_n else 0.0,
                "predicted_per_second": pred_n / c.generation_seconds
                if c.generation_seconds
                else 0.0,
            },
        }
        if gen.req.logprobs:
            out["completion_probabilities"] = self._llama_probs(
                gen, c.tokens if tokens is None else tokens
            )
        return out

    # -- streaming --

    async def _stream(self, req: Request, gen: Generation, watch: DisconnectWatch) -> None:
        # Wait for the first result before answering, so a request that fails or times out
        # before producing anything still gets a real HTTP status; but not for longer than
        # stream_keepalive: then the stream starts with keep-alive comments, so proxies and
        # clients with read timeouts do not give up during a long queue wait or prefill.
        first = await self._next_updates(gen, self.stream_keepalive)
        if first is None and not self._drain_ended():
            raise ApiError(
                504, "the request timed out before any token was produced", type="timeout_error"
            )
        failed = next((u for u in first or () if u.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}")
        await req.resp.start(
            200,
            [
                (b"content-type", b"text/event-stream; charset=utf-8"),
                (b"cache-control", b"no-cache"),
                (b"x-accel-buffering", b"no"),
            ],
        )
        shaper = _StreamShaper(self, gen)
        out = bytearray(shaper.opening())
        updates: list[Update] | None = first
        while True:
            if updates is None and not gen.anything_produced and not self._drain_ended():
                err = ApiError(
                    504, "the request timed out before any token was produced", type="timeout_error"
                )
                out += sse_event(err.envelope())
                req.resp.error_type = err.type
                watch.completed = True
                await req.resp.body(bytes(out))
                return
            if updates is None:  # timed out or drained: finish every open choice with "length"
                for c in gen.choices:
                    if not c.done:
                        c.finish_reason = "cancelled"
                        out += shaper.finish(c, "")
                break
            if not updates:
                out += SSE_KEEPALIVE
            for upd in updates:
                c = gen.choices[upd.job.index]
                c.apply(upd)
                if upd.finish_reason == "error":
                    out += sse_event(ApiError(500, f"generation failed: {upd.error}").envelope())
                    req.resp.error_type = "server_error"
                    watch.completed = True
                    await req.resp.body(bytes(out))
                    return
                out += shaper.piece(c, upd)
                if upd.final:
                    out += shaper.finish(c, upd.text, upd.tokens)
            if gen.all_done:
                break
            if out:
                await req.resp.body(bytes(out), more=True)
                out.clear()
            updates = await self._next_updates(gen, self.stream_keepalive)
        out += shaper.closing()
        watch.completed = True
        await req.resp.body(bytes(out))


class _StreamShaper:
    """Turns one request's updates into its endpoint's stream events."""

    def __init__(self, app: App, gen: Generation) -> None:
        self.app = app
        self.gen = gen
        g = gen.req
        fp = app._fingerprint(gen.engine)
        if g.endpoint == "chat":
            self.chat = ChatChunks(gen.id, gen.created, gen.model_id, fp, g.include_usage)
        elif g.endpoint == "completions":
            self.cmpl = CompletionChunks(gen.id, gen.created, gen.model_id, fp, g.include_usage)
        self.text_offsets = [0] * len(gen.choices)

    def opening(self) -> bytes:
        g = self.gen.req
        out = bytearray()
        if g.endpoint == "chat":
            for i in range(len(self.gen.choices)):
                out += sse_event(self.chat.role(i))
        elif g.endpoint == "completions" and g.echo:
            for i in range(len(self.gen.choices)):
                text = self.gen.prompt_texts[i // g.n]
                self.text_offsets[i] = len(text)
                out += sse_event(self.cmpl.text(i, text))
        return bytes(out)

    def piece(self, c: Choice, upd: Update) -> bytes:
        g = self.gen.req
        if not upd.text and not (g.logprobs and (upd.tokens or upd.prompt_logprobs)):
            return b""
        i = c.job.index
        if g.endpoint == "chat":
            lps = self.app._chat_logprob_entries(self.gen, upd.tokens or []) if g.logprobs else None
            return sse_event(self.chat.content(i, upd.text, lps))
        if g.endpoint == "completions":
            lps = None
            if g.logprobs:
                lps = self.app._logprob_lists(self.gen, upd.tokens or [], self.text_offsets[i])
                if g.echo and upd.prompt_logprobs:  # the echoed prompt's, at offset 0
                    head = self.app._logprob_lists(self.gen, upd.prompt_logprobs, 0)
                    lps = {k: head[k] + lps[k] for k in lps}
            self.text_offsets[i] += len(upd.text)
            return sse_event(self.cmpl.text(i, upd.text, lps))
        if g.endpoint == "completion":
            if upd.final or not (upd.text or (g.logprobs and upd.tokens)):
                return b""  # the final event carries the last text
            event = {
                "content": upd.text,
                "stop": False,
                "id_slot": -1,
                "tokens_predicted": upd.n_generated,
                "tokens_evaluated": len(self.gen.prompts[0]),
            }
            if g.logprobs:
                event["completion_probabilities"] = self.app._llama_probs(
                    self.gen, upd.tokens or []
                )
            return sse_event(event)
        return b""  # /generate does not stream pieces: one final event

    def finish(
        self, c: Choice, last_text: str, last_tokens: list[TokenResult] | None = None
    ) -> bytes:
        g = self.gen.req
        i = c.job.index
        if g.endpoint == "chat":
            return sse_event(self.chat.finish(i, c.openai_finish_reason))
        if g.endpoint == "completions":
            return sse_event(self.cmpl.finish(i, c.openai_finish_reason))
        if g.endpoint == "completion":
            return sse_event(self.app._llama_final(self.gen, c, last_text, last_tokens or []))
        return sse_event(
            {
                "generated_text": "".join(c.text),
                "tokens_generated": c.n_generated,
                "tokens_processed": len(self.gen.prompts[0]) + c.n_generated,
            }
        )

    def closing(self) -> bytes:
        g = self.gen.req
        out = bytearray()
        if g.include_usage and g.endpoint == "chat":
            out += sse_event(self.chat.usage(self.gen.usage()))
        elif g.include_usage and g.endpoint == "completions":
            out += sse_event(self.cmpl.usage(self.gen.usage()))
        if g.endpoint in ("chat", "completions"):
            out += SSE_DONE
        return bytes(out)


# ---- helpers -----------------------------------------------------------------------------------


def _header(scope: Scope, name: bytes) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == name:
            return v.decode("latin-1")
    return None


def _bearer_token(scope: Scope) -> str | None:
    for k, v in scope.get("headers", ()):
        if k == b"authorization":
            text = v.decode("latin-1").strip()
            if text[:7].lower() == "bearer ":
                return text[7:].strip()
            return None
        if k == b"x-api-key":
            return v.decode("latin-1").strip()
    return None


def _with_seed(params: Any, seed: int) -> Any:
    import dataclasses

    return dataclasses.replace(params, seed=seed % (1 << 64))


def _piece_or_none(tok: Any, token_id: int | None) -> str | None:
    if token_id is None:
        return None
    return tok.token_bytes(token_id).decode("utf-8", errors="replace")


def create_app(config: Config, metrics: Metrics | None = None) -> App:
    """The ASGI application for a configuration."""
    return App(config, metrics)
