"""What a model file of each supported family looks like, as the GGUF writer makes it: ggml type
and file-type ids, the chat templates the converters store, `ModelShape` (hyper-parameters,
graph, weight format), the named presets (tiny test shapes and the real full-size ones of
model-format §2 and §10), and the I2_S, Q2_0 and Q8_0 packings (model-format §4, §10.6,
§10.1.6)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from bitnetd_trio.engine.vocab import LLAMA3_N_VOCAB, TINY_VOCAB_SIZE

GGML_TYPE_F32 = 0
GGML_TYPE_F16 = 1
GGML_TYPE_Q8_0 = 8
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
    #: whether the head is token_embd (no output.weight); None: the architecture's official
    #: choice (BitNet and Qwen3 tied, Llama untied). Bonsai-8B has its own head, 1.7B not.
    tie_head: bool | None = None
    #: weights per block of a Q2_0 file's type-42 tensors: 64 (mainline, 18-byte blocks) or
    #: 128 (PrismML's layout, 34-byte blocks, the files its model cards list; §10.6.1)
    q2_0_block: int = 64
    #: ARCH.rope.scaling.type: "linear" or "yarn" (model-format §5.2.3.1), None for no scaling
    #: keys at all; with its rope.scaling.factor and, for yarn, the
    #: rope.scaling.original_context_length
    rope_scaling: str | None = None
    rope_scaling_factor: float = 1.0
    rope_scaling_orig_ctx: int | None = None
    #: the ggml type of token_embd.weight and of output.weight (when written): "f16", "q8_0"
    #: (model-format §10.1.6: what llama-quantize writes for a head whose width is not a
    #: multiple of 256, and what llama.cpp users pick) or, for Bonsai, "q2_0"; None: the
    #: architecture's own (F16, Bonsai Q2_0)
    token_embd_type: str | None = None
    output_type: str | None = None

    def tensor_type(self, which: str) -> int:
        """The ggml type of 'token_embd' or 'output' in a file of this shape."""
        chosen = self.token_embd_type if which == "token_embd" else self.output_type
        if chosen is None:
            chosen = "q2_0" if self.is_bonsai else "f16"
        return {"f16": GGML_TYPE_F16, "q8_0": GGML_TYPE_Q8_0, "q2_0": GGML_TYPE_Q2_0}[chosen]

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
        if self.q2_0_block not in (64, 128) or (self.q2_0_block == 128 and (
                not self.is_bonsai or self.n_embd % 128 or self.n_ff % 128
                or self.q_dim % 128)):
            raise ValueError(f"q2_0_block {self.q2_0_block}: 64, or 128 for a Q2_0 model "
                             "whose widths are multiples of 128")
        for name, k in (("n_embd", self.n_embd), ("n_ff", self.n_ff),
                        ("n_head * head_dim", self.q_dim)):
            if k % 128:
                raise ValueError(f"{name}={k} must be a multiple of 128 (I2_S blocks)")
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        for t in (self.token_embd_type, self.output_type):
            if t not in (None, "f16", "q8_0") and not (t == "q2_0" and self.is_bonsai):
                raise ValueError(f"token_embd / output type {t!r}: None, 'f16', 'q8_0', or "
                                 "'q2_0' for a Q2_0 model")
        if self.rope_scaling not in (None, "linear", "yarn") or (
                self.rope_scaling == "yarn") != (self.rope_scaling_orig_ctx is not None):
            raise ValueError(f"rope_scaling {self.rope_scaling!r}: None, 'linear' or 'yarn' "
                             "(rope_scaling_orig_ctx for yarn only, and required there)")


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
#: Falcon-E-3B-Instruct's shape. Its config.json was not found in any source we could read;
#: this geometry is a third party's (E 2048, 32 layers, 16 heads / 2 KV heads, FF 13312), and
#: with a 32768-token vocabulary (F16 embedding and head) it adds up to the 999 MB the I2_S
#: file is reported to weigh. RoPE base and context length are placeholders.
FALCON_E_3B = ModelShape(n_vocab=32768, n_embd=2048, n_head=16, n_head_kv=2, n_ff=13312,
                         n_layer=32, n_ctx=2048, rope_base=1000042.0, rms_eps=1e-6,
                         architecture="llama")
#: Ternary Bonsai (Qwen3 with Q2_0 weights, model-format §10.6) at TINY's width.
TINY_BONSAI = dataclasses.replace(TINY_QWEN3_EMBED, pooling_type=None, weight_format="q2_0")
#: Bonsai-8B's shape: the Qwen3-8B geometry, untied Q2_0 head (model-families C.1), and the
#: context and YaRN keys of PrismML's published file (65536 positions, factor 4 over an
#: original 16384; model-format §10.6.4).
BONSAI_8B = ModelShape(n_vocab=151936, n_embd=4096, n_head=32, n_head_kv=8, n_ff=12288,
                       n_layer=36, n_ctx=65536, rope_base=1000000.0, rms_eps=1e-6,
                       architecture="qwen3", n_head_dim=128, weight_format="q2_0",
                       tie_head=False, rope_scaling="yarn", rope_scaling_factor=4.0,
                       rope_scaling_orig_ctx=16384)
#: BitNet-embedding-0.6B's shape (model-families B.1; the context length is Qwen3-0.6B's
#: 32768, not confirmed for this model).
BITNET_EMBED_06B = ModelShape(n_vocab=151936, n_embd=1024, n_head=16, n_head_kv=8,
                              n_ff=3072, n_layer=28, n_ctx=32768, rope_base=1000000.0,
                              rms_eps=1e-6, architecture="qwen3", n_head_dim=128,
                              pooling_type=POOLING_LAST)

PRESETS: dict[str, ModelShape] = {"tiny": TINY, "smallest": SMALLEST, "full": FULL_2B4T,
                                  "demo": DEMO, "tiny-llama": TINY_LLAMA,
                                  "falcon3-1b": FALCON3_1B, "falcon3-10b": FALCON3_10B,
                                  "falcon-e-3b": FALCON_E_3B,
                                  "tiny-qwen3-embed": TINY_QWEN3_EMBED,
                                  "bitnet-embed-0.6b": BITNET_EMBED_06B,
                                  "tiny-bonsai": TINY_BONSAI, "bonsai-8b": BONSAI_8B}
#: tokenizer.ggml.pre of the presets whose official files name one other than their
#: vocabulary's default (model-families A.2)
PRESET_PRE_TOKENIZER: dict[str, str] = {"falcon-e-3b": "falcon_e"}


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


def pack_q2_0(codes: np.ndarray, d: np.ndarray, block: int = 64) -> bytes:
    """Q2_0 (model-format §10.6.1): codes (rows, cols) in 0..3 and F16 scales d (rows,
    cols/block) -> blocks of 2 + block/4 bytes: d, then the codes, weight j at bits 2*(j%4)
    of byte j/4. block 64 is mainline Q2_0 (18 bytes), 128 PrismML's layout (34 bytes)."""
    c = np.asarray(codes, dtype=np.uint8)
    rows, cols = c.shape
    if block not in (64, 128) or cols % block or c.max(initial=0) > 3:
        raise ValueError(f"Q2_0 needs cols a multiple of the block ({block}) and codes 0..3")
    c4 = c.reshape(rows, cols // block, block // 4, 4)
    qs = c4[..., 0] | (c4[..., 1] << 2) | (c4[..., 2] << 4) | (c4[..., 3] << 6)
    dd = np.asarray(d, dtype=np.float16).reshape(rows, cols // block, 1).view(np.uint8)
    return np.concatenate([dd, qs.astype(np.uint8)], axis=2).tobytes()


def unpack_q2_0(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_q2_0: (codes uint8 (rows, cols), d float16 (rows, cols/64))."""
    b = np.frombuffer(data, dtype=np.uint8, count=rows * cols // 64 * 18)
    b = b.reshape(rows, cols // 64, 18)
    d = b[..., :2].copy().view(np.float16).reshape(rows, cols // 64)
    qs = b[..., 2:]
    codes = np.stack([(qs >> (2 * k)) & 3 for k in range(4)], axis=-1).reshape(rows, cols)
    return codes.astype(np.uint8), d


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> bytes:
    """Q8_0 (ggml type 8, model-format §10.1.6): int8 values q (rows, cols) and F16 scales d
    (rows, cols/32) -> blocks of 34 bytes, d then the 32 values; weight = q * d."""
    qq = np.asarray(q)
    rows, cols = qq.shape
    if cols % 32 or qq.min(initial=0) < -128 or qq.max(initial=0) > 127:
        raise ValueError(f"Q8_0 needs cols a multiple of 32 and int8 values, got {qq.shape}")
    dd = np.asarray(d, dtype=np.float16).reshape(rows, cols // 32, 1).view(np.uint8)
    qs = qq.astype(np.int8).reshape(rows, cols // 32, 32).view(np.uint8)
    return np.concatenate([dd, qs], axis=2).tobytes()


def unpack_q8_0(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, np.ndarray]:
    """Inverse of pack_q8_0: (q int8 (rows, cols), d float16 (rows, cols/32))."""
    b = np.frombuffer(data, dtype=np.uint8, count=rows * cols // 32 * 34)
    b = b.reshape(rows, cols // 32, 34)
    d = b[..., :2].copy().view(np.float16).reshape(rows, cols // 32)
    return b[..., 2:].copy().view(np.int8).reshape(rows, cols), d


def _valid_i2s_code_bytes() -> np.ndarray:
    """The 81 byte values whose four 2-bit fields are all in {0, 1, 2}."""
    return np.array([b for b in range(256) if all(((b >> s) & 3) != 3 for s in (0, 2, 4, 6))],
                    dtype=np.uint8)


I2S_CODE_BYTES = _valid_i2s_code_bytes()
