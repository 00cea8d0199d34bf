"""An independent numpy reference of the BitNet b1.58 forward pass, of the Llama graph
with I2_S projections (Falcon3-1.58bit and kin), and of the Qwen3 graph of the BitNet
embedding model (BitNet-embedding-0.6B).

Written from docs/spec/model-format.md only (model-format §1, §4 and §5; the Llama graph from
the published math as model-format §10.4 states it (from the families fact sheet): no sub-norms,
SiLU-gated FFN, RoPE on adjacent pairs, head_dim from rope.dimension_count), not from any
engine code: its own GGUF reader (a plain struct walk), its own I2_S decoder, and the forward
pass step by step as the spec lists it. The Qwen3 embedding graph is written from the
published math as the families fact sheet states it (model-families B.1 "Forward"): every
projection P computes x -> RMSNorm(x) * P_norm_in -> per-token int8 -> ternary matmul ->
* scale; per-head RMSNorm of q and k (attn_q_norm / attn_k_norm) before NeoX RoPE; SiLU gate;
no sub-norms; the output is RMSNorm(x) * output_norm, pooled at the last token and
L2-normalised.

Precision: activations are float32 wherever the spec says F32 (so that the int8 activation
quantization sees the same values an F32 engine sees, up to summation order); the ternary
dot products are exact integers; RoPE angles are computed in float64 and rounded to float32
once. The result is float32 logits for every position.

Rounding ties: per-token int8 quantization is discontinuous. An activation whose scaled value
x*s lies within ~1e-4 of a half-integer can round differently in two correct float32
implementations that merely sum in another order, and one such one-unit flip moves the logits
by up to ~2e-2 (relative) at its position and, through the KV cache, at later ones.
`match_engine` therefore explains a disagreement only by flipping such near-tie activations
(margin below `tau`), one at a time, and reports every flip it needed; the logits tolerance
itself is never relaxed.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

F32, F16, Q8_0, I2_S, Q2_0 = 0, 1, 8, 36, 42

# GGUF metadata value types (spec 1.2): struct format for the fixed-size ones.
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
            10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFFormatError(ValueError):
    pass


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]  # GGUF order: ne[0] contiguous
    ggml_type: int
    offset: int  # relative to the data section
    nbytes: int
    q2_0_block: int = 64  # type 42: 64 (mainline) or 128 (PrismML's 34-byte blocks)


@dataclass
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, int]
    array_types: dict[str, int]
    tensors: dict[str, TensorInfo]
    tensor_order: list[str]
    data_start: int
    raw: bytes = field(repr=False)

    def tensor_bytes(self, name: str) -> bytes:
        info = self.tensors[name]
        start = self.data_start + info.offset
        return self.raw[start:start + info.nbytes]


def tensor_nbytes(ne: tuple[int, ...], ggml_type: int) -> int:
    n = 1
    for d in ne:
        n *= d
    if ggml_type == F32:
        return 4 * n
    if ggml_type == F16:
        return 2 * n
    if ggml_type == I2_S:
        return n // 4 + 32
    if ggml_type == Q2_0:
        return n // 64 * 18
    if ggml_type == Q8_0:
        return n // 32 * 34
    raise GGUFFormatError(f"tensor type {ggml_type} not used by this model")


class _Cursor:
    def __init__(self, raw: bytes) -> None:
        self.raw, self.pos = raw, 0

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.raw):
            raise GGUFFormatError(f"truncated file at byte {self.pos} (wanted {n})")
        out = self.raw[self.pos:self.pos + n]
        self.pos += n
        return out

    def unpack(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("<Q")).decode("utf-8")

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("<I"), self.unpack("<Q")
            if etype in _SCALARS and etype != 7:
                dt = np.dtype(_SCALARS[etype])
                return np.frombuffer(self.take(dt.itemsize * count), dtype=dt).tolist()
            return [self.value(etype) for _ in range(count)]
        raise GGUFFormatError(f"unknown metadata value type {vtype}")


def read_gguf(path: str | Path, *, check_sizes: bool = True) -> GGUFFile:
    """Parse a GGUF v3 file (model-format §1), including type-36 (I2_S) tensors.
    check_sizes=False skips the per-tensor bounds check (for deliberately odd files)."""
    raw = Path(path).read_bytes()
    cur = _Cursor(raw)
    if cur.take(4) != b"GGUF":
        raise GGUFFormatError("bad magic")
    version = cur.unpack("<I")
    n_tensors, n_kv = cur.unpack("<Q"), cur.unpack("<Q")
    metadata: dict[str, Any] = {}
    types: dict[str, int] = {}
    array_types: dict[str, int] = {}
    for _ in range(n_kv):
        key = cur.string()
        vtype = cur.unpack("<I")
        if vtype == _ARRAY:
            array_types[key] = struct.unpack("<I", raw[cur.pos:cur.pos + 4])[0]
        metadata[key] = cur.value(vtype)
        types[key] = vtype
    tensors: dict[str, TensorInfo] = {}
    order: list[str] = []
    for _ in range(n_tensors):
        name = cur.string()
        n_dims = cur.unpack("<I")
        ne = tuple(cur.unpack("<Q") for _ in range(n_dims))
        gt = cur.unpack("<I")
        offset = cur.unpack("<Q")
        tensors[name] = TensorInfo(name, ne, gt, offset, tensor_nbytes(ne, gt))
        order.append(name)
    align = int(metadata.get("general.alignment", 32))
    data_start = (cur.pos + align - 1) // align * align
    _q2_0_layout(tensors, len(raw) - data_start, align)
    for info in tensors.values():
        if check_sizes and (info.offset % align
                            or data_start + info.offset + info.nbytes > len(raw)):
            raise GGUFFormatError(f"tensor {info.name}: bad offset or size")
    return GGUFFile(Path(path), version, metadata, types, array_types, tensors, order,
                    data_start, raw)


def _q2_0_layout(tensors: dict[str, TensorInfo], data_size: int, align: int) -> None:
    """Type 42's layout from the offsets (model-format §10.6.1): a tensor whose data cannot
    hold 18-byte blocks of 64 before the next tensor, but holds PrismML's 34-byte blocks of 128
    exactly (up to the alignment padding), marks the whole file as that layout."""
    offsets = sorted(info.offset for info in tensors.values())

    def room(info: TensorInfo) -> int:
        later = [o for o in offsets if o > info.offset]
        return (later[0] if later else data_size) - info.offset

    def g128(info: TensorInfo) -> int:
        return int(np.prod(info.ne)) // 128 * 34 if info.ne[0] % 128 == 0 else 0

    q2 = [i for i in tensors.values() if i.ggml_type == Q2_0]
    if any(i.nbytes > room(i) and 0 < g128(i) <= room(i) < g128(i) + align for i in q2):
        for info in q2:
            info.q2_0_block, info.nbytes = 128, g128(info)


def decode_i2s(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, np.float32]:
    """I2_S bytes -> (ternary int8 (rows, cols), scale), per model-format §4: element j of a
    128-element block sits in byte j mod 32 at shift 6 - 2*(j div 32); code c -> c - 1."""
    n = rows * cols
    codes = np.frombuffer(data, dtype=np.uint8, count=n // 4).reshape(n // 128, 32)
    block = np.empty((n // 128, 128), dtype=np.int8)
    for group in range(4):
        shift = 6 - 2 * group
        block[:, group * 32:(group + 1) * 32] = ((codes >> shift) & 3).astype(np.int8) - 1
    scale = np.frombuffer(data, dtype=np.float32, count=1, offset=n // 4)[0]
    return block.reshape(rows, cols), scale


def decode_q2_0(data: bytes, rows: int, cols: int, block: int = 64
                ) -> tuple[np.ndarray, np.ndarray]:
    """Q2_0 bytes -> (ternary-or-+2 int8 (rows, cols) = code - 1, scales float32 (rows,
    cols/64)), per the fact sheet (model-families C.1): blocks of `block` weights, an fp16 d
    then block/4 bytes, weight j of a block at bits 2*(j mod 4) of byte j div 4. block 64 is
    mainline Q2_0 (18 bytes); 128 is PrismML's layout (34 bytes), whose d is then the scale of
    both halves of 64."""
    size = 2 + block // 4
    blocks = np.frombuffer(data, dtype=np.uint8, count=rows * cols // block * size)
    blocks = blocks.reshape(rows, cols // block, size)
    d = np.frombuffer(blocks[..., :2].tobytes(), dtype="<f2").reshape(rows, cols // block)
    qs = blocks[..., 2:]
    vals = np.empty((rows, cols // block, block), dtype=np.int8)
    for j in range(block):
        vals[..., j] = ((qs[..., j // 4] >> (2 * (j % 4))) & 3).astype(np.int8) - 1
    return vals.reshape(rows, cols), np.repeat(d.astype(np.float32), block // 64, axis=1)


def decode_q8_0(data: bytes, rows: int, cols: int) -> np.ndarray:
    """Q8_0 bytes -> float32 (rows, cols), per ggml's type 8: blocks of 32 weights along a
    row, each 34 bytes, a little-endian fp16 scale d then 32 signed bytes q; weight = q * d
    (exact in float32)."""
    blocks = np.frombuffer(data, dtype=np.uint8, count=rows * cols // 32 * 34)
    blocks = blocks.reshape(rows, cols // 32, 34)
    d = np.frombuffer(blocks[..., :2].tobytes(), dtype="<f2").astype(np.float32)
    q = np.frombuffer(blocks[..., 2:].tobytes(), dtype=np.int8).astype(np.float32)
    return (q.reshape(rows, cols // 32, 32) * d.reshape(rows, cols // 32, 1)).reshape(rows, cols)


@dataclass(frozen=True)
class RopeScaling:
    """ARCH.rope.scaling.*: kind "none", "linear" or "yarn"; factor; the YaRN original
    context length and ramp betas; attn_factor (the file's, before YaRN's own magnitude)."""

    kind: str = "none"
    factor: float = 1.0
    orig_ctx: int = 0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attn_factor: float = 1.0

    @classmethod
    def from_metadata(cls, md: dict, arch: str) -> RopeScaling:
        """The keys as the YaRN paper's and llama.cpp's readers take them: an absent type
        with a factor is linear; the betas default to 32 and 1, attn_factor to 1."""
        def g(key: str, default: Any = None) -> Any:
            return md.get(f"{arch}.rope.scaling.{key}", default)

        factor = g("factor", md.get(f"{arch}.rope.scale_linear"))
        kind = g("type", "linear" if factor is not None else "none")
        return cls(kind=kind, factor=float(factor) if factor is not None else 1.0,
                   orig_ctx=int(g("original_context_length", 0)),
                   beta_fast=float(g("yarn_beta_fast", 32.0)),
                   beta_slow=float(g("yarn_beta_slow", 1.0)),
                   attn_factor=float(g("attn_factor", 1.0)))


@dataclass
class ReferenceWeights:
    arch: str
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_layer: int
    n_vocab: int
    rms_eps: float
    rope_base: float
    tensors: dict[str, np.ndarray]  # F32/F16/Q8_0 as float32, I2_S and Q2_0 as int8 code - 1
    scales: dict[str, np.float32]
    head_dim: int = 0  # D; 0 means n_embd // n_head
    #: per-64 scales of the Q2_0 tensors (rows, cols / 64) float32
    group_scales: dict[str, np.ndarray] = field(default_factory=dict)
    #: the file's RoPE scaling (model-format §5.2.3.1), RopeScaling() for none
    rope_scaling: RopeScaling = field(default_factory=lambda: RopeScaling())

    def __post_init__(self) -> None:
        if not self.head_dim:
            self.head_dim = self.n_embd // self.n_head

    @property
    def is_llama(self) -> bool:
        """The Llama graph: no sub-norms, SiLU gate, adjacent-pair RoPE."""
        return self.arch == "llama"

    @property
    def is_qwen3(self) -> bool:
        """The Qwen3 embedding graph: input norms, QK-norm, SiLU gate, NeoX RoPE."""
        return self.arch == "qwen3" and not self.is_bonsai

    @property
    def is_bonsai(self) -> bool:
        """Ternary Bonsai: the Qwen3 graph with Q2_0 weights and no input norms."""
        return self.arch == "qwen3" and "blk.0.attn_q.weight" in self.group_scales

    def dequantized(self, name: str) -> np.ndarray:
        """A Q2_0 matrix as float32 values (code - 1) * d."""
        t, d = self.tensors[name], self.group_scales[name]
        rows, cols = t.shape
        return (t.reshape(rows, cols // 64, 64) * d[..., None]).reshape(rows, cols)


def load_reference(path: str | Path) -> ReferenceWeights:
    f = read_gguf(path)
    md = f.metadata
    arch = md["general.architecture"]
    tensors: dict[str, np.ndarray] = {}
    scales: dict[str, np.float32] = {}
    group_scales: dict[str, np.ndarray] = {}
    for name, info in f.tensors.items():
        data = f.tensor_bytes(name)
        shape = tuple(reversed(info.ne))  # numpy order (rows, cols)
        if info.ggml_type == F32:
            tensors[name] = np.frombuffer(data, dtype=np.float32).reshape(shape)
        elif info.ggml_type == F16:
            tensors[name] = np.frombuffer(data, dtype=np.float16).reshape(shape).astype(np.float32)
        elif info.ggml_type == I2_S:
            tensors[name], scales[name] = decode_i2s(data, *shape)
        elif info.ggml_type == Q2_0:
            tensors[name], group_scales[name] = decode_q2_0(data, *shape, info.q2_0_block)
        elif info.ggml_type == Q8_0:  # the head and embedding: float weights, float products
            tensors[name] = decode_q8_0(data, *shape)
    n_embd, n_head = md[f"{arch}.embedding_length"], md[f"{arch}.attention.head_count"]
    head_dim = n_embd // n_head
    if arch in ("llama", "qwen3"):  # key_length when present, else rope.dimension_count, else E / H
        head_dim = md.get(f"{arch}.attention.key_length",
                          md.get(f"{arch}.rope.dimension_count", head_dim))
    return ReferenceWeights(
        head_dim=head_dim,
        arch=arch,
        n_embd=md[f"{arch}.embedding_length"],
        n_head=md[f"{arch}.attention.head_count"],
        n_head_kv=md[f"{arch}.attention.head_count_kv"],
        n_ff=md[f"{arch}.feed_forward_length"],
        n_layer=md[f"{arch}.block_count"],
        n_vocab=len(md["tokenizer.ggml.tokens"]),
        rms_eps=md[f"{arch}.attention.layer_norm_rms_epsilon"],
        rope_base=md[f"{arch}.rope.freq_base"],
        tensors=tensors,
        scales=scales,
        group_scales=group_scales,
        rope_scaling=RopeScaling.from_metadata(md, arch),
    )


def rms_norm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    """Per row: w_i * x_i / sqrt(mean(x^2) + eps), in float32."""
    ms = np.mean(x * x, axis=-1, keepdims=True, dtype=np.float32)
    return (x / np.sqrt(ms + np.float32(eps))) * w


def quantize_activations(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-token absmax int8 quantization: (q int32 (T, K), s float32 (T, 1))."""
    m = np.maximum(np.max(np.abs(x), axis=-1, keepdims=True), np.float32(1e-5))
    s = (np.float32(127.0) / m).astype(np.float32)
    q = np.clip(np.rint(x * s), -128, 127).astype(np.int64)  # rint: round half to even
    return q, s


def bitlinear(q: np.ndarray, s: np.ndarray, w: np.ndarray, scale: np.float32) -> np.ndarray:
    """y_r = (sum_i t_ri q_i) / s * scale. The dot products are integers below 2^24, so the
    float64 matrix product computes them exactly (and much faster than an int64 one)."""
    acc = q.astype(np.float64) @ w.T.astype(np.float64)
    return (acc.astype(np.float32) / s) * np.float32(scale)


#: The quantization points of a layer, in order.
QUANT_POINTS = ("attn_in", "attn_out", "ffn_in", "ffn_down")
#: The Qwen3 embedding graph quantizes each projection's own input.
QWEN3_QUANT_POINTS = ("q_in", "k_in", "v_in", "attn_out", "gate_in", "up_in", "ffn_down")


class Quantizer:
    """Per-token int8 quantization with two test hooks: `overrides` forces chosen int8 values
    {(layer, point, position, index): value}, and `trace` keeps x*s (the value that gets
    rounded) per (layer, point), so a caller can find activations sitting on a rounding
    boundary, where two correct float32 implementations may legitimately round apart."""

    def __init__(self, overrides: dict[tuple[int, str, int, int], int] | None = None,
                 trace: bool = False) -> None:
        self.overrides = dict(overrides or {})
        self.trace: dict[tuple[int, str], np.ndarray] | None = {} if trace else None

    def __call__(self, layer: int, point: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, s = quantize_activations(x)
        self.adjust(layer, point, q, x * s)
        return q, s

    def adjust(self, layer: int, point: str, q: np.ndarray, scaled: np.ndarray) -> None:
        """Record `scaled` (x*s, the values rounded into q) and apply the overrides to q in
        place; separate from __call__ so that another implementation's quantization (the
        Hugging Face one of test_hf_reference.py) can be traced and flipped the same way."""
        if self.trace is not None:
            self.trace[(layer, point)] = scaled
        for (lay, pt, pos, idx), value in self.overrides.items():
            if lay == layer and pt == point and pos < q.shape[0]:
                q[pos, idx] = value


def rope_angles(positions: np.ndarray, d: int, base: float,
                scaling: RopeScaling | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(T, D/2) angles and the magnitude that multiplies cos and sin, float64.

    Unscaled (model-format §5.2.3): theta = p * base^(-2i/D) for pair i. Linear: theta / factor.
    YaRN (the paper's "NTK-by-parts" with its attention temperature): a pair i whose
    wavelength 2 pi / base^(-2i/D) fits fewer than beta_slow times into the original context
    is interpolated (theta / factor), one that fits beta_fast times or more keeps theta, the
    ones between mix the two linearly in i; the pair index where the wavelength fits n times
    is D ln(L / (2 pi n)) / (2 ln base), taken floor (fast) and ceil (slow) and clipped to
    [0, D - 1]. cos and sin grow by 1 + 0.1 ln(factor), on top of attn_factor. Applied at
    every position, below the original context too (it is a change of the model's
    frequencies, not an extrapolation switch)."""
    sc = scaling or RopeScaling()
    i = np.arange(d // 2, dtype=np.float64)
    freq = base ** (-2.0 * i / d)
    if sc.kind == "linear":
        freq = freq / sc.factor
    elif sc.kind == "yarn":
        def pair_of(n_turns: float) -> float:
            return d * math.log(sc.orig_ctx / (2 * math.pi * n_turns)) / (2 * math.log(base))
        lo = max(0.0, math.floor(pair_of(sc.beta_fast)))
        hi = min(d - 1.0, math.ceil(pair_of(sc.beta_slow)))
        interp_share = np.clip((i - lo) / max(hi - lo, 1e-3), 0.0, 1.0)
        freq = freq / sc.factor * interp_share + freq * (1.0 - interp_share)
    elif sc.kind != "none":
        raise ValueError(f"RoPE scaling {sc.kind!r}")
    magnitude = sc.attn_factor * (1 + 0.1 * math.log(sc.factor) if sc.kind == "yarn" else 1.0)
    return positions.astype(np.float64)[:, None] * freq, magnitude


def rope(x: np.ndarray, positions: np.ndarray, base: float,
         pairing: Literal["neox", "interleaved"] = "neox",
         scaling: RopeScaling | None = None) -> np.ndarray:
    """Rotate every head of x (T, H, D). neox pairs (i, i + D/2); interleaved (2i, 2i+1)
    is the wrong pairing for this model, kept so tests can prove they tell them apart."""
    d = x.shape[-1]
    theta, magnitude = rope_angles(positions, d, base, scaling)  # (T, D/2)
    cos = (np.cos(theta) * magnitude).astype(np.float32)[:, None, :]
    sin = (np.sin(theta) * magnitude).astype(np.float32)[:, None, :]
    if pairing == "neox":
        a, b = x[..., : d // 2], x[..., d // 2:]
    else:
        a, b = x[..., 0::2], x[..., 1::2]
    ra, rb = a * cos - b * sin, a * sin + b * cos
    out = np.empty_like(x)
    if pairing == "neox":
        out[..., : d // 2], out[..., d // 2:] = ra, rb
    else:
        out[..., 0::2], out[..., 1::2] = ra, rb
    return out


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x) = x / (1 + exp(-x)), float32."""
    with np.errstate(over="ignore"):
        return (x / (np.float32(1) + np.exp(-x))).astype(np.float32)


def forward(weights: ReferenceWeights, tokens: list[int], *, start_pos: int = 0,
            rope_pairing: Literal["neox", "interleaved"] | None = None,
            quantizer: Quantizer | None = None, kv_f16: bool = False,
            output: Literal["logits", "hidden"] = "logits",
            skip_norm_in: bool = False, float_activations: bool = False,
            rope_scaling: RopeScaling | None = None) -> np.ndarray:
    """Logits (T, n_vocab) float32 for every position of one sequence starting at start_pos
    (no cache: start_pos only shifts RoPE positions; use 0 for a full prompt), or with
    output="hidden" the final-norm rows y (T, n_embd) the head would multiply.
    kv_f16 models an engine whose KV cache holds F16: k (after RoPE) and v rounded to F16.
    rope_pairing None: the model's own (BitNet and Qwen3 neox, Llama interleaved = adjacent
    pairs). skip_norm_in: leave out the Qwen3 input norms (a wrong model, for tests).
    Q2_0 weights (Bonsai): each product is sum over blocks g of (exact int sum of (code-1)*q
    over the block) * d_g, divided by s (the engine's arithmetic, model-format §10.6.2, here
    in float64); float_activations=True multiplies the float activations by the dequantized
    weights instead (the model's own math, for the accuracy bar of model-families C.2).
    rope_scaling: None for the file's (model-format §5.2.3.1); another one makes a wrong model
    for tests that must tell scalings apart."""
    if rope_pairing is None:
        rope_pairing = "interleaved" if weights.is_llama else "neox"
    llama, qwen = weights.is_llama, weights.is_qwen3
    W, S, G = weights.tensors, weights.scales, weights.group_scales
    eps = weights.rms_eps
    T = len(tokens)
    H, Hkv, D = weights.n_head, weights.n_head_kv, weights.head_dim
    group = H // Hkv
    positions = np.arange(start_pos, start_pos + T)
    if "token_embd.weight" in G:
        x = weights.dequantized("token_embd.weight")[np.asarray(tokens)]
    else:
        x = W["token_embd.weight"][np.asarray(tokens)].astype(np.float32)
    causal = np.triu(np.ones((T, T), dtype=bool), k=1)

    quant = quantizer or Quantizer()

    def q2_matmul(layer: int, point: str, inp: np.ndarray, name: str) -> np.ndarray:
        if float_activations:
            return (inp.astype(np.float64) @ weights.dequantized(name).T.astype(np.float64)
                    ).astype(np.float32)
        qi, si = quant(layer, point, inp)
        t, d = W[name], G[name]
        rows, cols = t.shape
        qg = qi.reshape(qi.shape[0], cols // 64, 64).astype(np.float64)
        tg = t.reshape(rows, cols // 64, 64).astype(np.float64)
        isum = np.einsum("tgk,rgk->trg", qg, tg)  # exact integers
        return ((isum * d[None].astype(np.float64)).sum(axis=-1) / si.astype(np.float64)
                ).astype(np.float32)

    def proj(layer: int, point: str, name: str, inp: np.ndarray) -> np.ndarray:
        """One Qwen3 projection: its own input norm, its own quantization, the matmul."""
        if not skip_norm_in:
            inp = rms_norm(inp, W[name + "_norm_in.weight"], eps)
        qi, si = quant(layer, point, inp)
        return bitlinear(qi, si, W[name + ".weight"], S[name + ".weight"])

    for layer in range(weights.n_layer):
        b = f"blk.{layer}."
        h = rms_norm(x, W[b + "attn_norm.weight"], eps)
        if weights.is_bonsai:
            q = q2_matmul(layer, "attn_in", h, b + "attn_q.weight").reshape(T, H, D)
            k = q2_matmul(layer, "attn_in", h, b + "attn_k.weight").reshape(T, Hkv, D)
            v = q2_matmul(layer, "attn_in", h, b + "attn_v.weight").reshape(T, Hkv, D)
            q = rms_norm(q, W[b + "attn_q_norm.weight"], eps)
            k = rms_norm(k, W[b + "attn_k_norm.weight"], eps)
        elif qwen:
            q = proj(layer, "q_in", b + "attn_q", h).reshape(T, H, D)
            k = proj(layer, "k_in", b + "attn_k", h).reshape(T, Hkv, D)
            v = proj(layer, "v_in", b + "attn_v", h).reshape(T, Hkv, D)
            q = rms_norm(q, W[b + "attn_q_norm.weight"], eps)  # per head, over D
            k = rms_norm(k, W[b + "attn_k_norm.weight"], eps)
        else:
            qh, sh = quant(layer, "attn_in", h)
            q = bitlinear(qh, sh, W[b + "attn_q.weight"], S[b + "attn_q.weight"])
            k = bitlinear(qh, sh, W[b + "attn_k.weight"], S[b + "attn_k.weight"])
            v = bitlinear(qh, sh, W[b + "attn_v.weight"], S[b + "attn_v.weight"])
            q, k, v = q.reshape(T, H, D), k.reshape(T, Hkv, D), v.reshape(T, Hkv, D)
        scaling = weights.rope_scaling if rope_scaling is None else rope_scaling
        q = rope(q, positions, weights.rope_base, rope_pairing, scaling)
        k = rope(k, positions, weights.rope_base, rope_pairing, scaling)
        if kv_f16:
            k = k.astype(np.float16).astype(np.float32)
            v = v.astype(np.float16).astype(np.float32)
        heads = np.empty((T, H, D), dtype=np.float32)
        inv = np.float32(1.0 / np.sqrt(D))
        for hh in range(H):
            kv = hh // group
            scores = (q[:, hh, :] @ k[:, kv, :].T) * inv  # (T, T)
            scores[causal] = -np.inf
            scores = scores - scores.max(axis=-1, keepdims=True)
            p = np.exp(scores)
            p = p / p.sum(axis=-1, keepdims=True)
            heads[:, hh, :] = p @ v[:, kv, :]
        a = heads.reshape(T, H * D)
        if weights.is_bonsai:
            x = x + q2_matmul(layer, "attn_out", a, b + "attn_output.weight")
        elif qwen:
            x = x + proj(layer, "attn_out", b + "attn_output", a)
        else:
            if not llama:
                a = rms_norm(a, W[b + "attn_sub_norm.weight"], eps)
            qa, sa = quant(layer, "attn_out", a)
            x = x + bitlinear(qa, sa, W[b + "attn_output.weight"], S[b + "attn_output.weight"])
        h = rms_norm(x, W[b + "ffn_norm.weight"], eps)
        if weights.is_bonsai:
            g = q2_matmul(layer, "ffn_in", h, b + "ffn_gate.weight")
            u = q2_matmul(layer, "ffn_in", h, b + "ffn_up.weight")
        elif qwen:
            g = proj(layer, "gate_in", b + "ffn_gate", h)
            u = proj(layer, "up_in", b + "ffn_up", h)
        else:
            qh, sh = quant(layer, "ffn_in", h)
            g = bitlinear(qh, sh, W[b + "ffn_gate.weight"], S[b + "ffn_gate.weight"])
            u = bitlinear(qh, sh, W[b + "ffn_up.weight"], S[b + "ffn_up.weight"])
        if llama or qwen or weights.is_bonsai:
            f = silu(g) * u
        else:
            f = np.square(np.maximum(g, np.float32(0))) * u
            f = rms_norm(f, W[b + "ffn_sub_norm.weight"], eps)
        if weights.is_bonsai:
            x = x + q2_matmul(layer, "ffn_down", f, b + "ffn_down.weight")
        elif qwen:
            x = x + proj(layer, "ffn_down", b + "ffn_down", f)
        else:
            qf, sf = quant(layer, "ffn_down", f)
            x = x + bitlinear(qf, sf, W[b + "ffn_down.weight"], S[b + "ffn_down.weight"])
    y = rms_norm(x, W["output_norm.weight"], eps)
    if output == "hidden":
        return y.astype(np.float32)
    head_name = "output.weight" if "output.weight" in W else "token_embd.weight"
    if head_name in G:  # a Q2_0 head: y quantized per token too (model-format §10.6.3)
        return q2_matmul(weights.n_layer, "head", y, head_name)
    return (y @ W[head_name].T).astype(np.float32)


def pooled_embedding(y: np.ndarray, pooling: Literal["last", "mean", "cls"] = "last"
                     ) -> np.ndarray:
    """The embedding of a sequence's final-norm rows y (T, E): the last row (the model's
    definition), or the mean or first one, L2-normalised (float64, returned as float32)."""
    rows = y.astype(np.float64)
    v = rows[-1] if pooling == "last" else rows[0] if pooling == "cls" else rows.mean(axis=0)
    return (v / np.linalg.norm(v)).astype(np.float32)


def rel_errors(got: np.ndarray, want: np.ndarray) -> np.ndarray:
    """Per position: max_i |got_i - want_i| / max_i |want_i|."""
    return np.abs(got - want).max(axis=-1) / np.abs(want).max(axis=-1)


@dataclass
class Match:
    errors: np.ndarray  # per position, against the reference with the accepted flips
    raw_errors: np.ndarray  # per position, against the plain reference
    flips: list[tuple[int, str, int, int, float]]  # (layer, point, position, index, margin)
    failed_at: int | None = None
    #: the accepted flips as Quantizer overrides, to rerun the reference with them
    overrides: dict[tuple[int, str, int, int], int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.failed_at is None


def match_engine(weights: ReferenceWeights, tokens: list[int], got: np.ndarray, *,
                 tol: float = 1e-3, tau: float = 1e-3, max_flips: int = 8,
                 max_candidates: int = 48, max_pair_candidates: int = 10,
                 kv_f16: bool = False) -> Match:
    """Compare engine logits `got` (T, n_vocab) with the reference at every position.

    While some position t is off by tol or more, look for one activation at a position <= t
    whose scaled value is within tau of a rounding boundary and whose opposite rounding makes
    every position <= t agree within tol; accept it and go on. Fails when no such near-tie
    explains the disagreement or when more than max_flips would be needed."""
    def run(n: int, quantizer: Quantizer) -> np.ndarray:
        return forward(weights, tokens[:n], quantizer=quantizer, kv_f16=kv_f16)

    return match_rows(run, got, tol=tol, tau=tau, max_flips=max_flips,
                      max_candidates=max_candidates, max_pair_candidates=max_pair_candidates)


def match_rows(run: Callable[[int, Quantizer], np.ndarray], got: np.ndarray, *,
               tol: float = 1e-3, tau: float = 1e-3, max_flips: int = 8,
               max_candidates: int = 48, max_pair_candidates: int = 10) -> Match:
    """match_engine against any implementation that quantizes through a Quantizer:
    run(n, quantizer) returns its rows for the first n tokens of the sequence (n = len(got)
    for all of them)."""
    n_all = len(got)
    overrides: dict[tuple[int, str, int, int], int] = {}
    flips: list[tuple[int, str, int, int, float]] = []
    raw: np.ndarray | None = None
    while True:
        quant = Quantizer(overrides, trace=True)
        err = rel_errors(got, run(n_all, quant))
        if raw is None:
            raw = err
        bad = np.nonzero(err >= tol)[0]
        if bad.size == 0:
            return Match(err, raw, flips, overrides=overrides)
        t = int(bad[0])
        if len(flips) >= max_flips:
            return Match(err, raw, flips, failed_at=t)
        assert quant.trace is not None
        candidates = []
        for (layer, point), xs in quant.trace.items():
            rows = xs[: t + 1]
            margin = np.abs(rows % 1.0 - 0.5)
            for pos, idx in zip(*np.nonzero(margin < tau)):
                key = (layer, point, int(pos), int(idx))
                if key in overrides:
                    continue
                v = float(rows[pos, idx])
                r = float(np.rint(v))
                alt = int(np.clip(r + 1 if v > r else r - 1, -128, 127))
                candidates.append((float(margin[pos, idx]), t - int(pos), key, alt))
        candidates.sort()
        accepted = None
        partial = None  # two flips may be needed at one position: take the best first
        for margin_value, _, key, alt in candidates[:max_candidates]:
            trial = dict(overrides)
            trial[key] = alt
            e = rel_errors(got[: t + 1], run(t + 1, Quantizer(trial)))
            if e.max() < tol:
                accepted = (key, alt, margin_value)
                break
            if e[:t].max(initial=0.0) < tol and e[t] < err[t] / 1.5 and (
                    partial is None or e[t] < partial[0]):
                partial = (float(e[t]), (key, alt, margin_value))
        if accepted is None and partial is not None:
            accepted = partial[1]
        if accepted is None:
            # Two flips at once (e.g. at the same position): try pairs of the closest ties.
            best = candidates[:max_pair_candidates]
            for i, (m1, _, key1, alt1) in enumerate(best):
                for m2, _, key2, alt2 in best[i + 1:]:
                    trial = dict(overrides)
                    trial[key1], trial[key2] = alt1, alt2
                    e = rel_errors(got[: t + 1], run(t + 1, Quantizer(trial)))
                    if e.max() < tol:
                        overrides.update(trial)
                        flips += [(*key1, m1), (*key2, m2)]
                        break
                else:
                    continue
                break
            else:
                return Match(err, raw, flips, failed_at=t)
            continue
        key, alt, margin_value = accepted
        overrides[key] = alt
        flips.append((*key, margin_value))
