"""The forward pass's per-token steps against their plain references, bit for bit.

RMSNorm, RoPE and causal attention are each written twice in native/: the engine's version
(forward.c, reached through the test-only bn_test_* entry points) and a plain scalar loop
written from docs/spec/model-format.md §5.2 (reference.c, bn_ref_*). Both must give identical
float32 results on random shapes and inputs, as tests/test_kernels.py requires of the BitLinear
kernel sets. The references sum in the engine's fixed order where the engine fixes one (see
reference.c), so equality is exact, not approximate.

These steps do not go through the selectable kernel sets: attention picks its own
vector-width clone by CPU (target_clones), so it is checked on the clone this machine runs;
running each test under every kernel set checks that selecting one does not change them.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest
from bitnetd_trio._native import ffi, lib

from bitnetd_trio.engine import native as engine

KERNELS = ("scalar", "avx2", "avx512vnni", "amx")


def _supported(name: str) -> bool:
    return lib.bn_kernel_select(name.encode()) == 0


@pytest.fixture(params=KERNELS)
def kernel(request: pytest.FixtureRequest) -> Iterator[str]:
    before = engine.kernel_name()
    if not _supported(request.param):
        pytest.skip(f"no {request.param} on this CPU")
    yield request.param
    engine.select_kernel(before)


def _f32(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=np.float32)


def _ptr(a: np.ndarray) -> object:
    return ffi.cast("float *", ffi.from_buffer(a))


def _values(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Normal values at a random scale, now and then with a few large outliers."""
    x = rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 3)
    if rng.random() < 0.3:
        flat = x.reshape(-1)
        flat[rng.integers(0, flat.size, size=max(1, flat.size // 50))] *= 1e3
    return _f32(x)


def rmsnorm(fn: object, x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    out = np.empty_like(x)
    assert fn(_ptr(x), _ptr(w), x.size, eps, _ptr(out)) == 0  # type: ignore[operator]
    return out


def scaling(kind: str = "none", factor: float = 1.0, orig_ctx: int = 0,
            beta_fast: float = 32.0, beta_slow: float = 1.0, attn_factor: float = 1.0) -> object:
    """A bn_rope_scaling (model-format §5.2.3.1)."""
    types = {"none": lib.BN_ROPE_SCALING_NONE, "linear": lib.BN_ROPE_SCALING_LINEAR,
             "yarn": lib.BN_ROPE_SCALING_YARN}
    return ffi.new("bn_rope_scaling *", {
        "type": types[kind], "factor": factor, "orig_ctx": orig_ctx, "beta_fast": beta_fast,
        "beta_slow": beta_slow, "attn_factor": attn_factor})


def rope(fn: object, v: np.ndarray, pos: int, base: float, sc: object = None,
         adjacent: bool = False) -> np.ndarray:
    v = v.copy()
    n_heads, head_dim = v.shape
    rc = fn(_ptr(v), n_heads, head_dim, pos, base, sc or ffi.NULL, int(adjacent))  # type: ignore[operator]
    assert rc == 0
    return v


def random_scaling(rng: np.random.Generator) -> object:
    """None, linear or yarn with the loader's ranges: YaRN bounds below 0, inside the head and
    above it, betas and attn_factor now and then not the defaults."""
    kind = str(rng.choice(["none", "linear", "yarn", "yarn"]))
    factor = float(rng.choice([1.0, 2.0, 4.0, 40.0, rng.uniform(1, 64)]))
    orig = int(rng.choice([1, 32, 4096, 16384, int(rng.integers(1, 1 << 20))]))
    fast, slow = (32.0, 1.0) if rng.random() < 0.6 else (float(rng.uniform(0.5, 64)),
                                                          float(rng.uniform(0.01, 4)))
    attn = 1.0 if rng.random() < 0.6 else float(rng.uniform(0.5, 2))
    return scaling(kind, factor, orig, fast, slow, attn)


def attention(fn: object, q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    n_head, head_dim = q.shape
    n_pos, n_head_kv, _ = k.shape
    out = np.empty_like(q)
    rc = fn(_ptr(q), _ptr(k), _ptr(v), n_pos, n_head, n_head_kv, head_dim, _ptr(out))  # type: ignore[operator]
    assert rc == 0
    return out


@pytest.mark.parametrize("seed", range(40))
def test_rmsnorm_matches_reference(kernel: str, seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.choice([1, 7, 8, 9, 64, 127, 128, 640, int(rng.integers(1, 3000))]))
    x, w = _values(rng, (n,)), _f32(rng.standard_normal(n))
    eps = float(rng.choice([1e-5, 1e-6, 0.0]))
    got = rmsnorm(lib.bn_test_rmsnorm, x, w, eps)
    want = rmsnorm(lib.bn_ref_rmsnorm, x, w, eps)
    assert np.array_equal(got, want, equal_nan=True)


@pytest.mark.parametrize("seed", range(40))
def test_rope_matches_reference(kernel: str, seed: int) -> None:
    rng = np.random.default_rng(100 + seed)
    n_heads = int(rng.integers(1, 9))
    head_dim = int(rng.choice([2, 4, 14, 40, 64, 128, 2 * int(rng.integers(1, 129))]))
    pos = int(rng.choice([0, 1, int(rng.integers(0, 4096)), int(rng.integers(0, 1 << 20))]))
    base = float(rng.choice([10000.0, 500000.0]))
    v = _values(rng, (n_heads, head_dim))
    got = rope(lib.bn_test_rope, v, pos, base)
    want = rope(lib.bn_ref_rope, v, pos, base)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("seed", range(60))
def test_scaled_rope_matches_reference(kernel: str, seed: int) -> None:
    """Linear and YaRN scaling (model-format §5.2.3.1), both pairings: the engine's angle table
    and the plain loop give the same bits."""
    rng = np.random.default_rng(300 + seed)
    n_heads = int(rng.integers(1, 9))
    head_dim = int(rng.choice([2, 4, 64, 128, 2 * int(rng.integers(1, 129))]))
    pos = int(rng.choice([0, 1, int(rng.integers(0, 4096)), int(rng.integers(0, 1 << 20))]))
    base = float(rng.choice([10000.0, 1e6, 1000042.0, 1.5]))
    sc, adjacent = random_scaling(rng), bool(rng.integers(0, 2))
    v = _values(rng, (n_heads, head_dim))
    got = rope(lib.bn_test_rope, v, pos, base, sc, adjacent)
    want = rope(lib.bn_ref_rope, v, pos, base, sc, adjacent)
    assert np.array_equal(got, want)


@pytest.mark.parametrize("kind", ["linear", "yarn"])
def test_scaled_rope_reference_is_the_math(kind: str) -> None:
    """The plain loop against the scaling math written here in float64 (Bonsai-8B's values:
    base 1e6, factor 4, original context 16384, D 128; YaRN bounds floor(20.38) = 20 and
    ceil(36.44) = 37), at positions below and above the original context."""
    head_dim, base, factor, orig = 128, 1e6, 4.0, 16384
    sc = scaling(kind, factor, orig if kind == "yarn" else 0)
    i = np.arange(head_dim // 2)
    freq = base ** (-2.0 * i / head_dim)
    if kind == "yarn":
        lo, hi = 20, 37
        for n, bound in ((32, lo), (1, hi)):
            dim = head_dim * np.log(orig / (2 * np.pi * n)) / (2 * np.log(base))
            assert (np.floor if n == 32 else np.ceil)(dim) == bound
        interp = np.clip((i - lo) / (hi - lo), 0, 1)
        freq = freq / factor * interp + freq * (1 - interp)
        mag = 1 + 0.1 * np.log(factor)
    else:
        freq, mag = freq / factor, 1.0
    rng = np.random.default_rng(9)
    for pos in (1, 5000, 16383, 16384, 60000):
        v = _f32(rng.standard_normal((2, head_dim)))
        got = rope(lib.bn_ref_rope, v, pos, base, sc)
        theta = pos * freq
        a, b = v[:, : head_dim // 2].astype(np.float64), v[:, head_dim // 2:].astype(np.float64)
        c, s = np.cos(theta) * mag, np.sin(theta) * mag
        want = np.concatenate([a * c - b * s, a * s + b * c], axis=1)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_rope_pairs_halves() -> None:
    """The reference itself is the spec's NeoX pairing: (v[i], v[i + D/2]) turns, at angle
    pos * base^(-2i/D), computed here in float64 independently of the C code."""
    rng = np.random.default_rng(5)
    head_dim, pos, base = 16, 7, 10000.0
    v = _f32(rng.standard_normal((2, head_dim)))
    got = rope(lib.bn_ref_rope, v, pos, base)
    i = np.arange(head_dim // 2)
    theta = pos * base ** (-2.0 * i / head_dim)
    a, b = v[:, : head_dim // 2].astype(np.float64), v[:, head_dim // 2 :].astype(np.float64)
    want = np.concatenate([a * np.cos(theta) - b * np.sin(theta),
                           a * np.sin(theta) + b * np.cos(theta)], axis=1)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("seed", range(40))
def test_attention_matches_reference(kernel: str, seed: int) -> None:
    rng = np.random.default_rng(200 + seed)
    n_head_kv = int(rng.integers(1, 5))
    group = int(rng.choice([1, 2, 3, 4, 8]))
    n_head = n_head_kv * group
    head_dim = int(rng.choice([2, 8, 14, 16, 40, 64, 100, 128, 130, 256]))
    n_pos = int(rng.choice([1, 2, 3, 5, int(rng.integers(1, 300))]))
    q = _values(rng, (n_head, head_dim))
    k = _values(rng, (n_pos, n_head_kv, head_dim))
    v = _values(rng, (n_pos, n_head_kv, head_dim))
    got = attention(lib.bn_test_attention, q, k, v)
    want = attention(lib.bn_ref_attention, q, k, v)
    assert np.array_equal(got, want)


def test_attention_reference_is_softmax_attention() -> None:
    """The reference itself is the spec's attention, checked against float64 numpy."""
    rng = np.random.default_rng(9)
    n_pos, n_head_kv, group, head_dim = 6, 2, 2, 8
    q = _f32(rng.standard_normal((n_head_kv * group, head_dim)))
    k = _f32(rng.standard_normal((n_pos, n_head_kv, head_dim)))
    v = _f32(rng.standard_normal((n_pos, n_head_kv, head_dim)))
    got = attention(lib.bn_ref_attention, q, k, v)
    kv_head = np.arange(n_head_kv * group) // group
    scores = np.einsum("hd,thd->ht", q.astype(np.float64), k[:, kv_head].astype(np.float64))
    p = np.exp(scores / np.sqrt(head_dim) - (scores / np.sqrt(head_dim)).max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    want = np.einsum("ht,thd->hd", p, v[:, kv_head].astype(np.float64))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_entry_points_refuse_bad_arguments() -> None:
    x = np.zeros(8, np.float32)
    assert lib.bn_test_rmsnorm(_ptr(x), _ptr(x), 0, 1e-5, _ptr(x)) == -1
    assert lib.bn_ref_rmsnorm(ffi.NULL, _ptr(x), 8, 1e-5, _ptr(x)) == -1
    assert lib.bn_test_rope(_ptr(x), 1, 7, 0, 10000.0, ffi.NULL, 0) == -1   # odd head_dim
    assert lib.bn_ref_rope(_ptr(x), 1, 8, -1, 10000.0, ffi.NULL, 0) == -1   # negative position
    bad = scaling()
    bad.type = 3  # no such scaling
    assert lib.bn_test_rope(_ptr(x), 1, 8, 0, 10000.0, bad, 0) == -1
    assert lib.bn_ref_rope(_ptr(x), 1, 8, 0, 10000.0, bad, 1) == -1
    assert lib.bn_test_attention(_ptr(x), _ptr(x), _ptr(x), 1, 3, 2, 4, _ptr(x)) == -1
    assert lib.bn_ref_attention(_ptr(x), _ptr(x), _ptr(x), 0, 1, 1, 8, _ptr(x)) == -1
