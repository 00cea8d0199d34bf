"""What the scheduler plans and runs, sans-I/O: the sequences in the slots, a step's entries
and plan, the engine as the scheduler sees it (`EngineHooks`, `StepOutput`), and the learnt cost
of a step that sizes the prefill budget (`StepCost`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from bitnetd_trio.engine.jobs import EngineSettings, Job, TokenResult
from bitnetd_trio.engine.sampling import SamplingParams
from bitnetd_trio.engine.stops import StopMatcher

__all__ = [
    "ActiveSequence",
    "DecoderLike",
    "EngineHooks",
    "SamplerLike",
    "StepCost",
    "StepEntry",
    "StepOutput",
    "StepPlan",
]

class SamplerLike(Protocol):
    """A sequence's sampler (`sampling.Sampler`)."""

    def accept(self, token: int) -> None: ...
    def sample(self, logits: Any, allowed: Any = None) -> int: ...
    def sample_probs(
        self, logits: Any, top_n: int, allowed: Any = None
    ) -> tuple[int, float, list[tuple[int, float]]]: ...
    def close(self) -> None: ...


class DecoderLike(Protocol):
    """A sequence's streaming detokenizer (`tokenizer.StreamDecoder`)."""

    def push(self, token: int) -> str: ...
    def flush(self) -> str: ...


class StepOutput(Protocol):
    """The results of the last forward, by entry index (`native.Context` is one)."""

    def logits(self, entry_index: int, token_index: int) -> np.ndarray: ...
    def sample(self, entry_index: int, sampler: Any) -> int: ...
    def hidden(self, entry_index: int, token_index: int) -> np.ndarray: ...


@dataclass(frozen=True)
class EngineHooks:
    """The engine and tokenizer operations the scheduler needs besides a step's output.

    They are called on the scheduler's caller's thread (the inference thread).
    """

    new_sampler: Callable[[SamplingParams], SamplerLike]  # ValueError: bad parameters
    new_decoder: Callable[[], DecoderLike]
    is_control: Callable[[int], bool]  # control tokens add no text
    # (logits, token, top_n) -> (logprob of token, [(id, logprob)] of the top_n)
    logprobs: Callable[[Any, int, int], tuple[float, list[tuple[int, float]]]]
    reset_slot: Callable[[int], None]  # forget the slot's KV cache
    truncate_slot: Callable[[int, int], None]  # keep the slot's first n cached tokens


class ActiveSequence:
    """A job admitted into an engine slot."""

    __slots__ = (
        "admitted_at",
        "constraint",
        "decoder",
        "embed_rows",
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

    def __init__(
        self, job: Job, slot: int, sampler: SamplerLike, decoder: DecoderLike, now: float
    ) -> None:
        self.job = job
        self.slot = slot
        self.sampler = sampler
        self.decoder = decoder
        self.matcher = StopMatcher(job.stop)
        self.constraint = job.constraint  # engine/constraints.Constraint, or None
        self.n_fed = 0  # prompt tokens already in the slot's cache
        self.n_cached = 0  # of which were reused from an earlier request
        self.n_generated = 0
        self.next_token = -1  # the sampled token to feed in the next step
        self.admitted_at = now
        self.prefill_done_at = 0.0
        self.last_token_at = 0.0
        # echo scoring: the prompt tokens' logprobs, gathered chunk by chunk
        self.prompt_lps: list[TokenResult] | None = [] if job.prompt_logprobs else None
        self.embed_rows: list[np.ndarray] = []  # an embedding job's hidden rows so far

    @property
    def prefilling(self) -> bool:
        """True while part of the prompt is not in the slot's cache yet."""
        return self.n_fed < len(self.job.prompt)

    @property
    def n_past(self) -> int:
        """Tokens in the slot's cache (the last sampled token is fed in the next step)."""
        return self.n_fed + max(0, self.n_generated - 1)


@dataclass(slots=True, eq=False)
class StepEntry:
    """One sequence's share of a step.

    Carries the fields `native.Context.forward` reads from a `BatchEntry` (slot, tokens,
    logits, cancel), so a plan's entries go to the engine as they are.
    """

    seq: ActiveSequence
    slot: int
    tokens: list[int]
    logits: str  # "none" | "last" | "all": which positions' logits the step keeps
    cancel: Any  # the job's CancelFlag: the engine skips the entry once it is set


@dataclass(slots=True)
class StepPlan:
    """What one forward runs."""

    entries: list[StepEntry]
    n_prefill: int  # prompt tokens fed
    n_decode: int  # sequences decoding one token

    def constraints(self) -> list[Any]:
        """The constraints of the sequences this step samples for (their masks can be
        computed while the forward runs); empty for unconstrained steps."""
        return [
            e.seq.constraint
            for e in self.entries
            if e.seq.constraint is not None and e.logits != "none"
        ]


class StepCost:
    """Running estimates of step times, and the prompt tokens a step may feed from them."""

    def __init__(self, settings: EngineSettings) -> None:
        self.settings = settings
        self.decode_step_s: float | None = None  # a forward of decode tokens only
        self.prefill_token_s: float | None = None  # extra time per prompt token

    def prefill_budget(self, n_decoding: int, n_prefilling: int) -> int:
        """Prompt tokens this step may feed: all it can when nobody decodes, else few enough
        that the decoding sequences keep flowing (chunked prefill). The prefill's share of a
        step grows with the number of sequences waiting for their prompt against those
        decoding, so a burst of new requests is not starved by one running stream."""
        s = self.settings
        if not n_decoding or self.decode_step_s is None or not self.prefill_token_s:
            return s.prefill_budget
        share = max(1.0, n_prefilling / n_decoding)
        allowed = max(s.prefill_stall_factor * share * self.decode_step_s, s.prefill_stall_floor)
        return max(s.prefill_min_tokens, min(s.prefill_budget, int(allowed / self.prefill_token_s)))

    def learn(self, seconds: float, n_prefill: int, n_decode: int) -> None:
        """Fold in a step that took `seconds` to feed n_prefill prompt tokens beside
        n_decode decoding sequences (exponential moving averages)."""

        def ema(old: float | None, new: float) -> float:
            return new if old is None else 0.8 * old + 0.2 * new

        if n_prefill == 0:
            if n_decode:
                self.decode_step_s = ema(self.decode_step_s, seconds)
        else:
            base = self.decode_step_s if n_decode and self.decode_step_s else 0.0
            self.prefill_token_s = ema(self.prefill_token_s, max(seconds - base, 0.0) / n_prefill)
