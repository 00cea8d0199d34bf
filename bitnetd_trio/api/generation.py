"""The life of one generating request, whatever its dialect: prepare the prompts, submit one
engine job per choice, receive the engine's updates under the request's deadline, answer with
a whole body or a stream, stop the jobs when the client leaves, end cleanly on a drain, and
count what happened in the metrics.

The flow talks to the endpoint only through its `Dialect` (bitnetd_trio.api.dialects.base):
the dialect parses the request and shapes every byte of the answer; the flow decides when.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
import uuid

import trio

from bitnetd_trio import __version__
from bitnetd_trio.api.cpu_work import CpuWork
from bitnetd_trio.api.dialects.base import Dialect
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.http import DisconnectWatch, Request
from bitnetd_trio.api.metrics import Metrics
from bitnetd_trio.api.prompts import check_samplable, prepare_prompts
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.response_format import compile_constraint
from bitnetd_trio.api.schema import GenerationRequest
from bitnetd_trio.api.served_model import served_model_id
from bitnetd_trio.api.sse import SSE_KEEPALIVE
from bitnetd_trio.api.tools import constraint_of
from bitnetd_trio.config import Config
from bitnetd_trio.engine.inference import InferenceThread, Job, QueueFull, Update
from bitnetd_trio.engine.reasoning import think_mode

log = logging.getLogger("bitnetd.app")

__all__ = ["Generation", "GenerationFlow", "check_sequences"]

_STREAM_HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass events on as they come
]


def check_sequences(g: GenerationRequest, engine: InferenceThread) -> None:
    """ApiError 400 when the request asks for more sequences (prompts x n) than the engine
    could ever hold at once ([model] parallel running + [server] max_queue waiting): it could
    only be refused with 503 forever, or, admitted alone, take every slot from everyone."""
    n_prompts = 1 if g.messages is not None else len(g.prompts or ())
    sequences = n_prompts * g.n
    limit = engine.capacity
    if sequences <= limit:
        return
    param = "n" if g.n > limit or n_prompts == 1 else "prompt"
    asked = f"{sequences} sequences" if n_prompts == 1 else (
        f"{sequences} sequences ({n_prompts} prompts x n {g.n})"
    )
    raise ApiError(
        400,
        f"this request asks for {asked}; the server holds at most {limit} at once "
        f"([model] parallel {engine.settings.n_slots} + [server] max_queue {engine.max_queue})",
        param=param,
    )


def _nothing_produced() -> ApiError:
    return ApiError(
        504, "the request timed out before any token was produced", type="timeout_error"
    )


@dataclasses.dataclass(eq=False)
class Generation:
    """One generating request in flight: its reply, its engine jobs and their channel."""

    reply: Reply
    dialect: Dialect
    jobs: list[Job]  # one per choice, same order
    receiver: trio.MemoryReceiveChannel
    started_at: float  # Trio time
    request_timeout: float  # seconds; 0: none
    timed_out: bool = False
    wait_scope: trio.CancelScope | None = None  # the current wait for updates (drain moves it)

    def cancel_all(self) -> None:
        """Set the cancel flag of every job not finished (the engine frees their slots)."""
        for c, job in zip(self.reply.choices, self.jobs):
            if not c.done:
                job.cancel.set()


class GenerationFlow:
    """Runs generating requests; knows those in flight, so a drain can end them."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.active: set[Generation] = set()
        self.draining = False
        self.drain_deadline = math.inf  # Trio time after which generations are ended
        self.keepalive = 10.0  # seconds of silence before a stream sends ": ping"

    def begin_drain(self, deadline: float) -> None:
        """Admit no more generations; end running ones cleanly at Trio time `deadline`."""
        self.draining = True
        self.drain_deadline = min(self.drain_deadline, deadline)
        for gen in list(self.active):
            if gen.wait_scope is not None:
                gen.wait_scope.deadline = min(gen.wait_scope.deadline, self.drain_deadline)

    def drain_ended(self) -> bool:
        """A shutdown's drain deadline has passed: streams end cleanly (finish chunk and
        [DONE]) even when they produced nothing, instead of a timeout error."""
        return self.draining and trio.current_time() >= self.drain_deadline

    async def serve(
        self,
        req: Request,
        dialect: Dialect,
        g: GenerationRequest,
        engine: InferenceThread,
        config: Config,
        cpu: CpuWork,
    ) -> None:
        """Answer one validated generating request on `engine`; rendering and tokenizing the
        prompts run on `cpu` (worker threads for large requests)."""
        if self.draining:
            raise ApiError.unavailable("the server is shutting down", retry_after=5)
        check_sequences(g, engine)
        check_samplable(g, engine)
        gen: Generation | None = None

        def on_disconnect() -> None:
            if gen is not None:
                gen.cancel_all()

        # The disconnect watch is on before the prompts are prepared: a client that leaves
        # while its long prompt is tokenized ends the request there, before any job exists
        # (the abandoned tokenization finishes in its thread and is dropped).
        watch = DisconnectWatch(on_disconnect)
        # A Jinja chat template renders in a worker process: waiting for it blocks, whatever
        # the size of the request.
        jinja = g.messages is not None and engine.chat_template.kind == "jinja"
        work_size = math.inf if jinja else len(req.body)

        async def prepare_and_answer() -> None:
            nonlocal gen
            prompts, texts = await cpu.run(work_size, prepare_prompts, g, engine)
            # Where the prompt leaves a thinking model (engine/reasoning.py): the replies split
            # its think block off, and a tool grammar lets it think before it calls.
            thinking = None
            if g.messages is not None and engine.chat_template.thinks:
                thinking = think_mode(texts[0])
            constraint = await compile_constraint(
                constraint_of(g, engine, thinking), engine, config
            )
            if self.draining:  # the drain began while the prompts were prepared
                raise ApiError.unavailable("the server is shutting down", retry_after=5)
            gen = self._submit(dialect, g, engine, prompts, texts, config, constraint, thinking)
            self.active.add(gen)
            respond = self._stream if g.stream else self._respond_whole
            with gen.receiver:
                await respond(req, gen, watch)

        try:
            await watch.run(req.receive, prepare_and_answer)
        finally:
            if gen is not None:
                self.active.discard(gen)
                gen.cancel_all()  # any way out (error, timeout, disconnect) frees the slots
            # here, not after: a timeout with nothing produced leaves as a 504 ApiError
            if watch.disconnected or (gen is not None and gen.timed_out):
                self.metrics.requests_cancelled_total.inc()
        if gen is not None and log.isEnabledFor(logging.DEBUG):
            _log_outcome(gen, watch)
        if watch.disconnected and not req.resp.finished:
            req.resp.status = req.resp.status or 499

    def _submit(
        self,
        dialect: Dialect,
        g: GenerationRequest,
        engine: InferenceThread,
        prompts: list[list[int]],
        texts: list[str],
        config: Config,
        constraint: object = None,  # engine/constraints.Constraint: each job gets a copy
        thinking: str | None = None,  # engine/reasoning.think_mode of the prompt
    ) -> Generation:
        send_ch, recv_ch = trio.open_memory_channel[Update](math.inf)
        max_tokens = g.max_tokens
        if max_tokens is None:
            max_tokens = config.model.max_tokens_default
        jobs = []
        for p_index, ids in enumerate(prompts):
            for k in range(g.n):
                params = g.sampling
                if k > 0 and params.seed is not None:  # n seeded choices must still differ
                    params = dataclasses.replace(params, seed=(params.seed + k) % (1 << 64))
                jobs.append(
                    Job(
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
                        prompt_logprobs=g.echo and g.logprobs,  # echo scoring
                        cache_prompt=g.cache_prompt,
                        return_tokens=g.return_tokens,
                        post_sampling_probs=g.post_sampling_probs and g.logprobs,
                        return_progress=g.return_progress and g.stream,
                        constraint=constraint.copy() if constraint is not None else None,
                    )
                )
        reply = Reply(
            request=g,
            id=dialect.id_prefix + uuid.uuid4().hex[:24],
            created=int(time.time()),
            model_id=g.model or served_model_id(engine),  # the schema checked g.model
            fingerprint=f"bitnetd-trio-{__version__}-{engine.info.kernel}",
            prompts=prompts,
            prompt_texts=texts,
            choices=[Choice(job.index, thinking=thinking) for job in jobs],
            token_bytes=engine.tokenizer.token_bytes,
            reasoning=thinking,
        )
        try:
            engine.submit(jobs)
        except QueueFull as exc:
            raise ApiError.unavailable(f"server busy: {exc}", retry_after=1) from None
        return Generation(
            reply,
            dialect,
            jobs,
            recv_ch,
            started_at=trio.current_time(),
            request_timeout=config.server.request_timeout,
        )

    async def _next_updates(
        self, gen: Generation, patience: float = math.inf
    ) -> list[Update] | None:
        """The next update and any already waiting behind it; [] if none came within
        `patience` seconds; None when the request's time ran out (or a drain ended it)."""
        timeout = gen.request_timeout
        deadline = gen.started_at + timeout if timeout > 0 else math.inf
        with trio.CancelScope(deadline=min(deadline, self.drain_deadline)) as scope:
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

    async def _respond_whole(self, req: Request, gen: Generation, watch: DisconnectWatch) -> None:
        reply = gen.reply
        while not reply.all_done:
            updates = await self._next_updates(gen)
            if updates is None:
                if not reply.anything_produced:
                    raise _nothing_produced()
                break
            for upd in updates:
                reply.choices[upd.job.index].apply(upd)
        failed = reply.failed()
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}")
        body = gen.dialect.whole(reply)

        def complete() -> None:
            watch.completed = True

        await req.resp.send_json(200, body, before_final=complete)

    async def _stream(self, req: Request, gen: Generation, watch: DisconnectWatch) -> None:
        # Wait for the first result before answering, so a request that fails or times out
        # before producing anything still gets a real HTTP status; but not for longer than
        # the keep-alive interval: then the stream starts with keep-alive comments, so proxies
        # and clients with read timeouts do not give up during a long queue wait or prefill.
        first = await self._next_updates(gen, self.keepalive)
        if first is None and not self.drain_ended():
            raise _nothing_produced()
        failed = next((u for u in first or () if u.finish_reason == "error"), None)
        if failed is not None:
            raise ApiError(500, f"generation failed: {failed.error}")
        await req.resp.start(200, _STREAM_HEADERS)
        reply = gen.reply
        events = gen.dialect.stream(reply)
        out = bytearray(events.opening())

        async def end_with_error(err: ApiError) -> None:
            # the status is sent already: the error goes out as the stream's last event
            req.resp.error_type = err.type
            watch.completed = True
            await req.resp.body(bytes(out + events.error_event(err)))

        updates: list[Update] | None = first
        while True:
            if updates is None and not reply.anything_produced and not self.drain_ended():
                await end_with_error(_nothing_produced())
                return
            if updates is None:  # timed out or drained: finish every open choice ("length")
                for c in reply.choices:
                    if not c.done:
                        c.finish_reason = "cancelled"
                        out += events.finish(c, Piece())
                break
            if not updates:
                out += SSE_KEEPALIVE
            for upd in updates:
                c = reply.choices[upd.job.index]
                c.apply(upd)
                if upd.finish_reason == "error":
                    await end_with_error(ApiError(500, f"generation failed: {upd.error}"))
                    return
                piece = Piece.of(upd)
                out += events.finish(c, piece) if upd.final else events.piece(c, piece)
            if reply.all_done:
                break
            if out:
                await req.resp.body(bytes(out), more=True)
                out.clear()
            updates = await self._next_updates(gen, self.keepalive)
        out += events.closing()
        watch.completed = True
        await req.resp.body(bytes(out))


def _log_outcome(gen: Generation, watch: DisconnectWatch) -> None:
    usage = gen.reply.usage()
    if watch.disconnected:
        outcome = "client left"
    elif gen.timed_out:
        outcome = "timed out"
    else:
        outcome = ",".join(sorted({c.finish_reason or "?" for c in gen.reply.choices}))
    log.debug(
        "%s %s: %d prompt + %d completion tokens (%d cached), %s, %.3f s",
        gen.reply.id,
        gen.dialect.name,
        usage["prompt_tokens"],
        usage["completion_tokens"],
        usage["prompt_tokens_details"]["cached_tokens"],
        outcome,
        trio.current_time() - gen.started_at,
    )
