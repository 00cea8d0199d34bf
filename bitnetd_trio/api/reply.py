"""What one generating request has received so far, sans-I/O: the state a dialect shapes.

`Reply` holds the request, the response's identity and prompts, and one `Choice` per engine
job; `Piece` is what one engine step added to one choice. Nothing here waits, sends or touches
the engine's thread, so dialects are tested on hand-made replies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import InitVar, dataclass, field

from bitnetd_trio.api.schema import GenerationRequest
from bitnetd_trio.api.sse import usage_object
from bitnetd_trio.engine.inference import TokenResult, Update
from bitnetd_trio.engine.jobs import PromptProgress
from bitnetd_trio.engine.reasoning import ThinkSplitter

__all__ = ["Choice", "Piece", "Reply"]


@dataclass
class Piece:
    """What one engine step added to one choice: text (whole characters, stop strings
    resolved) and, when the request asked for logprobs, its tokens' results and, once, the
    prompt's (echo scoring)."""

    text: str = ""
    tokens: list[TokenResult] = field(default_factory=list)
    prompt_logprobs: list[TokenResult] | None = None
    token_ids: list[int] = field(default_factory=list)  # when the job asked for them
    progress: PromptProgress | None = None  # a prefill chunk done (when the job asked)

    @classmethod
    def of(cls, upd: Update) -> Piece:
        """The piece an engine update carries."""
        return cls(upd.text, upd.tokens or [], upd.prompt_logprobs, upd.token_ids or [],
                   upd.progress)

    def carries_anything(self, logprobs: bool) -> bool:
        """Text, token ids or prefill progress asked for, or logprobs a request that asked for
        them has to see."""
        return (
            bool(self.text or self.token_ids)
            or self.progress is not None
            or (logprobs and bool(self.tokens or self.prompt_logprobs))
        )


@dataclass
class Choice:
    """What a request has received so far for one of its choices (one engine job)."""

    index: int  # in the request's choices: prompt index * n + k
    text: list[str] = field(default_factory=list)
    tokens: list[TokenResult] = field(default_factory=list)
    prompt_logprobs: list[TokenResult] | None = None
    token_ids: list[int] = field(default_factory=list)  # when the job asked for them
    finish_reason: str | None = None  # "stop" | "length" | "cancelled" | "error"
    stop_type: str | None = None  # llama.cpp: "eos" | "word" | "limit"
    stopping_word: str = ""
    error: str | None = None
    n_generated: int = 0
    n_cached: int = 0
    prompt_seconds: float = 0.0
    generation_seconds: float = 0.0
    # the prompt's think mode (engine/reasoning.think_mode) when the template thinks: the
    # choice then counts its reasoning tokens, those generated until the think block closed
    thinking: InitVar[str | None] = None
    reasoning_tokens: int = 0
    _think: ThinkSplitter | None = field(default=None, init=False, repr=False)

    def __post_init__(self, thinking: str | None) -> None:
        if thinking is not None:
            self._think = ThinkSplitter(opened=thinking == "open")

    def apply(self, upd: Update) -> None:
        """Add an engine update for this choice."""
        self._count_reasoning(upd)
        if upd.text:
            self.text.append(upd.text)
        if upd.tokens:
            self.tokens.extend(upd.tokens)
        if upd.token_ids:
            self.token_ids.extend(upd.token_ids)
        if upd.prompt_logprobs is not None:
            self.prompt_logprobs = upd.prompt_logprobs
        self.n_generated = max(self.n_generated, upd.n_generated)
        if upd.final or upd.prompt_seconds:  # counts and times so far (llama.cpp timings)
            self.n_cached = upd.n_cached
            self.prompt_seconds = upd.prompt_seconds
            self.generation_seconds = upd.generation_seconds
        if upd.final:
            self.finish_reason = upd.finish_reason
            self.stop_type = upd.stop_type
            self.stopping_word = upd.stopping_word
            self.error = upd.error

    def _count_reasoning(self, upd: Update) -> None:
        # An update during which the block was open counts whole: the token that wrote
        # `</think>` is reasoning; text held back by a stop string's partial match can move
        # the count by the tokens held.
        s = self._think
        if s is None or s.closed:
            return
        s.feed(upd.text)
        if s.saw_block:
            self.reasoning_tokens = max(self.reasoning_tokens, upd.n_generated)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None


@dataclass(eq=False)
class Reply:
    """One generating request's response in the making."""

    request: GenerationRequest
    id: str  # the same in every chunk of a stream
    created: int  # unix time
    model_id: str
    fingerprint: str  # OpenAI's system_fingerprint: version and kernel
    prompts: list[list[int]]  # token ids of each prompt
    prompt_texts: list[str]
    choices: list[Choice]  # n per prompt, in prompt order
    token_bytes: Callable[[int], bytes]  # the tokenizer's, for logprobs
    # a conversation rendered with a template that marks thinking: the prompt's think mode
    # (engine/reasoning.think_mode: "open", "closed" or "off"); None: no reasoning is split out
    reasoning: str | None = None

    def prompt_index(self, choice: Choice) -> int:
        """Which prompt a choice continues."""
        return choice.index // max(1, self.request.n)

    @property
    def all_done(self) -> bool:
        return all(c.done for c in self.choices)

    @property
    def anything_produced(self) -> bool:
        return any(c.n_generated or c.text or c.tokens for c in self.choices)

    def failed(self) -> Choice | None:
        """The first choice the engine failed, if any."""
        return next((c for c in self.choices if c.finish_reason == "error"), None)

    def usage(self) -> dict:
        """The OpenAI `usage` object of the whole request."""
        prompt_tokens = sum(len(p) for p in self.prompts)
        completion_tokens = sum(c.n_generated for c in self.choices)
        # each prompt counts once however many choices share it (n > 1)
        n = max(1, self.request.n)
        cached = sum(c.n_cached for c in self.choices if c.index % n == 0)
        usage = usage_object(prompt_tokens, completion_tokens, cached)
        if self.reasoning is not None:  # a template that marks thinking (http-api §1.1)
            usage["completion_tokens_details"] = {
                "reasoning_tokens": sum(c.reasoning_tokens for c in self.choices)
            }
        return usage
