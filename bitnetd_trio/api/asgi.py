"""The raw ASGI application: lifespan, engine swap, routing, body reading and access control.

Served by hypercorn on Trio (`hypercorn -k trio bitnetd_trio.app:app`, configuration from
$BITNETD_CONFIG, or `bitnetd`, which calls `create_app(config)`). One `InferenceThread` owns
the engine. `App` reads a request's body, checks who may ask, and hands it to a handler: the
operations endpoints of `bitnetd_trio.api.ops` (http-api §2), or, for each generating path
(http-api §1.1, §1.2, §3), the generation flow (`bitnetd_trio.api.generation`) with that
path's dialect (`bitnetd_trio.api.dialects`).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from bitnetd_trio.api import ops, web
from bitnetd_trio.api.access import RateLimiter, check_api_key
from bitnetd_trio.api.cors import serve_with_cors, warn_if_open
from bitnetd_trio.api.cpu_work import CpuWork
from bitnetd_trio.api.dialects.anthropic_messages import (
    AnthropicMessages,
    anthropic_error_body,
    parse_messages_request,
)
from bitnetd_trio.api.dialects.base import Dialect
from bitnetd_trio.api.dialects.bitnet_generate import BitNetGenerate
from bitnetd_trio.api.dialects.llamacpp_completion import LlamaCppCompletion
from bitnetd_trio.api.dialects.openai_chat import OpenAIChat, parse_chat_completion
from bitnetd_trio.api.dialects.openai_completions import OpenAICompletions
from bitnetd_trio.api.dialects.openai_responses import OpenAIResponses, parse_responses_request
from bitnetd_trio.api.embeddings import embeddings
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.generation import GenerationFlow
from bitnetd_trio.api.http import (
    ClientGone,
    Receive,
    Request,
    Responder,
    Scope,
    Send,
    header,
    read_body,
)
from bitnetd_trio.api.json_body import check_content_type
from bitnetd_trio.api.metrics import Metrics
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults
from bitnetd_trio.api.served_model import DEMO_MODEL_ID, accepted_model_ids, served_model_id
from bitnetd_trio.api.token_count import counting_handler
from bitnetd_trio.config import Config
from bitnetd_trio.engine.inference import EngineSettings, InferenceThread

log = logging.getLogger("bitnetd.app")

# Receive, Responder, Scope, Send: the names bitnetd_trio.app imports from here.
__all__ = ["DEMO_MODEL_ID", "App", "Receive", "Responder", "Scope", "Send", "create_app"]

Handler = Callable[["App", Request], Awaitable[None]]

_BODY_METHODS = ("POST", "PUT", "PATCH")


@dataclass(frozen=True)
class Route:
    methods: dict[str, Handler]
    public: bool = False  # no API key needed
    metrics: bool = False  # the /metrics route (API key only when configured so)
    generation: bool = False  # counted in the end-to-end request latency
    # the error body of the route's API, every error included (access, body, validation)
    error_body: Callable[[ApiError], dict] = ApiError.envelope


def _generation_handler(dialect: Dialect) -> Handler:
    """The handler of a generating path: validate with the dialect, run the flow."""

    async def handle(app: App, req: Request) -> None:
        engine = app.require_engine()
        if engine.info.kind == "embedding":
            raise ApiError(
                400,
                f"the model '{served_model_id(engine)}' is an embedding model: it does not "
                f"generate text; use POST /v1/embeddings",
                param="model",
                code="model_not_supported",
            )
        defaults = app.schema_defaults(engine)
        g = await app.cpu.run(len(req.body), _parse_generation, dialect, req, defaults)
        await app.generations.serve(req, dialect, g, engine, app.config, app.cpu)

    return handle


def _parse_generation(
    dialect: Dialect, req: Request, defaults: SchemaDefaults
) -> GenerationRequest:
    return dialect.parse(req.json(), defaults)


class _Release:
    """When the task that owns an engine may close it."""

    def __init__(self) -> None:
        self.requested = trio.Event()
        self.grace = math.inf  # seconds its running requests get to finish
        self.after_reload = False
        self.done = trio.Event()  # the engine is closed

    def request(self, *, grace: float, after_reload: bool = False) -> None:
        self.grace = min(self.grace, grace) if self.requested.is_set() else grace
        self.after_reload = self.after_reload or after_reload
        self.requested.set()


class App:
    """The ASGI application: `await app(scope, receive, send)`."""

    def __init__(self, config: Config, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics or Metrics()
        self.engine: InferenceThread | None = None
        self.model_id = ""
        self._nursery: trio.Nursery | None = None  # the lifespan's
        self._stop_announced = False
        self._releases: dict[InferenceThread, _Release] = {}
        self.generations = GenerationFlow(self.metrics)
        self.cpu = CpuWork()  # JSON parsing, templates and tokenizing of large requests
        self._active_requests = 0  # requests holding a max_connections place
        self._rate_limiter = RateLimiter()
        self.routes: dict[str, Route] = self._build_routes()
        warn_if_open(config.server.cors_origins, config.server.api_keys)

    # -- ASGI entry --

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http" and scope.get("http_version", "1.1") not in ("1.0", "1.1"):
            # HTTP/1.1 only (http-api §0). bitnetd's server never switches protocols; this
            # answers HTTP/2 when another server (plain `hypercorn`) runs the app.
            await Responder(send).send_error(
                ApiError.http_version_not_supported(scope["http_version"])
            )
        elif kind == "http":
            origins = self.config.server.cors_origins
            await serve_with_cors(scope, receive, send, origins, self.routes, self._http)
        elif kind == "lifespan":
            await self._lifespan(receive, send)
        elif kind == "websocket":
            await send({"type": "websocket.close", "code": 1008})

    # -- lifespan and the engine --

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        msg = await receive()
        if msg["type"] != "lifespan.startup":
            return
        # Every engine (the one serving, and old ones finishing their requests after a
        # reload) lives in a task of this nursery: the application's life owns the models.
        async with trio.open_nursery() as nursery:
            self._nursery = nursery
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
        self._nursery = None
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
        """Start an inference thread for `config` and wait until its model is loaded.

        The thread belongs to a task of the lifespan nursery until `retire_engine` or the
        application's shutdown releases it."""
        if self._nursery is None:
            raise RuntimeError("the application's lifespan is not running")
        settings = self.engine_settings(config)
        return await self._nursery.start(self._own_engine, settings, config.server.max_queue)

    async def _own_engine(
        self, settings: EngineSettings, max_queue: int, *, task_status: trio.TaskStatus
    ) -> None:
        release = _Release()
        async with InferenceThread(settings, self.metrics, max_queue=max_queue) as engine:
            self._releases[engine] = release
            task_status.started(engine)
            try:
                await release.requested.wait()
                with trio.move_on_after(release.grace):
                    await engine.wait_idle()
            finally:
                del self._releases[engine]
        if release.after_reload:
            log.info("reload: previous model %s freed after its last request",
                     settings.model_path)
        release.done.set()

    def use_engine(self, engine: InferenceThread, config: Config | None = None) -> None:
        """Serve new requests from `engine` (requests in flight keep the one they started on)."""
        if config is not None:
            self.config = config
        self.engine = engine
        self.metrics.model_loaded.set(1)
        self.model_id = self.metrics.model_name = served_model_id(engine)

    async def startup(self) -> None:
        """Load the configured model and serve it."""
        engine = await self.load_engine(self.config)
        self.use_engine(engine)

    async def shutdown(self) -> None:
        """Stop serving and close every engine (requests still running end with an error)."""
        self.engine = None
        self.metrics.model_loaded.set(0)
        for release in list(self._releases.values()):
            release.request(grace=0.0)

    def begin_drain(self, deadline: float) -> None:
        """Stop admitting generations; end running ones cleanly (finish_reason "length",
        streams closed with their finish chunk and [DONE]) at Trio time `deadline`."""
        self.generations.begin_drain(deadline)

    def announce_stop(self) -> None:
        """Say "not ready" (/health 503) ahead of a drain; requests are still served."""
        self._stop_announced = True

    @property
    def draining(self) -> bool:
        """A stop was announced or a drain has begun: readiness is off."""
        return self._stop_announced or self.generations.draining

    @property
    def stream_keepalive(self) -> float:
        """Seconds of silence before a stream sends a ": ping" comment."""
        return self.generations.keepalive

    @stream_keepalive.setter
    def stream_keepalive(self, seconds: float) -> None:
        self.generations.keepalive = seconds

    def retire_engine(self, engine: InferenceThread, grace: float | None = None) -> trio.Event:
        """Close `engine` once its requests have finished (or after `grace` seconds); the
        returned Event is set when it is closed. The engine's task does the waiting."""
        release = self._releases.get(engine)
        if release is None:  # already closed
            done = trio.Event()
            done.set()
            return done
        release.request(grace=math.inf if grace is None else grace, after_reload=True)
        return release.done

    @property
    def retiring(self) -> int:
        """Engines released but still finishing their requests."""
        return sum(1 for r in self._releases.values() if r.requested.is_set())

    def require_engine(self) -> InferenceThread:
        """The engine serving new requests; ApiError 503 while none is loaded."""
        engine = self.engine
        if engine is None or not engine.ready:
            raise ApiError.unavailable("the model is loading, retry shortly", retry_after=2)
        return engine

    def schema_defaults(self, engine: InferenceThread) -> SchemaDefaults:
        """What request validation needs from the configuration and `engine`'s model."""
        return SchemaDefaults.from_config(
            self.config,
            n_vocab=engine.info.hparams.n_vocab,
            model_ids=accepted_model_ids(engine, self.config.model.alias),
            tokenizer=engine.tokenizer,
        )

    # -- routing --

    def _build_routes(self) -> dict[str, Route]:
        def generating(dialect: Dialect) -> Route:
            return Route(
                {"POST": _generation_handler(dialect)},
                generation=True,
                error_body=dialect.error_body,
            )

        chat, completions = generating(OpenAIChat()), generating(OpenAICompletions())
        models = Route({"GET": ops.models})
        health = Route({"GET": ops.health, "HEAD": ops.health}, public=True)
        return {
            "/v1/chat/completions": chat,
            "/v1/completions": completions,
            "/v1/models": models,
            "/health": health,
            "/health/ready": health,
            "/health/live": Route({"GET": ops.live, "HEAD": ops.live}, public=True),
            "/metrics": Route({"GET": ops.metrics}, metrics=True),
            "/tokenize": Route({"POST": ops.tokenize}),
            "/detokenize": Route({"POST": ops.detokenize}),
            "/tokenizer_info": Route({"GET": ops.tokenizer_info}),
            "/apply-template": Route({"POST": ops.apply_template}),
            "/props": Route({"GET": ops.props}),
            "/slots": Route({"GET": ops.slots}),
            "/model_info": Route({"GET": ops.model_info}),
            "/completion": generating(LlamaCppCompletion()),
            "/generate": generating(BitNetGenerate()),
            "/v1/embeddings": Route({"POST": embeddings}),
            "/": Route({"GET": web.page}, public=True),  # the chat page, when web_ui is on
            "/embeddings": Route({"POST": embeddings}),
            # Anthropic's Messages API and OpenAI's Responses API (http-api §4, §5)
            "/v1/messages": generating(AnthropicMessages()),
            "/v1/messages/count_tokens": Route(
                {"POST": counting_handler(
                    lambda d, s: parse_messages_request(d, s, counting=True),
                    lambda n: {"input_tokens": n},
                )},
                error_body=anthropic_error_body,
            ),
            "/v1/responses": generating(OpenAIResponses()),
            "/v1/responses/input_tokens": Route({"POST": counting_handler(
                lambda d, s: parse_responses_request(d, s, counting=True),
                lambda n: {"object": "response.input_tokens", "input_tokens": n},
            )}),
            "/v1/chat/completions/input_tokens": Route({"POST": counting_handler(
                parse_chat_completion,
                lambda n: {"object": "chat.completion.input_tokens", "input_tokens": n},
            )}),
            # the unversioned spellings llama.cpp's server also answers
            "/chat/completions": chat,
            "/completions": completions,
            "/models": models,
            "/v1/health": health,
        }

    def _route(self, method: str, path: str) -> tuple[Route, Handler, dict[str, str]]:
        params: dict[str, str] = {}
        route = self.routes.get(path)
        if route is None and path.startswith("/v1/models/") and len(path) > len("/v1/models/"):
            route = Route({"GET": ops.model_by_id})
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

    # -- HTTP --

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        """One request, in an order that lets no client hold a `max_connections` place it has
        not earned: route; access (a missing or wrong key is answered at once, its body never
        waited for); the body, under `body_timeout`; only then a place, for the handler."""
        started = time.monotonic()
        method, path = scope["method"], scope.get("path", "")
        resp = Responder(send)
        self.metrics.active_connections.inc()
        body: bytes | None = None
        wait_for_body = True  # whether an early error still drains the unread body
        holds_place = False
        try:
            try:
                route, handler, params = self._route(method, path)
                resp.error_body = route.error_body
                try:
                    self._check_access(scope, route)
                except ApiError:
                    # A refused client gets none of the server's time: no waiting for a body
                    # it may never send (the connection is closed instead).
                    wait_for_body = False
                    raise
                if method in _BODY_METHODS:
                    check_content_type(header(scope, "content-type"))
                    wait_for_body = False  # a failed or late body: close, do not read on
                    body = await self._read_body(scope, receive)
                self._take_place(route)
                holds_place = True
                await handler(self, Request(scope, receive, resp, body or b"", params))
            except ApiError as exc:
                if not resp.started:
                    if (
                        body is None
                        and method in _BODY_METHODS
                        and (not wait_for_body or not await self._discard_body(scope, receive))
                    ):
                        # the body was not read (all of it): the connection cannot be reused
                        exc.headers.setdefault("connection", "close")
                    await resp.send_error(exc)
                else:
                    resp.error_type = exc.type
        except ClientGone:
            resp.status = resp.status or 499
        except Exception as exc:
            log.exception("internal error on %s %s", method, path)
            if not resp.started:
                await resp.send_error(ApiError(500, f"internal error: {type(exc).__name__}"))
            else:
                resp.error_type = "server_error"
        finally:
            if holds_place:
                self._active_requests -= 1
            self.metrics.active_connections.dec()
            self.metrics.count_request(path, resp.status or 499, resp.error_type)
            known = self.routes.get(path)
            if known is not None and known.generation:
                self.metrics.e2e_request_seconds.observe(time.monotonic() - started)

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes:
        """The request body, which must arrive within `[server] body_timeout` (else 408). Its
        own deadline, not request_timeout: a client that sends headers and withholds the body
        must not keep its connection for the length of a generation."""
        timeout = self.config.server.body_timeout
        with trio.move_on_after(timeout):
            return await read_body(
                receive, scope.get("headers", []), self.config.server.max_body_size
            )
        raise ApiError(408, f"the request body did not arrive within {timeout:g} s")

    async def _discard_body(self, scope: Scope, receive: Receive) -> bool:
        """Read and drop the body of a request refused before its body was read (unknown
        route, wrong method or content type). Answering before the body is consumed races
        with hypercorn's own reader when the client pipelines its next request. False if the
        body is too large or slow: the connection is then closed instead. No max_connections
        place is held meanwhile."""
        with trio.move_on_after(min(5.0, self.config.server.body_timeout)):
            try:
                await read_body(receive, scope.get("headers", []), self.config.server.max_body_size)
            except (ApiError, ClientGone):
                return False
            return True
        return False

    def _check_access(self, scope: Scope, route: Route) -> None:
        """API key, then the per-client rate limit: who may ask at all."""
        if route.public:
            return
        keys = self.config.server.api_keys
        if keys and (not route.metrics or self.config.metrics.require_api_key):
            check_api_key(scope, keys)
        if route.metrics and not self.config.metrics.enabled:
            raise ApiError.route_not_found(scope["method"], scope.get("path", ""))
        rate = self.config.security.rate_limit
        if rate > 0:
            self._rate_limiter.check(scope, rate)

    def _take_place(self, route: Route) -> None:
        """Count the request against `[server] max_connections` (503 when all places are
        taken; public routes such as /health are counted but never refused)."""
        limit = self.config.server.max_connections
        if not route.public and self._active_requests >= limit:
            raise ApiError.unavailable(f"too many requests in progress (limit {limit})")
        self._active_requests += 1


def create_app(config: Config, metrics: Metrics | None = None) -> App:
    """The ASGI application for a configuration."""
    return App(config, metrics)
