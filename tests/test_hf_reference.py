"""The engine against Hugging Face transformers on tiny models of the three newer families
(model-format §10.4-§10.6): a second, independent reference beside tests/reference_model.py.

Each test writes a tiny model with the project's GGUF writer, turns the *file* into a
transformers checkpoint, loads it with transformers' own classes and compares. The checkpoint
is made from the file alone: the container is parsed by reference_model.read_gguf (a plain
struct walk), but the I2_S and Q2_0 payloads are decoded here, by another route than the numpy
reference's decoders (bit unpacking, not shifts and masks), and never from the writer's
in-memory weights. How each family maps onto transformers is the families fact sheet's
(model-families A.2, B.1, C.1):

- Llama graph, I2_S: `LlamaForCausalLM` with quantization_config {"quant_method": "bitnet"}, so
  every projection is transformers' `BitLinear` (packed uint8 weight, weight_scale, per-token
  int8 activations). The file's Q/K rows are permuted back to Hugging Face's half-split order
  and the I2_S scale becomes weight_scale = 1 / scale (model-format §10.4).
- Qwen3 embedding graph, I2_S: `Qwen3Model` with {bitnet, autobitlinear, online, use_rms_norm}:
  each projection is `AutoBitLinear`, whose own RMSNorm takes the file's `*_norm_in` weights.
- Ternary Bonsai, Q2_0: `Qwen3ForCausalLM` with the weights dequantized to (code - 1) * d.

Tolerance, as test_reference.py: per position, max |Δlogit| / max |logit| below 1e-3, where
a difference above that may be explained only by flipping activations that sit within 1e-3 of
an int8 rounding boundary (reference_model.match_rows; here the flips are applied to
transformers' own quantized activations), at most flip_cap of them per sequence. Ternary
Bonsai's model has float activations while the engine quantizes them per token
(model-format §10.6.2), so it is compared twice: with transformers' layers fed the same
per-token int8 activations (the strict rule above), and with the model's float activations
(the fact sheet's bar, model-families C.2: max |Δlogprob| < 0.1 and median < 0.02; on these
tiny models transformers' own int8 model exceeds that max too, see that test).

torch's compiler is kept out (torch.compiler.set_stance("force_eager")): transformers marks
its BitNet helpers with torch.compile, whose first call here took 22 s to build its kernels,
for logits identical to the eager ones.
"""

from __future__ import annotations

import dataclasses
import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import reference_model as ref
from test_reference import (
    TOLERANCE,
    assert_matched,
    chunked,
    engine_hidden,
    engine_logits,
    flip_cap,
    log_softmax,
    rel_errors,
    tokens_for,
)

from bitnetd_trio.engine import embedding, native
from bitnetd_trio.engine import gguf_writer as gw

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
# transformers refuses to load a BitNet-quantized checkpoint without accelerate (and 5.0
# fails to import its loading code with accelerate older than 1.2)
pytest.importorskip("accelerate", minversion="1.2")
from safetensors.torch import save_file  # noqa: E402  (installed with transformers)
from transformers.integrations import bitnet as hf_bitnet  # noqa: E402

transformers.utils.logging.disable_progress_bar()  # a bar per checkpoint load, on stderr

# ------------------------------------------------------------------------------------------
# From the GGUF file to plain arrays


def i2s_ternary(data: bytes, rows: int, cols: int) -> tuple[np.ndarray, np.float32]:
    """I2_S bytes -> ternary int8 (rows, cols) and the f32 scale (model-format §4). Weight j
    of a 128-weight block is in byte j mod 32, in the bit pair at 6 - 2 (j div 32): unpacked
    most significant bit first, byte b's pairs are the groups 0..3 in order."""
    n = rows * cols
    bits = np.unpackbits(np.frombuffer(data, np.uint8, count=n // 4)).reshape(n // 128, 32, 4, 2)
    codes = bits[..., 0] * 2 + bits[..., 1]  # (block, byte, group)
    t = codes.transpose(0, 2, 1).reshape(rows, cols).astype(np.int8) - 1
    return t, np.float32(struct.unpack_from("<f", data, n // 4)[0])


def q2_0_values(data: bytes, rows: int, cols: int) -> np.ndarray:
    """Q2_0 bytes -> float32 (rows, cols) = (code - 1) * d (model-format §10.6.1): 18-byte
    blocks, an f16 d then 16 bytes; weight j at bits 2 (j mod 4) of byte j div 4, so unpacked
    least significant bit first the pairs come out in weight order."""
    blocks = np.frombuffer(data, np.uint8, count=rows * cols // 64 * 18).reshape(-1, 18)
    d = blocks[:, :2].copy().view("<f2").astype(np.float32)  # (blocks, 1)
    bits = np.unpackbits(blocks[:, 2:], bitorder="little").reshape(-1, 64, 2)
    codes = bits[..., 0] + 2 * bits[..., 1]
    return ((codes.astype(np.float32) - 1) * d).reshape(rows, cols)


@dataclasses.dataclass
class FileModel:
    """What a transformers config needs, read from the file's keys, and its tensors: floats
    (F32, F16, Q2_0 dequantized) or, for I2_S, (ternary, scale)."""

    arch: str
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ff: int
    n_layer: int
    n_vocab: int
    n_ctx: int
    eps: float
    base: float
    floats: dict[str, np.ndarray]
    ternary: dict[str, tuple[np.ndarray, np.float32]]
    #: transformers' rope_parameters of the file's ARCH.rope.scaling.* keys (model-format
    #: §5.2.3.1), beside rope_theta
    rope_scaling: dict[str, object] = dataclasses.field(default_factory=dict)

    @property
    def tied(self) -> bool:
        return "output.weight" not in self.floats


def read_file_model(path: Path) -> FileModel:
    f = ref.read_gguf(path)
    md = f.metadata
    a = md["general.architecture"]
    floats: dict[str, np.ndarray] = {}
    ternary: dict[str, tuple[np.ndarray, np.float32]] = {}
    for name, info in f.tensors.items():
        data, shape = f.tensor_bytes(name), tuple(reversed(info.ne))
        if info.ggml_type == ref.F32:
            floats[name] = np.frombuffer(data, "<f4").reshape(shape)
        elif info.ggml_type == ref.F16:
            floats[name] = np.frombuffer(data, "<f2").reshape(shape).astype(np.float32)
        elif info.ggml_type == ref.I2_S:
            ternary[name] = i2s_ternary(data, *shape)
        elif info.ggml_type == ref.Q2_0:
            floats[name] = q2_0_values(data, *shape)
        else:
            raise AssertionError(f"{name}: type {info.ggml_type}")
    e, h = md[f"{a}.embedding_length"], md[f"{a}.attention.head_count"]
    # the Llama files have no key_length (model-format §10.4.3)
    head_dim = md.get(f"{a}.attention.key_length", md.get(f"{a}.rope.dimension_count", e // h))
    return FileModel(
        arch=a, n_embd=e, n_head=h, n_head_kv=md[f"{a}.attention.head_count_kv"],
        head_dim=head_dim, n_ff=md[f"{a}.feed_forward_length"], n_layer=md[f"{a}.block_count"],
        n_vocab=len(md["tokenizer.ggml.tokens"]), n_ctx=md[f"{a}.context_length"],
        eps=md[f"{a}.attention.layer_norm_rms_epsilon"], base=md[f"{a}.rope.freq_base"],
        floats=floats, ternary=ternary, rope_scaling=rope_parameters(md, a))


def rope_parameters(md: dict, a: str) -> dict[str, object]:
    """The file's RoPE scaling keys in transformers' terms: rope_type, factor, and for YaRN
    original_max_position_embeddings (and beta_fast / beta_slow / attention_factor when the
    file has them; YaRN's attention_factor is 0.1 ln(factor) + 1 times the file's
    attn_factor, the engine's magnitude)."""
    kind = md.get(f"{a}.rope.scaling.type", "none")
    if kind == "none":
        return {}
    assert kind in ("linear", "yarn"), kind
    out: dict[str, object] = {"rope_type": kind,
                              "factor": float(md[f"{a}.rope.scaling.factor"])}
    if kind == "yarn":
        out["original_max_position_embeddings"] = int(
            md[f"{a}.rope.scaling.original_context_length"])
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if f"{a}.rope.scaling.{key}" in md:
                out[name] = float(md[f"{a}.rope.scaling.{key}"])
        if f"{a}.rope.scaling.attn_factor" in md:
            out["attention_factor"] = float(md[f"{a}.rope.scaling.attn_factor"]) * (
                0.1 * np.log(out["factor"]) + 1)
    return out


#: GGUF projection -> (transformers module path inside a layer, quantization point of
#: reference_model: the Llama and Bonsai graphs quantize q/k/v's input once, gate/up's once)
PROJECTIONS = {
    "attn_q": ("self_attn.q_proj", "attn_in", "q_in"),
    "attn_k": ("self_attn.k_proj", "attn_in", "k_in"),
    "attn_v": ("self_attn.v_proj", "attn_in", "v_in"),
    "attn_output": ("self_attn.o_proj", "attn_out", "attn_out"),
    "ffn_gate": ("mlp.gate_proj", "ffn_in", "gate_in"),
    "ffn_up": ("mlp.up_proj", "ffn_in", "up_in"),
    "ffn_down": ("mlp.down_proj", "ffn_down", "ffn_down"),
}
#: the module path -> (shared point, per-projection point)
POINT_OF = {hf: (shared, own) for hf, shared, own in PROJECTIONS.values()}


def common_state(m: FileModel, prefix: str) -> dict[str, np.ndarray]:
    """Embedding and norms under transformers' Llama / Qwen3 names."""
    out = {prefix + "embed_tokens.weight": m.floats["token_embd.weight"],
           prefix + "norm.weight": m.floats["output_norm.weight"]}
    for i in range(m.n_layer):
        b, hb = f"blk.{i}.", f"{prefix}layers.{i}."
        out[hb + "input_layernorm.weight"] = m.floats[b + "attn_norm.weight"]
        out[hb + "post_attention_layernorm.weight"] = m.floats[b + "ffn_norm.weight"]
        if b + "attn_q_norm.weight" in m.floats:
            out[hb + "self_attn.q_norm.weight"] = m.floats[b + "attn_q_norm.weight"]
            out[hb + "self_attn.k_norm.weight"] = m.floats[b + "attn_k_norm.weight"]
    if not m.tied and prefix:
        out["lm_head.weight"] = m.floats["output.weight"]
    return out


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo bitnet.cpp's converter's Q/K row permutation (model-families A.2: it wrote
    w.reshape(n_head, 2, rows / n_head / 2, cols).swapaxes(1, 2)), giving back Hugging Face's
    half-split RoPE order."""
    rows, cols = w.shape
    return w.reshape(n_head, rows // n_head // 2, 2, cols).swapaxes(1, 2).reshape(rows, cols)


def pack_bitnet(t: np.ndarray) -> np.ndarray:
    """Ternary (out, in) -> transformers' BitLinear weight, uint8 (out / 4, in): row band i
    (rows i*out/4 .. (i+1)*out/4 - 1) at bits 2i..2i+1, code = t + 1 (model-families A.2)."""
    c = (t.astype(np.int16) + 1).astype(np.uint8)
    c = c.reshape(4, t.shape[0] // 4, t.shape[1])
    return c[0] | (c[1] << 2) | (c[2] << 4) | (c[3] << 6)


def config_dict(m: FileModel, model_type: str, architecture: str) -> dict[str, object]:
    return {
        "model_type": model_type, "architectures": [architecture],
        "hidden_size": m.n_embd, "intermediate_size": m.n_ff,
        "num_hidden_layers": m.n_layer, "num_attention_heads": m.n_head,
        "num_key_value_heads": m.n_head_kv, "head_dim": m.head_dim, "hidden_act": "silu",
        "max_position_embeddings": m.n_ctx, "rms_norm_eps": m.eps,
        "rope_parameters": {"rope_type": "default", "rope_theta": m.base, **m.rope_scaling},
        "vocab_size": m.n_vocab, "tie_word_embeddings": m.tied, "attention_bias": False,
        "dtype": "float32",
    }


def save_checkpoint(directory: Path, config: dict[str, object],
                    state: dict[str, np.ndarray]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(config))
    save_file({k: torch.from_numpy(np.array(v, order="C")) for k, v in state.items()},
              str(directory / "model.safetensors"))
    return directory


def llama_checkpoint(path: Path, directory: Path, *, unpermute: bool = True) -> Path:
    """A LlamaForCausalLM BitNet checkpoint (model-families A.2) of a Llama-graph I2_S file;
    unpermute=False leaves Q/K in the file's row order (a wrong model, for a test)."""
    m = read_file_model(path)
    assert m.arch == "llama" and not m.ternary.keys() & m.floats.keys()
    state = common_state(m, "model.")
    for i in range(m.n_layer):
        for gguf_name, (hf_name, _, _) in PROJECTIONS.items():
            t, scale = m.ternary[f"blk.{i}.{gguf_name}.weight"]
            if unpermute and gguf_name in ("attn_q", "attn_k"):
                t = unpermute_rows(t, m.n_head if gguf_name == "attn_q" else m.n_head_kv)
            key = f"model.layers.{i}.{hf_name}."
            state[key + "weight"] = pack_bitnet(t)
            # the file's scale is already 1 / weight_scale (trap A.3.4): BitLinear divides
            state[key + "weight_scale"] = np.array([np.float32(1) / scale], np.float32)
    config = config_dict(m, "llama", "LlamaForCausalLM")
    config["mlp_bias"] = False
    config["quantization_config"] = {"quant_method": "bitnet",
                                     "modules_to_not_convert": ["lm_head"]}
    return save_checkpoint(directory, config, state)


def latent_weight(t: np.ndarray, scale: np.float32) -> np.ndarray:
    """A float weight that AutoBitLinear's online WeightQuant turns into t * scale. WeightQuant
    computes m = mean|w|, round(w / m) clamped to [-1, 1], times m (model-families B.1). With
    w = t * scale / p, p the fraction of nonzero t, mean|w| = scale, and w / m = ±1/p rounds
    to ±1 or beyond (clamped back to ±1) since p <= 1."""
    p = np.count_nonzero(t) / t.size
    return (t.astype(np.float32) * np.float32(scale / p)).astype(np.float32)


def qwen3_embed_checkpoint(path: Path, directory: Path) -> Path:
    """A Qwen3Model checkpoint with AutoBitLinear projections (model-families B.1): latent
    weights and each projection's input norm as AutoBitLinear's rms_norm."""
    m = read_file_model(path)
    assert m.arch == "qwen3" and m.ternary
    state = common_state(m, "")
    for i in range(m.n_layer):
        for gguf_name, (hf_name, _, _) in PROJECTIONS.items():
            key, b = f"layers.{i}.{hf_name}.", f"blk.{i}.{gguf_name}"
            state[key + "weight"] = latent_weight(*m.ternary[b + ".weight"])
            state[key + "rms_norm.weight"] = m.floats[b + "_norm_in.weight"]
    config = config_dict(m, "qwen3", "Qwen3Model")
    config["quantization_config"] = {
        "quant_method": "bitnet", "linear_class": "autobitlinear",
        "quantization_mode": "online", "use_rms_norm": True, "rms_norm_eps": m.eps}
    return save_checkpoint(directory, config, state)


def bonsai_checkpoint(path: Path, directory: Path) -> Path:
    """A plain float Qwen3ForCausalLM checkpoint of a Q2_0 file (model-families C.1)."""
    m = read_file_model(path)
    assert m.arch == "qwen3" and not m.ternary
    state = common_state(m, "model.")
    for i in range(m.n_layer):
        for gguf_name, (hf_name, _, _) in PROJECTIONS.items():
            state[f"model.layers.{i}.{hf_name}.weight"] = m.floats[f"blk.{i}.{gguf_name}.weight"]
    return save_checkpoint(directory, config_dict(m, "qwen3", "Qwen3ForCausalLM"), state)


# ------------------------------------------------------------------------------------------
# Running transformers with traceable int8 activations


@contextmanager
def eager() -> Iterator[None]:
    with torch.no_grad(), torch.compiler.set_stance("force_eager"):
        yield


class Hooks:
    """Routes the int8 activations of a transformers model through a reference_model
    Quantizer (trace and tie-flip overrides) while `quantizer` is set."""

    def __init__(self) -> None:
        self.quantizer: ref.Quantizer | None = None

    def adjust(self, layer: int, point: str, q: torch.Tensor, scaled: torch.Tensor
               ) -> torch.Tensor:
        """q (1, T, K) as the quantization computed it, scaled = x*s; returns q after the
        overrides."""
        if self.quantizer is None:
            return q
        qn = q[0].to(torch.int64).numpy().copy()
        self.quantizer.adjust(layer, point, qn, scaled[0].numpy().copy())
        return torch.from_numpy(qn).to(q.dtype)[None]


def per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, s, x*s): s = 127 / max(|x|, 1e-5) per token, q = x*s rounded half to even and
    clamped to [-128, 127] (as float), the formula of transformers' ActQuant and of the
    engine (model-format §5.4.1-§5.4.2)."""
    s = 127 / x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-5)
    scaled = x * s
    return scaled.round().clamp(-128, 127), s, scaled


def layer_and_module(name: str) -> tuple[int, str]:
    """'model.layers.3.self_attn.q_proj' -> (3, 'self_attn.q_proj')."""
    parts = name.split(".")
    i = parts.index("layers")
    return int(parts[i + 1]), ".".join(parts[i + 2:])


def hook_bitlinear(model: torch.nn.Module, hooks: Hooks) -> int:
    """Wrap every BitLinear's own activation_quant: it still computes the int8 values (and
    they are used), the hook only records x*s and applies overrides."""
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, hf_bitnet.BitLinear):
            continue
        layer, path = layer_and_module(name)
        point = POINT_OF[path][0]

        def activation_quant(x: torch.Tensor, num_bits: int = 8, *,
                             _orig: Callable = mod.activation_quant, _layer: int = layer,
                             _point: str = point) -> tuple[torch.Tensor, torch.Tensor]:
            q, s = _orig(x, num_bits)
            return hooks.adjust(_layer, _point, q, x * s), s

        mod.activation_quant = activation_quant
        n += 1
    return n


def hook_autobitlinear(model: torch.nn.Module, hooks: Hooks,
                       monkeypatch: pytest.MonkeyPatch) -> int:
    """AutoBitLinear quantizes through the module-level ActQuant (after its own RMSNorm): a
    pre-hook on each module says which projection runs, and ActQuant is wrapped so that its
    output q / s gets the overrides. The wrapper recomputes q and s by ActQuant's formula and
    requires q / s to equal ActQuant's own result bit for bit, so the trace is of the values
    transformers rounded."""
    current = [(0, "")]  # the projection whose forward runs

    def enter(where: tuple[int, str]) -> Callable[..., None]:
        def pre(*_: object) -> None:
            current[0] = where
        return pre

    hf_act_quant = hf_bitnet.ActQuant

    class TracedActQuant:
        @staticmethod
        def apply(x: torch.Tensor) -> torch.Tensor:
            y = hf_act_quant.apply(x)
            if hooks.quantizer is None:
                return y
            q, s, scaled = per_token_int8(x)
            assert torch.equal(q / s, y)
            return hooks.adjust(*current[0], q, scaled) / s

    n = 0
    for name, mod in model.named_modules():
        if isinstance(mod, hf_bitnet.AutoBitLinear):
            layer, path = layer_and_module(name)
            mod.register_forward_pre_hook(enter((layer, POINT_OF[path][1])))
            n += 1
    monkeypatch.setattr(hf_bitnet, "ActQuant", TracedActQuant)
    return n


def quantize_linear_inputs(model: torch.nn.Module, n_layer: int, hooks: Hooks) -> int:
    """While hooks.quantizer is set, feed every projection (and the head) of a float model
    per-token int8 activations q / s (per_token_int8), as the engine does for Q2_0
    (model-format §10.6.2, §10.6.3). Without a quantizer the model is the plain float one."""
    n = 0
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        if name == "lm_head":
            layer, point = n_layer, "head"
        else:
            layer, path = layer_and_module(name)
            point = POINT_OF[path][0]

        def pre(_mod: torch.nn.Module, args: tuple[torch.Tensor, ...], *, _layer: int = layer,
                _point: str = point) -> tuple[torch.Tensor, ...] | None:
            if hooks.quantizer is None:
                return None
            q, s, scaled = per_token_int8(args[0])
            return (hooks.adjust(_layer, _point, q, scaled) / s, *args[1:])

        mod.register_forward_pre_hook(pre)
        n += 1
    return n


def hf_rows(model: torch.nn.Module, tokens: list[int], hooks: Hooks | None = None,
            quantizer: ref.Quantizer | None = None) -> np.ndarray:
    """Logits (causal LM) or final-norm hidden rows (Qwen3Model) of every position."""
    if hooks is not None:
        hooks.quantizer = quantizer
    try:
        with eager():
            out = model(input_ids=torch.tensor([tokens]))
    finally:
        if hooks is not None:
            hooks.quantizer = None
    rows = out.logits if hasattr(out, "logits") else out.last_hidden_state
    return rows[0].float().numpy().copy()


def match_hf(model: torch.nn.Module, hooks: Hooks, tokens: list[int],
             got: np.ndarray) -> ref.Match:
    """The tolerance rule of test_reference.py with transformers as the reference: tie flips
    are applied to transformers' own int8 activations."""
    def run(n: int, quantizer: ref.Quantizer) -> np.ndarray:
        return hf_rows(model, tokens[:n], hooks, quantizer)

    return ref.match_rows(run, got, tol=TOLERANCE, max_flips=flip_cap(len(tokens)))


def logprob_gap(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """|Δ log-probability| over every position and vocabulary entry."""
    return np.abs(log_softmax(a) - log_softmax(b))


def report(label: str, got: np.ndarray, plain: np.ndarray, flipped: np.ndarray,
           m: ref.Match) -> None:
    """Print the figures: |Δlogprob| against transformers as it is and with the tie flips,
    and the relative errors of the tolerance rule."""
    d, f = logprob_gap(got, plain), logprob_gap(got, flipped)
    print(f"{label}: |Δlogprob| max {d.max():.3g} median {np.median(d):.3g} (last position "
          f"{d[-1].max():.3g}); with {len(m.flips)} tie flips max {f.max():.3g} median "
          f"{np.median(f):.3g}; rel error max {m.raw_errors.max():.3g}, with flips "
          f"{m.errors.max():.3g}")


def load_hf(cls: type, directory: Path) -> torch.nn.Module:
    """Load through transformers' own path (its quantizer replaces the linear layers); every
    tensor of the checkpoint must have found its parameter and every parameter its tensor."""
    model, info = cls.from_pretrained(directory, dtype=torch.float32, output_loading_info=True)
    assert not any(info.values()), info
    return model.eval()


# ------------------------------------------------------------------------------------------
# Family A: the Llama graph with I2_S projections (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58)

#: 8 query heads over 2 kv heads, head_dim 64: queries wider than n_embd
LLAMA_GQA = dataclasses.replace(gw.TINY_LLAMA, n_head=8, n_head_kv=2, n_head_dim=64)


@pytest.mark.parametrize("shape,seed,tie,n,chunks", [
    (gw.TINY_LLAMA, 81, False, 40, [40]),
    (LLAMA_GQA, 82, False, 48, [32, 1, 1, 14]),
    (gw.TINY_LLAMA, 83, True, 33, [20, 1, 12]),
], ids=["tiny", "gqa-decode", "tied"])
def test_llama_i2s_against_transformers_bitlinear(tmp_path: Path, shape: gw.ModelShape,
                                                   seed: int, tie: bool, n: int,
                                                   chunks: list[int]) -> None:
    """Every position's logits, the engine fed in chunks (prefill, then single-token steps)
    and transformers in one pass, by the tolerance rule."""
    path = gw.write_model(tmp_path / "m.gguf", shape, seed, tie_head=tie)
    model = load_hf(transformers.LlamaForCausalLM, llama_checkpoint(path, tmp_path / "hf"))
    hooks = Hooks()
    assert hook_bitlinear(model, hooks) == 7 * shape.n_layer  # lm_head stays float
    assert isinstance(model.lm_head, torch.nn.Linear)
    toks = tokens_for(shape.n_vocab, n, seed)
    got = engine_logits(native, path, chunked(toks, chunks), 256)
    m = match_hf(model, hooks, toks, got)
    report(f"llama seed {seed}", got, hf_rows(model, toks),
           hf_rows(model, toks, hooks, ref.Quantizer(m.overrides)), m)
    assert_matched(m)


def test_llama_transformers_comparison_sees_the_rope_pairing(tmp_path: Path) -> None:
    """The comparison can fail: leaving the Q/K rows in the file's order (so that
    transformers' half-split RoPE rotates the wrong pairs, trap A.3.1) is far off."""
    path = gw.write_model(tmp_path / "m.gguf", gw.TINY_LLAMA, 84)
    model = load_hf(transformers.LlamaForCausalLM,
                    llama_checkpoint(path, tmp_path / "hf", unpermute=False))
    toks = tokens_for(gw.TINY_LLAMA.n_vocab, 40, 84)
    got = engine_logits(native, path, [toks], 256)
    wrong = rel_errors(got, hf_rows(model, toks))
    assert wrong[0] < 1e-5  # position 0 is not rotated
    assert np.median(wrong[1:]) > 10 * TOLERANCE


# ------------------------------------------------------------------------------------------
# Family B: the Qwen3 graph of BitNet-embedding-0.6B (I2_S, per-projection input norms)

QWEN3_GQA = dataclasses.replace(gw.TINY_QWEN3_EMBED, n_head=8, n_head_kv=2)


@pytest.mark.parametrize("shape,seed,n", [
    (gw.TINY_QWEN3_EMBED, 91, 24),
    (QWEN3_GQA, 92, 40),
], ids=["tiny", "gqa"])
def test_qwen3_embedding_against_transformers_autobitlinear(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, shape: gw.ModelShape, seed: int,
        n: int) -> None:
    """The final-norm rows by the tolerance rule (tie flips in transformers' activations), then
    the pooled, L2-normalised vector: cosine and max |Δ| against transformers' with those
    flips (and, printed, without them)."""
    path = gw.write_model(tmp_path / "m.gguf", shape, seed)
    model = load_hf(transformers.Qwen3Model, qwen3_embed_checkpoint(path, tmp_path / "hf"))
    autobit = [mod for mod in model.modules() if isinstance(mod, hf_bitnet.AutoBitLinear)]
    assert len(autobit) == 7 * shape.n_layer and all(mod.rms_norm is not None
                                                     for mod in autobit)
    assert all(mod.online_quant for mod in autobit)
    hooks = Hooks()
    hook_autobitlinear(model, hooks, monkeypatch)
    # the pooled token is the EOS the tokenizer appends (model-format §10.5.5)
    loaded = native.Model.load(path)
    try:
        eos_id = loaded.metadata("tokenizer.ggml.eos_token_id")
    finally:
        loaded.close()
    toks = tokens_for(shape.n_vocab, n - 1, seed) + [eos_id]
    got = engine_hidden(native, path, toks)
    m = match_hf(model, hooks, toks, got)
    plain = hf_rows(model, toks)
    flipped = hf_rows(model, toks, hooks, ref.Quantizer(m.overrides))
    vec = embedding.pool([got[-1]], "last").astype(np.float64)

    def l2(rows: np.ndarray) -> np.ndarray:
        return torch.nn.functional.normalize(torch.from_numpy(rows[-1]).double(), dim=0).numpy()

    figures = {}
    for label, rows in (("plain", plain), ("flips", flipped)):
        want = l2(rows)
        figures[label] = (float(vec @ want), float(np.abs(vec - want).max()))
    print(f"qwen3 embed seed {seed}: " + "; ".join(
        f"{k} cosine {c:.10f} max |Δ| {d:.3g}" for k, (c, d) in figures.items())
        + f"; hidden rows plain rel max {m.raw_errors.max():.3g}, {len(m.flips)} tie flips, "
        f"then {m.errors.max():.3g}")
    assert_matched(m)
    cos, diff = figures["flips"]
    assert cos > 1 - 1e-6 and diff < 1e-3


# ------------------------------------------------------------------------------------------
# Family C: Ternary Bonsai, the Qwen3 graph with Q2_0 weights

BONSAI_GQA = dataclasses.replace(gw.TINY_BONSAI, n_head=8, n_head_kv=2, n_head_dim=64)


#: Bonsai-8B's RoPE scaling (YaRN, factor 4) over an original context of 32 in a context of
#: 320, so one sequence runs below and above it (model-format §5.2.3.1)
BONSAI_YARN = dataclasses.replace(gw.TINY_BONSAI, n_ctx=320, rope_scaling="yarn",
                                  rope_scaling_factor=4.0, rope_scaling_orig_ctx=32)


@pytest.fixture(scope="module")
def bonsai_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """name -> (GGUF file, transformers checkpoint made from it)."""
    d = tmp_path_factory.mktemp("bonsai-hf")
    out = {}
    for name, shape, seed, tie in (("tied", gw.TINY_BONSAI, 101, True),
                                   ("untied", gw.TINY_BONSAI, 102, False),
                                   ("gqa", BONSAI_GQA, 103, False),
                                   ("yarn", BONSAI_YARN, 104, False)):
        path = gw.write_model(d / f"{name}.gguf", shape, seed, tie_head=tie)
        out[name] = (path, bonsai_checkpoint(path, d / f"{name}-hf"))
    return out


@pytest.mark.parametrize("which,n,chunks", [
    ("tied", 40, [40]),
    ("untied", 33, [20, 1, 12]),
    ("gqa", 48, [32, 1, 1, 14]),
    ("yarn", 120, [90, 1, 1, 28]),
])
def test_bonsai_q2_0_against_transformers_with_int8_activations(
        bonsai_models: dict[str, tuple[Path, Path]], which: str, n: int,
        chunks: list[int]) -> None:
    """Qwen3ForCausalLM on the dequantized weights, every projection and the head fed the
    engine's per-token int8 activations: the tolerance rule of the other families."""
    path, directory = bonsai_models[which]
    model = load_hf(transformers.Qwen3ForCausalLM, directory)
    hooks = Hooks()
    # 7 projections per layer, and the head (Q2_0, or tied to the Q2_0 embedding)
    assert quantize_linear_inputs(model, gw.TINY_BONSAI.n_layer, hooks) == 7 * 2 + 1
    toks = tokens_for(gw.TINY_BONSAI.n_vocab, n, 110 + n)
    got = engine_logits(native, path, chunked(toks, chunks), 256)
    m = match_hf(model, hooks, toks, got)
    report(f"bonsai {which} int8 activations", got, hf_rows(model, toks, hooks, ref.Quantizer()),
           hf_rows(model, toks, hooks, ref.Quantizer(m.overrides)), m)
    assert_matched(m)


@pytest.mark.parametrize("which", ["tied", "untied", "gqa", "yarn"])
def test_bonsai_q2_0_against_the_float_transformers_model(
        bonsai_models: dict[str, tuple[Path, Path]], which: str) -> None:
    """The model's own math (float activations), against the fact sheet's bar for an engine
    that quantizes activations (model-families C.2: max |Δlogprob| < 0.1, median < 0.02).

    On these tiny random models the median holds (about 0.015) but the max can exceed 0.1 for
    transformers itself: the same model with per-token int8 activations, computed entirely by
    transformers, is 0.11-0.14 from its float version (the bar was measured on the fact
    sheet's own reference file). So the max may pass 0.1 only where transformers' int8 model
    does, with the engine's tie flips (the strict comparison above) applied to it."""
    path, directory = bonsai_models[which]
    model = load_hf(transformers.Qwen3ForCausalLM, directory)
    hooks = Hooks()
    quantize_linear_inputs(model, gw.TINY_BONSAI.n_layer, hooks)
    toks = tokens_for(gw.TINY_BONSAI.n_vocab, 60, 120)
    got = engine_logits(native, path, [toks], 256)
    want = hf_rows(model, toks)
    m = match_hf(model, hooks, toks, got)
    assert_matched(m)
    own = logprob_gap(hf_rows(model, toks, hooks, ref.Quantizer(m.overrides)), want)
    d = logprob_gap(got, want)
    print(f"bonsai {which} float activations: engine |Δlogprob| max {d.max():.3g} median "
          f"{np.median(d):.3g}; transformers int8 (same flips) vs float max {own.max():.3g} "
          f"median {np.median(own):.3g}")
    assert np.median(d) < 0.02
    assert d.max() < 0.1 or d.max() < own.max() + 1e-3, (d.max(), own.max())


def test_bonsai_yarn_transformers_comparison_sees_the_scaling(
        bonsai_models: dict[str, tuple[Path, Path]], tmp_path: Path) -> None:
    """transformers really runs YaRN from the checkpoint's rope_parameters: its rotary
    embedding carries the 1 + 0.1 ln 4 magnitude, and the same weights with unscaled RoPE (or
    YaRN without that magnitude) are far from the engine, below the original context (32) and
    above it."""
    path, directory = bonsai_models["yarn"]
    model = load_hf(transformers.Qwen3ForCausalLM, directory)
    assert model.model.rotary_emb.attention_scaling == pytest.approx(1 + 0.1 * np.log(4.0))
    hooks = Hooks()
    quantize_linear_inputs(model, gw.TINY_BONSAI.n_layer, hooks)
    toks = tokens_for(gw.TINY_BONSAI.n_vocab, 80, 121)
    got = engine_logits(native, path, [toks], 256)
    m = match_hf(model, hooks, toks, got)
    assert_matched(m)
    config = json.loads((directory / "config.json").read_text())
    for label, params in (("unscaled", {"rope_type": "default"}),
                          ("no magnitude", {**config["rope_parameters"],
                                            "attention_factor": 1.0})):
        wrong_dir = tmp_path / label.replace(" ", "-")
        wrong_dir.mkdir()
        (wrong_dir / "config.json").write_text(json.dumps({
            **config, "rope_parameters": {**params, "rope_theta": config["rope_parameters"][
                "rope_theta"]}}))
        (wrong_dir / "model.safetensors").symlink_to(directory / "model.safetensors")
        wrong_model = load_hf(transformers.Qwen3ForCausalLM, wrong_dir)
        quantize_linear_inputs(wrong_model, gw.TINY_BONSAI.n_layer, hooks)
        wrong = rel_errors(got, hf_rows(wrong_model, toks, hooks, ref.Quantizer(m.overrides)))
        assert np.median(wrong[1:32]) > 10 * TOLERANCE, label
        assert np.median(wrong[32:]) > 10 * TOLERANCE, label
