"""The inference thread: one OS thread owns the engine and runs continuous batching.

Data path (design.md): the Trio side validates a request, tokenizes it and submits `Job`s;
this thread admits them into free engine slots between steps, prefills prompts in bounded
chunks beside the decoding sequences, runs one `Context.forward` per step for every live
sequence, samples per sequence, detokenizes (UTF-8 safe), matches stop strings, and hands each
step's results back to Trio with ONE `trio_token.run_sync_soon(dispatch, updates)`.

Rules kept here:
- All native calls happen on this thread (only `CancelFlag.set` runs elsewhere).
- This thread never blocks on a client: results go into unbounded per-request memory
  channels with `send_nowait` from the Trio thread, and `dispatch` never raises.
- A job whose cancel flag is set is dropped before its next step and its slot freed; the
  engine also skips an entry whose flag was set while the step was being assembled.
- Logprobs are computed on the raw model logits of the step (before penalties, bias and
  temperature), the values `sampling.logprobs` gives for the engine's output.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import trio

from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.chat import ChatTemplate
from bitnetd_trio.engine.sampling import Sampler, SamplingError, SamplingParams
from bitnetd_trio.engine.sampling import logprobs as compute_logprobs
from bitnetd_trio.engine.stops import StopMatcher
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

# A generated or prompt token with its log-probability (None when not asked for, or for the
# first prompt token, which nothing predicts) and the top alternatives (id, logprob).
TokenResult = tuple[int, float | None, list[tuple[int, float]]]

_job_ids = itertools.count(1)


@dataclass(frozen=True)
class EngineSettings:
    """What the inference thread needs from the configuration."""

    model_path: str
    n_slots: int = 4
    n_ctx: int = 4096  # per slot; 0: the model's training context; capped to it
    n_threads: int = 1
    chat_template_override: str | None = None
    prefill_chunk: int = 256  # most prompt tokens one sequence feeds in one step
    prefill_budget: int = 512  # most prompt tokens all sequences feed in one step
    # While other sequences are decoding, prompt tokens per step are limited so that a step
    # takes at most about a decode step plus max(stall_factor x share x decode step,
    # stall_floor), share = sequences in prefill / sequences decoding (at least 1).
    prefill_stall_factor: float = 2.0
    prefill_stall_floor: float = 0.02  # seconds
    prefill_min_tokens: int = 8
    # Results of steps closer together than this are handed to Trio together (first tokens
    # and finished sequences at once): every hand-over costs the Trio thread a wake-up.
    delivery_interval: float = 0.010  # seconds
    is_demo: bool = False


@dataclass(frozen=True)
class ModelInfo:
    """Facts about the loaded model, read-only for the Trio side."""

    path: str
    name: str | None
    architecture: str
    n_vocab: int
    n_ctx_train: int
    n_ctx: int  # per slot, as served
    n_embd: int
    n_layer: int
    n_head: int
    n_head_kv: int
    n_params: int
    file_size: int
    n_slots: int
    n_threads: int
    kernel: str
    is_demo: bool
    loaded_at: float  # unix time


@dataclass(frozen=True)
class SlotState:
    """What /slots shows for one engine slot (replaced whole, so reads are consistent)."""

    id: int
    busy: bool = False
    job_id: str | None = None
    n_past: int = 0
    n_prompt: int = 0
    n_generated: int = 0


@dataclass(eq=False)
class Job:
    """One sequence to generate (a request with n choices submits n jobs)."""

    prompt: list[int]
    params: SamplingParams
    max_tokens: int | None  # None: until the context is full
    sink: Any  # trio.MemorySendChannel[Update]; touched on the Trio thread only
    stop: Sequence[str] = ()
    index: int = 0  # choice index within the request
    min_tokens: int = 0
    ignore_eos: bool = False
    logprobs: bool = False  # logprob of each generated token
    top_logprobs: int = 0
    prompt_logprobs: bool = False  # logprobs of the prompt tokens (echo scoring)
    cache_prompt: bool = True  # may start from a slot that already holds a prefix of the prompt
    id: str = field(default_factory=lambda: f"job-{next(_job_ids)}")
    cancel: engine.CancelFlag = field(default_factory=engine.CancelFlag)
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(slots=True, eq=False)
class Update:
    """One step's results for one job, delivered to the Trio side."""

    job: Job
    text: str = ""  # final text (stop strings resolved, whole UTF-8 characters)
    tokens: list[TokenResult] | None = None  # generated tokens of this step
    prompt_logprobs: list[TokenResult] | None = None  # for echo scoring, once
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stop_type: str | None = None  # llama.cpp: "eos" | "word" | "limit"
    stopping_word: str = ""
    error: str | None = None
    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens reused from the slot's cache
    n_generated: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def final(self) -> bool:
        return self.finish_reason is not None


class QueueFull(Exception):
    """More jobs than the slots plus the wait queue can hold."""


class _Sequence:
    """A job admitted into an engine slot (inference thread only)."""

    __slots__ = (
        "admitted_at",
        "decoder",
        "job",
        "last_token_at",
        "matcher",
        "n_cached",
        "n_fed",
        "n_generated",
        "next_token",
        "prefill_done_at",
        "prompt_lps",
        "sampler",
        "slot",
    )

    def __init__(self, job: Job, slot: int, sampler: Sampler, decoder: Any, now: float) -> None:
        self.job = job
        self.slot = slot
        self.sampler = sampler
        self.decoder = decoder
        self.matcher = StopMatcher(job.stop)
        self.n_fed = 0  # prompt tokens already in the slot's cache
        self.n_cached = 0  # of which were reused from an earlier request
        self.n_generated = 0
        self.next_token = -1  # the sampled token to feed in the next step
        self.admitted_at = now
        self.prefill_done_at = 0.0
        self.last_token_at = 0.0
        # echo scoring: the prompt tokens' logprobs, gathered chunk by chunk
        self.prompt_lps: list[TokenResult] | None = [] if job.prompt_logprobs else None

    @property
    def prefilling(self) -> bool:
        return self.n_fed < len(self.job.prompt)

    @property
    def n_past(self) -> int:
        return self.n_fed + max(0, self.n_generated - 1)


class InferenceThread:
    """Owns Model, Context and Tokenizer on one thread; continuous batching over slots.

    Trio side: `await start()`, `submit(jobs)`, `snapshot_slots()`, `stop()`, `await aclose()`.
    """

    def __init__(self, settings: EngineSettings, metrics: Any = None, max_queue: int = 64) -> None:
        self.settings = settings
        self.metrics = metrics
        self.max_queue = max_queue
        self.info: ModelInfo | None = None
        self.tokenizer: Tokenizer | None = None
        self.chat_template: ChatTemplate | None = None
        self.tokens_after_disconnect = 0  # also in metrics; read by tests and /slots
        self._cond = threading.Condition()
        self._queue: deque[Job] = deque()  # guarded by _cond
        self._stopping = False  # guarded by _cond
        self._thread: threading.Thread | None = None
        self._trio_token: trio.lowlevel.TrioToken | None = None
        self._ready = trio.Event()
        self._closed = trio.Event()
        self._load_error: BaseException | None = None
        self._in_system = 0  # jobs submitted and not finished (Trio thread only)
        self._slots: list[SlotState] = []
        self._steps = 0  # loop iterations done (read by heartbeat)
        # thread-only state
        self._model: Any = None
        self._ctx: Any = None
        self._active: list[_Sequence] = []
        self._free: list[int] = []
        self._outbox: list[Update] = []  # results of the last steps, not yet delivered
        self._delivered_at = 0.0
        self._gauges = (-1, -1)  # last (waiting, running) written to the metrics
        self._trio_gone = False
        self._cached: list[list[int]] = []  # per slot: the tokens its KV cache holds
        self._stop_ids: frozenset[int] = frozenset()
        self._decode_step_s: float | None = None  # EMA: a forward of decode tokens only
        self._prefill_token_s: float | None = None  # EMA: extra time per prompt token
        self._stop_array: np.ndarray = np.zeros(0, dtype=np.int64)

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
            raise self._load_error

    @property
    def ready(self) -> bool:
        return self._ready.is_set() and self._load_error is None and not self._closed.is_set()

    @property
    def in_system(self) -> int:
        """Jobs submitted and not yet finished (running or waiting)."""
        return self._in_system

    @property
    def capacity(self) -> int:
        return self.settings.n_slots + self.max_queue

    def submit(self, jobs: Sequence[Job]) -> None:
        """Queue jobs for the thread (Trio thread). QueueFull when they do not fit."""
        if not self.ready:
            raise QueueFull("the model is not loaded")
        if self._in_system + len(jobs) > self.capacity and self._in_system > 0:
            raise QueueFull(f"{self._in_system} requests in progress, queue limit reached")
        self._in_system += len(jobs)
        with self._cond:
            self._queue.extend(jobs)
            self._cond.notify()

    def heartbeat(self) -> tuple[bool, bool, int]:
        """(thread alive, has work, steps done so far) for the systemd watchdog."""
        alive = self.ready and self._thread is not None and self._thread.is_alive()
        return alive, self._in_system > 0, self._steps

    def snapshot_slots(self) -> list[SlotState]:
        return list(self._slots)

    def queue_length(self) -> int:
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
        if self._thread is not None and self._thread.is_alive():
            await self._closed.wait()

    def _dispatch(self, updates: list[Update]) -> None:
        """Runs on the Trio thread via run_sync_soon: must never raise."""
        for upd in updates:
            try:
                if upd.final:
                    self._in_system -= 1
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
            self._slots = [SlotState(i) for i in range(len(self._slots))]
            self._call_trio(self._set_closed, None)

    def _load(self) -> None:
        s = self.settings
        t0 = time.monotonic()
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
        self._stop_ids = frozenset(tok.stop_ids)
        self._stop_array = np.array(sorted(self._stop_ids), dtype=np.int64)
        self._free = list(range(s.n_slots - 1, -1, -1))
        self._cached = [[] for _ in range(s.n_slots)]
        self._slots = [SlotState(i) for i in range(s.n_slots)]
        self.info = ModelInfo(
            path=str(Path(s.model_path)),
            name=_str_or_none(model.metadata("general.name")),
            architecture=hp.architecture,
            n_vocab=hp.n_vocab,
            n_ctx_train=hp.n_ctx_train,
            n_ctx=self._ctx.n_ctx,
            n_embd=hp.n_embd,
            n_layer=hp.n_layer,
            n_head=hp.n_head,
            n_head_kv=hp.n_head_kv,
            n_params=hp.n_params,
            file_size=hp.file_size,
            n_slots=s.n_slots,
            n_threads=s.n_threads,
            kernel=engine.kernel_name(),
            is_demo=s.is_demo,
            loaded_at=time.time(),
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
        # model_loaded is the app's to clear: after a reload, closing the old engine must not
        # mark the new one as unloaded.
        for seq in self._active:
            seq.sampler.close()
        self._active.clear()
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None
        if self._model is not None:
            self._model.close()
            self._model = None

    def _fail_everything(self, message: str) -> None:
        updates = list(self._outbox)  # finished in the last step, not delivered yet
        self._outbox.clear()
        updates += [self._final(seq.job, "error", error=message, seq=seq) for seq in self._active]
        with self._cond:
            queued = list(self._queue)
            self._queue.clear()
        updates += [self._final(job, "error", error=message) for job in queued]
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
        updates = self._outbox
        while True:
            if not self._active and not self._flush(force=True):  # nothing runs next
                return
            with self._cond:
                while not self._stopping and not self._queue and not self._active:
                    self._cond.wait()
                if self._stopping:
                    return
                self._drop_cancelled_waiting(updates)
                admitted = []
                while self._queue and len(admitted) < len(self._free):
                    admitted.append(self._queue.popleft())
                waiting = len(self._queue)
            for job in admitted:
                try:
                    self._admit(job, updates)
                except Exception as exc:  # a bug in one job's admission: that job fails alone
                    log.exception("admitting job %s failed", job.id)
                    updates.append(self._final(job, "error", error=f"internal error: {exc}"))
            try:
                self._set_gauges(waiting)
                self._step(updates)
            except Exception as exc:  # a bug: end the sequences involved, keep serving
                log.exception("inference step failed")
                for seq in list(self._active):
                    self._retire(seq, "error", updates, error=f"internal error: {exc}")
            self._steps += 1
            # After the step too: sequences that finished in it are no longer running
            # (otherwise the gauge keeps the old count until the next request arrives).
            self._set_gauges(waiting)
            if self._trio_gone:
                return

    def _drop_cancelled_waiting(self, updates: list[Update]) -> None:
        """Remove waiting jobs whose client left (called with _cond held)."""
        if any(job.cancel.is_set() for job in self._queue):
            keep = deque()
            for job in self._queue:
                if job.cancel.is_set():
                    updates.append(self._final(job, "cancelled"))
                else:
                    keep.append(job)
            self._queue = keep

    def _admit(self, job: Job, updates: list[Update]) -> None:
        now = time.monotonic()
        if job.cancel.is_set():
            updates.append(self._final(job, "cancelled"))
            return
        params = job.params
        if job.ignore_eos and self._stop_ids:
            bias = dict(params.logit_bias)
            for t in self._stop_ids:
                bias[t] = -math.inf
            params = _replace_bias(params, bias)
        try:
            sampler = Sampler(params, self.info.n_vocab)
        except (ValueError, MemoryError) as exc:
            updates.append(self._final(job, "error", error=str(exc)))
            return
        try:
            decoder = self.tokenizer.stream_decoder()
            slot, keep = self._pick_slot(job)
        except BaseException:
            sampler.close()
            raise
        seq = _Sequence(job, slot, sampler, decoder, now)
        seq.n_fed = seq.n_cached = keep
        self._active.append(seq)
        self._slots[slot] = SlotState(slot, True, job.id, 0, len(job.prompt), 0)
        if self.metrics is not None:
            self.metrics.request_queue_seconds.observe(now - job.submitted_at)
            self.metrics.prompt_tokens_total.inc(len(job.prompt))
        if job.max_tokens == 0 and not job.prompt_logprobs:
            self._retire(seq, "length", updates, stop_type="limit")

    def _pick_slot(self, job: Job) -> tuple[int, int]:
        """A free slot for `job` and how many prompt tokens its cache already holds.

        Prefers the slot whose cached tokens share the longest prefix with the prompt
        (llama.cpp's cache_prompt); the last prompt token is always fed again, because its
        logits are needed. Scoring jobs need logits for the whole prompt: no reuse.
        """
        prompt = job.prompt
        best_i, best_len = len(self._free) - 1, 0
        if job.cache_prompt and not job.prompt_logprobs:
            for i, slot in enumerate(self._free):
                n = _common_prefix(self._cached[slot], prompt)
                if n > best_len:
                    best_i, best_len = i, n
        slot = self._free[best_i]
        keep = min(best_len, len(prompt) - 1)
        if keep > 0:
            self._ctx.truncate(slot, keep)
            del self._cached[slot][keep:]
        else:
            self._ctx.reset(slot)
            self._cached[slot] = []
        self._free.pop(best_i)  # only now: a failure above leaves the slot free
        return slot, keep

    def _retire(
        self,
        seq: _Sequence,
        reason: str,
        updates: list[Update],
        *,
        text: str = "",
        tokens: list[TokenResult] | None = None,
        stop_type: str | None = None,
        stopping_word: str = "",
        error: str | None = None,
    ) -> None:
        self._active.remove(seq)
        seq.sampler.close()
        if reason == "error":  # the cache's content is unknown: forget it
            self._ctx.reset(seq.slot)
            self._cached[seq.slot] = []
        self._free.insert(0, seq.slot)  # most recently used last in the pick order
        self._slots[seq.slot] = SlotState(seq.slot, n_past=len(self._cached[seq.slot]))
        updates.append(
            self._final(
                seq.job,
                reason,
                seq=seq,
                text=text,
                tokens=tokens,
                stop_type=stop_type,
                stopping_word=stopping_word,
                error=error,
            )
        )
        if self.metrics is not None:
            upd = updates[-1]
            self.metrics.finish_generation(
                seq.n_generated, upd.generation_seconds, time.monotonic() - seq.admitted_at
            )

    def _final(
        self,
        job: Job,
        reason: str,
        *,
        seq: _Sequence | None = None,
        text: str = "",
        tokens: list[TokenResult] | None = None,
        stop_type: str | None = None,
        stopping_word: str = "",
        error: str | None = None,
    ) -> Update:
        upd = Update(
            job,
            text=text,
            tokens=tokens,
            finish_reason=reason,
            stop_type=stop_type,
            stopping_word=stopping_word,
            error=error,
            n_prompt=len(job.prompt),
        )
        if seq is not None:
            now = time.monotonic()
            upd.n_generated = seq.n_generated
            upd.n_cached = seq.n_cached
            done = seq.prefill_done_at or now
            upd.prompt_seconds = done - seq.admitted_at
            upd.generation_seconds = now - done if seq.prefill_done_at else 0.0
        return upd

    def _step(self, updates: list[Update]) -> None:
        """One forward for every live sequence: decode tokens plus bounded prefill chunks."""
        ctx = self._ctx
        s = self.settings
        plan: list[tuple[_Sequence, int, int]] = []  # (sequence, n tokens, logits mode)
        entries: list[engine.BatchEntry] = []
        budget = self._prefill_budget()
        n_prefill = n_decode = 0
        for seq in list(self._active):
            job = seq.job
            if job.cancel.is_set():
                self._retire(seq, "cancelled", updates)
                continue
            if seq.prefilling:
                remaining = len(job.prompt) - seq.n_fed
                n = min(remaining, s.prefill_chunk, budget)
                if n <= 0:
                    continue  # other prompts took this step's budget
                # Scoring wants every position's logits. The engine's logits do not depend on
                # how a prompt is cut into calls (bit-exact), so chunks keep the logits buffer
                # and the other sequences' wait bounded without changing the values.
                if job.prompt_logprobs:
                    mode = "all"
                else:
                    mode = "last" if n == remaining else "none"
                budget -= n
                n_prefill += n
                tokens = job.prompt[seq.n_fed : seq.n_fed + n]
            else:
                tokens, mode = [seq.next_token], "last"
                n_decode += 1
            plan.append((seq, len(tokens), mode))
            entries.append(engine.BatchEntry(seq.slot, tokens, mode, job.cancel))
        if not entries:
            return
        if not self._flush():
            self._trio_gone = True
            return
        started = time.monotonic()
        try:
            statuses = ctx.forward(entries)
        except engine.EngineError as exc:
            log.error("forward step failed for %d sequences: %s", len(entries), exc)
            for seq, _, _ in plan:
                self._retire(seq, "error", updates, error=f"engine error: {exc}")
            return
        now = time.monotonic()
        self._learn_step_cost(now - started, n_prefill, n_decode)
        for i, (seq, n, mode) in enumerate(plan):
            job = seq.job
            produces_token = mode != "none"
            if statuses[i] == 0:
                self._cached[seq.slot].extend(entries[i].tokens)
            if statuses[i] != 0 or job.cancel.is_set():
                if statuses[i] == 0 and produces_token:
                    self._count_after_disconnect()
                self._retire(seq, "cancelled", updates)
                continue
            prompt_lps = None
            if seq.prefilling:
                if seq.prompt_lps is not None:
                    seq.prompt_lps.extend(self._prompt_logprobs(i, seq, n))
                seq.n_fed += n
                if seq.prefilling:
                    self._slots[seq.slot] = SlotState(
                        seq.slot, True, job.id, seq.n_fed, len(job.prompt), 0
                    )
                    continue
                seq.prefill_done_at = now
                prompt_lps = seq.prompt_lps
                if job.max_tokens == 0:
                    self._retire(seq, "length", updates, stop_type="limit", tokens=None)
                    if prompt_lps is not None:
                        updates[-1].prompt_logprobs = prompt_lps
                    continue
            self._sample(i, n - 1, seq, now, updates, prompt_lps)
        self._account_step()

    def _prefill_budget(self) -> int:
        """Prompt tokens this step may feed: all it can when nobody decodes, else few enough
        that the decoding sequences keep flowing (chunked prefill). The prefill's share of a
        step grows with the number of sequences waiting for their prompt against those
        decoding, so a burst of new requests is not starved by one running stream."""
        s = self.settings
        n_decoding = sum(1 for seq in self._active if not seq.prefilling)
        if not n_decoding or self._decode_step_s is None or not self._prefill_token_s:
            return s.prefill_budget
        n_prefilling = len(self._active) - n_decoding
        share = max(1.0, n_prefilling / n_decoding)
        allowed = max(s.prefill_stall_factor * share * self._decode_step_s, s.prefill_stall_floor)
        return max(
            s.prefill_min_tokens, min(s.prefill_budget, int(allowed / self._prefill_token_s))
        )

    def _learn_step_cost(self, seconds: float, n_prefill: int, n_decode: int) -> None:
        """Running estimates of a decode step's time and of a prompt token's extra time."""

        def ema(old: float | None, new: float) -> float:
            return new if old is None else 0.8 * old + 0.2 * new

        if n_prefill == 0:
            if n_decode:
                self._decode_step_s = ema(self._decode_step_s, seconds)
        else:
            base = self._decode_step_s if n_decode and self._decode_step_s else 0.0
            self._prefill_token_s = ema(self._prefill_token_s, max(seconds - base, 0.0) / n_prefill)

    def _prompt_logprobs(self, entry: int, seq: _Sequence, n: int) -> list[TokenResult]:
        """Logprobs of the prompt tokens that this chunk's n positions predict (the first
        prompt token, which nothing predicts, gets None)."""
        prompt = seq.job.prompt
        top_n = seq.job.top_logprobs
        out: list[TokenResult] = []
        if seq.n_fed == 0:
            out.append((prompt[0], None, []))
        for t in range(min(n, len(prompt) - 1 - seq.n_fed)):
            target = prompt[seq.n_fed + t + 1]
            lp, top = compute_logprobs(self._ctx.logits(entry, t), target, top_n)
            out.append((target, lp, top))
        return out

    def _sample(
        self,
        entry: int,
        t: int,
        seq: _Sequence,
        now: float,
        updates: list[Update],
        prompt_lps: list[TokenResult] | None,
    ) -> bool:
        """Sample the next token of `seq` from entry's logits at token t; emit or finish."""
        job = seq.job
        ctx = self._ctx
        try:
            if seq.n_generated < job.min_tokens and len(self._stop_array):
                masked = np.array(ctx.logits(entry, t), dtype=np.float32, copy=True)
                masked[self._stop_array] = -np.inf
                token = seq.sampler.sample(masked)
            else:
                token = ctx.sample(entry, seq.sampler)
        except SamplingError as exc:  # e.g. all-NaN logits from a broken model: this one fails
            log.error("sampling failed for job %s: %s", job.id, exc)
            self._retire(seq, "error", updates, error=str(exc))
            self._attach_prompt_lps(updates, prompt_lps)
            return True
        seq.sampler.accept(token)
        seq.n_generated += 1
        if self.metrics is not None:
            if seq.n_generated == 1:
                self.metrics.time_to_first_token_seconds.observe(now - job.submitted_at)
            else:
                self.metrics.inter_token_latency_seconds.observe(now - seq.last_token_at)
        seq.last_token_at = now
        is_stop_token = token in self._stop_ids and not job.ignore_eos
        results: list[TokenResult] | None = None
        if job.logprobs and not is_stop_token:
            lp, top = compute_logprobs(ctx.logits(entry, t), token, job.top_logprobs)
            results = [(token, lp, top)]
        if is_stop_token:
            text = self._flush_text(seq)
            self._retire(seq, "stop", updates, text=text, tokens=results, stop_type="eos")
            self._attach_prompt_lps(updates, prompt_lps)
            return True
        piece = "" if self.tokenizer.is_control(token) else seq.decoder.push(token)
        text, hit = seq.matcher.push(piece)
        if hit:
            self._retire(
                seq,
                "stop",
                updates,
                text=text,
                tokens=results,
                stop_type="word",
                stopping_word=seq.matcher.matched,
            )
        elif (
            job.max_tokens is not None
            and seq.n_generated >= job.max_tokens
            or seq.n_fed + seq.n_generated > ctx.n_ctx
        ):
            text += self._flush_text(seq)
            self._retire(seq, "length", updates, text=text, tokens=results, stop_type="limit")
        else:
            seq.next_token = token
            self._slots[seq.slot] = SlotState(
                seq.slot, True, job.id, seq.n_past, len(job.prompt), seq.n_generated
            )
            if text or results or prompt_lps:
                updates.append(
                    Update(
                        job,
                        text=text,
                        tokens=results,
                        prompt_logprobs=prompt_lps,
                        n_prompt=len(job.prompt),
                        n_generated=seq.n_generated,
                    )
                )
            if job.cancel.is_set():  # the client left while this token was being made
                self._count_after_disconnect()
                self._retire(seq, "cancelled", updates)
            return True
        self._attach_prompt_lps(updates, prompt_lps)
        return True

    @staticmethod
    def _attach_prompt_lps(updates: list[Update], prompt_lps: list[TokenResult] | None) -> None:
        if prompt_lps is not None:
            updates[-1].prompt_logprobs = prompt_lps

    def _flush_text(self, seq: _Sequence) -> str:
        tail, hit = seq.matcher.push(seq.decoder.flush())
        return tail if hit else tail + seq.matcher.flush()

    def _count_after_disconnect(self) -> None:
        self.tokens_after_disconnect += 1
        if self.metrics is not None:
            self.metrics.tokens_after_disconnect_total.inc()

    def _set_gauges(self, waiting: int) -> None:
        """requests_waiting / requests_running, written only when they change."""
        counts = (waiting, len(self._active))
        if self.metrics is not None and counts != self._gauges:
            self._gauges = counts
            self.metrics.requests_waiting.set(counts[0])
            self.metrics.requests_running.set(counts[1])

    def _account_step(self) -> None:
        if self.metrics is not None:
            used = sum(seq.n_past for seq in self._active)
            self.metrics.kv_cache_usage_ratio.set(used / (self._ctx.n_ctx * self.settings.n_slots))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _replace_bias(params: SamplingParams, bias: dict[int, float]) -> SamplingParams:
    import dataclasses

    return dataclasses.replace(params, logit_bias=bias)


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) else None
