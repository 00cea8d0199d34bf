"""The project's one GGUF writer: BitNet b1.58 models in the official I2_S layout.

Tests, benchmarks and the demo model all come from here. The layout (24 metadata keys, tensor
names, shapes and types, I2_S packing) follows model-format §1-§4 and §8.
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
FILE_TYPE_MOSTLY_I2_S = 40


#: The placeholder template that bitnet.cpp's converter stores in the official file
#: (the two-character sequences backslash-n are inside a Jinja string literal, as in the file).
OFFICIAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first %}{{ bos_token }}{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ 'Human: ' + message['content'] + '\\n\\nBITNETAssistant: ' + eos_token }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% endif %}{% endfor %}"
)

#: Bump when the demo model's content changes, so stale cached files are not reused.
DEMO_MODEL_VERSION = "demo-v2"

@dataclass(frozen=True)
class ModelShape:
    """Hyper-parameters of a BitNet b1.58 model."""

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

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_dim(self) -> int:
        return self.head_dim * self.n_head_kv

    def validate(self) -> None:
        """Raise ValueError for a shape the official layout cannot express."""
        if self.n_embd % self.n_head or self.n_head % self.n_head_kv:
            raise ValueError(f"heads do not divide evenly: {self}")
        for name, k in (("n_embd", self.n_embd), ("n_ff", self.n_ff)):
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

PRESETS: dict[str, ModelShape] = {"tiny": TINY, "smallest": SMALLEST, "full": FULL_2B4T,
                                  "demo": DEMO}


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
        return {GGML_TYPE_F32: 4 * n, GGML_TYPE_F16: 2 * n}.get(self.ggml_type, n // 4 + 32)


def tensor_layout(shape: ModelShape, *, tie_head: bool = True) -> list[TensorSpec]:
    """Tensor names, numpy shapes and types of the official layout (model-format §3)."""
    e, f, kv = shape.n_embd, shape.n_ff, shape.kv_dim
    specs = [TensorSpec("token_embd.weight", (shape.n_vocab, e), GGML_TYPE_F16)]
    for i in range(shape.n_layer):
        b = f"blk.{i}."
        specs += [
            TensorSpec(b + "attn_norm.weight", (e,), GGML_TYPE_F32),
            TensorSpec(b + "attn_q.weight", (e, e), GGML_TYPE_I2_S),
            TensorSpec(b + "attn_k.weight", (kv, e), GGML_TYPE_I2_S),
            TensorSpec(b + "attn_v.weight", (kv, e), GGML_TYPE_I2_S),
            TensorSpec(b + "attn_sub_norm.weight", (e,), GGML_TYPE_F32),
            TensorSpec(b + "attn_output.weight", (e, e), GGML_TYPE_I2_S),
            TensorSpec(b + "ffn_norm.weight", (e,), GGML_TYPE_F32),
            TensorSpec(b + "ffn_gate.weight", (f, e), GGML_TYPE_I2_S),
            TensorSpec(b + "ffn_up.weight", (f, e), GGML_TYPE_I2_S),
            TensorSpec(b + "ffn_sub_norm.weight", (f,), GGML_TYPE_F32),
            TensorSpec(b + "ffn_down.weight", (e, f), GGML_TYPE_I2_S),
        ]
    specs.append(TensorSpec("output_norm.weight", (e,), GGML_TYPE_F32))
    if not tie_head:
        specs.append(TensorSpec("output.weight", (shape.n_vocab, e), GGML_TYPE_F16))
    return specs


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
    if spec.ggml_type == GGML_TYPE_F16:
        return _f16_normal(rng, spec.shape, 0.05)
    if spec.ggml_type == GGML_TYPE_F32:
        return rng.uniform(0.8, 1.2, size=spec.shape).astype(np.float32)
    n = int(np.prod(spec.shape))
    codes = _CODE_BYTES[rng.integers(0, len(_CODE_BYTES), size=n // 4, dtype=np.uint8)]
    # A ternary row with uniform codes has norm sqrt(2K/3); this scale (of order 1 times
    # 1/sqrt(K)) keeps every projection's outputs at the size of its inputs, so activations
    # stay O(1) through any depth and attention scores are O(1): with larger scales softmax
    # degenerates to an argmax and a comparison against a reference could not see attention.
    k = spec.shape[1]
    scale = np.float32(rng.uniform(0.5, 1.5) * np.sqrt(1.5 / k))
    return codes.tobytes(), scale


def random_weights(shape: ModelShape, seed: int = 0, *, tie_head: bool = True
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


def _metadata(shape: ModelShape, vocab: Vocab, chat_template: str) -> list[tuple[str, Any, Any]]:
    from gguf import GGUFValueType as T

    a = shape.architecture
    name = "bitnet2b" if shape == FULL_2B4T else f"bitnet-test-{shape.n_embd}x{shape.n_layer}"
    return [
        ("general.architecture", a, T.STRING),
        ("general.name", name, T.STRING),
        (f"{a}.vocab_size", shape.n_vocab, T.UINT32),
        (f"{a}.context_length", shape.n_ctx, T.UINT32),
        (f"{a}.embedding_length", shape.n_embd, T.UINT32),
        (f"{a}.block_count", shape.n_layer, T.UINT32),
        (f"{a}.feed_forward_length", shape.n_ff, T.UINT32),
        (f"{a}.rope.dimension_count", shape.head_dim, T.UINT32),
        (f"{a}.attention.head_count", shape.n_head, T.UINT32),
        (f"{a}.attention.head_count_kv", shape.n_head_kv, T.UINT32),
        ("tokenizer.ggml.add_bos_token", True, T.BOOL),
        (f"{a}.attention.layer_norm_rms_epsilon", shape.rms_eps, T.FLOAT32),
        (f"{a}.rope.freq_base", shape.rope_base, T.FLOAT32),
        ("general.file_type", FILE_TYPE_MOSTLY_I2_S, T.UINT32),
        ("tokenizer.ggml.model", "gpt2", T.STRING),
        ("tokenizer.ggml.tokens", vocab.tokens, (T.ARRAY, T.STRING)),
        ("tokenizer.ggml.scores", [0.0] * len(vocab), (T.ARRAY, T.FLOAT32)),
        ("tokenizer.ggml.token_type", vocab.token_types, (T.ARRAY, T.INT32)),
        ("tokenizer.ggml.merges", vocab.merges, (T.ARRAY, T.STRING)),
        ("tokenizer.ggml.bos_token_id", vocab.bos_id, T.UINT32),
        ("tokenizer.ggml.eos_token_id", vocab.eos_id, T.UINT32),
        ("tokenizer.ggml.padding_token_id", vocab.eos_id, T.UINT32),
        ("tokenizer.chat_template", chat_template, T.STRING),
        ("general.quantization_version", 2, T.UINT32),
    ]


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
        return spec.shape, spec.ggml_type, data
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
    vocab: Literal["tiny", "llama3"] = "tiny",
    tie_head: bool = True,
    chat_template: str | None = None,
    extra_metadata: Mapping[str, Any] | None = None,
    tensor_overrides: Mapping[str, Any] | None = None,
    drop_keys: Sequence[str] = (),
    drop_tensors: Sequence[str] = (),
) -> Path:
    """Write a BitNet b1.58 GGUF file in the official layout and return its path.

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
    voc = get_vocab(vocab).padded(shape.n_vocab)
    template = OFFICIAL_CHAT_TEMPLATE if chat_template is None else chat_template

    entries = _metadata(shape, voc, template)
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
    parser.add_argument("--vocab", choices=("tiny", "llama3"), default=None,
                        help="tokenizer vocabulary (default: llama3 for full, else tiny)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--untied-head", action="store_true",
                        help="write a separate output.weight instead of tying the head")
    parser.add_argument("out", type=Path, help="output .gguf path")
    args = parser.parse_args(argv)
    shape = PRESETS[args.preset]
    vocab = args.vocab
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
        write_model(args.out, shape, args.seed, vocab=vocab, tie_head=not args.untied_head)
    except (RuntimeError, ValueError, OSError) as exc:
        print(f"bitnetd-write-model: error: {exc}", file=sys.stderr)
        return 1
    size = args.out.stat().st_size
    print(f"wrote {args.out} ({size:,} bytes, preset {args.preset}, vocab {vocab}, "
          f"seed {args.seed}) in {time.perf_counter() - start:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
