"""The inference thread: one OS thread owns the engine and runs continuous batching.

Data path (design.md): the Trio side validates a request, tokenizes it and submits `Job`s;
this thread takes them from the queue between steps and lets the `Scheduler`
(engine/scheduler.py) admit them into engine slots and plan each step: prompts prefilled in
bounded chunks beside the decoding sequences. The thread runs one `Context.forward` per step
for every live sequence, and the scheduler turns the step's logits into tokens, text (UTF-8
safe, stop strings matched) and endings. The thread hands the resulting `Update`s back to
Trio with ONE `trio_token.run_sync_soon(dispatch, updates)` per delivery.

Rules kept here:
- All native calls happen on this thread (only `CancelFlag.set` runs elsewhere); the
  scheduler reaches the engine only through what this thread gives it.
- This thread never blocks on a client: results go into unbounded per-request memory
  channels with `send_nowait` from the Trio thread, and `dispatch` never raises.
- A job whose cancel flag is set is dropped before its next step and its slot freed; the
  engine also skips an entry whose flag was set while the step was being assembled.
- Logprobs are computed on the raw model logits of the step (before penalties, bias and
  temperature), the values `sampling.logprobs` gives for the engine's output.
"""

from __future__ import annotations

import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.chat import ChatTemplate
from bitnetd_trio.engine.constraints import MaskWorker
from bitnetd_trio.engine.embedding import pooling_of_model
from bitnetd_trio.engine.jobs import (
    EngineSettings,
    Job,
    QueueFull,
    SlotState,
    TokenResult,
    Update,
    queue_has_room,
)
from bitnetd_trio.engine.model_file import ModelFileWatch, exit_model_file_changed
from bitnetd_trio.engine.sampling import Sampler
from bitnetd_trio.engine.sampling import logprobs as compute_logprobs
from bitnetd_trio.engine.scheduler import Scheduler, final_update
from bitnetd_trio.engine.steps import EngineHooks
from bitnetd_trio.engine.tokenizer import Tokenizer

log = logging.getLogger("bitnetd.inference")

__all__ = [
    "EngineSettings",
    "InferenceThread",
    "Job",
    "ModelInfo",
    "QueueFull",
    "SlotState",
    "TokenResult",
    "Update",
]


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model, read-only for the Trio side."""

    path: str
    name: str | None
    hparams: engine.HParams  # what the file says: architecture, sizes, vocabulary, ...
    n_ctx: int  # per slot, as served
    n_slots: int
    n_threads: int
    kernel: str
    is_demo: bool
    loaded_at: float  # unix time
    pooling: str = "mean"  # how /v1/embeddings pools the hidden states (engine/embedding.py)

    @property
    def kind(self) -> str:
        """"embedding" for a graph defined with its own pooling (the BitNet embedding model:
        no head, /v1/embeddings only), else "generation" (a decoder, which also serves
        /v1/embeddings)."""
        return "embedding" if self.hparams.pooling else "generation"


class InferenceThread:
    """Owns Model, Context and Tokenizer on one thread; continuous batching over slots.

    Trio side: `async with InferenceThread(settings) as engine:` (or `await start()` ...
    `await aclose()`), `submit(jobs)`, `snapshot_slots()`, `stop()`, `await wait_idle()`.
    """

    def __init__(self, settings: EngineSettings, metrics: Any = None, max_queue: int = 64) -> None:
        self.settings = settings
        self.metrics = metrics
        self.max_queue = max_queue
        self.info: ModelInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.chat_template: ChatTemplate | None = None
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        # Set on the Trio thread through run_sync_soon, so Trio tasks can wait for them.
        self._ready = trio.Event()  # the load finished (successfully or not)
        self._closed = trio.Event()  # the thread released the engine; its last act
        self._idle = trio.Event()  # in_system came down to 0
        self._load_error: BaseException | None = None
        self._in_system = 0  # jobs submitted and not finished (Trio thread only)
        self._slots: list[SlotState] = []  # the scheduler's, once the model is loaded
        self._steps = 0  # loop iterations done (read by heartbeat)
        # thread-only state
        self._model: Any = None
        self._file_watch: ModelFileWatch | None = None  # made by _load
        self._ctx: Any = None
        self._scheduler: Scheduler | None = None
        self._outbox: list[Update] = []  # results of the last steps, not yet delivered
        self._delivered_at = 0.0
        self._gauges = (-1, -1)  # last (waiting, running) written to the metrics
        self._trio_gone = False
        self._masks = MaskWorker()  # its thread starts with the first constrained step

    # ---- Trio side ------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the thread and wait until the model is loaded; raises its load error."""
        self._trio_token = trio.lowlevel.current_trio_token()
        self._thread = threading.Thread(target=self._main, name="bitnetd-inference", daemon=True)
        self._thread.start()
        try:
            await self._ready.wait()
        except BaseException:
            self.stop()
            raise
        if self._load_error is not None:
            await self._join()  # the thread ends by itself after a failed load
            raise self._load_error

    async def __aenter__(self) -> InferenceThread:
        """`start()`: the engine is serving when the body runs."""
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """`aclose()`, even when the body was cancelled: the engine is released at exit."""
        # Shielded: a cancelled body would otherwise leave the thread running. Stopping takes
        # at most the step in progress.
        with trio.CancelScope(shield=True):
            await self.aclose()

    @property
    def ready(self) -> bool:
        """The model is loaded and the thread serving."""
        return self._ready.is_set() and self._load_error is None and not self._closed.is_set()

    @property
    def in_system(self) -> int:
        """Jobs submitted and not yet finished (running or waiting)."""
        return self._in_system

    @property
    def capacity(self) -> int:
        """Sequences (jobs) the slots and the wait queue hold together."""
        return self.settings.n_slots + self.max_queue

    @property
    def tokens_after_disconnect(self) -> int:
        """Tokens computed for clients that had already left (also in the metrics)."""
        return self._scheduler.tokens_after_disconnect if self._scheduler is not None else 0

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs for the thread (Trio thread). QueueFull when they do not fit."""
        if not self.ready:
            raise QueueFull("the model is not loaded")
        if not queue_has_room(self._in_system, len(jobs), self.capacity):
            raise QueueFull(
                f"{self._in_system} sequences running or waiting, {len(jobs)} more do not fit "
                f"(limit {self.capacity})"
            )
        self._in_system += len(jobs)
        with self._cond:
            self._queue.extend(jobs)
            self._cond.notify()

    def heartbeat(self) -> tuple[bool, bool, int]:
        """(thread alive, has work, steps done so far) for the systemd watchdog."""
        alive = self.ready and self._thread is not None and self._thread.is_alive()
        return alive, self._in_system > 0, self._steps

    def snapshot_slots(self) -> list[SlotState]:
        """The engine slots' states, as of the last step."""
        return list(self._slots)

    def queue_length(self) -> int:
        """Jobs waiting for a slot."""
        with self._cond:
            return len(self._queue)

    def stop(self) -> None:
        """Ask the thread to finish: every job still queued or running ends with an error."""
        with self._cond:
            self._stopping = True
            self._cond.notify()

    async def aclose(self) -> None:
        """Stop the thread and wait until it has released the engine."""
        self.stop()
        await self._join()

    async def wait_idle(self) -> None:
        """Return once no submitted job is running or waiting (at once if none is)."""
        while self._in_system > 0:
            if self._idle.is_set():  # from an earlier idle moment
                self._idle = trio.Event()
            await self._idle.wait()

    async def _join(self) -> None:
        thread = self._thread
        if thread is None:
            return
        if thread.is_alive():
            await self._closed.wait()
        # _closed is set by the thread's last act, so this join only waits for the thread
        # to unwind its frames: it does not hold up the Trio thread.
        thread.join()

    def _dispatch(self, updates: list[Update]) -> None:
        """Runs on the Trio thread via run_sync_soon: must never raise."""
        for upd in updates:
            try:
                if upd.final:
                    self._in_system -= 1
                    if self._in_system == 0:
                        self._idle.set()
                upd.job.sink.send_nowait(upd)
            except Exception:  # noqa: BLE001, S110 - receiver gone (client left): nothing to do
                pass

    def _set_ready(self, error: BaseException | None) -> None:
        self._load_error = error
        self._ready.set()

    def _set_closed(self, _: object = None) -> None:
        self._closed.set()

    # ---- thread side ----------------------------------------------------------------------

    def _call_trio(self, fn: Callable[[Any], None], arg: Any) -> bool:
        token = self._trio_token
        if token is None:
            return False
        try:
            token.run_sync_soon(fn, arg)
            return True
        except trio.RunFinishedError:
            with self._cond:
                self._stopping = True
            return False

    def _main(self) -> None:
        try:
            self._load()
        except BaseException as exc:  # noqa: BLE001 - every load failure goes to lifespan startup
            log.error("model load failed: %s", exc)
            self._close_engine()
            self._call_trio(self._set_ready, exc)
            self._call_trio(self._set_closed, None)
            return
        self._call_trio(self._set_ready, None)
        try:
            self._loop()
        except BaseException:  # logged; the finally below fails every job still in flight
            log.exception("inference thread crashed")
            if self.metrics is not None:
                self.metrics.model_loaded.set(0)
        finally:
            self._fail_everything("the inference engine stopped")
            self._close_engine()
            self._call_trio(self._set_closed, None)

    def _load(self) -> None:
        """Load the model, make the context, tokenizer, chat template and scheduler."""
        s = self.settings
        t0 = time.monotonic()
        self._file_watch = ModelFileWatch(s.model_path)
        model = engine.Model.load(s.model_path)
        self._model = model
        hp = model.hparams
        n_ctx = hp.n_ctx_train if s.n_ctx <= 0 else min(s.n_ctx, hp.n_ctx_train)
        self._ctx = engine.Context(model, s.n_slots, n_ctx, s.n_threads)
        tok = Tokenizer.from_model(model)
        tmpl = ChatTemplate.from_model(
            model.metadata("tokenizer.chat_template"),
            s.chat_template_override,
            tok.piece(tok.bos_id) if tok.bos_id is not None else "",
            tok.piece(tok.eos_id) if tok.eos_id is not None else "",
        )
        self.tokenizer = tok
        self.chat_template = tmpl
        ctx = self._ctx
        hooks = EngineHooks(
            new_sampler=functools.partial(Sampler, n_vocab=hp.n_vocab),
            new_decoder=lambda: tok.stream_decoder(),  # late-bound: a fault can be injected
            is_control=tok.is_control,
            logprobs=compute_logprobs,
            reset_slot=ctx.reset,
            truncate_slot=ctx.truncate,
        )
        self._scheduler = Scheduler(s, ctx.n_ctx, hooks, tok.stop_ids, self.metrics)
        self._slots = self._scheduler.slots
        self.info = ModelInfo(
            path=str(Path(s.model_path)),
            name=_str_or_none(model.metadata("general.name")),
            hparams=hp,
            n_ctx=self._ctx.n_ctx,
            n_slots=s.n_slots,
            n_threads=s.n_threads,
            kernel=engine.kernel_name(),
            is_demo=s.is_demo,
            loaded_at=time.time(),
            pooling=pooling_of_model(model.metadata, hp.architecture, hp.pooling),
        )
        if self.metrics is not None:
            self.metrics.model_loaded.set(1)
        log.info(
            "loaded %s%s in %.2f s: %s, %d layers, %d params, context %d x %d slots, "
            "%d threads, kernel %s",
            s.model_path,
            " (demo model)" if s.is_demo else "",
            time.monotonic() - t0,
            hp.architecture,
            hp.n_layer,
            hp.n_params,
            self._ctx.n_ctx,
            s.n_slots,
            s.n_threads,
            self.info.kernel,
        )

    def _close_engine(self) -> None:
        self._masks.close()
        # model_loaded is the app's to clear: after a reload, closing the old engine must not
        # mark the new one as unloaded.
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def _fail_everything(self, message: str) -> None:
        updates = list(self._outbox)  # finished in the last step, not delivered yet
        self._outbox.clear()
        if self._scheduler is not None:
            self._scheduler.abort(message, updates)
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
        updates += [final_update(job, "error", error=message) for job in queued]
        if updates:
            self._call_trio(self._dispatch, updates)

    def _flush(self, force: bool = False) -> bool:
        """Hand the collected updates to Trio (one run_sync_soon); False once Trio is gone.

        Called just before the next forward rather than right after sampling: the Trio thread
        wakes up and takes the GIL to stream the results while this thread is inside the
        native forward (GIL released), instead of this thread waiting for the GIL to come
        back before it can start the next step. Fast steps are delivered together (at most
        one hand-over per delivery_interval), except first tokens and endings.
        """
        if not self._outbox:
            return True
        now = time.monotonic()
        if (
            not force
            and now - self._delivered_at < self.settings.delivery_interval
            and not any(u.final or u.n_generated <= 1 for u in self._outbox)
        ):
            return True
        self._delivered_at = now
        batch = list(self._outbox)
        self._outbox.clear()
        return self._call_trio(self._dispatch, batch)

    def _loop(self) -> None:
        scheduler = self._scheduler
        assert scheduler is not None  # made by _load
        updates = self._outbox
        while True:
            if not scheduler.active and not self._flush(force=True):  # nothing runs next
                return
            with self._cond:
                while not self._stopping and not self._queue and not scheduler.active:
                    self._cond.wait()
                if self._stopping:
                    return
                admitted = scheduler.take_jobs(self._queue, updates)
                waiting = len(self._queue)
            scheduler.admit(admitted, updates)
            try:
                self._set_gauges(waiting)
                self._step(scheduler, updates)
            except Exception as exc:  # a bug: end the sequences involved, keep serving
                log.exception("inference step failed")
                scheduler.fail_active(f"internal error: {exc}", updates)
            self._steps += 1
            # After the step too: sequences that finished in it are no longer running
            # (otherwise the gauge keeps the old count until the next request arrives).
            self._set_gauges(waiting)
            if self._trio_gone:
                return

    def _step(self, scheduler: Scheduler, updates: list[Update]) -> None:
        """One forward for every live sequence: decode tokens plus bounded prefill chunks."""
        plan = scheduler.plan_step(updates)
        if plan is None:
            return
        watch = self._file_watch
        changed = watch.changed_in_place() if watch is not None else None
        if changed is not None:  # the next forward would read a mix of two files
            exit_model_file_changed(self.settings.model_path, changed)
        if not self._flush():
            self._trio_gone = True
            return
        started = time.monotonic()
        # Constrained sequences: their next masks are computed while the forward runs.
        masking = self._masks.start(plan.constraints())
        try:
            # StepEntry has the fields forward reads from a BatchEntry
            statuses = self._ctx.forward(plan.entries)
        except engine.EngineError as exc:
            log.error("forward step failed for %d sequences: %s", len(plan.entries), exc)
            scheduler.fail_step(plan, f"engine error: {exc}", updates)
            return
        finally:
            if masking:
                self._masks.wait()
        scheduler.absorb(plan, statuses, self._ctx, time.monotonic() - started, updates)

    def _set_gauges(self, waiting: int) -> None:
        """requests_waiting / requests_running, written only when they change."""
        running = len(self._scheduler.active) if self._scheduler is not None else 0
        counts = (waiting, running)
        if self.metrics is not None and counts != self._gauges:
            self._gauges = counts
            self.metrics.requests_waiting.set(counts[0])
            self.metrics.requests_running.set(counts[1])


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
