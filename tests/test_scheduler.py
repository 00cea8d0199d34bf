"""engine/scheduler.py without a thread or an engine: fake logits, samplers and decoders.

Covers admission (FIFO, as many as free slots, cancelled waiters, the queue limit), slot choice
with prefix reuse, the prefill budget beside decoding sequences, every ending (EOS, stop
string, max tokens, full context, cancel, max_tokens 0) and failures that end one sequence.
"""

from __future__ import annotations

import dataclasses
import math
from collections import deque
from collections.abc import Callable

import numpy as np
import pytest

from bitnetd_trio.engine.jobs import EngineSettings, Job, Update, queue_has_room
from bitnetd_trio.engine.sampling import SamplingError, SamplingParams
from bitnetd_trio.engine.scheduler import Scheduler
from bitnetd_trio.engine.steps import EngineHooks, StepCost, StepEntry, StepPlan

N_VOCAB = 16
EOS = 15  # the model's only stop token
CONTROL = 14  # a control token: no text
LETTERS = "abcdefghijklmn"  # the text of tokens 0..13


def one_hot(token: int) -> np.ndarray:
    logits = np.zeros(N_VOCAB, dtype=np.float32)
    logits[token] = 10.0
    return logits


def counting_model(entry: StepEntry, t: int) -> np.ndarray:
    """The fake model's logits after token t of `entry`: it predicts the next letter."""
    return one_hot((entry.tokens[t] + 1) % len(LETTERS))


class FakeFlag:
    """A CancelFlag without native memory."""

    def __init__(self) -> None:
        self._set = False

    def set(self) -> None:
        self._set = True

    def is_set(self) -> bool:
        return self._set


class FakeSampler:
    """Greedy: the highest logit; all-NaN logits cannot be sampled, as in the C sampler."""

    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.accepted: list[int] = []
        self.closed = False

    def sample(self, logits: np.ndarray, allowed: object = None) -> int:
        if np.isnan(logits).all():
            raise SamplingError("every logit is NaN")
        return int(np.nanargmax(logits))

    def sample_probs(
        self, logits: np.ndarray, top_n: int, allowed: object = None
    ) -> tuple[int, float, list[tuple[int, float]]]:
        """Greedy's report: the token alone, with probability 1."""
        tok = self.sample(logits)
        return tok, 1.0, [(tok, 1.0)][:top_n]

    def accept(self, token: int) -> None:
        self.accepted.append(token)

    def close(self) -> None:
        self.closed = True


class FakeDecoder:
    def __init__(self, pieces: dict[int, str]) -> None:
        self.pieces = pieces

    def push(self, token: int) -> str:
        return self.pieces.get(token, LETTERS[token] if token < len(LETTERS) else "?")

    def flush(self) -> str:
        return ""


class FakeOutput:
    """A step's results: `model(entry, t)` gives the logits of entry's token t. Reading logits
    the plan did not ask for fails, as it does in the engine."""

    def __init__(self, plan: StepPlan, model: Callable[[StepEntry, int], np.ndarray]) -> None:
        self.plan = plan
        self.model = model

    def logits(self, entry_index: int, token_index: int) -> np.ndarray:
        entry = self.plan.entries[entry_index]
        last = len(entry.tokens) - 1
        assert entry.logits == "all" or (entry.logits == "last" and token_index == last), (
            f"logits of token {token_index} were not requested ({entry.logits})"
        )
        return self.model(entry, token_index)

    def sample(self, entry_index: int, sampler: FakeSampler) -> int:
        last = len(self.plan.entries[entry_index].tokens) - 1
        return sampler.sample(self.logits(entry_index, last))


def log_softmax_logprobs(
    logits: np.ndarray, token: int, top_n: int
) -> tuple[float, list[tuple[int, float]]]:
    lps = logits - np.logaddexp.reduce(logits)
    top = np.argsort(-lps)[:top_n]
    return float(lps[token]), [(int(i), float(lps[i])) for i in top]


class Bench:
    """A scheduler over fake hooks, and the thread's loop around it with a fake engine.

    A step costs 10 ms with decoding sequences plus 1 ms per prompt token.
    """

    def __init__(
        self,
        n_slots: int = 2,
        n_ctx: int = 64,
        model: Callable[[StepEntry, int], np.ndarray] = counting_model,
        pieces: dict[int, str] | None = None,
        **settings: object,
    ) -> None:
        self.settings = EngineSettings("fake.gguf", n_slots=n_slots, **settings)  # type: ignore[arg-type]
        self.model = model
        self.pieces = pieces or {}
        self.samplers: list[FakeSampler] = []
        self.slot_calls: list[tuple[str, int, int]] = []  # ("reset" | "truncate", slot, n)
        self.now = 100.0
        self.queue: deque[Job] = deque()
        self.updates: list[Update] = []
        hooks = EngineHooks(
            new_sampler=self.new_sampler,
            new_decoder=lambda: FakeDecoder(self.pieces),
            is_control=lambda token: token == CONTROL,
            logprobs=log_softmax_logprobs,
            reset_slot=lambda slot: self.slot_calls.append(("reset", slot, 0)),
            truncate_slot=lambda slot, n: self.slot_calls.append(("truncate", slot, n)),
        )
        self.sched = Scheduler(self.settings, n_ctx, hooks, [EOS], clock=lambda: self.now)

    def new_sampler(self, params: SamplingParams) -> FakeSampler:
        params.validate(N_VOCAB)
        sampler = FakeSampler(params)
        self.samplers.append(sampler)
        return sampler

    def submit(self, *jobs: Job) -> None:
        self.queue.extend(jobs)

    def step(
        self,
        statuses: list[int] | None = None,
        during: Callable[[], None] | None = None,
    ) -> StepPlan | None:
        """One iteration of the thread's loop: take and admit jobs, plan, forward, absorb.
        `during` runs while the forward would; by default the engine reports an entry whose
        cancel flag is set as cancelled (status 1)."""
        self.sched.admit(self.sched.take_jobs(self.queue, self.updates), self.updates)
        plan = self.sched.plan_step(self.updates)
        if plan is None:
            return None
        if during is not None:
            during()
        if statuses is None:
            statuses = [1 if e.cancel.is_set() else 0 for e in plan.entries]
        seconds = (0.010 if plan.n_decode else 0.0) + 0.001 * plan.n_prefill
        self.now += seconds
        self.sched.absorb(plan, statuses, FakeOutput(plan, self.model), seconds, self.updates)
        return plan

    def run_until_final(self, job: Job, max_steps: int = 200) -> Update:
        for _ in range(max_steps):
            for upd in self.updates:
                if upd.job is job and upd.final:
                    return upd
            self.step()
        raise AssertionError(f"{job.id} did not finish in {max_steps} steps")

    def of(self, job: Job) -> list[Update]:
        return [u for u in self.updates if u.job is job]

    def text_of(self, job: Job) -> str:
        return "".join(u.text for u in self.of(job))


def new_job(prompt: list[int], max_tokens: int | None = 8, **kw: object) -> Job:
    kw.setdefault("params", SamplingParams(temperature=0.0))
    return Job(prompt=prompt, max_tokens=max_tokens, sink=None, cancel=FakeFlag(), **kw)  # type: ignore[arg-type]


def entry_of(plan: StepPlan, job: Job) -> StepEntry | None:
    return next((e for e in plan.entries if e.seq.job is job), None)


# ---- admission ------------------------------------------------------------------------------


def test_jobs_are_admitted_first_in_first_out_as_slots_free_up() -> None:
    bench = Bench(n_slots=1)
    jobs = [new_job([i + 1], max_tokens=1) for i in range(3)]
    bench.submit(*jobs)
    order = []
    for _ in range(3):
        plan = bench.step()
        assert plan is not None and len(plan.entries) == 1  # one slot: one job at a time
        order.append(plan.entries[0].seq.job)
    assert order == jobs
    assert [u.job for u in bench.updates if u.final] == jobs
    assert bench.step() is None and not bench.queue


def test_take_jobs_takes_only_as_many_as_free_slots() -> None:
    bench = Bench(n_slots=2)
    jobs = [new_job([1, 2], max_tokens=None) for _ in range(5)]
    bench.submit(*jobs)
    bench.step()
    assert [s.job.id for s in bench.sched.active] == [jobs[0].id, jobs[1].id]
    assert list(bench.queue) == jobs[2:]  # the rest wait, in order
    assert sorted(s.job_id for s in bench.sched.slots if s.busy) == sorted(j.id for j in jobs[:2])


def test_a_cancelled_waiting_job_leaves_the_queue_without_a_slot() -> None:
    bench = Bench(n_slots=1)
    running, gone, next_one = new_job([1], max_tokens=2), new_job([2]), new_job([3])
    bench.submit(running, gone, next_one)
    bench.step()
    gone.cancel.set()
    bench.step()  # running ends (max_tokens 2); gone is dropped while still waiting
    assert [u.finish_reason for u in bench.of(gone)] == ["cancelled"]
    assert bench.of(gone)[0].n_generated == 0
    assert list(bench.queue) == [next_one]
    bench.step()
    assert [s.job for s in bench.sched.active] == [next_one]
    assert all(sampler.params is not gone.params for sampler in bench.samplers)


@pytest.mark.parametrize(
    ("in_system", "n_new", "capacity", "room"),
    [(0, 3, 6, True), (3, 3, 6, True), (4, 3, 6, False), (6, 1, 6, False), (0, 6, 6, True),
     (0, 9, 6, False)],
)
def test_queue_limit(in_system: int, n_new: int, capacity: int, room: bool) -> None:
    # counted in sequences; more than the capacity never fits, not even an empty system
    assert queue_has_room(in_system, n_new, capacity) is room


# ---- slots and the prompt cache ---------------------------------------------------------------


def test_a_prompt_sharing_a_prefix_reuses_that_slot_and_feeds_only_the_rest() -> None:
    bench = Bench(n_slots=2)
    first = new_job([1, 2, 3, 4, 5, 6], max_tokens=1)
    bench.submit(first)
    bench.step()
    used = bench.of(first)[-1]
    assert used.finish_reason == "length"
    first_slot = next(s.id for s in bench.sched.slots if s.n_past == 6)
    # an empty slot is first in line (least recently used); the cached prefix wins over it
    follow_up = new_job([1, 2, 3, 4, 9, 9], max_tokens=2)
    bench.submit(follow_up)
    plan = bench.step()
    assert plan is not None
    entry = entry_of(plan, follow_up)
    assert entry is not None and entry.slot == first_slot
    assert entry.tokens == [9, 9] and entry.slot not in bench.sched.free
    assert ("truncate", first_slot, 4) in bench.slot_calls
    assert bench.run_until_final(follow_up).n_cached == 4


def test_a_prompt_without_a_shared_prefix_takes_the_least_recently_used_slot() -> None:
    bench = Bench(n_slots=2)
    bench.submit(new_job([1, 2, 3], max_tokens=1))
    bench.step()
    other = new_job([7, 8], max_tokens=1)
    bench.submit(other)
    plan = bench.step()
    assert plan is not None and plan.entries[0].slot == 1  # the never-used slot
    assert bench.sched.cached[0] == [1, 2, 3]  # the first prompt stays cached for reuse


def test_the_same_prompt_again_still_feeds_its_last_token() -> None:
    bench = Bench(n_slots=1)
    bench.submit(new_job([3, 4, 5], max_tokens=1))
    bench.step()
    again = new_job([3, 4, 5], max_tokens=1)
    bench.submit(again)
    plan = bench.step()
    assert plan is not None and plan.entries[0].tokens == [5]  # its logits are needed
    assert bench.of(again)[-1].n_cached == 2


@pytest.mark.parametrize("option", [{"cache_prompt": False}, {"prompt_logprobs": True}])
def test_no_prefix_reuse_when_the_job_opts_out_or_scores_the_prompt(option: dict) -> None:
    bench = Bench(n_slots=1)
    bench.submit(new_job([3, 4, 5], max_tokens=1))
    bench.step()
    again = new_job([3, 4, 5], max_tokens=1, **option)
    bench.submit(again)
    plan = bench.step()
    assert plan is not None and plan.entries[0].tokens == [3, 4, 5]
    assert bench.slot_calls[-1] == ("reset", 0, 0)
    assert bench.of(again)[-1].n_cached == 0


# ---- the prefill budget ---------------------------------------------------------------------


def test_without_decoders_prompts_fill_the_budget_in_chunks() -> None:
    bench = Bench(n_slots=3, prefill_chunk=4, prefill_budget=6)
    jobs = [new_job(list(range(10)), max_tokens=1) for _ in range(3)]
    bench.submit(*jobs)
    plan = bench.step()
    assert plan is not None
    assert [len(e.tokens) for e in plan.entries] == [4, 2]  # chunk 4, then the budget's rest
    assert [e.logits for e in plan.entries] == ["none", "none"]  # mid-prompt: no logits
    assert plan.n_prefill == 6 and plan.n_decode == 0


def test_decoding_sequences_get_a_token_every_step_while_a_long_prompt_prefills() -> None:
    bench = Bench(n_slots=2)
    streamer = new_job([1, 2, 3], max_tokens=None)
    bench.submit(streamer)
    bench.step()  # its prompt: 3 ms for 3 tokens -> 1 ms per prompt token
    bench.step()  # a decode step alone: 10 ms
    long = new_job([(7 * i) % 13 for i in range(200)], max_tokens=1)
    bench.submit(long)
    # the budget lets prefill add about stall_factor x one decode step: 2 x 10 ms -> 20 tokens
    steps = 0
    while not bench.of(long):
        plan = bench.step()
        assert plan is not None
        steps += 1
        decode = entry_of(plan, streamer)
        assert decode is not None and len(decode.tokens) == 1 and decode.logits == "last"
        chunk = entry_of(plan, long)
        if chunk is not None:
            assert len(chunk.tokens) <= 20
    assert steps >= 200 // 20
    assert bench.sched.cost.decode_step_s == pytest.approx(0.010)
    assert bench.sched.cost.prefill_token_s == pytest.approx(0.001)
    assert sum(len(u.tokens or []) + bool(u.text) for u in bench.of(streamer)) >= steps


def test_the_prefill_share_grows_with_the_sequences_waiting_for_their_prompt() -> None:
    cost = StepCost(EngineSettings("fake.gguf", prefill_budget=512, prefill_min_tokens=8))
    assert cost.prefill_budget(n_decoding=1, n_prefilling=1) == 512  # nothing learnt yet
    cost.learn(0.010, n_prefill=0, n_decode=2)
    cost.learn(0.010 + 0.050, n_prefill=50, n_decode=2)  # 1 ms per prompt token
    assert cost.prefill_budget(n_decoding=0, n_prefilling=3) == 512  # nobody waits on it
    assert cost.prefill_budget(n_decoding=2, n_prefilling=1) == 20  # 2 x 10 ms
    assert cost.prefill_budget(n_decoding=1, n_prefilling=3) == 60  # share 3
    cost.learn(0.010 + 5.0, n_prefill=10, n_decode=1)  # prompt tokens became very slow
    assert cost.prefill_budget(n_decoding=1, n_prefilling=1) == 8  # never below the minimum


# ---- endings --------------------------------------------------------------------------------


def test_eos_ends_with_stop() -> None:
    bench = Bench(model=lambda e, t: one_hot(EOS if e.tokens[t] == 2 else e.tokens[t] + 1))
    job = new_job([0], max_tokens=10)
    bench.submit(job)
    end = bench.run_until_final(job)
    assert (end.finish_reason, end.stop_type) == ("stop", "eos")
    assert end.n_generated == 3 and bench.text_of(job) == "bc"  # 1, 2, then EOS (no text)


def test_min_tokens_masks_eos_and_ignore_eos_bans_it() -> None:
    def eos_first(entry: StepEntry, t: int) -> np.ndarray:
        logits = one_hot(EOS)
        logits[(entry.tokens[t] + 1) % len(LETTERS)] = 5.0  # second best
        return logits

    bench = Bench(model=eos_first)
    job = new_job([0], max_tokens=10, min_tokens=2)
    bench.submit(job)
    end = bench.run_until_final(job)
    assert end.finish_reason == "stop" and end.n_generated == 3
    ignoring = new_job([0], max_tokens=4, ignore_eos=True)
    bench.submit(ignoring)
    bench.step()
    assert bench.samplers[-1].params.logit_bias == {EOS: -math.inf}
    assert ignoring.params.logit_bias == {}  # the job's own parameters are left alone
    end = bench.run_until_final(ignoring)
    assert (end.finish_reason, end.stop_type) == ("length", "limit") and end.n_generated == 4


def test_a_stop_string_across_tokens_ends_with_the_text_before_it() -> None:
    bench = Bench(pieces={1: "ok <", 2: "/s", 3: "> after"})
    job = new_job([0], max_tokens=10, stop=["</s>"])
    bench.submit(job)
    end = bench.run_until_final(job)
    assert (end.finish_reason, end.stop_type, end.stopping_word) == ("stop", "word", "</s>")
    assert bench.text_of(job) == "ok "  # "<" was held back, then dropped with the stop
    assert end.n_generated == 3


def test_text_held_for_an_unfinished_stop_string_is_delivered_at_the_end() -> None:
    bench = Bench(pieces={1: "x <", 2: "/"})
    job = new_job([0], max_tokens=2, stop=["</s>"])
    bench.submit(job)
    end = bench.run_until_final(job)
    assert end.finish_reason == "length" and bench.text_of(job) == "x </"
    assert [u.text for u in bench.of(job)] == ["x ", "</"]


def test_max_tokens_ends_with_length() -> None:
    bench = Bench()
    job = new_job([0], max_tokens=5, logprobs=True, top_logprobs=2)
    bench.submit(job)
    end = bench.run_until_final(job)
    assert (end.finish_reason, end.stop_type, end.n_generated) == ("length", "limit", 5)
    assert bench.text_of(job) == "bcdef"
    tokens = [tok for u in bench.of(job) for tok in u.tokens or []]
    assert [tok[0] for tok in tokens] == [1, 2, 3, 4, 5]
    assert all(tok[2][0][0] == tok[0] for tok in tokens)  # the sampled token is the top one


def test_a_full_context_ends_with_length() -> None:
    bench = Bench(n_ctx=8)
    job = new_job([0, 1, 2, 3, 4, 5], max_tokens=None)
    bench.submit(job)
    end = bench.run_until_final(job)
    assert end.finish_reason == "length" and end.n_generated == 8 - 6 + 1


def test_max_tokens_zero_ends_at_admission() -> None:
    bench = Bench()
    job = new_job([1, 2, 3], max_tokens=0)
    bench.submit(job)
    assert bench.step() is None  # nothing to run
    assert [(u.finish_reason, u.n_generated) for u in bench.of(job)] == [("length", 0)]
    assert len(bench.sched.free) == 2 and bench.samplers[0].closed


def test_max_tokens_zero_with_prompt_scoring_gives_the_prompt_logprobs() -> None:
    bench = Bench()
    job = new_job([4, 5, 6], max_tokens=0, prompt_logprobs=True)
    bench.submit(job)
    plan = bench.step()
    assert plan is not None and plan.entries[0].logits == "all"
    (end,) = bench.of(job)
    assert end.finish_reason == "length" and end.prompt_logprobs is not None
    assert [tok[0] for tok in end.prompt_logprobs] == [4, 5, 6]
    assert end.prompt_logprobs[0][1] is None  # nothing predicts the first token
    # the fake model predicts each next letter: the logprob of the actual next token is ~0
    assert all(-0.01 < lp < 0 for _, lp, _ in end.prompt_logprobs[1:])


def test_cancel_between_steps_frees_the_slot() -> None:
    bench = Bench(n_slots=1)
    job = new_job([1, 2], max_tokens=None)
    bench.submit(job)
    bench.step()
    job.cancel.set()
    assert bench.step() is None  # retired before the step, nothing else runs
    assert bench.of(job)[-1].finish_reason == "cancelled"
    assert bench.sched.free == [0] and not bench.sched.slots[0].busy
    assert bench.samplers[0].closed and bench.sched.tokens_after_disconnect == 0


def test_cancel_during_a_step() -> None:
    bench = Bench(n_slots=2)
    skipped, computed = new_job([1], max_tokens=None), new_job([2], max_tokens=None)
    bench.submit(skipped, computed)
    bench.step()
    # both clients leave during the forward: the engine skipped one entry (status 1), the
    # other's token was already made (status 0), a token computed for nobody

    def both_leave() -> None:
        skipped.cancel.set()
        computed.cancel.set()

    bench.step(statuses=[1, 0], during=both_leave)
    assert bench.of(skipped)[-1].finish_reason == "cancelled"
    assert bench.of(computed)[-1].finish_reason == "cancelled"
    assert bench.sched.tokens_after_disconnect == 1 and not bench.sched.active


# ---- failures stay with their sequence --------------------------------------------------------


def test_a_sequence_whose_logits_cannot_be_sampled_fails_alone() -> None:
    def nan_for_slot_0(entry: StepEntry, t: int) -> np.ndarray:
        return np.full(N_VOCAB, np.nan, np.float32) if entry.slot == 0 else counting_model(entry, t)

    bench = Bench(n_slots=2, model=nan_for_slot_0)
    broken, fine = new_job([1, 2], max_tokens=3), new_job([3, 4], max_tokens=3)
    bench.submit(broken, fine)
    bench.step()
    end = bench.of(broken)[-1]
    assert end.finish_reason == "error" and "NaN" in (end.error or "")
    assert ("reset", 0, 0) in bench.slot_calls and bench.sched.cached[0] == []
    assert bench.run_until_final(fine).finish_reason == "length"
    assert bench.text_of(fine) == "fgh"


def test_a_job_that_cannot_be_admitted_fails_alone() -> None:
    bench = Bench(n_slots=2)
    bad = new_job([1], params=SamplingParams(temperature=-1.0))
    good = new_job([2], max_tokens=2)
    bench.submit(bad, good)
    bench.step()
    assert bench.of(bad)[0].finish_reason == "error" and "temperature" in bench.of(bad)[0].error
    assert [s.job for s in bench.sched.active] == [good]
    assert bench.run_until_final(good).finish_reason == "length"
    assert len(bench.sched.free) == 2


def test_an_admission_bug_fails_that_job_and_loses_no_slot() -> None:
    bench = Bench(n_slots=1)
    calls = []

    def decoder_failing_once() -> FakeDecoder:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("injected")
        return FakeDecoder({})

    bench.sched.hooks = dataclasses.replace(bench.sched.hooks, new_decoder=decoder_failing_once)
    first, second = new_job([1], max_tokens=1), new_job([2], max_tokens=1)
    bench.submit(first)
    bench.step()
    end = bench.of(first)[0]
    assert end.finish_reason == "error" and end.error == "internal error: injected"
    assert bench.samplers[0].closed and bench.sched.free == [0]
    bench.submit(second)
    assert bench.run_until_final(second).finish_reason == "length"


def test_a_failed_forward_ends_the_sequences_it_carried() -> None:
    bench = Bench(n_slots=2)
    jobs = [new_job([1], max_tokens=None), new_job([2], max_tokens=None)]
    bench.submit(*jobs)
    bench.step()
    plan = bench.sched.plan_step(bench.updates)
    assert plan is not None
    bench.sched.fail_step(plan, "engine error: boom", bench.updates)
    assert [bench.of(j)[-1].error for j in jobs] == ["engine error: boom"] * 2
    assert sorted(bench.sched.free) == [0, 1] and bench.sched.cached == [[], []]


def test_abort_ends_every_sequence_and_clears_the_slots() -> None:
    bench = Bench(n_slots=2)
    job = new_job([1, 2], max_tokens=None)
    bench.submit(job)
    bench.step()
    out: list[Update] = []
    bench.sched.abort("the inference engine stopped", out)
    assert [(u.job, u.finish_reason, u.error) for u in out] == [
        (job, "error", "the inference engine stopped")
    ]
    assert not bench.sched.active and not any(s.busy for s in bench.sched.slots)
    assert bench.samplers[0].closed


# ---- llama.cpp's return_progress and post_sampling_probs ------------------------------------


def test_progress_after_every_prefill_chunk_and_before_the_first_token() -> None:
    bench = Bench(n_slots=1, prefill_chunk=4, prefill_budget=4)
    job = new_job(list(range(10)), max_tokens=2, return_progress=True)
    plain = new_job(list(range(10)), max_tokens=2, cache_prompt=False)
    bench.submit(job)
    while not any(u.final for u in bench.of(job)):
        bench.step()
    ups = bench.of(job)
    progress = [u.progress for u in ups if u.progress is not None]
    assert [(p.total, p.cache, p.processed) for p in progress] == [
        (10, 0, 4), (10, 0, 8), (10, 0, 10)
    ]
    assert [p.time_ms for p in progress] == sorted(p.time_ms for p in progress)
    first_text = next(i for i, u in enumerate(ups) if u.text)
    assert all(i < first_text for i, u in enumerate(ups) if u.progress is not None)
    assert all(not u.text and not u.final for u in ups if u.progress is not None)
    # a job that does not ask gets none, and the same text
    bench.submit(plain)
    while not any(u.final for u in bench.of(plain)):
        bench.step()
    assert all(u.progress is None for u in bench.of(plain))
    assert bench.text_of(plain) == bench.text_of(job)


def test_progress_counts_the_reused_prefix() -> None:
    bench = Bench(n_slots=1, prefill_chunk=4)
    first = new_job(list(range(10)), max_tokens=1)
    bench.submit(first)
    while not bench.of(first):
        bench.step()
    again = new_job(list(range(10)) + [3, 4], max_tokens=1, return_progress=True)
    bench.submit(again)
    while not any(u.final for u in bench.of(again)):
        bench.step()
    progress = [u.progress for u in bench.of(again) if u.progress is not None]
    assert [(p.total, p.cache, p.processed) for p in progress] == [(12, 10, 12)]


def test_post_sampling_probs_come_from_the_sampler() -> None:
    bench = Bench()
    job = new_job([1, 2], max_tokens=3, logprobs=True, top_logprobs=2, post_sampling_probs=True)
    bench.submit(job)
    while not any(u.final for u in bench.of(job)):
        bench.step()
    results = [r for u in bench.of(job) for r in u.tokens or []]
    assert results == [(3, 1.0, [(3, 1.0)]), (4, 1.0, [(4, 1.0)]), (5, 1.0, [(5, 1.0)])]
