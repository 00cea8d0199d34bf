"""Continuous batching without I/O: what the next step runs, and what a step's results mean.

The inference thread owns the engine and the queue; the `Scheduler` owns the policy between
them. Per step the thread calls:

1. `take_jobs(queue, updates)` with the queue's lock held: drops waiting jobs whose client
   left and takes, first in first out, as many jobs as there are free slots;
2. `admit(jobs, updates)`: a slot for each job, preferring one whose cached tokens share the
   longest prefix with the prompt (only the rest of the prompt is fed again);
3. `plan_step(updates)`: one `StepEntry` per live sequence, a decode token for every
   sequence past its prompt and prompt chunks bounded by the prefill budget;
4. the engine's forward over `plan.entries`, then `absorb(plan, statuses, output, seconds,
   updates)`: samples each sequence's next token from `output`, detokenizes, matches stop
   strings and ends sequences (EOS/EOT, stop string, max tokens, full context, cancel).

Every result is appended to `updates` as an `Update`; the thread hands them to Trio. The
scheduler reaches the engine and the tokenizer only through `EngineHooks` and the `StepOutput`
of a step, on the caller's thread, so tests drive it with fake logits and fake samplers.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np

from bitnetd_trio.engine import embedding
from bitnetd_trio.engine.jobs import (
    EngineSettings,
    Job,
    PromptProgress,
    SlotState,
    TokenResult,
    Update,
)
from bitnetd_trio.engine.sampling import SamplingError
from bitnetd_trio.engine.steps import (
    ActiveSequence,
    EngineHooks,
    StepCost,
    StepEntry,
    StepOutput,
    StepPlan,
)

log = logging.getLogger("bitnetd.inference")

__all__ = ["Scheduler", "final_update"]


def final_update(
    job: Job,
    reason: str,
    *,
    seq: ActiveSequence | None = None,
    now: float = 0.0,
    text: str = "",
    tokens: list[TokenResult] | None = None,
    token_ids: list[int] | None = None,
    stop_type: str | None = None,
    stopping_word: str = "",
    error: str | None = None,
) -> Update:
    """The last update of `job`; with its sequence, counts and timings up to `now`."""
    upd = Update(
        job,
        text=text,
        tokens=tokens,
        token_ids=token_ids,
        finish_reason=reason,
        stop_type=stop_type,
        stopping_word=stopping_word,
        error=error,
        n_prompt=len(job.prompt),
    )
    if seq is not None:
        upd.n_generated = seq.n_generated
        _timings(upd, seq, now)
    return upd


def _timings(upd: Update, seq: ActiveSequence, now: float) -> None:
    """The prompt's cache share and the prefill and generation times up to `now`."""
    upd.n_cached = seq.n_cached
    done = seq.prefill_done_at or now
    upd.prompt_seconds = done - seq.admitted_at
    upd.generation_seconds = now - done if seq.prefill_done_at else 0.0


class Scheduler:
    """Slots, the sequences in them and the batching policy (see the module docstring).

    `active` holds the admitted sequences, `slots` what /slots shows (each entry replaced
    whole, so a reader on another thread sees consistent states).
    """

    def __init__(
        self,
        settings: EngineSettings,
        n_ctx: int,
        hooks: EngineHooks,
        stop_ids: Iterable[int],
        metrics: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.n_ctx = n_ctx  # per slot
        self.hooks = hooks
        self.metrics = metrics
        self.clock = clock
        self.stop_ids = frozenset(stop_ids)  # EOS/EOT: end a sequence unless ignore_eos
        self._stop_array = np.array(sorted(self.stop_ids), dtype=np.int64)
        n = settings.n_slots
        self.active: list[ActiveSequence] = []
        self.free = list(range(n - 1, -1, -1))  # picked from the end: least recently used first
        self.cached: list[list[int]] = [[] for _ in range(n)]  # per slot: its KV cache's tokens
        self.slots = [SlotState(i) for i in range(n)]
        self.cost = StepCost(settings)
        self.tokens_after_disconnect = 0

    # ---- admission ------------------------------------------------------------------------

    def take_jobs(self, queue: deque[Job], updates: list[Update]) -> list[Job]:
        """Remove from `queue` the jobs to admit now (first come, first served, as many as
        there are free slots); waiting jobs whose client left end as "cancelled"."""
        if any(job.cancel.is_set() for job in queue):
            waiting = list(queue)
            queue.clear()
            for job in waiting:
                if job.cancel.is_set():
                    updates.append(final_update(job, "cancelled"))
                else:
                    queue.append(job)
        taken: list[Job] = []
        while queue and len(taken) < len(self.free):
            taken.append(queue.popleft())
        return taken

    def admit(self, jobs: Iterable[Job], updates: list[Update]) -> None:
        """Give each job a slot; a job that cannot be admitted ends alone with an error."""
        for job in jobs:
            try:
                self._admit(job, updates)
            except Exception as exc:  # a bug in one job's admission: that job fails alone
                log.exception("admitting job %s failed", job.id)
                updates.append(final_update(job, "error", error=f"internal error: {exc}"))

    def _admit(self, job: Job, updates: list[Update]) -> None:
        now = self.clock()
        if job.cancel.is_set():
            updates.append(final_update(job, "cancelled"))
            return
        params = job.params
        if job.ignore_eos and self.stop_ids:
            bias = dict(params.logit_bias)
            for t in self.stop_ids:
                bias[t] = -math.inf
            params = dataclasses.replace(params, logit_bias=bias)
        try:
            sampler = self.hooks.new_sampler(params)
        except (ValueError, MemoryError) as exc:
            updates.append(final_update(job, "error", error=str(exc)))
            return
        try:
            decoder = self.hooks.new_decoder()
            slot, keep = self._pick_slot(job)
        except BaseException:
            sampler.close()
            raise
        seq = ActiveSequence(job, slot, sampler, decoder, now)
        seq.n_fed = seq.n_cached = keep
        self.active.append(seq)
        self.slots[slot] = SlotState(slot, True, job.id, 0, len(job.prompt), 0)
        if self.metrics is not None:
            self.metrics.request_queue_seconds.observe(now - job.submitted_at)
            self.metrics.prompt_tokens_total.inc(len(job.prompt))
            self.metrics.prefix_cache_queries_total.inc(len(job.prompt))
            self.metrics.prefix_cache_hits_total.inc(keep)
        if job.max_tokens == 0 and not job.prompt_logprobs:
            self._retire(seq, "length", updates, stop_type="limit")

    def _pick_slot(self, job: Job) -> tuple[int, int]:
        """A free slot for `job` and how many prompt tokens its cache already holds.

        Prefers the slot whose cached tokens share the longest prefix with the prompt
        (llama.cpp's cache_prompt); the last prompt token is always fed again, because its
        logits are needed. Scoring jobs need logits for the whole prompt: no reuse.
        """
        prompt = job.prompt
        best_i, best_len = len(self.free) - 1, 0
        if job.cache_prompt and not job.prompt_logprobs:
            for i, slot in enumerate(self.free):
                n = _common_prefix(self.cached[slot], prompt)
                if n > best_len:
                    best_i, best_len = i, n
        slot = self.free[best_i]
        keep = min(best_len, len(prompt) - 1)
        if keep > 0:
            self.hooks.truncate_slot(slot, keep)
            del self.cached[slot][keep:]
        else:
            self.hooks.reset_slot(slot)
            self.cached[slot] = []
        self.free.pop(best_i)  # only now: a failure above leaves the slot free
        return slot, keep

    # ---- a step ---------------------------------------------------------------------------

    def plan_step(self, updates: list[Update]) -> StepPlan | None:
        """The next forward: a decode token for every sequence past its prompt, prompt chunks
        within the prefill budget for the others; None when nothing runs. Sequences whose
        client left end here as "cancelled"."""
        s = self.settings
        n_decoding = sum(1 for seq in self.active if not seq.prefilling)
        budget = self.cost.prefill_budget(n_decoding, len(self.active) - n_decoding)
        entries: list[StepEntry] = []
        n_prefill = n_decode = 0
        for seq in list(self.active):
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
                if job.embed is not None:
                    mode = embedding.step_mode(job.embed, seq.n_fed, n, remaining)
                elif job.prompt_logprobs:
                    mode = "all"
                else:
                    mode = "last" if n == remaining else "none"
                budget -= n
                n_prefill += n
                tokens = job.prompt[seq.n_fed : seq.n_fed + n]
            else:
                tokens, mode = [seq.next_token], "last"
                n_decode += 1
            entries.append(StepEntry(seq, seq.slot, tokens, mode, job.cancel))
        if not entries:
            return None
        return StepPlan(entries, n_prefill, n_decode)

    def fail_step(self, plan: StepPlan, error: str, updates: list[Update]) -> None:
        """The forward of `plan` failed: its sequences end with `error`."""
        for entry in plan.entries:
            self._retire(entry.seq, "error", updates, error=error)

    def fail_active(self, error: str, updates: list[Update]) -> None:
        """End every admitted sequence with `error` (the step broke in an unknown place)."""
        for seq in list(self.active):
            self._retire(seq, "error", updates, error=error)

    def absorb(
        self,
        plan: StepPlan,
        statuses: list[int],
        output: StepOutput,
        seconds: float,
        updates: list[Update],
    ) -> None:
        """Take in the results of `plan`'s forward, which took `seconds`: the engine's status
        per entry (0 done, else cancelled) and its logits in `output`."""
        now = self.clock()
        self.cost.learn(seconds, plan.n_prefill, plan.n_decode)
        for i, entry in enumerate(plan.entries):
            seq = entry.seq
            job = seq.job
            n = len(entry.tokens)
            done = statuses[i] == 0
            if done:
                self.cached[seq.slot].extend(entry.tokens)
            if not done or job.cancel.is_set():
                if done and entry.logits != "none":
                    self._count_after_disconnect()
                self._retire(seq, "cancelled", updates)
                continue
            prompt_lps = None
            if seq.prefilling:
                if seq.prompt_lps is not None:
                    seq.prompt_lps.extend(self._prompt_logprobs(output, i, seq, n))
                if job.embed is not None:
                    remaining = len(job.prompt) - seq.n_fed
                    seq.embed_rows += embedding.collect_rows(
                        output, i, job.embed, seq.n_fed, n, remaining
                    )
                seq.n_fed += n
                if job.return_progress:
                    updates.append(_progress_update(seq, now))
                if seq.prefilling:
                    self.slots[seq.slot] = SlotState(
                        seq.slot, True, job.id, seq.n_fed, len(job.prompt), 0
                    )
                    continue
                seq.prefill_done_at = now
                if job.embed is not None:  # prefill only: pool, and free the slot
                    vector = embedding.pool(seq.embed_rows, job.embed)
                    self._retire(seq, "stop", updates)
                    updates[-1].embedding = vector
                    continue
                prompt_lps = seq.prompt_lps
                if job.max_tokens == 0:
                    self._retire(seq, "length", updates, stop_type="limit", tokens=None)
                    _attach_prompt_lps(updates, prompt_lps)
                    continue
            self._sample(output, i, n - 1, seq, now, updates, prompt_lps)
        if self.metrics is not None:
            used = sum(seq.n_past for seq in self.active)
            self.metrics.kv_cache_usage_ratio.set(used / (self.n_ctx * self.settings.n_slots))

    def _prompt_logprobs(
        self, output: StepOutput, entry: int, seq: ActiveSequence, n: int
    ) -> list[TokenResult]:
        """Logprobs of the prompt tokens that this chunk's n positions predict (the first
        prompt token, which nothing predicts, gets None)."""
        prompt = seq.job.prompt
        top_n = seq.job.top_logprobs
        out: list[TokenResult] = []
        if seq.n_fed == 0:
            out.append((prompt[0], None, []))
        for t in range(min(n, len(prompt) - 1 - seq.n_fed)):
            target = prompt[seq.n_fed + t + 1]
            lp, top = self.hooks.logprobs(output.logits(entry, t), target, top_n)
            out.append((target, lp, top))
        return out

    def _sample(
        self,
        output: StepOutput,
        entry: int,
        t: int,
        seq: ActiveSequence,
        now: float,
        updates: list[Update],
        prompt_lps: list[TokenResult] | None,
    ) -> None:
        """Sample the next token of `seq` from entry's logits at token t; emit or finish."""
        job = seq.job
        constraint = seq.constraint
        allowed = None
        if constraint is not None:
            if constraint.needs_mask:  # not computed beside the forward (no mask worker)
                constraint.compute_mask()
            if constraint.error is not None:  # e.g. a mask that ran out of its step limits
                self._retire(seq, "error", updates, error=constraint.error)
                _attach_prompt_lps(updates, prompt_lps)
                return
            allowed = constraint.mask
        # llama.cpp's post_sampling_probs: the sampler reports the distribution it drew from
        post: tuple[int, float, list[tuple[int, float]]] | None = None
        try:
            if seq.n_generated < job.min_tokens and len(self._stop_array):
                masked = np.array(output.logits(entry, t), dtype=np.float32, copy=True)
                masked[self._stop_array] = -np.inf
                if job.post_sampling_probs:
                    post = seq.sampler.sample_probs(masked, job.top_logprobs, allowed)
                    token = post[0]
                elif allowed is None:
                    token = seq.sampler.sample(masked)
                else:
                    token = seq.sampler.sample(masked, allowed)
            elif job.post_sampling_probs:
                post = seq.sampler.sample_probs(output.logits(entry, t), job.top_logprobs, allowed)
                token = post[0]
            elif allowed is None:
                token = output.sample(entry, seq.sampler)
            else:
                token = output.sample(entry, seq.sampler, allowed)
        except SamplingError as exc:  # e.g. all-NaN logits from a broken model: this one fails
            log.error("sampling failed for job %s: %s", job.id, exc)
            self._retire(seq, "error", updates, error=str(exc))
            _attach_prompt_lps(updates, prompt_lps)
            return
        seq.sampler.accept(token)
        seq.n_generated += 1
        if self.metrics is not None:
            if seq.n_generated == 1:
                self.metrics.time_to_first_token_seconds.observe(now - job.submitted_at)
            else:
                self.metrics.inter_token_latency_seconds.observe(now - seq.last_token_at)
        seq.last_token_at = now
        is_stop_token = token in self.stop_ids and not job.ignore_eos
        results: list[TokenResult] | None = None
        if post is not None and not is_stop_token:
            results = [post]
        elif job.logprobs and not is_stop_token:
            lp, top = self.hooks.logprobs(output.logits(entry, t), token, job.top_logprobs)
            results = [(token, lp, top)]
        ids = [token] if job.return_tokens and not is_stop_token else None
        if is_stop_token:
            text = _flush_text(seq)
            self._retire(seq, "stop", updates, text=text, tokens=results, stop_type="eos")
            _attach_prompt_lps(updates, prompt_lps)
            return
        piece = "" if self.hooks.is_control(token) else seq.decoder.push(token)
        text, hit = seq.matcher.push(piece)
        grammar_done = False
        if constraint is not None:
            constraint.accept(token)
            if constraint.error is not None:
                self._retire(seq, "error", updates, text=text, tokens=results,
                             token_ids=ids, error=constraint.error)
                _attach_prompt_lps(updates, prompt_lps)
                return
            grammar_done = constraint.finished
        if hit:
            self._retire(
                seq,
                "stop",
                updates,
                text=text,
                tokens=results,
                token_ids=ids,
                stop_type="word",
                stopping_word=seq.matcher.matched,
            )
        elif grammar_done:  # the grammar allows nothing more: as if EOS had been sampled
            text += _flush_text(seq)
            self._retire(seq, "stop", updates, text=text, tokens=results, token_ids=ids,
                         stop_type="eos")
        elif (
            job.max_tokens is not None
            and seq.n_generated >= job.max_tokens
            or seq.n_fed + seq.n_generated > self.n_ctx
        ):
            text += _flush_text(seq)
            self._retire(seq, "length", updates, text=text, tokens=results, token_ids=ids,
                         stop_type="limit")
        else:
            seq.next_token = token
            self.slots[seq.slot] = SlotState(
                seq.slot, True, job.id, seq.n_past, len(job.prompt), seq.n_generated
            )
            if text or results or ids or prompt_lps:
                upd = Update(
                    job,
                    text=text,
                    tokens=results,
                    token_ids=ids,
                    prompt_logprobs=prompt_lps,
                    n_prompt=len(job.prompt),
                    n_generated=seq.n_generated,
                )
                _timings(upd, seq, now)
                updates.append(upd)
            if job.cancel.is_set():  # the client left while this token was being made
                self._count_after_disconnect()
                self._retire(seq, "cancelled", updates)
            return
        _attach_prompt_lps(updates, prompt_lps)

    # ---- endings --------------------------------------------------------------------------

    def _retire(
        self, seq: ActiveSequence, reason: str, updates: list[Update], **ending: Any
    ) -> None:
        """End `seq` and free its slot; `ending`: final_update's text, tokens, stop_type,
        stopping_word and error."""
        self.active.remove(seq)
        seq.sampler.close()
        if reason == "error":  # the cache's content is unknown: forget it
            self.hooks.reset_slot(seq.slot)
            self.cached[seq.slot] = []
        self.free.insert(0, seq.slot)  # most recently used last in the pick order
        self.slots[seq.slot] = SlotState(seq.slot, n_past=len(self.cached[seq.slot]))
        now = self.clock()
        upd = final_update(seq.job, reason, seq=seq, now=now, **ending)
        updates.append(upd)
        if self.metrics is not None:
            self.metrics.finish_generation(
                seq.n_generated, upd.generation_seconds, now - seq.admitted_at
            )

    def abort(self, message: str, updates: list[Update]) -> None:
        """The engine is going away: every admitted sequence ends with `message`."""
        now = self.clock()
        for seq in self.active:
            updates.append(final_update(seq.job, "error", seq=seq, now=now, error=message))
            seq.sampler.close()
        self.active.clear()
        self.slots[:] = [SlotState(i) for i in range(len(self.slots))]

    def _count_after_disconnect(self) -> None:
        self.tokens_after_disconnect += 1
        if self.metrics is not None:
            self.metrics.tokens_after_disconnect_total.inc()


def _progress_update(seq: ActiveSequence, now: float) -> Update:
    """The update saying how far `seq`'s prefill has come (Job.return_progress)."""
    job = seq.job
    progress = PromptProgress(
        total=len(job.prompt),
        cache=seq.n_cached,
        processed=seq.n_fed,
        time_ms=(now - seq.admitted_at) * 1000.0,
    )
    return Update(job, progress=progress, n_prompt=len(job.prompt))


def _attach_prompt_lps(updates: list[Update], prompt_lps: list[TokenResult] | None) -> None:
    if prompt_lps is not None:
        updates[-1].prompt_logprobs = prompt_lps


def _flush_text(seq: ActiveSequence) -> str:
    tail, hit = seq.matcher.push(seq.decoder.flush())
    return tail if hit else tail + seq.matcher.flush()


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i
