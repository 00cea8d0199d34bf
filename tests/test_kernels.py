"""BitLinear kernels: the numpy formula of model-format §5.4, and scalar == SIMD bit for bit.

Every kernel set must give identical results (the ternary dot products are exact int32, the
epilogue one scalar expression), whatever the thread count or the number of tokens.
"""

from __future__ import annotations

import numpy as np
import pytest

from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.gguf_writer import pack_i2s


def _available(name: str) -> bool:
    try:
        engine.ternary_matmul(
            pack_i2s(np.zeros((1, 128), np.int8)),
            1.0,
            128,
            1,
            np.zeros((1, 128), np.float32),
            kernel=name,
        )
    except engine.EngineError:
        return False
    return True


SIMD_KERNELS = ("avx2", "avx512vnni", "amx")
AVAILABLE = [k for k in SIMD_KERNELS if _available(k)]
HAS_AVX2 = "avx2" in AVAILABLE
needs_avx2 = pytest.mark.skipif(not HAS_AVX2, reason="this CPU has no AVX2/FMA/F16C")
#: every SIMD kernel set, skipped where the CPU lacks it
simd = pytest.mark.parametrize(
    "kernel",
    [
        pytest.param(k, marks=pytest.mark.skipif(k not in AVAILABLE, reason=f"no {k} on this CPU"))
        for k in SIMD_KERNELS
    ],
)


def bitlinear_reference(w: np.ndarray, scale: float, x: np.ndarray) -> np.ndarray:
    """Spec section 5 in numpy, float32 like the engine: per-token int8 quantization with
    round-half-to-even, exact integer dot products, (acc - qsum) / s * scale."""
    x = x.astype(np.float32)
    m = np.maximum(np.abs(x).max(axis=1), np.float32(1e-5)).astype(np.float32)
    s = (np.float32(127.0) / m).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int64)
    acc = q @ (w.astype(np.int64) + 1).T  # codes are weight + 1
    qsum = q.sum(axis=1, keepdims=True)
    diff = (acc - qsum).astype(np.float32)
    return (diff / s[:, None] * np.float32(scale)).astype(np.float32)


def random_case(
    rng: np.random.Generator, n_in: int, n_out: int, n_tok: int, kind: str = "normal"
) -> tuple[np.ndarray, np.ndarray]:
    w = rng.integers(-1, 2, size=(n_out, n_in), dtype=np.int8)
    if kind == "normal":
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    elif kind == "large":  # all +-1e30: every activation quantizes to +-127
        x = np.where(rng.random((n_tok, n_in)) < 0.5, -1e30, 1e30).astype(np.float32)
    elif kind == "zeros":
        x = np.zeros((n_tok, n_in), np.float32)
    elif kind == "tiny":  # denormal-ish: below the 1e-5 floor of max|x|
        x = (rng.standard_normal((n_tok, n_in)) * 1e-39).astype(np.float32)
    elif kind == "onehot":  # one huge value, the rest rounds to 0 or +-1
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
        x[:, rng.integers(0, n_in)] = 1e6
    else:
        raise ValueError(kind)
    return w, x


def run(kernel: str, w: np.ndarray, scale: float, x: np.ndarray, n_threads: int = 1) -> np.ndarray:
    n_out, n_in = w.shape
    return engine.ternary_matmul(
        pack_i2s(w, scale), scale, n_in, n_out, x, kernel=kernel, n_threads=n_threads
    )


@pytest.mark.parametrize("kind", ["normal", "large", "zeros", "tiny", "onehot"])
def test_scalar_matches_numpy_formula(kind: str) -> None:
    rng = np.random.default_rng(1)
    w, x = random_case(rng, 384, 37, 3, kind)
    got = run("scalar", w, 0.75, x)
    np.testing.assert_array_equal(got, bitlinear_reference(w, 0.75, x))


def test_saturating_extremes_exact() -> None:
    """All weights +1 and all activations +127 (or -128 after rounding): the largest possible
    int16 partial sums in the SIMD path, the exact total in the reference."""
    n_in = 2560
    for sign in (1.0, -1.0):
        w = np.ones((9, n_in), np.int8)
        x = np.full((2, n_in), sign * 3.0, np.float32)
        want = bitlinear_reference(w, 1.0, x)
        assert want[0, 0] == pytest.approx(sign * 3.0 * n_in, rel=1e-6)
        np.testing.assert_array_equal(run("scalar", w, 1.0, x), want)
        for k in AVAILABLE:
            np.testing.assert_array_equal(run(k, w, 1.0, x, n_threads=2), want)


@simd
@pytest.mark.parametrize("kind", ["normal", "large", "zeros", "tiny", "onehot"])
def test_simd_identical_to_scalar(kernel: str, kind: str) -> None:
    rng = np.random.default_rng(2)
    for _ in range(12):
        n_in = 128 * int(rng.integers(1, 30))
        n_out = int(rng.integers(1, 70))  # often not a multiple of 4 or of the threads
        n_tok = int(rng.integers(1, 9))
        n_threads = int(rng.integers(1, 4))
        w, x = random_case(rng, n_in, n_out, n_tok, kind)
        scale = float(rng.uniform(0.1, 3.0))
        want = run("scalar", w, scale, x)
        got = run(kernel, w, scale, x, n_threads=n_threads)
        np.testing.assert_array_equal(got, want, err_msg=f"{n_in}x{n_out} tokens {n_tok}")
        np.testing.assert_array_equal(want, bitlinear_reference(w, scale, x))


@simd
def test_real_shapes_and_thread_counts(kernel: str) -> None:
    rng = np.random.default_rng(3)
    w, x = random_case(rng, 2560, 640, 5)
    want = run("scalar", w, 1.25, x)
    for n_threads in (1, 2, 3, 7):
        np.testing.assert_array_equal(run(kernel, w, 1.25, x, n_threads=n_threads), want)


@simd
def test_many_rows_and_token_groups(kernel: str) -> None:
    """Enough rows for the 64-row AMX passes (plus a remainder), 2..20 tokens (token groups
    of 16 and a partial group), an odd number of 128-blocks (the natural-layout tail)."""
    rng = np.random.default_rng(6)
    for n_in, n_out, n_tok in ((2560, 1000, 8), (384, 200, 5), (1280, 130, 20), (3456, 300, 2)):
        w, x = random_case(rng, n_in, n_out, n_tok)
        want = bitlinear_reference(w, 0.5, x)
        for n_threads in (1, 2):
            np.testing.assert_array_equal(
                run(kernel, w, 0.5, x, n_threads=n_threads),
                want,
                err_msg=f"{n_in}x{n_out} tokens {n_tok}",
            )


@simd
def test_single_token_rows_with_any_codes(kernel: str) -> None:
    """The single-token tiles (planes masked in place, one accumulator per plane), over all
    byte values (code 3 included), even and odd numbers of 128-blocks, extreme inputs."""
    rng = np.random.default_rng(7)
    for n_in, n_out in ((2560, 300), (3456, 77), (128, 40)):
        packed = rng.integers(0, 256, size=n_out * n_in // 4, dtype=np.uint8).tobytes()
        for x in (
            rng.standard_normal((1, n_in)).astype(np.float32),
            np.full((1, n_in), -5.0, np.float32),
            np.full((1, n_in), 5.0, np.float32),
        ):
            want = engine.ternary_matmul(packed, 0.9, n_in, n_out, x, kernel="scalar")
            got = engine.ternary_matmul(packed, 0.9, n_in, n_out, x, kernel=kernel, n_threads=2)
            np.testing.assert_array_equal(got, want, err_msg=f"{n_in}x{n_out}")


def test_code_three_is_bounded() -> None:
    """Code 3 never occurs in a valid file; the kernels still agree (no int16 overflow)."""
    rng = np.random.default_rng(4)
    n_in, n_out = 1024, 13
    packed = bytearray(rng.integers(0, 256, size=n_out * n_in // 4, dtype=np.uint8).tobytes())
    packed[: n_in // 4] = b"\xff" * (n_in // 4)  # row 0: all codes 3
    x = np.full((2, n_in), -7.0, np.float32)
    a = engine.ternary_matmul(bytes(packed), 1.0, n_in, n_out, x, kernel="scalar")
    assert a[0, 0] == pytest.approx(2 * n_in * -7.0, rel=1e-6)  # (3 - 1) * x per input
    for k in AVAILABLE:
        b = engine.ternary_matmul(bytes(packed), 1.0, n_in, n_out, x, kernel=k, n_threads=2)
        np.testing.assert_array_equal(a, b)


def test_largest_input_size_exact_and_larger_refused() -> None:
    """n_in up to 2^22 keeps every int32 accumulator exact, even with code 3 everywhere (the
    masked AVX-512 planes hold 64x the plane's sum per lane); beyond it the kernels wrapped
    around (2^23 inputs of code 3 gave -8322556 instead of -16777216), so it is refused."""
    n_in, n_out = 1 << 22, 4  # 4 rows: the single-token masked tile
    for byte, xv, want in ((0xFF, -1.0, -2.0 * n_in), (0xAA, 1.0, float(n_in))):
        packed = bytes([byte]) * (n_out * n_in // 4)
        x = np.full((1, n_in), xv, np.float32)
        for k in ("scalar", *AVAILABLE):
            got = engine.ternary_matmul(packed, 1.0, n_in, n_out, x, kernel=k)
            np.testing.assert_array_equal(got, np.full((1, n_out), want, np.float32), err_msg=k)
    big = 1 << 23
    with pytest.raises(engine.EngineError):
        engine.ternary_matmul(
            b"\xff" * (n_out * big // 4), 1.0, big, n_out, np.full((1, big), -1.0, np.float32)
        )


def test_bad_arguments_are_refused() -> None:
    x = np.zeros((1, 100), np.float32)
    with pytest.raises(engine.EngineError):
        engine.ternary_matmul(b"\0" * 100, 1.0, 100, 4, x)  # n_in not a multiple of 128
    with pytest.raises(engine.EngineError):
        engine.ternary_matmul(
            b"\0" * 32, 1.0, 128, 1, np.zeros((1, 128), np.float32), kernel="no-such-kernel"
        )


def test_kernel_selection() -> None:
    name = engine.kernel_name()
    assert name in ("scalar", *SIMD_KERNELS)
    try:
        engine.select_kernel("scalar")
        assert engine.kernel_name() == "scalar"
        with pytest.raises(ValueError):
            engine.select_kernel("no-such-kernel")
        assert engine.kernel_name() == "scalar"
    finally:
        engine.select_kernel(name)


def logits_from_each_kernel(model: engine.Model) -> dict[str, np.ndarray]:
    """The logits of tokens 3..39 of `model` from the scalar set and every SIMD set this CPU
    has, one fresh context each (the selected set is restored)."""
    name = engine.kernel_name()
    out = {}
    try:
        for k in ("scalar", *AVAILABLE):
            engine.select_kernel(k)
            with engine.Context(model, 1, 64, 2) as ctx:
                ctx.forward([engine.BatchEntry(0, list(range(3, 40)), "all")])
                out[k] = np.stack([np.array(ctx.logits(0, t)) for t in range(37)])
    finally:
        engine.select_kernel(name)
    return out


@needs_avx2
def test_whole_model_same_logits_from_every_kernel(gqa_model_path) -> None:
    """The F16 head and embedding paths too: the same logits bit for bit from every kernel."""
    model = engine.Model.load(gqa_model_path)
    try:
        out = logits_from_each_kernel(model)
    finally:
        model.close()
    for k in AVAILABLE:
        np.testing.assert_array_equal(out["scalar"], out[k], err_msg=k)


# ---- Q2_0 (model-format §10.6): 18-byte blocks of 64, low bits first, (code - 1) * d -------


def sum16(p: np.ndarray) -> np.ndarray:
    """The fixed tree over the 16 partial sums in the last axis (kernels.h), in float32."""
    s8 = (p[..., :8] + p[..., 8:]).astype(np.float32)
    s4 = (s8[..., :4] + s8[..., 4:]).astype(np.float32)
    return ((s4[..., 0] + s4[..., 2]) + (s4[..., 1] + s4[..., 3])).astype(np.float32)


def q2_0_reference(codes: np.ndarray, d: np.ndarray, x: np.ndarray) -> np.ndarray:
    """model-format §10.6.2 in numpy: per-token int8 quantization as for I2_S, the exact
    integer sum of (code - 1) * q per block of 64, then 16 float32 partial sums, block g into
    lane g % 16 with a fused multiply-add, the fixed tree, divided by s. The fused step is
    computed in float64 and rounded once: every value is a multiple of 2^-24 (F16 scales times
    integers, and float32 roundings of such sums), so below 2^28 float64 holds it exactly."""
    x = x.astype(np.float32)
    m = np.maximum(np.abs(x).max(axis=1), np.float32(1e-5)).astype(np.float32)
    s = (np.float32(127.0) / m).astype(np.float32)
    q = np.clip(np.rint(x * s[:, None]), -128, 127).astype(np.int64)
    n_out, n_in = codes.shape
    t = codes.astype(np.int64).reshape(n_out, n_in // 64, 64) - 1
    isum = np.einsum("tgk,rgk->trg", q.reshape(-1, n_in // 64, 64), t)
    dd = d.astype(np.float64)
    p = np.zeros((x.shape[0], n_out, 16), np.float32)
    for g in range(n_in // 64):
        exact = isum[:, :, g].astype(np.float64) * dd[None, :, g] + p[:, :, g % 16]
        assert np.all(np.abs(exact) < 2.0**28)
        p[:, :, g % 16] = exact.astype(np.float32)
    return (sum16(p) / s[:, None]).astype(np.float32)


def q2_0_case(rng: np.random.Generator, n_in: int, n_out: int, n_tok: int
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    codes = rng.integers(0, 4, size=(n_out, n_in)).astype(np.uint8)
    d = rng.uniform(-2, 2, size=(n_out, n_in // 64)).astype(np.float16)
    d[rng.random(d.shape) < 0.1] = 0  # all-zero groups as the quantizer writes them
    x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    return codes, d, x


def test_q2_0_layout_and_code_three() -> None:
    """Weight j of a block sits at bits 2*(j%4) of byte j/4 (low bits first, unlike I2_S);
    codes 0..3 mean -1, 0, +1, +2; each block has its own scale."""
    from bitnetd_trio.engine.gguf_writer import pack_q2_0

    codes = np.ones((4, 128), np.uint8)
    codes[0, 5], codes[1, 70], codes[2, 127], codes[3, 0] = 3, 0, 2, 3
    d = np.array([[0.5, 4.0]] * 4, np.float16)
    blob = pack_q2_0(codes, d)
    assert len(blob) == 4 * 2 * 18 and blob[2 + 1] == 0b01011101  # weights 4..7 = 1,3,1,1
    for j, row, want in ((5, 0, 2 * 0.5), (70, 1, -1 * 4.0), (127, 2, 1 * 4.0), (0, 3, 2 * 0.5)):
        x = np.zeros((1, 128), np.float32)
        x[0, j] = 127.0  # s = 1: q is x exactly
        for k in ("scalar", *AVAILABLE):
            y = engine.q2_0_matmul(blob, 128, 4, x, kernel=k)
            assert y[0, row] == np.float32(127 * want), (k, j, y[0])


def test_q2_0_scalar_matches_numpy_formula() -> None:
    from bitnetd_trio.engine.gguf_writer import pack_q2_0

    rng = np.random.default_rng(5)
    for n_in, n_out, n_tok in ((64, 3, 1), (192, 17, 4), (4096 + 64, 5, 2), (64 * 70, 9, 3)):
        codes, d, x = q2_0_case(rng, n_in, n_out, n_tok)
        got = engine.q2_0_matmul(pack_q2_0(codes, d), n_in, n_out, x, kernel="scalar")
        np.testing.assert_array_equal(got, q2_0_reference(codes, d, x))


@simd
def test_q2_0_simd_identical_to_scalar(kernel: str) -> None:
    from bitnetd_trio.engine.gguf_writer import pack_q2_0

    rng = np.random.default_rng(6)
    for _ in range(12):
        n_in = 64 * int(rng.integers(1, 140))  # past one slice of 64 blocks
        n_out, n_tok = int(rng.integers(1, 40)), int(rng.integers(1, 9))
        codes, d, x = q2_0_case(rng, n_in, n_out, n_tok)
        blob = pack_q2_0(codes, d)
        want = engine.q2_0_matmul(blob, n_in, n_out, x, kernel="scalar")
        got = engine.q2_0_matmul(blob, n_in, n_out, x, kernel=kernel,
                                 n_threads=int(rng.integers(1, 4)))
        np.testing.assert_array_equal(got, want, err_msg=f"{n_in}x{n_out} tokens {n_tok}")
    with pytest.raises(ValueError):
        engine.q2_0_matmul(b"\0" * 18, 96, 1, np.zeros((1, 96), np.float32))


@simd
def test_q2_0_chunks_streams_and_token_groups(kernel: str) -> None:
    """The chunk layout's paths (AVX-512 and AVX2 sets): full chunks of 16 blocks with and without a partial last
    chunk, 4-row streams plus leftover rows (up to 4 tokens), L2 row blocks and 4-token passes
    (more tokens), token groups split by the block-sum buffer (wide inputs, many tokens), and
    inputs past 2^19 that keep the natural layout."""
    cases = ((1024, 9, 1), (1024 + 64 * 5, 23, 3), (4096, 70, 4), (2048 + 64 * 15, 31, 6),
             (3072, 300, 13), (40960, 6, 20), (64 * 8193, 3, 2))
    check_q2_0_cases(kernel, np.random.default_rng(7), cases)


def check_q2_0_cases(kernel: str, rng: np.random.Generator,
                     cases: tuple[tuple[int, int, int], ...], extreme: int = -1) -> None:
    """kernel == scalar (== the numpy formula up to 4096 inputs) at 1-3 threads for each
    (n_in, n_out, n_tok); case number `extreme` gets code 3 in its first rows and half its
    inputs at the largest magnitude."""
    from bitnetd_trio.engine.gguf_writer import pack_q2_0

    for i, (n_in, n_out, n_tok) in enumerate(cases):
        codes, d, x = q2_0_case(rng, n_in, n_out, n_tok)
        if i == extreme:
            codes[:2] = 3
            x[:, : n_in // 2] = -1e3
        blob = pack_q2_0(codes, d)
        want = engine.q2_0_matmul(blob, n_in, n_out, x, kernel="scalar")
        if n_in <= 4096:
            np.testing.assert_array_equal(want, q2_0_reference(codes, d, x))
        for n_threads in (1, 2, 3):
            got = engine.q2_0_matmul(blob, n_in, n_out, x, kernel=kernel, n_threads=n_threads)
            np.testing.assert_array_equal(got, want, err_msg=f"{n_in}x{n_out} tokens {n_tok}")


@simd
def test_q2_0_prefill_tiles(kernel: str) -> None:
    """Prefill shapes (12 tokens and more: the AMX set's tile path, model-format §10.6.2):
    token groups of 16 with a partial last one, row groups of 16 with leftover rows, inputs
    of fewer than 16 blocks (lanes without blocks stay +0), a partial last chunk, several
    token super-groups (wide inputs), activations at -127 against code 3, 1-3 threads."""
    cases = ((64, 5, 16), (64 * 15, 33, 17), (1024, 16, 31), (1024 + 64 * 5, 47, 33),
             (192, 1, 20), (4096, 70, 64), (2048 + 64 * 15, 31, 100), (40960, 18, 40),
             (1024, 20, 12), (64 * 17, 9, 15))
    check_q2_0_cases(kernel, np.random.default_rng(8), cases, extreme=3)


@simd
def test_q2_0_extreme_sums_exact(kernel: str) -> None:
    """The largest block sums: every code 3 (or 0) and every activation +-127, so that the
    AVX2 kernel's int16 partial sums (planes 1 and 3 kept 4 times their code) reach their
    bound; full chunks, a partial one, 4-row streams and leftover rows, 1 to 6 tokens."""
    from bitnetd_trio.engine.gguf_writer import pack_q2_0

    n_in, n_out = 1024 * 3 + 64 * 7, 6
    for code in (3, 0):
        codes = np.full((n_out, n_in), code, np.uint8)
        d = np.full((n_out, n_in // 64), 0.5, np.float16)
        blob = pack_q2_0(codes, d)
        for n_tok in (1, 4, 6):
            x = np.full((n_tok, n_in), 5.0, np.float32)
            x[1::2] = -5.0  # q = +-127 exactly
            want = q2_0_reference(codes, d, x)
            np.testing.assert_array_equal(
                engine.q2_0_matmul(blob, n_in, n_out, x, kernel="scalar"), want)
            for n_threads in (1, 2):
                got = engine.q2_0_matmul(blob, n_in, n_out, x, kernel=kernel, n_threads=n_threads)
                np.testing.assert_array_equal(got, want, err_msg=f"code {code} tokens {n_tok}")


# ---- Q8_0 head (model-format §5.3, §10.1.6): 34-byte blocks of 32, weight q * d ------------


def q8_0_reference(q: np.ndarray, d: np.ndarray, x: np.ndarray) -> np.ndarray:
    """model-format §5.3 for a Q8_0 head in numpy, written from the format: float x (not
    quantized), weight w = q * d (exact in float32), 16 float32 partial sums, element i into
    lane i % 16 with a fused multiply-add, then the fixed tree. The fused step is computed in
    float64 and rounded once, which is the fused result when float64 holds it exactly:
    q2_0_case-like inputs that are multiples of 2^-30 below 2^22 (asserted)."""
    n_out, n_in = q.shape
    w = (q.astype(np.float64).reshape(n_out, n_in // 32, 32) * d.astype(np.float64)[..., None]
         ).reshape(n_out, n_in)
    assert np.array_equal(w.astype(np.float32).astype(np.float64), w)  # exact in float32
    xx = x.astype(np.float64)
    p = np.zeros((x.shape[0], n_out, 16), np.float32)
    for i in range(n_in):
        exact = xx[:, None, i] * w[None, :, i] + p[:, :, i % 16]
        assert np.all(np.abs(exact) < 2.0**22)
        p[:, :, i % 16] = exact.astype(np.float32)
    return sum16(p)


def q8_0_case(rng: np.random.Generator, n_in: int, n_out: int, n_tok: int, *,
              coarse: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every int8 value, F16 scales of both signs with zero and subnormal ones, and normal
    float inputs; coarse: inputs k / 64 (multiples of 2^-6) for q8_0_reference."""
    q = rng.integers(-128, 128, size=(n_out, n_in)).astype(np.int8)
    d = rng.uniform(-2, 2, size=(n_out, n_in // 32)).astype(np.float16)
    d[rng.random(d.shape) < 0.05] = 0
    d[rng.random(d.shape) < 0.05] = np.float16(3e-6)  # subnormal in F16
    if coarse:
        x = (rng.integers(-512, 513, size=(n_tok, n_in)) / 64).astype(np.float32)
    else:
        x = rng.standard_normal((n_tok, n_in)).astype(np.float32)
    return q, d, x


def test_q8_0_layout() -> None:
    """A block is d (F16) then 32 int8 values in weight order; weight = q * d."""
    from bitnetd_trio.engine.gguf_writer import pack_q8_0, unpack_q8_0

    q = np.zeros((2, 64), np.int8)
    q[0, 3], q[0, 40], q[1, 63] = -128, 7, 127
    d = np.array([[0.5, 4.0], [1.0, -0.25]], np.float16)
    blob = pack_q8_0(q, d)
    assert len(blob) == 2 * 2 * 34 and blob[34 + 2 + 8] == 7 and blob[2 + 3] == 0x80
    rq, rd = unpack_q8_0(blob, 2, 64)
    assert np.array_equal(rq, q) and np.array_equal(rd, d)
    for j, row, want in ((3, 0, -128 * 0.5), (40, 0, 7 * 4.0), (63, 1, 127 * -0.25)):
        x = np.zeros((1, 64), np.float32)
        x[0, j] = 3.0
        for k in ("scalar", *AVAILABLE):
            y = engine.q8_0_matmul(blob, 64, 2, x, kernel=k)
            assert y[0, row] == np.float32(3 * want), (k, j, y[0])


def test_q8_0_scalar_matches_numpy_formula() -> None:
    from bitnetd_trio.engine.gguf_writer import pack_q8_0

    rng = np.random.default_rng(11)
    for n_in, n_out, n_tok in ((32, 3, 1), (96, 17, 4), (512, 5, 2), (32 * 41, 9, 3)):
        q, d, x = q8_0_case(rng, n_in, n_out, n_tok, coarse=True)
        got = engine.q8_0_matmul(pack_q8_0(q, d), n_in, n_out, x, kernel="scalar")
        np.testing.assert_array_equal(got, q8_0_reference(q, d, x))
        # and close to the float64 product of the dequantized weights
        exact = x.astype(np.float64) @ (q.reshape(n_out, -1, 32) * d[..., None].astype(
            np.float64)).reshape(n_out, n_in).T
        assert np.abs(got - exact).max() <= 1e-5 * max(1.0, np.abs(exact).max())


@simd
def test_q8_0_simd_identical_to_scalar(kernel: str) -> None:
    """Every set == scalar bit for bit: 4-row streams and leftover rows, 1 to 9 tokens (the
    AVX-512 set's tiles of 1-4 tokens and their tails), 1-3 threads, real head widths."""
    from bitnetd_trio.engine.gguf_writer import pack_q8_0

    rng = np.random.default_rng(12)
    cases = [(32, 1, 1), (64, 5, 2), (96, 3, 3), (160, 33, 4), (2048, 18, 5), (2560, 9, 1),
             (3072, 7, 9), (32 * 37, 100, 6)]
    for _ in range(6):
        cases.append((32 * int(rng.integers(1, 90)), int(rng.integers(1, 50)),
                      int(rng.integers(1, 10))))
    for n_in, n_out, n_tok in cases:
        q, d, x = q8_0_case(rng, n_in, n_out, n_tok)
        x[:, :: 7] *= 1e3  # large and small terms in one sum
        blob = pack_q8_0(q, d)
        want = engine.q8_0_matmul(blob, n_in, n_out, x, kernel="scalar")
        for n_threads in (1, 2, 3):
            got = engine.q8_0_matmul(blob, n_in, n_out, x, kernel=kernel, n_threads=n_threads)
            np.testing.assert_array_equal(got, want, err_msg=f"{n_in}x{n_out} tokens {n_tok}")
    with pytest.raises(ValueError):
        engine.q8_0_matmul(b"\0" * 34, 48, 1, np.zeros((1, 48), np.float32))


def test_q8_0_head_is_the_f16_head_order(tmp_path) -> None:
    """With weights an F16 can hold (q * 2^-k), a Q8_0 head gives the very logits of the F16
    head of the same values, on every kernel set: the same order, not just close. Also a
    Q8_0 token_embd (tied, so the head too) against its F16 twin."""
    import dataclasses

    from bitnetd_trio.engine import gguf_writer as gw

    rng = np.random.default_rng(13)
    shape = dataclasses.replace(gw.TINY_LLAMA, n_layer=1)
    n_vocab, e = shape.n_vocab, shape.n_embd
    q = rng.integers(-127, 128, size=(n_vocab, e)).astype(np.int8)
    d = np.exp2(-rng.integers(9, 12, size=(n_vocab, e // 32))).astype(np.float16)
    w16 = (q.reshape(n_vocab, -1, 32) * d[..., None].astype(np.float32)).reshape(n_vocab, e)
    assert np.array_equal(w16.astype(np.float16).astype(np.float32), w16)
    raw = gw.RawTensor(gw.pack_q8_0(q, d), (n_vocab, e), gw.GGML_TYPE_Q8_0)
    pairs = {
        "head": ({"output.weight": w16.astype(np.float16)}, {"output.weight": raw}, False),
        "tied-embd": ({"token_embd.weight": w16.astype(np.float16)},
                      {"token_embd.weight": raw}, True),
    }
    name = engine.kernel_name()
    try:
        for which, (f16, q8, tied) in pairs.items():
            paths = [gw.write_model(tmp_path / f"{which}-{i}.gguf", shape, 5, tie_head=tied,
                                    tensor_overrides=o) for i, o in enumerate((f16, q8))]
            out = {}
            for k in ("scalar", *AVAILABLE):
                engine.select_kernel(k)
                for i, p in enumerate(paths):
                    model = engine.Model.load(p)
                    try:
                        with engine.Context(model, 1, 64, 2) as ctx:
                            ctx.forward([engine.BatchEntry(0, list(range(3, 30)), "all")])
                            out[k, i] = np.stack([np.array(ctx.logits(0, t))
                                                  for t in range(27)])
                    finally:
                        model.close()
            for k in ("scalar", *AVAILABLE):
                np.testing.assert_array_equal(out[k, 1], out[k, 0], err_msg=f"{which} {k}")
                np.testing.assert_array_equal(out[k, 1], out["scalar", 1], err_msg=which)
    finally:
        engine.select_kernel(name)
