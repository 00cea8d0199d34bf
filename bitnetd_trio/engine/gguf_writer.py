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
import os
import sys
import time
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from bitnetd_trio.engine.model_shapes import (
    BITNET_EMBED_06B,
    BONSAI_8B,
    DEMO,
    DEMO_MODEL_VERSION,
    FALCON3_1B,
    FALCON3_10B,
    FALCON3_CHAT_TEMPLATE,
    FILE_TYPE_MOSTLY_I2_S,
    FILE_TYPE_MOSTLY_Q2_0,
    FULL_2B4T,
    GGML_TYPE_F16,
    GGML_TYPE_F32,
    GGML_TYPE_I2_S,
    GGML_TYPE_Q2_0,
    GGML_TYPE_Q8_0,
    I2S_CODE_BYTES,
    LLAMA3_CHAT_TEMPLATE,
    LLAMA_ARCHS,
    OFFICIAL_CHAT_TEMPLATE,
    POOLING_CLS,
    POOLING_LAST,
    POOLING_MEAN,
    PRESET_PRE_TOKENIZER,
    PRESETS,
    QWEN3_ARCHS,
    SMALLEST,
    TINY,
    TINY_BONSAI,
    TINY_LLAMA,
    TINY_QWEN3_EMBED,
    ModelShape,
    pack_i2s,
    pack_q2_0,
    pack_q8_0,
    unpack_i2s,
    unpack_q2_0,
    unpack_q8_0,
)
from bitnetd_trio.engine.vocab import (
    LLAMA3_N_VOCAB,
    TINY_VOCAB_SIZE,
    Vocab,
    cache_dir,
    get_vocab,
    llama3_vocab,
    replaced_atomically,
)

# The writer's public face: its own functions, and the shapes and vocabularies it writes
# (defined in model_shapes.py and vocab.py), so that callers need one import.
__all__ = [
    "POOLING_CLS",
    "POOLING_LAST",
    "POOLING_MEAN",
    "BITNET_EMBED_06B",
    "BONSAI_8B",
    "DEMO",
    "DEMO_MODEL_VERSION",
    "FALCON3_10B",
    "FALCON3_1B",
    "FALCON3_CHAT_TEMPLATE",
    "FILE_TYPE_MOSTLY_I2_S",
    "FILE_TYPE_MOSTLY_Q2_0",
    "FULL_2B4T",
    "GGML_TYPE_F16",
    "GGML_TYPE_F32",
    "GGML_TYPE_I2_S",
    "GGML_TYPE_Q2_0",
    "GGML_TYPE_Q8_0",
    "LLAMA3_CHAT_TEMPLATE",
    "LLAMA3_N_VOCAB",
    "LLAMA_ARCHS",
    "ModelShape",
    "OFFICIAL_CHAT_TEMPLATE",
    "PRESET_PRE_TOKENIZER",
    "PRESETS",
    "QWEN3_ARCHS",
    "RawTensor",
    "SMALLEST",
    "TINY",
    "TINY_BONSAI",
    "TINY_LLAMA",
    "TINY_QWEN3_EMBED",
    "TINY_VOCAB_SIZE",
    "TensorSpec",
    "Vocab",
    "cache_dir",
    "demo_model_path",
    "is_norm",
    "llama3_vocab",
    "main",
    "pack_i2s",
    "pack_q2_0",
    "pack_q8_0",
    "random_weights",
    "tensor_layout",
    "unpack_i2s",
    "unpack_q2_0",
    "unpack_q8_0",
    "write_model",
]


# --------------------------------------------------------------------------------------------
# Random weights


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order: (rows, cols) = (ne1, ne0)
    ggml_type: int
    q2_0_block: int = 64  # type 42's layout: 64 (mainline) or 128 (PrismML's)

    @property
    def nbytes(self) -> int:
        n = int(np.prod(self.shape))
        q2 = n // 64 * 18 if self.q2_0_block == 64 else n // 128 * 34
        return {GGML_TYPE_F32: 4 * n, GGML_TYPE_F16: 2 * n, GGML_TYPE_Q8_0: n // 32 * 34,
                GGML_TYPE_Q2_0: q2}.get(self.ggml_type, n // 4 + 32)


def tensor_layout(shape: ModelShape, *, tie_head: bool | None = None) -> list[TensorSpec]:
    """Tensor names, numpy shapes and types of the official layout (model-format §3; the
    Llama graph: §10.4.3, no sub-norms, untied head by default; the Qwen3 embedding graph:
    §10.5.3, QK-norms and input norms, every norm F16, tied head by default)."""
    e, f, kv, qd, d = shape.n_embd, shape.n_ff, shape.kv_dim, shape.q_dim, shape.head_dim
    if tie_head is None:
        tie_head = shape.tie_head if shape.tie_head is not None else not shape.is_llama
    qwen, bonsai = shape.is_qwen3, shape.is_bonsai
    norm_t = GGML_TYPE_F16 if qwen and not bonsai else GGML_TYPE_F32
    wt = GGML_TYPE_Q2_0 if bonsai else GGML_TYPE_I2_S
    # Bonsai's token_embd and head are Q2_0 too (model-families C.1); either may be Q8_0
    blk = shape.q2_0_block
    specs = [TensorSpec("token_embd.weight", (shape.n_vocab, e), shape.tensor_type("token_embd"),
                        blk)]

    def proj(name: str, rows: int, cols: int) -> list[TensorSpec]:
        """A projection, after its input norm when the graph has them."""
        out = ([TensorSpec(name + "_norm_in.weight", (cols,), norm_t)]
               if qwen and not bonsai else [])
        return out + [TensorSpec(name + ".weight", (rows, cols), wt, blk)]

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
        specs.append(TensorSpec("output.weight", (shape.n_vocab, e), shape.tensor_type("output"),
                                blk))
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
    if spec.ggml_type == GGML_TYPE_Q8_0:
        rows, k = spec.shape
        # weights of the F16 embedding's size (std 0.05); every int8 value, -128 included
        # (ggml's quantizer never writes it, but a file may)
        q = np.clip(np.rint(rng.standard_normal((rows, k)) * 45), -128, 127).astype(np.int8)
        d = rng.uniform(0.8e-3, 1.4e-3, size=(rows, k // 32))
        return pack_q8_0(q, d.astype(np.float16))
    if spec.ggml_type == GGML_TYPE_Q2_0:
        rows, k = spec.shape
        # mostly ternary codes, a few 3s (+2, legal though never produced from ternary input)
        codes = rng.choice(4, size=(rows, k), p=[0.33, 0.33, 0.32, 0.02]).astype(np.uint8)
        g = spec.q2_0_block
        if spec.name == "token_embd.weight" or spec.name == "output.weight":
            d = rng.uniform(0.03, 0.08, size=(rows, k // g))
        else:  # as the I2_S scale below: outputs at the size of the inputs
            d = rng.uniform(0.5, 1.5, size=(rows, k // g)) * np.sqrt(1.5 / k)
        return pack_q2_0(codes, d.astype(np.float16), g)
    n = int(np.prod(spec.shape))
    codes = I2S_CODE_BYTES[rng.integers(0, len(I2S_CODE_BYTES), size=n // 4, dtype=np.uint8)]
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
    I2_S tensors, and each I2_S tensor's scale under '<name>.scale' (np.float32 0-d array);
    Q2_0 tensors as code - 1 and Q8_0 ones as their int8 values, with their F16 block scales
    under '<name>.d'."""
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
            if spec.q2_0_block != 64:
                raise ValueError("random_weights reads mainline (g64) Q2_0 only")
            c, d = unpack_q2_0(data, *spec.shape)  # type: ignore[arg-type]
            out[spec.name] = c.astype(np.int8) - 1
            out[spec.name + ".d"] = d
        elif spec.ggml_type == GGML_TYPE_Q8_0:
            q, d = unpack_q8_0(data, *spec.shape)  # type: ignore[arg-type]
            out[spec.name], out[spec.name + ".d"] = q, d
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


#: Written after rope.freq_base when the shape has RoPE scaling (model-format §5.2.3.1).
_ROPE_SCALING_KEYS = ("ARCH.rope.scaling.type", "ARCH.rope.scaling.factor",
                      "ARCH.rope.scaling.original_context_length")

#: The key order of the official BitNet file (model-format §2.2): "ARCH." stands for the
#: architecture prefix; tokenizer.ggml.pre (not in the official file) goes before the tokens.
_BITNET_KEYS = (
    "general.architecture", "general.name", "ARCH.vocab_size", "ARCH.context_length",
    "ARCH.embedding_length", "ARCH.block_count", "ARCH.feed_forward_length",
    "ARCH.rope.dimension_count", "ARCH.attention.head_count", "ARCH.attention.head_count_kv",
    "tokenizer.ggml.add_bos_token", "ARCH.attention.layer_norm_rms_epsilon",
    "ARCH.rope.freq_base", *_ROPE_SCALING_KEYS, "general.file_type", "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
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
    "ARCH.attention.head_count_kv", "ARCH.rope.freq_base", *_ROPE_SCALING_KEYS,
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
    *_ROPE_SCALING_KEYS,
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
        "ARCH.rope.scaling.type": (shape.rope_scaling, T.STRING),
        "ARCH.rope.scaling.factor": (
            shape.rope_scaling_factor if shape.rope_scaling else None, f32),
        "ARCH.rope.scaling.original_context_length": (shape.rope_scaling_orig_ctx, u32),
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
        return spec.shape, spec.ggml_type, data  # arrays; Q2_0 and Q8_0 bytes
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
                    tie_head=None if args.untied_head is None else False,
                    pre=PRESET_PRE_TOKENIZER.get(args.preset))
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"bitnetd-write-model: error: {exc}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size:,} bytes, preset {args.preset}, vocab {vocab}, "
          f"seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
