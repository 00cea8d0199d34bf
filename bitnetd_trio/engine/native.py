"""The Python face of the C engine (native/bitnet.h): models, contexts, batched forward steps.

Use a Model and its Contexts from one thread (the daemon's inference thread); only
CancelFlag.set/clear/is_set may be called from any thread. Every native call releases the GIL
(cffi API mode), and logits are numpy views of engine memory, never copies.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np

from bitnetd_trio._native import ffi, lib

try:  # the sampler lives in its own module; re-exported here for one import site
    from bitnetd_trio.engine.sampling import Sampler, SamplingParams, logprobs
except ImportError:  # pragma: no cover - only while the sampler module is missing
    Sampler = SamplingParams = logprobs = None  # type: ignore[assignment,misc]

__all__ = [
    "BandwidthProbe",
    "BatchEntry",
    "CancelFlag",
    "Context",
    "EngineError",
    "HParams",
    "Model",
    "ModelLoadError",
    "Sampler",
    "SamplingParams",
    "kernel_name",
    "logprobs",
    "measure_read_bandwidth",
    "select_kernel",
    "ternary_matmul",
    "q2_0_matmul",
    "q8_0_matmul",
]

_ERRLEN = 512
_LOGITS_MODES = {
    "none": lib.BN_LOGITS_NONE,
    "last": lib.BN_LOGITS_LAST,
    "all": lib.BN_LOGITS_ALL,
    # the final-norm hidden state instead of logits (model-format §5.3.1): embeddings
    "hidden_last": lib.BN_HIDDEN_LAST,
    "hidden_all": lib.BN_HIDDEN_ALL,
}
_NUMERIC_DTYPES = {
    lib.BN_GGUF_U8: "<u1",
    lib.BN_GGUF_I8: "<i1",
    lib.BN_GGUF_U16: "<u2",
    lib.BN_GGUF_I16: "<i2",
    lib.BN_GGUF_U32: "<u4",
    lib.BN_GGUF_I32: "<i4",
    lib.BN_GGUF_F32: "<f4",
    lib.BN_GGUF_U64: "<u8",
    lib.BN_GGUF_I64: "<i8",
    lib.BN_GGUF_F64: "<f8",
    lib.BN_GGUF_BOOL: "<u1",
}
_INT_TYPES = {
    lib.BN_GGUF_U8,
    lib.BN_GGUF_I8,
    lib.BN_GGUF_U16,
    lib.BN_GGUF_I16,
    lib.BN_GGUF_U32,
    lib.BN_GGUF_I32,
    lib.BN_GGUF_U64,
    lib.BN_GGUF_I64,
}


class EngineError(Exception):
    """The engine refused a call (bad slot, token out of range, context full, ...)."""


class ModelLoadError(EngineError):
    """A model file could not be loaded; the message names the offending key or tensor."""


def _errbuf() -> Any:
    return ffi.new("char[]", _ERRLEN)


def _errmsg(buf: Any, fallback: str) -> str:
    msg = ffi.string(buf).decode("utf-8", "replace")
    return msg or fallback


#: bn_rope_scaling.type -> the ARCH.rope.scaling.type string
_ROPE_SCALING_NAMES = {lib.BN_ROPE_SCALING_NONE: "none", lib.BN_ROPE_SCALING_LINEAR: "linear",
                       lib.BN_ROPE_SCALING_YARN: "yarn"}


@dataclass(frozen=True)
class HParams:
    """Hyper-parameters of a loaded model (bn_hparams)."""

    architecture: str
    n_vocab: int
    n_ctx_train: int
    n_embd: int
    n_layer: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rms_eps: float
    rope_base: float
    tied_head: bool
    n_params: int
    file_size: int
    #: the pooling the graph is defined with, numbered as ARCH.pooling_type (3 = last token
    #: for the BitNet embedding graph), 0 for a decoder (model-format §10.5.4)
    pooling: int = 0
    #: ARCH.rope.scaling.* as the engine applies them (model-format §5.2.3.1): type "none",
    #: "linear" or "yarn"; factor 1 for none; original_context_length 0 unless yarn; the
    #: YaRN ramp's betas; attn_factor multiplies RoPE's cos and sin
    rope_scaling: str = "none"
    rope_scaling_factor: float = 1.0
    rope_orig_ctx: int = 0
    rope_yarn_beta_fast: float = 32.0
    rope_yarn_beta_slow: float = 1.0
    rope_attn_factor: float = 1.0


class _Closable:
    """A native resource freed by close(): at the end of a with block, or at garbage collection."""

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # interpreter shutdown
            self.close()


class Model(_Closable):
    """A GGUF BitNet b1.58 model mapped into memory. Immutable; shared by its contexts."""

    def __init__(self, ptr: Any, path: Path) -> None:
        self._ptr = ptr
        self.path = path
        self._users = 0  # open contexts; the C model is freed when the last one closes
        self._closed = False
        hp = ffi.new("bn_hparams *")
        lib.bn_model_hparams(ptr, hp)
        self.hparams = HParams(
            architecture=ffi.string(hp.architecture).decode("utf-8", "replace"),
            n_vocab=hp.n_vocab,
            n_ctx_train=hp.n_ctx_train,
            n_embd=hp.n_embd,
            n_layer=hp.n_layer,
            n_ff=hp.n_ff,
            n_head=hp.n_head,
            n_head_kv=hp.n_head_kv,
            head_dim=hp.head_dim,
            rms_eps=float(hp.rms_eps),
            rope_base=float(hp.rope_base),
            tied_head=bool(hp.tied_head),
            n_params=int(hp.n_params),
            file_size=int(hp.file_size),
            pooling=int(hp.pooling),
            rope_scaling=_ROPE_SCALING_NAMES.get(int(hp.rope_scaling.type), "?"),
            rope_scaling_factor=float(hp.rope_scaling.factor),
            rope_orig_ctx=int(hp.rope_scaling.orig_ctx),
            rope_yarn_beta_fast=float(hp.rope_scaling.beta_fast),
            rope_yarn_beta_slow=float(hp.rope_scaling.beta_slow),
            rope_attn_factor=float(hp.rope_scaling.attn_factor),
        )

    @classmethod
    def load(cls, path: str | Path) -> Model:
        """Map and validate a model file; ModelLoadError carries the engine's message."""
        p = Path(path)
        err = _errbuf()
        ptr = lib.bn_model_load(str(p).encode(), err, _ERRLEN)
        if ptr == ffi.NULL:
            raise ModelLoadError(f"{p}: {_errmsg(err, 'cannot load model')}")
        return cls(ptr, p)

    def _live(self) -> Any:
        if self._closed:
            raise EngineError("model is closed")
        return self._ptr

    def metadata(self, key: str, default: Any = None) -> Any:
        """A metadata value: str, int, float, bool or a list of them; default if absent."""
        m = self._live()
        idx = lib.bn_meta_find(m, key.encode())
        if idx < 0:
            return default
        t = lib.bn_meta_type(m, idx)
        if t == lib.BN_GGUF_STRING:
            n = ffi.new("size_t *")
            s = lib.bn_meta_get_str(m, idx, n)
            return ffi.unpack(s, n[0]).decode("utf-8", "replace") if s != ffi.NULL else default
        if t in _INT_TYPES or t == lib.BN_GGUF_BOOL:
            out = ffi.new("int64_t *")
            if lib.bn_meta_get_i64(m, idx, out) != 0:
                return default
            return bool(out[0]) if t == lib.BN_GGUF_BOOL else int(out[0])
        if t in (lib.BN_GGUF_F32, lib.BN_GGUF_F64):
            out = ffi.new("double *")
            return float(out[0]) if lib.bn_meta_get_f64(m, idx, out) == 0 else default
        if t == lib.BN_GGUF_ARRAY:
            return self._array(m, idx, default)
        return default

    def _array(self, m: Any, idx: int, default: Any) -> Any:
        et = ffi.new("int *")
        count = ffi.new("uint64_t *")
        data = ffi.new("void **")
        if lib.bn_meta_array(m, idx, et, count, data) != 0:
            return default
        n = int(count[0])
        if et[0] == lib.BN_GGUF_STRING:
            ln = ffi.new("size_t *")
            out = []
            for i in range(n):
                s = lib.bn_meta_array_str(m, idx, i, ln)
                if s == ffi.NULL:
                    return default
                out.append(ffi.unpack(s, ln[0]).decode("utf-8", "replace"))
            return out
        dt = _NUMERIC_DTYPES.get(et[0])
        if dt is None:
            return default  # nested arrays: the engine does not read them
        size = np.dtype(dt).itemsize * n
        arr = np.frombuffer(ffi.buffer(ffi.cast("char *", data[0]), size), dtype=dt)
        if et[0] == lib.BN_GGUF_BOOL:
            return [bool(v) for v in arr]
        return arr.tolist()

    def close(self) -> None:
        """Release the mapping (deferred until every Context on this model is closed)."""
        if not self._closed:
            self._closed = True
            self._maybe_free()

    def _maybe_free(self) -> None:
        if self._closed and self._users == 0 and self._ptr is not None:
            lib.bn_model_free(self._ptr)
            self._ptr = None


class CancelFlag:
    """A cancellation flag in native memory (an atomic int): set it from any thread."""

    def __init__(self) -> None:
        raw = lib.bn_cancel_new()
        if raw == ffi.NULL:
            raise MemoryError("bn_cancel_new failed")
        self._ptr = ffi.gc(raw, lib.bn_cancel_free)

    def set(self) -> None:
        lib.bn_cancel_set(self._ptr)

    def clear(self) -> None:
        lib.bn_cancel_clear(self._ptr)

    def is_set(self) -> bool:
        return bool(lib.bn_cancel_is_set(self._ptr))


@dataclass
class BatchEntry:
    """One sequence's share of a forward step: tokens appended at the slot's position."""

    slot: int
    tokens: Sequence[int]
    logits: Literal["none", "last", "all", "hidden_last", "hidden_all"] = "last"
    cancel: CancelFlag | None = None


class Context(_Closable):
    """Sequence slots with their KV caches, and a worker pool, over one Model."""

    def __init__(self, model: Model, n_slots: int, n_ctx: int, n_threads: int) -> None:
        err = _errbuf()
        ptr = lib.bn_context_new(
            model._live(), int(n_slots), int(n_ctx), int(n_threads), err, _ERRLEN
        )
        if ptr == ffi.NULL:
            raise EngineError(_errmsg(err, "cannot create context"))
        self._ptr = ptr
        self.model = model
        model._users += 1
        self.n_slots: int = lib.bn_context_n_slots(ptr)
        self.n_ctx: int = lib.bn_context_n_ctx(ptr)
        self.n_threads = int(n_threads)
        self._n_vocab = model.hparams.n_vocab
        self._entries = ffi.new("bn_batch_entry[]", self.n_slots)
        self._tok_cap = 0
        self._tok_buf: Any = None
        self._err = _errbuf()
        self._n_last = 0

    def _live(self) -> Any:
        if self._ptr is None:
            raise EngineError("context is closed")
        return self._ptr

    def forward(self, entries: Sequence[BatchEntry]) -> list[int]:
        """Run one step for every entry: status per entry (0 done, 1 cancelled).

        Raises EngineError (nothing applied) for a bad slot, token, logits mode or a full
        context.
        """
        ctx = self._live()
        n = len(entries)
        if n > self.n_slots:
            raise EngineError(f"{n} entries for {self.n_slots} slots: slots must be distinct")
        total = 0
        for e in entries:
            total += len(e.tokens)
        if total > self._tok_cap or self._tok_buf is None:
            self._tok_cap = max(total, 2 * self._tok_cap, 64)
            self._tok_buf = ffi.new("int32_t[]", self._tok_cap)
        buf = self._tok_buf
        c = self._entries
        off = 0
        for i, e in enumerate(entries):
            k = len(e.tokens)
            mode = _LOGITS_MODES.get(e.logits)
            if mode is None:
                raise EngineError(
                    f"entry {i}: logits must be one of {', '.join(_LOGITS_MODES)}, "
                    f"got {e.logits!r}"
                )
            ce = c[i]
            ce.slot = int(e.slot)
            ce.n_tokens = k
            if k:
                try:
                    buf[off : off + k] = e.tokens
                except (TypeError, OverflowError) as exc:
                    raise EngineError(f"entry {i}: bad token list: {exc}") from None
            ce.tokens = buf + off
            ce.logits = mode
            ce.cancel = e.cancel._ptr if e.cancel is not None else ffi.NULL
            ce.status = 0
            off += k
        self._n_last = 0
        if lib.bn_forward(ctx, c, n, self._err, _ERRLEN) != 0:
            raise EngineError(_errmsg(self._err, "forward failed"))
        self._n_last = n
        return [c[i].status for i in range(n)]

    def _logits_ptr(self, entry_index: int, token_index: int) -> Any:
        p = lib.bn_logits(self._live(), int(entry_index), int(token_index))
        if p == ffi.NULL:
            raise EngineError(
                f"no logits for entry {entry_index} token {token_index} "
                "(not requested, cancelled, or out of range)"
            )
        return p

    def logits(self, entry_index: int, token_index: int) -> np.ndarray:
        """Read-only float32 view of n_vocab logits, valid until the next forward."""
        p = self._logits_ptr(entry_index, token_index)
        arr = np.frombuffer(ffi.buffer(p, 4 * self._n_vocab), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def hidden(self, entry_index: int, token_index: int) -> np.ndarray:
        """Read-only float32 view of the n_embd final-norm hidden state (model-format
        §5.3.1) of an entry run with "hidden_last" or "hidden_all", valid until the next
        forward."""
        p = lib.bn_hidden(self._live(), int(entry_index), int(token_index))
        if p == ffi.NULL:
            raise EngineError(
                f"no hidden state for entry {entry_index} token {token_index} "
                "(not requested, cancelled, or out of range)"
            )
        arr = np.frombuffer(ffi.buffer(p, 4 * self.model.hparams.n_embd), dtype=np.float32)
        arr.flags.writeable = False
        return arr

    def sample(self, entry_index: int, sampler: Any, allowed: Any = None) -> int:
        """Sample from the entry's last logits in place (no copy); `allowed`: the constrained
        decoding bitset (`Sampler.sample`)."""
        hp = self._logits_ptr(entry_index, self._last_token(entry_index))
        if allowed is None:
            return int(sampler.sample(hp))
        return int(sampler.sample(hp, allowed))

    def _last_token(self, entry_index: int) -> int:
        if not 0 <= entry_index < self._n_last:
            raise EngineError(f"entry {entry_index} was not part of the last forward")
        return self._entries[entry_index].n_tokens - 1

    def reset(self, slot: int) -> None:
        """Forget a slot's tokens."""
        self._check_slot(slot)
        lib.bn_seq_reset(self._live(), int(slot))

    def truncate(self, slot: int, pos: int) -> None:
        """Keep the slot's first pos tokens (a common prefix), drop the rest."""
        self._check_slot(slot)
        if lib.bn_seq_truncate(self._live(), int(slot), int(pos)) != 0:
            raise EngineError(
                f"slot {slot}: cannot truncate to {pos} (position is {self.pos(slot)})"
            )

    def pos(self, slot: int) -> int:
        """Number of tokens in the slot's cache."""
        self._check_slot(slot)
        return int(lib.bn_seq_pos(self._live(), int(slot)))

    def _check_slot(self, slot: int) -> None:
        if not 0 <= slot < self.n_slots:
            raise EngineError(f"slot {slot} out of range 0..{self.n_slots - 1}")

    def set_threads(self, n: int) -> None:
        if lib.bn_context_set_threads(self._live(), int(n)) != 0:
            raise EngineError(f"cannot use {n} threads")
        self.n_threads = int(n)

    def close(self) -> None:
        if self._ptr is not None:
            lib.bn_context_free(self._ptr)
            self._ptr = None
            self.model._users -= 1
            self.model._maybe_free()


_select_lock = threading.Lock()


def kernel_name() -> str:
    """The kernel set in use: "scalar", "avx2", "avx512vnni" or "amx"."""
    return ffi.string(lib.bn_kernel_name()).decode()


def select_kernel(name: str) -> None:
    """Force a kernel set (tests, benchmarks); ValueError if this machine cannot run it."""
    with _select_lock:
        if lib.bn_kernel_select(name.encode()) != 0:
            raise ValueError(f"kernel {name!r} is not available on this machine")


def ternary_matmul(
    packed: bytes | np.ndarray,
    scale: float,
    n_in: int,
    n_out: int,
    x: np.ndarray,
    *,
    kernel: str | None = None,
    n_threads: int = 1,
) -> np.ndarray:
    """BitLinear of x (n_tok, n_in) with an I2_S matrix of n_out rows: (n_tok, n_out) float32."""
    codes = np.frombuffer(packed, dtype=np.uint8) if isinstance(packed, bytes) else packed
    codes = np.ascontiguousarray(codes, dtype=np.uint8)
    if codes.size < n_out * n_in // 4:
        raise ValueError("packed matrix too small")
    xa = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_in)
    y = np.empty((xa.shape[0], n_out), dtype=np.float32)
    rc = lib.bn_ternary_matmul(
        kernel.encode() if kernel else ffi.NULL,
        ffi.from_buffer("uint8_t[]", codes),
        float(scale),
        int(n_in),
        int(n_out),
        ffi.from_buffer("float[]", xa),
        xa.shape[0],
        ffi.from_buffer("float[]", y, require_writable=True),
        int(n_threads),
    )
    if rc != 0:
        raise EngineError("bn_ternary_matmul refused its arguments (kernel, shape or threads)")
    return y


def measure_read_bandwidth(
    n_bytes: int = 1 << 30, n_threads: int = 1, streams: int = 4, reps: int = 3
) -> float:
    """Best memory read bandwidth in GB/s over reps passes of a buffer of n_bytes."""
    v = lib.bn_measure_read_bandwidth(int(n_bytes), int(n_threads), int(streams), int(reps))
    if v <= 0:
        raise EngineError("bandwidth measurement failed (out of memory?)")
    return float(v)


class BandwidthProbe:
    """A read-bandwidth probe that keeps its buffer and threads, for interleaved passes."""

    def __init__(self, n_bytes: int = 1 << 30, n_threads: int = 1) -> None:
        raw = lib.bn_bwprobe_new(int(n_bytes), int(n_threads))
        if raw == ffi.NULL:
            raise EngineError(f"cannot set up a {n_bytes}-byte probe with {n_threads} threads")
        self._ptr = ffi.gc(raw, lib.bn_bwprobe_free)
        self.n_threads = int(n_threads)

    def run(self, streams: int = 8) -> float:
        """One pass over the buffer: GB/s."""
        v = lib.bn_bwprobe_run(self._ptr, int(streams))
        if v <= 0:
            raise EngineError("bandwidth probe failed")
        return float(v)

    def close(self) -> None:
        if self._ptr is not None:
            ffi.release(self._ptr)
            self._ptr = None


def _blocks_matmul(fmt: str, block: int, block_bytes: int, blocks: bytes | np.ndarray,
                   n_in: int, n_out: int, x: np.ndarray, kernel: str | None,
                   n_threads: int) -> np.ndarray:
    """x (n_tok, n_in) times n_out rows of n_in/block blocks of block_bytes through
    bn_<fmt>_matmul: (n_tok, n_out) float32."""
    data = np.frombuffer(blocks, dtype=np.uint8) if isinstance(blocks, bytes) else blocks
    data = np.ascontiguousarray(data, dtype=np.uint8)
    if n_in % block or data.size < n_out * n_in // block * block_bytes:
        raise ValueError(f"{fmt.upper()} matrix too small or n_in not a multiple of {block}")
    xa = np.ascontiguousarray(x, dtype=np.float32).reshape(-1, n_in)
    y = np.empty((xa.shape[0], n_out), dtype=np.float32)
    fn = getattr(lib, f"bn_{fmt}_matmul")
    if fn(kernel.encode() if kernel else ffi.NULL, ffi.from_buffer("uint8_t[]", data),
          int(n_in), int(n_out), ffi.from_buffer("float[]", xa), xa.shape[0],
          ffi.from_buffer("float[]", y, require_writable=True), int(n_threads)):
        raise EngineError(f"bn_{fmt}_matmul failed (kernel {kernel!r}, {n_in}x{n_out})")
    return y


def q2_0_matmul(
    blocks: bytes | np.ndarray,
    n_in: int,
    n_out: int,
    x: np.ndarray,
    *,
    kernel: str | None = None,
    n_threads: int = 1,
) -> np.ndarray:
    """x (n_tok, n_in) times a Q2_0 matrix of n_out rows (model-format §10.6), activations
    quantized per token: (n_tok, n_out) float32."""
    return _blocks_matmul("q2_0", 64, 18, blocks, n_in, n_out, x, kernel, n_threads)


def q8_0_matmul(
    blocks: bytes | np.ndarray,
    n_in: int,
    n_out: int,
    x: np.ndarray,
    *,
    kernel: str | None = None,
    n_threads: int = 1,
) -> np.ndarray:
    """x (n_tok, n_in) float, not quantized, times a Q8_0 matrix of n_out rows: the Q8_0 head
    product (model-format §5.3, §10.1.6), (n_tok, n_out) float32."""
    return _blocks_matmul("q8_0", 32, 34, blocks, n_in, n_out, x, kernel, n_threads)
