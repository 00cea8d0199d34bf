"""The project's one GGUF writer: BitNet b1.58 models in the official I2_S layout,
Llama-graph I2_S models (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58) in the layout of
bitnet.cpp's converter + llama-quantize, and Qwen3-graph I2_S embedding models
(BitNet-embedding-0.6B) in the layout of bitnet.cpp's embedding converter.

Tests, benchmarks and the demo model all come from here. The layout (metadata keys, tensor
names, shapes and types, I2_S packing) follows model-format §1-§4 and §8, and §10.4 for the
Llama graph (`ModelShape.architecture = "llama"`).
Weights are random but deterministic per (seed, tensor name); `random_weights` returns exactly
what `write_model` writes, so an independent reference forward pass can use the same numbers.
The vocabularies (tiny and Llama-3) come from `bitnetd_trio.engine.vocab`.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bitnetd_trio.engine.vocab import (
    LLAMA3_N_VOCAB,
    TINY_VOCAB_SIZE,
    Vocab,
    cache_dir,
    get_vocab,
    llama3_vocab,
    replaced_atomically,
)

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_I2_S = 36
GGML_TYPE_Q2_0 = 42
FILE_TYPE_MOSTLY_I2_S = 40
#: ggml's GGML_FTYPE_MOSTLY_Q2_0, which the fact sheet's reference writes (the value in real
#: Bonsai files is not confirmed)
FILE_TYPE_MOSTLY_Q2_0 = 28


#: The placeholder template that bitnet.cpp's converter stores in the official file
#: (the two-character sequences backslash-n are inside a Jinja string literal, as in the file).
OFFICIAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'Human: ' + message['content'] + '\\n\\nBITNETAssistant: ' + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

#: The Falcon3 instruct chat format (model-format §10.4.4), written here as Jinja from its
#: description: `<|system|>\n...\n<|user|>\n...\n<|assistant|>\n...<eos>\n`.
FALCON3_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\n' + message['content'] + '\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '<|assistant|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

#: A Llama-3 instruct chat format (headers and <|eot_id|>), for Llama-graph test models with
#: the tiny (Llama-3 specials) vocabulary.
LLAMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] + '<|eot_id|>' }}{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

#: Architectures whose graph is the Llama one (model-format §10.4).
LLAMA_ARCHS = ("llama",)
#: The Qwen3 graph with I2_S projections and input norms (model-format §10.5).
QWEN3_ARCHS = ("qwen3",)
#: llama.cpp's ARCH.pooling_type numbers (model-format §10.5.4)
POOLING_MEAN, POOLING_CLS, POOLING_LAST = 1, 2, 3

#: Bump when the demo model's content changes, so stale cached files are not reused.
DEMO_MODEL_VERSION = "demo-v2"

@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a model: BitNet b1.58 (the default architecture) or the Llama
    graph with I2_S projections (architecture "llama", model-format §10.4)."""

    n_vocab: int
    n_embd: int
    n_head: int
    n_head_kv: int
    n_ff: int
    n_layer: int
    n_ctx: int
    rope_base: float = 500000.0
    rms_eps: float = 1e-5
    architecture: str = "bitnet-b1.58"
    #: the head dimension when it differs from n_embd / n_head (Llama and Qwen3 graphs);
    #: written as rope.dimension_count (and for Qwen3 also as key_length / value_length), as
    #: the converters do
    n_head_dim: int | None = None
    #: ARCH.pooling_type of a Qwen3 embedding file (model-format §10.5.4); None: not written
    pooling_type: int | None = None
    #: the weight format of a Qwen3 file: "i2_s" (the BitNet embedding graph, §10.5) or
    #: "q2_0" (Ternary Bonsai, §10.6: no input norms, F32 norms, Q2_0 weights)
    weight_format: str = "i2_s"

    @property
    def is_bonsai(self) -> bool:
        return self.is_qwen3 and self.weight_format == "q2_0"

    @property
    def is_llama(self) -> bool:
        return self.architecture in LLAMA_ARCHS

    @property
    def is_qwen3(self) -> bool:
        return self.architecture in QWEN3_ARCHS

    @property
    def head_dim(self) -> int:
        return self.n_head_dim if self.n_head_dim is not None else self.n_embd // self.n_head

    @property
    def q_dim(self) -> int:
        """Width of the queries and of the attention output: n_head * head_dim."""
        return self.head_dim * self.n_head

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_head_kv

    def validate(self) -> None:
        """Raise ValueError for a shape the official layout cannot express."""
        if self.n_head % self.n_head_kv:
            raise ValueError(f"heads do not divide evenly: {self}")
        if self.n_head_dim is None and self.n_embd % self.n_head:
            raise ValueError(f"heads do not divide evenly: {self}")
        if self.n_head_dim is not None and not (self.is_llama or self.is_qwen3):
            raise ValueError("n_head_dim is for the Llama and Qwen3 graphs (BitNet: D = E / H)")
        if self.weight_format not in ("i2_s", "q2_0") or (
                self.weight_format == "q2_0" and not self.is_qwen3):
            raise ValueError(f"weight format {self.weight_format!r}: Q2_0 is for qwen3 only")
        for name, k in (("n_embd", self.n_embd), ("n_ff", self.n_ff),
                        ("n_head * head_dim", self.q_dim)):
            if k % 128:
                raise ValueError(f"{name}={k} must be a multiple of 128 (I2_S blocks)")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")


TINY = ModelShape(n_vocab=TINY_VOCAB_SIZE, n_embd=256, n_head=4, n_head_kv=2, n_ff=384,
                  n_layer=2, n_ctx=256)
SMALLEST = ModelShape(n_vocab=TINY_VOCAB_SIZE, n_embd=128, n_head=2, n_head_kv=1, n_ff=256,
                      n_layer=2, n_ctx=256)
FULL_2B4T = ModelShape(n_vocab=LLAMA3_N_VOCAB, n_embd=2560, n_head=20, n_head_kv=5, n_ff=6912,
                       n_layer=30, n_ctx=4096)
DEMO = dataclasses.replace(TINY, n_ctx=512)
#: The Llama graph at TINY's size, with Falcon3's RoPE base and eps (model-format §10.4).
TINY_LLAMA = dataclasses.replace(TINY, architecture="llama", rope_base=1000042.0, rms_eps=1e-6)
#: Falcon3-1B-Instruct-1.58bit and Falcon3-10B-Instruct-1.58bit shapes (model-families A.2).
FALCON3_1B = ModelShape(n_vocab=131072, n_embd=2048, n_head=8, n_head_kv=4, n_ff=8192,
                        n_layer=18, n_ctx=8192, rope_base=1000042.0, rms_eps=1e-6,
                        architecture="llama", n_head_dim=256)
FALCON3_10B = ModelShape(n_vocab=131072, n_embd=3072, n_head=12, n_head_kv=4, n_ff=23040,
                         n_layer=40, n_ctx=32768, rope_base=1000042.0, rms_eps=1e-6,
                         architecture="llama", n_head_dim=256)

#: The BitNet embedding graph (Qwen3, I2_S, input norms; model-format §10.5) at TINY's
#: width, with a head dimension (128) that differs from E / H (64) as in the real model.
TINY_QWEN3_EMBED = ModelShape(n_vocab=TINY_VOCAB_SIZE, n_embd=256, n_head=4, n_head_kv=2,
                              n_ff=384, n_layer=2, n_ctx=256, rope_base=1000000.0,
                              rms_eps=1e-6, architecture="qwen3", n_head_dim=128,
                              pooling_type=POOLING_LAST)
#: BitNet-embedding-0.6B's shape (model-families B.1; the context length is Qwen3-0.6B's
#: 32768, not confirmed for this model).
#: Ternary Bonsai (Qwen3 with Q2_0 weights, model-format §10.6) at TINY's width.
TINY_BONSAI = dataclasses.replace(TINY_QWEN3_EMBED, pooling_type=None, weight_format="q2_0")
#: Bonsai-8B's shape: the Qwen3-8B geometry, untied Q2_0 head (model-families C.1).
BONSAI_8B = ModelShape(n_vocab=151936, n_embd=4096, n_head=32, n_head_kv=8, n_ff=12288,
                       n_layer=36, n_ctx=40960, rope_base=1000000.0, rms_eps=1e-6,
                       architecture="qwen3", n_head_dim=128, weight_format="q2_0")
BITNET_EMBED_06B = ModelShape(n_vocab=151936, n_embd=1024, n_head=16, n_head_kv=8,
                              n_ff=3072, n_layer=28, n_ctx=32768, rope_base=1000000.0,
                              rms_eps=1e-6, architecture="qwen3", n_head_dim=128,
                              pooling_type=POOLING_LAST)

PRESETS: dict[str, ModelShape] = {"tiny": TINY, "smallest": SMALLEST, "full": FULL_2B4T,
                                  "demo": DEMO, "tiny-llama": TINY_LLAMA,
                                  "falcon3-1b": FALCON3_1B, "falcon3-10b": FALCON3_10B,
                                  "tiny-qwen3-embed": TINY_QWEN3_EMBED,
                                  "bitnet-embed-0.6b": BITNET_EMBED_06B,
                                  "tiny-bonsai": TINY_BONSAI, "bonsai-8b": BONSAI_8B}


# --------------------------------------------------------------------------------------------
# I2_S packing


def pack_i2s(t: np.ndarray, scale: float = 1.0) -> bytes:
    """Pack a (rows, cols) ternary matrix in the x86 I2_S layout: codes, f32 scale, 28 zeros."""
    t = np.asarray(t)
    if t.ndim != 2 or t.size % 128 or t.shape[1] % 128:
        raise ValueError(f"I2_S needs a 2-D matrix with cols a multiple of 128, got {t.shape}")
    if not np.isin(t, (-1, 0, 1)).all():
        raise ValueError("I2_S values must be -1, 0 or 1")
    c = (t.astype(np.int16) + 1).astype(np.uint8).reshape(-1, 4, 32)
    codes = (c[:, 0] << 6) | (c[:, 1] << 4) | (c[:, 2] << 2) | c[:, 3]
    return codes.tobytes() + np.float32(scale).tobytes() + bytes(28)


def unpack_i2s(data: bytes | np.ndarray, rows: int, cols: int) -> tuple[np.ndarray, np.float32]:
    """Inverse of pack_i2s: (ternary int8 (rows, cols), scale)."""
    n = rows * cols
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, bytes) else data.view(np.uint8)
    if buf.size < n // 4 + 4:
        raise ValueError(f"I2_S data too short: {buf.size} bytes for {rows}x{cols}")
    codes = buf[: n // 4].reshape(-1, 32)
    planes = [(codes >> shift) & 3 for shift in (6, 4, 2, 0)]
    t = np.stack(planes, axis=1).reshape(rows, cols).astype(np.int8) - 1
    scale = np.frombuffer(buf[n // 4: n // 4 + 4].tobytes(), dtype=np.float32)[0]
    return t.astype(np.int8), scale


def pack_q2_0(codes: np.ndarray, d: np.ndarray) -> bytes:
    """Q2_0 (model-format §10.6.1): codes (rows, cols) in 0..3 and F16 scales d (rows,
    cols/64) -> 18-byte blocks: d, then 16 bytes, weight j at bits 2*(j%4) of byte j/4."""
    c = np.asarray(codes, dtype=np.uint8)
    rows, cols = c.shape
    if cols % 64 or c.max(initial=0) > 3:
        raise ValueError("Q2_0 needs cols a multiple of 64 and codes 0..3")
    c4 = c.reshape(rows, cols // 64, 16, 4)
    qs = c4[..., 0] | (c4[..., 1] << 2) | (c4[..., 2] << 4) | (c4[..., 3] << 6)
    dd = np.asarray(d, dtype=np.float16).reshape(rows, cols // 64, 1).view(np.uint8)
    return np.concatenate([dd, qs.astype(np.uint8)], axis=2).tobytes()


def unpack_q2_0(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_q2_0: (codes uint8 (rows, cols), d float16 (rows, cols/64))."""
    b = np.frombuffer(data, dtype=np.uint8, count=rows * cols // 64 * 18)
    b = b.reshape(rows, cols // 64, 18)
    d = b[..., :2].copy().view(np.float16).reshape(rows, cols // 64)
    qs = b[..., 2:]
    codes = np.stack([(qs >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(rows, cols)
    return codes.astype(np.uint8), d


def _valid_code_bytes() -> np.ndarray:
    """The 81 byte values whose four 2-bit fields are all in {0, 1, 2}."""
    return np.array([b for b in range(256) if all(((b >> s) & 3) != 3 for s in (0, 2, 4, 6))],
                    dtype=np.uint8)


_CODE_BYTES = _valid_code_bytes()


# --------------------------------------------------------------------------------------------
# Random weights


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) = (ne1, ne0)
    ggml_type: int

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        return {GGML_TYPE_F32: 4 * n, GGML_TYPE_F16: 2 * n,
                GGML_TYPE_Q2_0: n // 64 * 18}.get(self.ggml_type, n // 4 + 32)


def tensor_layout(shape: ModelShape, *, tie_head: bool | None = None) -> list[TensorSpec]:
    """Tensor names, numpy shapes and types of the official layout (model-format §3; the
    Llama graph: §10.4.3, no sub-norms, untied head by default; the Qwen3 embedding graph:
    §10.5.3, QK-norms and input norms, every norm F16, tied head by default)."""
    e, f, kv, qd, d = shape.n_embd, shape.n_ff, shape.kv_dim, shape.q_dim, shape.head_dim
    if tie_head is None:
        tie_head = not shape.is_llama
    qwen, bonsai = shape.is_qwen3, shape.is_bonsai
    norm_t = GGML_TYPE_F16 if qwen and not bonsai else GGML_TYPE_F32
    wt = GGML_TYPE_Q2_0 if bonsai else GGML_TYPE_I2_S
    # Bonsai's token_embd and head are Q2_0 too (model-families C.1)
    et = GGML_TYPE_Q2_0 if bonsai else GGML_TYPE_F16
    specs = [TensorSpec("token_embd.weight", (shape.n_vocab, e), et)]

    def proj(name: str, rows: int, cols: int) -> list[TensorSpec]:
        """A projection, after its input norm when the graph has them."""
        out = ([TensorSpec(name + "_norm_in.weight", (cols,), norm_t)]
               if qwen and not bonsai else [])
        return out + [TensorSpec(name + ".weight", (rows, cols), wt)]

    for i in range(shape.n_layer):
        b = f"blk.{i}."
        specs.append(TensorSpec(b + "attn_norm.weight", (e,), norm_t))
        specs += proj(b + "attn_q", qd, e) + proj(b + "attn_k", kv, e) + proj(b + "attn_v", kv, e)
        if qwen:
            specs += [TensorSpec(b + "attn_q_norm.weight", (d,), norm_t),
                      TensorSpec(b + "attn_k_norm.weight", (d,), norm_t)]
        if not (shape.is_llama or qwen):
            specs.append(TensorSpec(b + "attn_sub_norm.weight", (qd,), GGML_TYPE_F32))
        specs += proj(b + "attn_output", e, qd)
        specs.append(TensorSpec(b + "ffn_norm.weight", (e,), norm_t))
        specs += proj(b + "ffn_gate", f, e) + proj(b + "ffn_up", f, e)
        if not (shape.is_llama or qwen):
            specs.append(TensorSpec(b + "ffn_sub_norm.weight", (f,), GGML_TYPE_F32))
        specs += proj(b + "ffn_down", e, f)
    specs.append(TensorSpec("output_norm.weight", (e,), norm_t))
    if not tie_head:
        specs.append(TensorSpec("output.weight", (shape.n_vocab, e), et))
    return specs


def is_norm(name: str) -> bool:
    """A norm weight vector (F32, or F16 in the Qwen3 embedding graph)."""
    return name.endswith(("norm.weight", "norm_in.weight"))


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _f16_normal(rng: np.random.Generator, shape: tuple[int, ...], std: float) -> np.ndarray:
    out = np.empty(shape, dtype=np.float16)
    flat = out.reshape(-1)
    chunk = 1 << 24
    for start in range(0, flat.size, chunk):
        n = min(chunk, flat.size - start)
        flat[start:start + n] = rng.standard_normal(n, dtype=np.float32) * np.float32(std)
    return out


def _generate(spec: TensorSpec, seed: int) -> np.ndarray | tuple[bytes, np.float32]:
    """One tensor's data: an array for F32/F16, (packed codes without scale, scale) for I2_S."""
    rng = _rng(seed, spec.name)
    if spec.ggml_type == GGML_TYPE_F16 and is_norm(spec.name):
        return rng.uniform(0.8, 1.2, size=spec.shape).astype(np.float16)
    if spec.ggml_type == GGML_TYPE_F16:
        return _f16_normal(rng, spec.shape, 0.05)
    if spec.ggml_type == GGML_TYPE_F32:
        return rng.uniform(0.8, 1.2, size=spec.shape).astype(np.float32)
    if spec.ggml_type == GGML_TYPE_Q2_0:
        rows, k = spec.shape
        # mostly ternary codes, a few 3s (+2, legal though never produced from ternary input)
        codes = rng.choice(4, size=(rows, k), p=[0.33, 0.33, 0.32, 0.02]).astype(np.uint8)
        if spec.name == "token_embd.weight" or spec.name == "output.weight":
            d = rng.uniform(0.03, 0.08, size=(rows, k // 64))
        else:  # as the I2_S scale below: outputs at the size of the inputs
            d = rng.uniform(0.5, 1.5, size=(rows, k // 64)) * np.sqrt(1.5 / k)
        return pack_q2_0(codes, d.astype(np.float16))
    n = int(np.prod(spec.shape))
    codes = _CODE_BYTES[rng.integers(0, len(_CODE_BYTES), size=n // 4, dtype=np.uint8)]
    # A ternary row with uniform codes has norm sqrt(2K/3); this scale (of order 1 times
    # 1/sqrt(K)) keeps every projection's outputs at the size of its inputs, so activations
    # stay O(1) through any depth and attention scores are O(1): with larger scales softmax
    # degenerates to an argmax and a comparison against a reference could not see attention.
    k = spec.shape[1]
    scale = np.float32(rng.uniform(0.5, 1.5) * np.sqrt(1.5 / k))
    return codes.tobytes(), scale


def random_weights(shape: ModelShape, seed: int = 0, *, tie_head: bool | None = None
                   ) -> dict[str, np.ndarray]:
    """The weights write_model writes: F16/F32 arrays, ternary int8 (rows, cols) arrays for
    I2_S tensors, and each I2_S tensor's scale under '<name>.scale' (np.float32 0-d array)."""
    shape.validate()
    out: dict[str, np.ndarray] = {}
    for spec in tensor_layout(shape, tie_head=tie_head):
        data = _generate(spec, seed)
        if spec.ggml_type == GGML_TYPE_I2_S:
            codes, scale = data  # type: ignore[misc]
            t, _ = unpack_i2s(codes + scale.tobytes(), *spec.shape)
            out[spec.name] = t
            out[spec.name + ".scale"] = np.asarray(scale, dtype=np.float32)
        elif spec.ggml_type == GGML_TYPE_Q2_0:
            c, d = unpack_q2_0(data, *spec.shape)  # type: ignore[arg-type]
            out[spec.name] = c.astype(np.int8) - 1
            out[spec.name + ".d"] = d
        else:
            out[spec.name] = data  # type: ignore[assignment]
    return out


# --------------------------------------------------------------------------------------------
# Writing


@dataclass(frozen=True)
class RawTensor:
    """A tensor written verbatim: data bytes, numpy-order shape, ggml type id (for tests of
    malformed or unusual files)."""

    data: bytes
    shape: tuple[int, ...]
    ggml_type: int


#: The key order of the official BitNet file (model-format §2.2): "ARCH." stands for the
#: architecture prefix; tokenizer.ggml.pre (not in the official file) goes before the tokens.
_BITNET_KEYS = (
    "general.architecture", "general.name", "ARCH.vocab_size", "ARCH.context_length",
    "ARCH.embedding_length", "ARCH.block_count", "ARCH.feed_forward_length",
    "ARCH.rope.dimension_count", "ARCH.attention.head_count", "ARCH.attention.head_count_kv",
    "tokenizer.ggml.add_bos_token", "ARCH.attention.layer_norm_rms_epsilon",
    "ARCH.rope.freq_base", "general.file_type", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.scores", "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
    "general.quantization_version",
)

#: The keys bitnet.cpp's converter (LlamaModel, gpt2 vocabulary) and llama-quantize write for
#: the Llama graph (model-format §10.4.3): integers u32, the two floats f32, no key_length, no
#: scores. The exact order of the real files is not known; this one follows the converter's
#: code path (general, hyper-parameters, file type, vocabulary, tokenizer).
_LLAMA_KEYS = (
    "general.architecture", "general.name", "ARCH.block_count", "ARCH.context_length",
    "ARCH.embedding_length", "ARCH.feed_forward_length", "ARCH.attention.head_count",
    "ARCH.attention.head_count_kv", "ARCH.rope.freq_base",
    "ARCH.attention.layer_norm_rms_epsilon", "general.file_type", "ARCH.vocab_size",
    "ARCH.rope.dimension_count", "tokenizer.ggml.model", "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.chat_template",
    "general.quantization_version",
)


#: The keys bitnet.cpp's embedding converter writes for the Qwen3 graph (model-format
#: §10.5.3): the three head-dimension keys, pooling_type, the tokenizer with EOS forced to
#: <|endoftext|> and add_eos_token; no general.quantization_version, no chat template. The
#: exact order of the real file is not known.
_QWEN3_KEYS = (
    "general.architecture", "general.name", "ARCH.block_count", "ARCH.context_length",
    "ARCH.embedding_length", "ARCH.feed_forward_length", "ARCH.attention.head_count",
    "ARCH.attention.head_count_kv", "ARCH.vocab_size", "ARCH.rope.dimension_count",
    "ARCH.attention.key_length", "ARCH.attention.value_length", "ARCH.rope.freq_base",
    "ARCH.attention.layer_norm_rms_epsilon", "general.file_type", "ARCH.pooling_type",
    "tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.tokens",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
)


def _metadata(shape: ModelShape, vocab: Vocab, chat_template: str,
              pre: str | None) -> list[tuple[str, Any, Any]]:
    """(key, value, type) in the official order of the shape's architecture; keys whose value
    is None (tokenizer.ggml.pre of a BitNet file) are left out."""
    from gguf import GGUFValueType as T

    a = shape.architecture
    if shape.is_llama:
        keys, name = _LLAMA_KEYS, f"llama-i2s-test-{shape.n_embd}x{shape.n_layer}"
        pad = vocab.tokens.index("<|pad|>") if "<|pad|>" in vocab.tokens else vocab.eos_id
        pre = pre or "llama-bpe"
    elif shape.is_qwen3:
        keys, name = _QWEN3_KEYS, f"bitnet-embedding-test-{shape.n_embd}x{shape.n_layer}"
        if shape.is_bonsai:
            name = f"bonsai-q2_0-test-{shape.n_embd}x{shape.n_layer}"
        pad = vocab.eos_id
        pre = pre or "qwen2"
    else:
        keys = _BITNET_KEYS
        name = "bitnet2b" if shape == FULL_2B4T else f"bitnet-test-{shape.n_embd}x{shape.n_layer}"
        pad = vocab.eos_id
    u32, f32 = T.UINT32, T.FLOAT32
    values: dict[str, tuple[Any, Any]] = {
        "general.architecture": (a, T.STRING),
        "general.name": (name, T.STRING),
        "ARCH.vocab_size": (shape.n_vocab, u32),
        "ARCH.context_length": (shape.n_ctx, u32),
        "ARCH.embedding_length": (shape.n_embd, u32),
        "ARCH.block_count": (shape.n_layer, u32),
        "ARCH.feed_forward_length": (shape.n_ff, u32),
        "ARCH.rope.dimension_count": (shape.head_dim, u32),
        "ARCH.attention.head_count": (shape.n_head, u32),
        "ARCH.attention.head_count_kv": (shape.n_head_kv, u32),
        "tokenizer.ggml.add_bos_token": (not shape.is_qwen3, T.BOOL),
        "tokenizer.ggml.add_eos_token": (not shape.is_bonsai, T.BOOL),
        "ARCH.attention.key_length": (shape.head_dim, u32),
        "ARCH.attention.value_length": (shape.head_dim, u32),
        "ARCH.pooling_type": (shape.pooling_type, u32),
        "ARCH.attention.layer_norm_rms_epsilon": (shape.rms_eps, f32),
        "ARCH.rope.freq_base": (shape.rope_base, f32),
        "general.file_type": (FILE_TYPE_MOSTLY_Q2_0 if shape.is_bonsai else FILE_TYPE_MOSTLY_I2_S,
                              u32),
        "tokenizer.ggml.model": ("gpt2", T.STRING),
        "tokenizer.ggml.pre": (pre, T.STRING),
        "tokenizer.ggml.tokens": (vocab.tokens, (T.ARRAY, T.STRING)),
        "tokenizer.ggml.scores": ([0.0] * len(vocab), (T.ARRAY, f32)),
        "tokenizer.ggml.token_type": (vocab.token_types, (T.ARRAY, T.INT32)),
        "tokenizer.ggml.merges": (vocab.merges, (T.ARRAY, T.STRING)),
        "tokenizer.ggml.bos_token_id": (vocab.bos_id, u32),
        "tokenizer.ggml.eos_token_id": (vocab.eos_id, u32),
        "tokenizer.ggml.padding_token_id": (pad, u32),
        "tokenizer.chat_template": (chat_template, T.STRING),
        "general.quantization_version": (2, u32),
    }
    return [(k.replace("ARCH.", a + ".", 1), *values[k]) for k in keys
            if values[k][0] is not None]


def _infer_type(value: Any) -> Any:
    from gguf import GGUFValueType as T

    if isinstance(value, bool):
        return T.BOOL
    if isinstance(value, int):
        return T.UINT32 if 0 <= value < 2**32 else T.INT64
    if isinstance(value, float):
        return T.FLOAT32
    if isinstance(value, str):
        return T.STRING
    if isinstance(value, (list, tuple)) and value:
        return (T.ARRAY, _infer_type(value[0]))
    raise ValueError(f"cannot infer a GGUF type for {value!r}; pass (value, GGUFValueType)")


def _tensor_payload(spec: TensorSpec, override: Any, seed: int
                    ) -> tuple[tuple[int, ...], int, Any]:
    """(numpy shape, ggml type, data as bytes or ndarray) for one tensor."""
    if override is None:
        data = _generate(spec, seed)
        if spec.ggml_type == GGML_TYPE_I2_S:
            codes, scale = data  # type: ignore[misc]
            return spec.shape, GGML_TYPE_I2_S, codes + scale.tobytes() + bytes(28)
        return spec.shape, spec.ggml_type, data  # arrays; Q2_0 bytes
    if isinstance(override, RawTensor):
        return tuple(override.shape), override.ggml_type, override.data
    if spec.ggml_type == GGML_TYPE_I2_S:
        if isinstance(override, tuple):
            t, scale = override
        else:
            t, scale = override, _generate(spec, seed)[1]  # type: ignore[index]
        return spec.shape, GGML_TYPE_I2_S, pack_i2s(np.asarray(t).reshape(spec.shape), scale)
    arr = np.ascontiguousarray(override)
    if arr.dtype == np.float64:
        arr = arr.astype(np.float32)
    types = {np.dtype(np.float32): GGML_TYPE_F32, np.dtype(np.float16): GGML_TYPE_F16}
    if arr.dtype not in types:
        raise ValueError(f"override for {spec.name}: dtype {arr.dtype} not F32/F16")
    return arr.shape, types[arr.dtype], arr


def write_model(
    path: str | os.PathLike[str],
    shape: ModelShape = TINY,
    seed: int = 0,
    *,
    vocab: Literal["tiny", "tiny-falcon3", "tiny-qwen3", "llama3"] | None = None,
    tie_head: bool | None = None,
    chat_template: str | None = None,
    pre: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    tensor_overrides: Mapping[str, Any] | None = None,
    drop_keys: Sequence[str] = (),
    drop_tensors: Sequence[str] = (),
) -> Path:
    """Write a GGUF file in the official layout of its architecture and return its path.

    vocab: None for the architecture's tiny one ('tiny-qwen3' for Qwen3, else 'tiny').
    tie_head: None for the architecture's official choice (BitNet and Qwen3 tied, Llama
    untied).
    pre: tokenizer.ggml.pre (the Llama graph writes 'llama-bpe' by default, or 'falcon3'
    with the tiny-falcon3 vocabulary; BitNet files have no such key unless given).
    chat_template: None for the official one (BitNet's placeholder; Falcon3's or a Llama-3
    one for the Llama graph, by vocabulary).

    extra_metadata: key -> value (type inferred: bool, int -> u32, float -> f32, str, lists)
    or key -> (value, GGUFValueType) or (value, GGUFValueType.ARRAY, element type); replaces
    an official key of the same name in place, else is appended.
    tensor_overrides: name -> ndarray (F32/F16 data; for I2_S a ternary (rows, cols) array,
    or (ternary, scale)), or RawTensor; names outside the layout are appended.
    drop_keys / drop_tensors: leave these out (for tests of incomplete files).
    Tensors are streamed one at a time, so a full-size model never sits in memory twice.
    """
    import gguf
    from gguf import GGUFValueType as T

    shape.validate()
    path = Path(path)
    if vocab is None:
        vocab = "tiny-qwen3" if shape.is_qwen3 else "tiny"
    voc = get_vocab(vocab).padded(shape.n_vocab)
    if chat_template is not None:
        template = chat_template
    elif shape.is_qwen3:
        template = ""  # the embedding converter writes none
    elif not shape.is_llama:
        template = OFFICIAL_CHAT_TEMPLATE
    else:
        template = FALCON3_CHAT_TEMPLATE if vocab == "tiny-falcon3" else LLAMA3_CHAT_TEMPLATE
    if pre is None and shape.is_llama and vocab == "tiny-falcon3":
        pre = "falcon3"

    entries = _metadata(shape, voc, template, pre)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, tuple) and len(value) in (2, 3) and isinstance(value[1], T):
            vtype = value[1] if len(value) == 2 else (value[1], value[2])
            value = value[0]
        else:
            vtype = _infer_type(value)
        for i, (k, _, _) in enumerate(entries):
            if k == key:
                entries[i] = (key, value, vtype)
                break
        else:
            entries.append((key, value, vtype))
    dropped = set(drop_keys)
    entries = [e for e in entries if e[0] not in dropped]

    overrides = dict(tensor_overrides or {})
    specs = [s for s in tensor_layout(shape, tie_head=tie_head) if s.name not in drop_tensors]
    known = {s.name for s in specs}
    for name, value in overrides.items():
        if name not in known:
            if not isinstance(value, RawTensor):
                arr = np.asarray(value)
                gt = GGML_TYPE_F16 if arr.dtype == np.float16 else GGML_TYPE_F32
                specs.append(TensorSpec(name, tuple(arr.shape), gt))
            else:
                specs.append(TensorSpec(name, tuple(value.shape), value.ggml_type))

    writer = gguf.GGUFWriter(path, shape.architecture)
    writer.kv_data[0].clear()  # drop the automatic general.architecture: we add our own
    for key, value, vtype in entries:
        sub = None
        if isinstance(vtype, tuple):
            vtype, sub = vtype
        writer.add_key_value(key, value, vtype, sub_type=sub)

    # Tensor infos need sizes up front; payloads are produced again while streaming, so
    # only one tensor's data is alive at a time. Generation is deterministic.
    def payload(spec: TensorSpec) -> tuple[tuple[int, ...], int, Any]:
        return _tensor_payload(spec, overrides.get(spec.name), seed)

    for spec in specs:
        if spec.name in overrides:
            shp, gt, data = payload(spec)
            nbytes = len(data) if isinstance(data, bytes) else data.nbytes
        else:
            shp, gt, nbytes = spec.shape, spec.ggml_type, spec.nbytes
        writer.add_tensor_info(spec.name, shp, np.dtype(np.int8) if gt not in (0, 1)
                               else np.dtype(np.float32 if gt == 0 else np.float16),
                               nbytes, raw_dtype=gt)  # type: ignore[arg-type]

    path.parent.mkdir(parents=True, exist_ok=True)
    writer.write_header_to_file(path)
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for spec in specs:
        _, _, data = payload(spec)
        if isinstance(data, bytes):
            data = np.frombuffer(data, dtype=np.int8)
        writer.write_tensor_data(data)
        del data
    writer.close()
    return path


def demo_model_path() -> Path:
    """A small demo model (TINY shape, tiny vocabulary, context 512), written once into the
    cache directory (atomically: temp file + rename) and reused afterwards."""
    target = cache_dir() / f"bitnet-{DEMO_MODEL_VERSION}.gguf"
    if target.is_file():
        return target
    with replaced_atomically(target) as tmp:
        write_model(tmp, DEMO, seed=1234, vocab="tiny")
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bitnetd-write-model",
        description="Write a random BitNet b1.58 model in the official GGUF (I2_S) layout.")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    parser.add_argument("--vocab", choices=("tiny", "tiny-falcon3", "tiny-qwen3", "llama3"),
                        default=None,
                        help="tokenizer vocabulary (default: llama3 for full, tiny-falcon3 "
                             "for the Llama-graph presets, tiny-qwen3 for the Qwen3 ones, "
                             "else tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied-head", action="store_true", default=None,
                        help="write a separate output.weight instead of tying the head "
                             "(the default of the Llama-graph presets)")
    parser.add_argument("out", type=Path, help="output .gguf path")
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    vocab = args.vocab
    if vocab is None and shape.is_llama:
        vocab = "tiny-falcon3"
    if vocab is None and shape.is_qwen3:
        vocab = "tiny-qwen3"
    if vocab is None:
        vocab = "tiny"
        if shape.n_vocab >= LLAMA3_N_VOCAB:
            try:
                llama3_vocab()
                vocab = "llama3"
            except RuntimeError as exc:
                print(f"bitnetd-write-model: warning: {exc}; using the tiny vocabulary padded "
                      f"with reserved tokens to {shape.n_vocab} entries", file=sys.stderr)
    start = time.perf_counter()
    try:
        write_model(args.out, shape, args.seed, vocab=vocab,
                    tie_head=None if args.untied_head is None else False)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"bitnetd-write-model: error: {exc}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size:,} bytes, preset {args.preset}, vocab {vocab}, "
          f"seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
