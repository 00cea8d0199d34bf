"""What the Trio side, the inference thread and the scheduler hand each other.

A request becomes `Job`s (one per choice) on the Trio side; the scheduler turns every step's
results into `Update`s, which the inference thread delivers back to the job's `sink`.
`SlotState`s are what /slots shows. Nothing here runs anything.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.sampling import SamplingParams

__all__ = [
    "EngineSettings",
    "Job",
    "PromptProgress",
    "QueueFull",
    "SlotState",
    "TokenResult",
    "Update",
    "queue_has_room",
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
    # An embedding job: prefill only, no sampling; ends with `Update.embedding` pooled this way
    # ("mean", "cls" or "last", engine/embedding.py).
    embed: str | None = None
    # constrained decoding: an engine/constraints.Constraint of this job alone (its matcher
    # advances with every token), or None
    constraint: Any = None
    return_tokens: bool = False  # updates carry the ids of their generated tokens (llama.cpp)
    # llama.cpp's post_sampling_probs: with logprobs, each token's TokenResult holds
    # probabilities after the sampling chain (renormalised over its survivors), not logprobs
    post_sampling_probs: bool = False
    return_progress: bool = False  # an update with `progress` after each prefill chunk
    id: str = field(default_factory=lambda: f"job-{next(_job_ids)}")
    cancel: engine.CancelFlag = field(default_factory=engine.CancelFlag)
    submitted_at: float = field(default_factory=time.monotonic)


@dataclass(frozen=True, slots=True)
class PromptProgress:
    """Where a job's prefill stands after one of its chunks (llama.cpp's `prompt_progress`)."""

    total: int  # prompt tokens
    cache: int  # of which were reused from the slot's cache
    processed: int  # prompt tokens in the slot's cache now (the reused ones included)
    time_ms: float  # since the job was admitted


@dataclass(slots=True, eq=False)
class Update:
    """One step's results for one job, delivered to the Trio side."""

    job: Job
    text: str = ""  # final text (stop strings resolved, whole UTF-8 characters)
    tokens: list[TokenResult] | None = None  # generated tokens of this step
    token_ids: list[int] | None = None  # their ids, when the job asked (Job.return_tokens)
    prompt_logprobs: list[TokenResult] | None = None  # for echo scoring, once
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stop_type: str | None = None  # llama.cpp: "eos" | "word" | "limit"
    stopping_word: str = ""
    error: str | None = None
    embedding: Any = None  # an embedding job's vector (float32 ndarray), in its final update
    progress: PromptProgress | None = None  # a prefill chunk done (Job.return_progress)
    n_prompt: int = 0
    n_cached: int = 0  # prompt tokens reused from the slot's cache
    n_generated: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0

    @property
    def final(self) -> bool:
        """True for the job's last update (it has a finish reason)."""
        return self.finish_reason is not None


class QueueFull(Exception):
    """More sequences than the slots plus the wait queue can hold."""


def queue_has_room(in_system: int, n_new: int, capacity: int) -> bool:
    """Whether `n_new` more jobs (sequences) may join the `in_system` ones already running or
    waiting, `capacity` being the slots plus the wait queue.

    Counted in sequences, not requests: one request with many prompts or a large n weighs as
    much as that many requests. A request bigger than the whole capacity never fits (the API
    refuses it with 400 before it gets here).
    """
    return in_system + n_new <= capacity
