"""Batch and thread invariance of the forward pass (design: "Deterministic").

What holds exactly (bit for bit), by construction:
- a sequence's logits do not depend on the other sequences in the same forward step,
- nor on the number of threads,
- nor on how its tokens are split into bn_forward calls or internal chunks: every per-token
  computation (norms, RoPE, attention over its own slot, the matrix rows) runs the same code in
  the same order whatever else is in the step. So prefill in one call equals token by token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bitnetd_trio.engine import native as engine


@pytest.fixture(scope="module")
def model(gqa_model_path: Path):
    m = engine.Model.load(gqa_model_path)
    yield m
    m.close()


def greedy_alone(
    model: engine.Model, prompt: list[int], n_new: int, n_threads: int = 1, n_ctx: int = 128
) -> tuple[list[int], list[np.ndarray]]:
    """Prefill then greedy decode, one sequence in its own context."""
    with engine.Context(model, 1, n_ctx, n_threads) as ctx:
        ctx.forward([engine.BatchEntry(0, prompt, "last")])
        rows = [np.array(ctx.logits(0, len(prompt) - 1))]
        toks = []
        for _ in range(n_new):
            tok = int(np.argmax(rows[-1]))
            toks.append(tok)
            ctx.forward([engine.BatchEntry(0, [tok], "last")])
            rows.append(np.array(ctx.logits(0, 0)))
    return toks, rows


def test_alone_vs_beside_three_others(model: engine.Model) -> None:
    prompt = [5, 17, 99, 3, 250, 7, 8]
    n_new = 12
    want_toks, want_rows = greedy_alone(model, prompt, n_new)

    others = {1: [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50], 2: [300], 3: [9, 9, 9, 9]}
    with engine.Context(model, 4, 128, 2) as ctx:
        # the others start first, so they are mid-prefill or decoding when ours runs
        ctx.forward([engine.BatchEntry(s, p[:2], "none") for s, p in others.items()])
        nxt = {s: p[2:] for s, p in others.items()}
        got_rows: list[np.ndarray] = []
        got_toks: list[int] = []
        feed = prompt
        for step in range(n_new + 1):
            entries = [engine.BatchEntry(0, feed, "last")]
            for s in (3, 1, 2):  # the order of entries must not matter either
                chunk = nxt[s][:3] if nxt[s] else [(step * 31 + s) % 500]
                nxt[s] = nxt[s][3:]
                entries.append(engine.BatchEntry(s, chunk, "last" if step % 2 else "all"))
            assert ctx.forward(entries) == [0, 0, 0, 0]
            got_rows.append(np.array(ctx.logits(0, len(feed) - 1)))
            tok = int(np.argmax(got_rows[-1]))
            if step < n_new:
                got_toks.append(tok)
            feed = [tok]
    assert got_toks == want_toks
    for a, b in zip(got_rows, want_rows, strict=True):
        np.testing.assert_array_equal(a, b)


def test_thread_counts_give_identical_logits(model: engine.Model) -> None:
    prompt = list(range(20, 60))
    ref_toks, ref_rows = greedy_alone(model, prompt, 6, n_threads=1)
    for n_threads in (2, 3):
        toks, rows = greedy_alone(model, prompt, 6, n_threads=n_threads)
        assert toks == ref_toks
        for a, b in zip(rows, ref_rows, strict=True):
            np.testing.assert_array_equal(a, b)


def test_set_threads_keeps_results(model: engine.Model) -> None:
    prompt = [1, 2, 3, 4, 5, 6]
    with engine.Context(model, 2, 64, 1) as ctx:
        ctx.forward([engine.BatchEntry(0, prompt, "last")])
        a = np.array(ctx.logits(0, 5))
        ctx.set_threads(3)
        ctx.forward([engine.BatchEntry(1, prompt, "last")])
        np.testing.assert_array_equal(np.array(ctx.logits(0, 5)), a)


def test_prefill_one_call_equals_token_by_token(model: engine.Model) -> None:
    prompt = [11, 200, 3, 47, 47, 90, 1, 2, 300, 12]
    with engine.Context(model, 2, 64, 2) as ctx:
        ctx.forward([engine.BatchEntry(0, prompt, "all")])
        whole = np.stack([np.array(ctx.logits(0, t)) for t in range(len(prompt))])
        rows = []
        for tok in prompt:
            ctx.forward([engine.BatchEntry(1, [tok], "last")])
            rows.append(np.array(ctx.logits(0, 0)))
    np.testing.assert_array_equal(whole, np.stack(rows))


def test_internal_chunks_are_invisible(head128_model_path: Path) -> None:
    """A 700-token prompt runs as internal chunks (512 + 188): same logits as 7 calls of 100."""
    rng = np.random.default_rng(5)
    prompt = [int(t) for t in rng.integers(0, 500, size=700)]
    with engine.Model.load(head128_model_path) as m, engine.Context(m, 2, 1024, 2) as ctx:
        ctx.forward([engine.BatchEntry(0, prompt, "all")])
        whole = [np.array(ctx.logits(0, t)) for t in (0, 511, 512, 699)]
        got = {}
        for start in range(0, 700, 100):
            ctx.forward([engine.BatchEntry(1, prompt[start : start + 100], "all")])
            for t in (0, 511, 512, 699):
                if start <= t < start + 100:
                    got[t] = np.array(ctx.logits(0, t - start))
        assert ctx.pos(0) == ctx.pos(1) == 700
    for t, row in zip((0, 511, 512, 699), whole, strict=True):
        np.testing.assert_array_equal(row, got[t])
