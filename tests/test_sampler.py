"""The C sampler (native/sampler.c) through bitnetd_trio.engine.sampling."""

import math

import numpy as np
import pytest
from bitnetd_trio._native import ffi

from bitnetd_trio.engine.sampling import Sampler, SamplingError, SamplingParams, logprobs

# Every filter off: the draw follows softmax(logits / T) exactly.
PLAIN = dict(top_k=0, top_p=1.0, min_p=0.0)


def greedy(**kw):
    return SamplingParams(temperature=0.0, **kw)


def sample_once(params, logits, history=()):
    logits = np.asarray(logits, dtype=np.float32)
    with Sampler(params, logits.size) as s:
        for t in history:
            s.accept(t)
        return s.sample(logits)


def draws(params, logits, n):
    logits = np.asarray(logits, dtype=np.float32)
    with Sampler(params, logits.size) as s:
        return [s.sample(logits) for _ in range(n)]


def softmax(x):
    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max())
    return e / e.sum()


# ---- greedy ----


def test_greedy_is_argmax():
    rng = np.random.default_rng(1)
    for _ in range(50):
        logits = rng.normal(size=1000).astype(np.float32)
        assert sample_once(greedy(), logits) == int(np.argmax(logits))


def test_greedy_ties_go_to_lowest_id():
    assert sample_once(greedy(), [0.0, 3.0, 1.0, 3.0, 3.0]) == 1


def test_greedy_ignores_seed_and_does_not_modify_logits():
    logits = np.array([0.5, 2.0, -1.0, 2.0], dtype=np.float32)
    before = logits.copy()
    picks = {sample_once(greedy(seed=s, logit_bias={1: -5.0}), logits) for s in range(5)}
    assert picks == {3}
    np.testing.assert_array_equal(logits, before)


# ---- seeds ----


def test_same_seed_same_tokens():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=5000).astype(np.float32)
    p = SamplingParams(temperature=1.0, top_k=100, top_p=0.95, min_p=0.01, seed=1234)
    assert draws(p, logits, 200) == draws(p, logits, 200)


def test_different_seeds_differ():
    logits = np.zeros(1000, dtype=np.float32)
    a = draws(SamplingParams(temperature=1.0, seed=1, **PLAIN), logits, 50)
    b = draws(SamplingParams(temperature=1.0, seed=2, **PLAIN), logits, 50)
    assert a != b


def test_random_seed_is_drawn_and_reported():
    with Sampler(SamplingParams(), 10) as a, Sampler(SamplingParams(), 10) as b:
        assert a.seed != b.seed
        assert 0 <= a.seed < 2**64


def test_negative_seed_is_accepted_and_reproducible():
    logits = np.zeros(100, dtype=np.float32)
    p = SamplingParams(temperature=1.0, seed=-7, **PLAIN)
    assert draws(p, logits, 20) == draws(p, logits, 20)


# ---- filters ----


def test_top_k_1_is_greedy():
    rng = np.random.default_rng(3)
    for seed in range(30):
        logits = rng.normal(size=3000).astype(np.float32)
        p = SamplingParams(temperature=1.5, top_k=1, top_p=1.0, min_p=0.0, seed=seed)
        assert sample_once(p, logits) == int(np.argmax(logits))


def test_top_k_keeps_only_the_k_best():
    rng = np.random.default_rng(4)
    logits = rng.normal(size=128256).astype(np.float32)
    best = set(np.argsort(-logits)[:40].tolist())
    p = SamplingParams(temperature=5.0, top_k=40, top_p=1.0, min_p=0.0, seed=9)
    got = draws(p, logits, 300)
    assert set(got) <= best
    assert len(set(got)) > 20  # a hot temperature spreads over the 40


def test_top_p_tiny_is_greedy():
    rng = np.random.default_rng(5)
    for seed in range(30):
        logits = rng.normal(size=2000).astype(np.float32)
        p = SamplingParams(temperature=1.0, top_k=0, top_p=1e-6, min_p=0.0, seed=seed)
        assert sample_once(p, logits) == int(np.argmax(logits))


@pytest.mark.parametrize("top_p,kept", [(0.45, {0}), (0.75, {0, 1}), (0.85, {0, 1, 2})])
def test_top_p_keeps_the_smallest_nucleus(top_p, kept):
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05]))
    p = SamplingParams(temperature=1.0, top_k=0, top_p=top_p, min_p=0.0, seed=3)
    got = draws(p, logits, 2000)
    assert set(got) == kept


def test_top_p_without_top_k_on_a_large_vocabulary():
    # The nucleus is found without sorting everything: check it against a full numpy sort.
    rng = np.random.default_rng(6)
    logits = (rng.normal(size=128256) * 3).astype(np.float32)
    p = softmax(logits)
    order = np.argsort(-p, kind="stable")
    n_keep = int(np.searchsorted(np.cumsum(p[order]), 0.9)) + 1
    nucleus = set(order[:n_keep].tolist())
    p = SamplingParams(temperature=1.0, top_k=0, top_p=0.9, min_p=0.0, seed=4)
    got = draws(p, logits, 300)
    assert set(got) <= nucleus
    assert n_keep > 64  # the growing-selection path was exercised past its first step


def test_min_p_cuts_relative_to_the_best():
    # p_i / p_max: 1, e^-1 = 0.37, e^-2.2 = 0.11, e^-3 = 0.05.
    logits = [0.0, -1.0, -2.2, -3.0]
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.1, seed=5)
    got = draws(p, logits, 3000)
    assert set(got) == {0, 1, 2}
    p = SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=5)
    got = draws(p, logits, 3000)
    assert set(got) == {0, 1}


def test_min_p_applies_before_temperature():
    # A hot temperature must not let back tokens that min-p removed at temperature 1.
    logits = [0.0, -1.0, -4.0, -4.0]
    p = SamplingParams(temperature=50.0, top_k=0, top_p=1.0, min_p=0.1, seed=6)
    got = draws(p, logits, 2000)
    assert set(got) == {0, 1}


# ---- the distribution itself ----


def chi_square(counts, probs):
    n = sum(counts)
    return sum((c - n * p) ** 2 / (n * p) for c, p in zip(counts, probs))


@pytest.mark.parametrize("temperature", [0.7, 1.0, 1.8])
def test_draws_follow_softmax(temperature):
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0], dtype=np.float32)
    n = 20000
    got = draws(SamplingParams(temperature=temperature, seed=11, **PLAIN), logits, n)
    counts = np.bincount(got, minlength=5)
    probs = softmax(logits / temperature)
    # 4 degrees of freedom: P(chi2 > 23.5) = 1e-4. The seed is fixed, so this never flakes.
    assert chi_square(counts, probs) < 23.5, (counts / n, probs)


def test_draws_follow_renormalized_top_k():
    logits = np.array([1.0, 0.5, 0.0, -0.5, -1.0], dtype=np.float32)
    p = SamplingParams(temperature=0.8, top_k=3, top_p=1.0, min_p=0.0, seed=12)
    got = draws(p, logits, 20000)
    counts = np.bincount(got, minlength=5)
    assert counts[3] == counts[4] == 0
    probs = softmax(logits[:3] / 0.8)
    assert chi_square(counts[:3], probs) < 18.4  # 2 dof, 1e-4


# ---- penalties (by hand on tiny vocabularies, greedy so the arithmetic decides) ----


@pytest.mark.parametrize("rival,expected", [(1.81, 0), (1.83, 1)])
def test_repeat_penalty_divides_positive_logits(rival, expected):
    # 2.0 / 1.1 = 1.818...
    p = greedy(repeat_penalty=1.1)
    assert sample_once(p, [2.0, rival, -3.0], history=[0]) == expected


@pytest.mark.parametrize("rival,expected", [(-1.11, 0), (-1.09, 1)])
def test_repeat_penalty_multiplies_negative_logits(rival, expected):
    # -1.0 * 1.1 = -1.1
    p = greedy(repeat_penalty=1.1)
    assert sample_once(p, [-1.0, rival, -3.0], history=[0]) == expected


def test_repeat_penalty_counts_a_token_once():
    # Three occurrences still divide once: 2.0 / 1.1 = 1.818 > 1.81.
    p = greedy(repeat_penalty=1.1)
    assert sample_once(p, [2.0, 1.81, -3.0], history=[0, 0, 0]) == 0


@pytest.mark.parametrize("rival,expected", [(0.69, 0), (0.71, 1)])
def test_presence_penalty_subtracts_once(rival, expected):
    # 1.0 - 0.3 = 0.7 however many times token 0 occurred.
    p = greedy(presence_penalty=0.3)
    assert sample_once(p, [1.0, rival], history=[0, 0, 0]) == expected


@pytest.mark.parametrize("rival,expected", [(0.39, 0), (0.41, 1)])
def test_frequency_penalty_scales_with_count(rival, expected):
    # 1.0 - 3 * 0.2 = 0.4
    p = greedy(frequency_penalty=0.2)
    assert sample_once(p, [1.0, rival], history=[0, 0, 0]) == expected


def test_penalties_combine_in_order():
    # repeat first, then presence and frequency: 2.0 / 2 - 0.25 - 2 * 0.1 = 0.55
    p = greedy(repeat_penalty=2.0, presence_penalty=0.25, frequency_penalty=0.1)
    assert sample_once(p, [2.0, 0.54], history=[0, 0]) == 0
    assert sample_once(p, [2.0, 0.56], history=[0, 0]) == 1


def test_penalty_window_forgets_old_tokens():
    p = greedy(presence_penalty=1.0, repeat_last_n=2)
    # Token 0 left the window [1, 1]: it keeps its logit.
    assert sample_once(p, [1.0, 0.5, 0.0], history=[0, 1, 1]) == 0
    # Both in the window: [1.0 - 1, 0.5 - 1, 0.1] -> token 2.
    assert sample_once(p, [1.0, 0.5, 0.1], history=[0, 1]) == 2


def test_whole_history_window_and_disabled_window():
    hist = [0] + [1] * 100
    assert sample_once(greedy(presence_penalty=1.0, repeat_last_n=-1), [1.0, 0.0, 0.5], hist) == 2
    assert sample_once(greedy(presence_penalty=1.0, repeat_last_n=0), [1.0, 0.0, 0.5], hist) == 0


def test_accept_ignores_out_of_range_tokens():
    p = greedy(presence_penalty=1.0)
    assert sample_once(p, [1.0, 0.5], history=[-1, 2, 99]) == 0


# ---- logit bias and non-finite logits ----


def test_logit_bias_minus_100_bans_and_plus_100_forces():
    rng = np.random.default_rng(7)
    logits = rng.normal(size=500).astype(np.float32)
    top = int(np.argmax(logits))
    low = int(np.argmin(logits))
    p = SamplingParams(temperature=1.0, seed=1, logit_bias={top: -100.0}, **PLAIN)
    assert top not in draws(p, logits, 500)
    p = SamplingParams(temperature=1.0, seed=1, logit_bias={low: 100.0})
    assert set(draws(p, logits, 100)) == {low}
    assert sample_once(greedy(logit_bias={low: 100.0}), logits) == low


def test_minus_infinity_bias_bans():
    p = SamplingParams(temperature=1.0, seed=2, logit_bias={0: -math.inf}, **PLAIN)
    assert set(draws(p, [5.0, 0.0, 0.0], 300)) == {1, 2}


def test_nan_logits_are_never_picked():
    logits = np.array([np.nan, 1.0, np.nan, 0.5, np.nan], dtype=np.float32)
    assert sample_once(greedy(), logits) == 1
    got = draws(SamplingParams(temperature=1.0, seed=3, **PLAIN), logits, 500)
    assert set(got) == {1, 3}
    got = draws(SamplingParams(temperature=1.0, top_k=2, seed=3), logits, 200)
    assert set(got) <= {1, 3}


def test_infinite_logit_wins():
    logits = np.array([0.0, np.inf, 3.0, -np.inf], dtype=np.float32)
    assert sample_once(greedy(), logits) == 1
    assert set(draws(SamplingParams(temperature=1.0, seed=4, **PLAIN), logits, 100)) == {1}


def test_nothing_to_sample_raises():
    nan = np.full(8, np.nan, dtype=np.float32)
    with pytest.raises(SamplingError):
        sample_once(greedy(), nan)
    with pytest.raises(SamplingError):
        sample_once(SamplingParams(temperature=1.0, seed=1), nan)
    banned = SamplingParams(temperature=1.0, seed=1, logit_bias={0: -math.inf, 1: -math.inf})
    with pytest.raises(SamplingError):
        sample_once(banned, [1.0, 2.0])


# ---- the Python wrapper ----


def test_cffi_pointer_and_float64_input():
    logits = np.array([0.1, 0.9, 0.3], dtype=np.float32)
    with Sampler(greedy(), 3) as s:
        assert s.sample(ffi.from_buffer("float[]", logits)) == 1
        assert s.sample(logits.astype(np.float64)) == 1
        with pytest.raises(ValueError, match="expected 3 logits"):
            s.sample(np.zeros(4, dtype=np.float32))


def test_closed_sampler_refuses():
    s = Sampler(greedy(), 3)
    s.close()
    s.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        s.sample(np.zeros(3, dtype=np.float32))


@pytest.mark.parametrize(
    "field,value",
    [
        ("temperature", -0.1),
        ("temperature", math.nan),
        ("top_k", -2),
        ("top_k", 1.5),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("repeat_penalty", 0.0),
        ("repeat_last_n", -2),
        ("presence_penalty", math.inf),
        ("frequency_penalty", "1"),
        ("seed", 2**64),
        ("seed", 1.0),
        ("logit_bias", {5: 1.0}),
        ("logit_bias", {0: math.nan}),
        ("logit_bias", {-1: 1.0}),
    ],
)
def test_validate_names_the_field(field, value):
    p = SamplingParams(**{field: value})
    with pytest.raises(ValueError, match=field):
        p.validate(n_vocab=5)
    with pytest.raises(ValueError, match=field):
        Sampler(p, 5)


def test_defaults_match_the_interface():
    p = SamplingParams()
    assert (p.temperature, p.top_k, p.top_p, p.min_p) == (0.8, 40, 0.95, 0.05)
    assert (p.repeat_penalty, p.repeat_last_n, p.presence_penalty, p.frequency_penalty) == (
        1.0,
        64,
        0.0,
        0.0,
    )
    assert p.seed is None and p.logit_bias == {}
    p.validate(n_vocab=10)


# ---- log-probabilities ----


def np_log_softmax(x):
    x = np.asarray(x, dtype=np.float64)
    m = x.max()
    return x - m - np.log(np.exp(x - m).sum())


def test_logprobs_match_numpy():
    rng = np.random.default_rng(8)
    for n, scale in [(5, 1.0), (1000, 10.0), (128256, 4.0)]:
        logits = (rng.normal(size=n) * scale).astype(np.float32)
        ref = np_log_softmax(logits)
        for tok in rng.integers(0, n, size=5).tolist():
            lp, top = logprobs(logits, tok, 5)
            assert abs(lp - ref[tok]) < 1e-6 * max(1.0, abs(ref[tok]))
            order = np.argsort(-ref, kind="stable")[:5]
            assert [i for i, _ in top] == order.tolist()
            for i, v in top:
                assert abs(v - ref[i]) < 1e-6 * max(1.0, abs(ref[i]))


def test_logprobs_large_logits_are_stable():
    logits = np.array([1000.0, 999.0, -1000.0], dtype=np.float32)
    lp, top = logprobs(logits, 1, 3)
    ref = np_log_softmax(logits)
    assert abs(lp - ref[1]) < 1e-6
    assert [i for i, _ in top] == [0, 1, 2]


def test_logprobs_ties_by_lower_id_and_top_n_clamped():
    lp, top = logprobs(np.array([1.0, 2.0, 2.0, 0.0, 2.0], dtype=np.float32), 0, 10)
    assert [i for i, _ in top] == [1, 2, 4, 0, 3]
    assert top[0][1] == top[1][1] == top[2][1]
    assert lp == pytest.approx(top[3][1])


def test_logprobs_nan_and_bad_token():
    logits = np.array([np.nan, 0.0, 0.0], dtype=np.float32)
    lp, top = logprobs(logits, 1, 2)
    assert lp == pytest.approx(math.log(0.5))
    assert [i for i, _ in top] == [1, 2]
    assert logprobs(logits, 0, 0)[0] == -math.inf
    with pytest.raises(ValueError):
        logprobs(logits, 3, 1)


def test_vanishing_temperature_is_greedy():
    rng = np.random.default_rng(9)
    logits = rng.normal(size=100).astype(np.float32)
    p = SamplingParams(temperature=1e-45, seed=1, **PLAIN)
    assert draws(p, logits, 20) == [int(np.argmax(logits))] * 20


# ---- the post-sampling distribution (llama.cpp's post_sampling_probs) ----


def chain_distribution(params, logits):
    """The chain recomputed in numpy: {id: probability} of the tokens that survive bias,
    top-k, top-p (at temperature 1), min-p, then softmax at the temperature."""
    lg = np.asarray(logits, dtype=np.float32).copy()
    for tok, bias in params.logit_bias.items():
        lg[tok] += np.float32(bias)
    order = sorted((i for i in range(lg.size) if lg[i] > -np.inf), key=lambda i: (-lg[i], i))
    if params.temperature == 0:
        return {order[0]: 1.0}
    if 0 < params.top_k < lg.size:
        order = order[: params.top_k]
    mx = float(lg[order[0]])
    if params.top_p < 1.0:
        w = np.exp(np.array([lg[i] for i in order], dtype=np.float64) - mx)
        cum = np.cumsum(w)
        n = int(np.searchsorted(cum, params.top_p * w.sum())) + 1
        order = order[: min(n, len(order))]
    if params.min_p > 0:
        order = [i for i in order if lg[i] >= mx + math.log(params.min_p)]
    w = np.exp((np.array([lg[i] for i in order], dtype=np.float64) - mx) / params.temperature)
    return dict(zip(order, (w / w.sum()).tolist()))


CHAINS = [
    SamplingParams(temperature=0.7, top_k=5, top_p=1.0, min_p=0.0, seed=3),
    SamplingParams(temperature=1.3, top_k=0, top_p=0.9, min_p=0.0, seed=4),
    SamplingParams(temperature=0.8, top_k=0, top_p=0.95, min_p=0.05, seed=5),
    SamplingParams(temperature=1.0, top_k=40, top_p=0.95, min_p=0.05, seed=6),
    SamplingParams(temperature=1.0, top_k=0, top_p=1.0, min_p=0.2, seed=7, logit_bias={3: 2.5}),
    SamplingParams(temperature=2.0, **PLAIN, seed=8),
]


@pytest.mark.parametrize("params", CHAINS)
def test_sample_probs_draws_the_same_tokens(params):
    rng = np.random.default_rng(11)
    steps = [rng.normal(0, 2, 300).astype(np.float32) for _ in range(40)]
    with Sampler(params, 300) as a, Sampler(params, 300) as b:
        plain = [a.sample(lg) for lg in steps]
        reported = [b.sample_probs(lg, 7)[0] for lg in steps]
    assert reported == plain


@pytest.mark.parametrize("params", CHAINS)
def test_sample_probs_is_the_chains_distribution(params):
    rng = np.random.default_rng(12)
    logits = rng.normal(0, 3, 500).astype(np.float32)
    expected = chain_distribution(params, logits)
    with Sampler(params, 500) as s:
        tok, prob, top = s.sample_probs(logits, 10)
    assert tok in expected
    assert prob == pytest.approx(expected[tok], rel=1e-5)
    best = sorted(expected.items(), key=lambda kv: (-kv[1], kv[0]))[:10]
    assert [i for i, _ in top] == [i for i, _ in best]
    assert [p for _, p in top] == pytest.approx([p for _, p in best], rel=1e-5)
    assert sum(p for _, p in top) <= 1.0 + 1e-6
    if len(top) < 10:  # fewer survivors than asked: they are the whole distribution
        assert sum(p for _, p in top) == pytest.approx(1.0, rel=1e-5)


def test_sample_probs_greedy_reports_the_token_with_one():
    logits = np.array([0.5, 3.0, 3.0, -1.0], dtype=np.float32)
    with Sampler(greedy(), 4) as s:
        assert s.sample_probs(logits, 3) == (1, 1.0, [(1, 1.0)])
        assert s.sample_probs(logits, 0) == (1, 1.0, [])


def test_sample_probs_with_a_mask_and_no_token_left():
    logits = np.arange(64, dtype=np.float32) / 8
    allowed = np.zeros(2, dtype=np.uint32)
    allowed[0] = (1 << 3) | (1 << 5)
    params = SamplingParams(temperature=1.0, **PLAIN, seed=9)
    with Sampler(params, 64) as s:
        tok, prob, top = s.sample_probs(logits, 4, allowed)
    assert tok in (3, 5)
    assert [i for i, _ in top] == [5, 3]
    assert sum(p for _, p in top) == pytest.approx(1.0)
    assert prob == dict(top)[tok]
    with Sampler(params, 64) as s, pytest.raises(SamplingError):
        s.sample_probs(logits, 4, np.zeros(2, dtype=np.uint32))
