"""Sampling parameters and the Python face of the C sampler (native/sampler.c).

The chain runs in C (model-format §7): logit bias, repetition / presence / frequency penalties,
then greedy (temperature 0) or top-k, top-p, min-p, temperature, softmax and a seeded draw.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bitnetd_trio._native import ffi, lib

_U64 = 1 << 64


class SamplingError(RuntimeError):
    """No token can be sampled (every logit NaN or banned)."""


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _is_real(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


@dataclass
class SamplingParams:
    """Per-request sampling settings; defaults are bitnet.cpp's (model-format §7)."""

    temperature: float = 0.8
    top_k: int = 40  # <= 0: off
    top_p: float = 0.95  # 1: off
    min_p: float = 0.05  # 0: off
    repeat_penalty: float = 1.0  # 1: off
    repeat_last_n: int = 64  # penalty window; 0 = no penalties, -1 = whole history
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None  # None: a random seed is drawn when the Sampler is made
    logit_bias: dict[int, float] = field(default_factory=dict)

    def validate(self, n_vocab: int | None = None) -> None:
        """Raise ValueError naming the first field that is out of range."""

        def real(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if not _is_real(v) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < lo or (lo_open and v == lo) or v > hi:
                lo_s = f"({lo}" if lo_open else f"[{lo}"
                raise ValueError(f"{name} must be in {lo_s}, {hi}], got {v!r}")

        real("temperature", 0.0, 1e6)
        if not _is_int(self.top_k) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (<= 0 disables), got {self.top_k!r}")
        real("top_p", 0.0, 1.0)
        real("min_p", 0.0, 1.0)
        real("repeat_penalty", 0.0, 1e6, lo_open=True)
        if not _is_int(self.repeat_last_n) or self.repeat_last_n < -1:
            raise ValueError(
                f"repeat_last_n must be an integer >= -1 (-1 = whole history), "
                f"got {self.repeat_last_n!r}"
            )
        real("presence_penalty", -1e6, 1e6)
        real("frequency_penalty", -1e6, 1e6)
        if self.seed is not None and (
            not _is_int(self.seed) or not -(1 << 63) <= self.seed < _U64
        ):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64), got {self.seed!r}")
        if not isinstance(self.logit_bias, dict):
            raise ValueError("logit_bias must be a mapping of token id to bias")
        for tok, bias in self.logit_bias.items():
            if not _is_int(tok) or tok < 0 or (n_vocab is not None and tok >= n_vocab):
                raise ValueError(f"logit_bias: token id {tok!r} is out of range")
            if not _is_real(bias) or math.isnan(bias) or bias == math.inf:
                raise ValueError(f"logit_bias: bias for token {tok} must be a number or -inf")


def random_seed() -> int:
    """A fresh 64-bit seed from the OS."""
    return int.from_bytes(os.urandom(8), "little")


class Sampler:
    """One sequence's sampler: owns the C state (PRNG, penalty window, scratch buffer).

    Not thread-safe: use it from one thread at a time (the inference thread).
    """

    def __init__(self, params: SamplingParams, n_vocab: int) -> None:
        params.validate(n_vocab)
        self.params = params
        self.n_vocab = int(n_vocab)
        self.seed: int = (random_seed() if params.seed is None else int(params.seed)) % _U64
        c = ffi.new("bn_sampling *")
        c.temperature = float(params.temperature)
        c.top_k = int(params.top_k)
        c.top_p = float(params.top_p)
        c.min_p = float(params.min_p)
        c.repeat_penalty = float(params.repeat_penalty)
        c.repeat_last_n = int(params.repeat_last_n)
        c.presence_penalty = float(params.presence_penalty)
        c.frequency_penalty = float(params.frequency_penalty)
        c.seed = self.seed
        raw = lib.bn_sampler_new(c, self.n_vocab)
        if raw == ffi.NULL:
            raise MemoryError("bn_sampler_new failed (out of memory or bad n_vocab)")
        self._ptr = ffi.gc(raw, lib.bn_sampler_free)
        for tok, bias in params.logit_bias.items():
            if lib.bn_sampler_set_bias(self._ptr, int(tok), float(bias)) != 0:
                raise ValueError(f"logit_bias: cannot set bias for token {tok}")

    @property
    def handle(self) -> Any:
        """The `bn_sampler *` for callers that sample straight from engine memory."""
        return self._live()

    def _live(self) -> Any:
        if self._ptr is None:
            raise ValueError("sampler is closed")
        return self._ptr

    def accept(self, token: int) -> None:
        """Add a token to the penalty history (every generated token, in order)."""
        lib.bn_sampler_accept(self._live(), int(token))

    def sample_probs(
        self, logits: Any, top_n: int, allowed: np.ndarray | None = None
    ) -> tuple[int, float, list[tuple[int, float]]]:
        """`sample`, also reporting the distribution the token was drawn from: after the whole
        chain, renormalised over the surviving tokens (llama.cpp's post_sampling_probs).

        Returns (token, its probability, [(id, probability)] of the `top_n` most likely
        survivors, best first; fewer when fewer survive). The token and the PRNG use are
        those of `sample` with the same inputs. Greedy reports the token alone, with 1.0.
        """
        ptr = self._live()
        buf = self._logits_buffer(logits)
        top_n = max(0, int(top_n))
        ids = ffi.new("int32_t[]", max(top_n, 1))
        probs = ffi.new("float[]", max(top_n, 1))
        prob = ffi.new("float *")
        n_top = ffi.new("int32_t *")
        words, n_words = self._allowed_buffer(allowed)
        tok = lib.bn_sampler_sample_probs(ptr, buf, words, n_words, top_n, ids, probs, prob,
                                          n_top)
        if tok < 0:
            raise SamplingError("no token can be sampled: every logit is NaN or banned")
        return int(tok), float(prob[0]), [(int(ids[i]), float(probs[i])) for i in
                                          range(n_top[0])]

    def _logits_buffer(self, logits: Any) -> Any:
        """A `float *` over n_vocab logits: a cffi pointer as is, an array without a copy when
        it is C-contiguous float32."""
        if isinstance(logits, ffi.CData):
            return logits
        arr = np.asarray(logits)
        if arr.dtype != np.float32 or not arr.flags.c_contiguous:
            arr = np.ascontiguousarray(arr, dtype=np.float32)
        if arr.size != self.n_vocab:
            raise ValueError(f"expected {self.n_vocab} logits, got {arr.size}")
        return ffi.from_buffer("float[]", arr)

    @staticmethod
    def _allowed_buffer(allowed: np.ndarray | None) -> tuple[Any, int]:
        if allowed is None:
            return ffi.NULL, 0
        if allowed.dtype != np.uint32 or not allowed.flags.c_contiguous:
            raise ValueError("allowed must be a C-contiguous uint32 bitset")
        return ffi.from_buffer("uint32_t[]", allowed), int(allowed.size)

    def sample(self, logits: Any, allowed: np.ndarray | None = None) -> int:
        """Pick a token from n_vocab logits: a float32 numpy array or a cffi `float *`.

        A C-contiguous float32 array and a cffi pointer are used in place, never copied.
        `allowed` (constrained decoding): a uint32 bitset, bit i % 32 of word i // 32 set for
        each token that may be picked; the others count as -inf before the chain.
        """
        ptr = self._live()
        buf = self._logits_buffer(logits)
        if allowed is None:
            tok = lib.bn_sampler_sample(ptr, buf)
        else:
            words, n_words = self._allowed_buffer(allowed)
            tok = lib.bn_sampler_sample_masked(ptr, buf, words, n_words)
        if tok < 0:
            raise SamplingError("no token can be sampled: every logit is NaN or banned")
        return int(tok)

    def close(self) -> None:
        """Free the C sampler now (also happens at garbage collection)."""
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None

    def __enter__(self) -> Sampler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def logprobs(logits: Any, token: int, top_n: int = 0) -> tuple[float, list[tuple[int, float]]]:
    """log-softmax of `logits` at `token`, and the `top_n` best (id, logprob), best first."""
    if isinstance(logits, ffi.CData):
        raise TypeError("logprobs needs an array (its length), not a bare pointer")
    arr = np.asarray(logits)
    if arr.dtype != np.float32 or not arr.flags.c_contiguous:
        arr = np.ascontiguousarray(arr, dtype=np.float32)
    n = int(arr.size)
    if n == 0:
        raise ValueError("logprobs of an empty vocabulary")
    if not 0 <= token < n:
        raise ValueError(f"token {token} out of range [0, {n})")
    top_n = max(0, min(int(top_n), n))
    ids = ffi.new("int32_t[]", max(top_n, 1))
    lps = ffi.new("float[]", max(top_n, 1))
    lp = lib.bn_logprobs(ffi.from_buffer("float[]", arr), n, int(token), top_n, ids, lps)
    return float(lp), [(int(ids[i]), float(lps[i])) for i in range(top_n)]
