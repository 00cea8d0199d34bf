"""engine.py over the real C engine: errors, slots, cancellation, logits views."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.native import BatchEntry


@pytest.fixture(scope="module")
def model(tiny_model_path: Path):
    m = engine.Model.load(tiny_model_path)
    yield m
    m.close()


@pytest.fixture
def ctx(model: engine.Model):
    c = engine.Context(model, 3, 32, 2)
    yield c
    c.close()


def test_load_errors_are_model_load_errors(tmp_path: Path) -> None:
    with pytest.raises(engine.ModelLoadError, match="nope.gguf"):
        engine.Model.load(tmp_path / "nope.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\0\0\0" + b"\xff" * 40)
    with pytest.raises(engine.ModelLoadError) as exc:
        engine.Model.load(bad)
    assert isinstance(exc.value, engine.EngineError)


def test_hparams_and_metadata(model: engine.Model) -> None:
    hp = model.hparams
    assert (hp.n_embd, hp.n_head, hp.n_head_kv, hp.head_dim, hp.n_layer) == (256, 4, 2, 64, 2)
    assert model.metadata("general.architecture") == "bitnet-b1.58"
    assert model.metadata("bitnet-b1.58.embedding_length") == 256
    assert isinstance(model.metadata("bitnet-b1.58.rope.freq_base"), float)
    assert model.metadata("tokenizer.ggml.add_bos_token") is True
    tokens = model.metadata("tokenizer.ggml.tokens")
    assert (
        isinstance(tokens, list)
        and len(tokens) == hp.n_vocab
        and all(isinstance(t, str) for t in tokens)
    )
    types = model.metadata("tokenizer.ggml.token_type")
    assert len(types) == hp.n_vocab and set(types) <= {1, 2, 3, 4, 5, 6}
    assert model.metadata("no.such.key", 42) == 42


def test_context_arguments_are_checked(model: engine.Model) -> None:
    with pytest.raises(engine.EngineError, match="n_slots"):
        engine.Context(model, 0, 32, 1)
    with pytest.raises(engine.EngineError, match="n_threads"):
        engine.Context(model, 1, 32, 0)


def test_slot_and_token_errors_apply_nothing(ctx: engine.Context) -> None:
    ctx.forward([BatchEntry(0, [1, 2, 3], "none")])
    bad_batches = [
        ([BatchEntry(0, [4], "last"), BatchEntry(3, [5], "last")], "slot 3 out of range"),
        ([BatchEntry(0, [4], "last"), BatchEntry(0, [5], "last")], "twice"),
        ([BatchEntry(0, [4], "last"), BatchEntry(1, [5, 512], "last")], "token 512"),
        ([BatchEntry(0, [4], "last"), BatchEntry(1, [-1], "last")], "token -1"),
        ([BatchEntry(0, [4], "sometimes")], "logits"),
    ]
    for entries, msg in bad_batches:
        with pytest.raises(engine.EngineError, match=msg):
            ctx.forward(entries)
        assert (ctx.pos(0), ctx.pos(1)) == (3, 0)
    with pytest.raises(engine.EngineError):
        ctx.logits(0, 0)  # the failed forward left no logits


def test_context_overflow_names_slot_and_sizes(ctx: engine.Context) -> None:
    ctx.forward([BatchEntry(2, list(range(30)), "none")])
    with pytest.raises(engine.EngineError, match=r"slot 2.*3 tokens at position 30.*32"):
        ctx.forward([BatchEntry(1, [1], "last"), BatchEntry(2, [1, 2, 3], "last")])
    assert (ctx.pos(1), ctx.pos(2)) == (0, 30)
    assert ctx.forward([BatchEntry(2, [1, 2], "last")]) == [0]
    assert ctx.pos(2) == 32


def test_cancel_flag_skips_entry(ctx: engine.Context) -> None:
    flag = engine.CancelFlag()
    assert not flag.is_set()
    t = threading.Thread(target=flag.set)
    t.start()
    t.join()
    assert flag.is_set()
    ctx.forward([BatchEntry(1, [7, 8], "none")])
    st = ctx.forward([BatchEntry(0, [1, 2, 3], "last"), BatchEntry(1, [9], "last", flag)])
    assert st == [0, 1]
    assert (ctx.pos(0), ctx.pos(1)) == (3, 2)  # the cancelled slot keeps its position
    assert ctx.logits(0, 2).shape == (512,)
    with pytest.raises(engine.EngineError):
        ctx.logits(1, 0)
    flag.clear()
    assert not flag.is_set()
    assert ctx.forward([BatchEntry(1, [9], "last", flag)]) == [0]
    assert ctx.pos(1) == 3


def test_truncate_and_reset(ctx: engine.Context) -> None:
    toks = [10, 20, 30, 40, 50, 60]
    ctx.forward([BatchEntry(0, toks, "all")])
    want = np.array(ctx.logits(0, 5))
    ctx.truncate(0, 3)
    assert ctx.pos(0) == 3
    ctx.forward([BatchEntry(0, toks[3:], "last")])
    np.testing.assert_array_equal(np.array(ctx.logits(0, 2)), want)
    with pytest.raises(engine.EngineError):
        ctx.truncate(0, 7)  # beyond the position
    with pytest.raises(engine.EngineError):
        ctx.truncate(5, 0)  # no such slot
    ctx.reset(0)
    assert ctx.pos(0) == 0
    ctx.forward([BatchEntry(0, toks, "last")])
    np.testing.assert_array_equal(np.array(ctx.logits(0, 5)), want)


def test_logits_modes_and_views(ctx: engine.Context, model: engine.Model) -> None:
    n_vocab = model.hparams.n_vocab
    ctx.forward(
        [
            BatchEntry(0, [1, 2, 3, 4], "all"),
            BatchEntry(1, [5, 6], "last"),
            BatchEntry(2, [7], "none"),
        ]
    )
    rows = [ctx.logits(0, t) for t in range(4)]
    assert all(r.shape == (n_vocab,) and r.dtype == np.float32 for r in rows)
    assert not rows[0].flags.writeable and not rows[0].flags.owndata  # a view, not a copy
    assert len({r.tobytes() for r in rows}) == 4
    assert np.isfinite(np.stack(rows)).all()
    assert ctx.logits(1, 1).shape == (n_vocab,)
    with pytest.raises(engine.EngineError):
        ctx.logits(1, 0)  # "last" keeps only the last token's row
    with pytest.raises(engine.EngineError):
        ctx.logits(2, 0)  # "none"
    with pytest.raises(engine.EngineError):
        ctx.logits(0, 4)


def test_sample_from_engine_memory(ctx: engine.Context, model: engine.Model) -> None:
    if engine.SamplingParams is None:
        pytest.skip("sampling module missing")
    ctx.forward([BatchEntry(0, [3, 4, 5], "last")])
    sampler = engine.Sampler(engine.SamplingParams(temperature=0.0), model.hparams.n_vocab)
    assert ctx.sample(0, sampler) == int(np.argmax(ctx.logits(0, 2)))


def test_empty_and_zero_token_entries(ctx: engine.Context) -> None:
    assert ctx.forward([]) == []
    assert ctx.forward([BatchEntry(0, [], "last")]) == [0]
    assert ctx.pos(0) == 0


def test_model_close_waits_for_contexts(tiny_model_path: Path) -> None:
    m = engine.Model.load(tiny_model_path)
    c = engine.Context(m, 1, 16, 1)
    m.close()  # deferred: the context still reads the weights
    c.forward([BatchEntry(0, [1, 2], "last")])
    assert c.logits(0, 1).shape == (512,)
    c.close()
    with pytest.raises(engine.EngineError):
        m.metadata("general.name")
    with pytest.raises(engine.EngineError):
        c.forward([BatchEntry(0, [1], "last")])


def test_cancel_while_running_leaves_slots_consistent(head128_model_path: Path) -> None:
    """A flag set from another thread during a long, chunked forward: the entry ends either
    done (status 0, position advanced) or cancelled (status 1, position unchanged), and the
    other entry of the call is unaffected. Which one happens depends on timing."""
    prompt = [(i * 37) % 500 for i in range(700)]
    with engine.Model.load(head128_model_path) as m, engine.Context(m, 2, 1024, 2) as ctx:
        ctx.forward([BatchEntry(1, prompt[:20], "last")])
        want_other = None
        seen = set()
        for delay in (0.0, 0.002, 0.01, 0.05):
            ctx.reset(0)
            ctx.truncate(1, 20)
            flag = engine.CancelFlag()
            timer = threading.Timer(delay, flag.set)
            timer.start()
            st = ctx.forward(
                [BatchEntry(0, prompt, "last", flag), BatchEntry(1, prompt[20:40], "last")]
            )
            timer.join()
            seen.add(st[0])
            assert st[1] == 0 and ctx.pos(1) == 40
            other = np.array(ctx.logits(1, 19))
            if want_other is None:
                want_other = other
            np.testing.assert_array_equal(other, want_other)
            if st[0] == 1:
                assert ctx.pos(0) == 0
                with pytest.raises(engine.EngineError):
                    ctx.logits(0, 699)
            else:
                assert st[0] == 0 and ctx.pos(0) == 700
        assert seen <= {0, 1}


def test_native_api_tolerates_null_handles() -> None:
    """Every bn_* call that takes a handle answers NULL with its error value, not a crash
    (the context size getters and the cancel flag calls used to dereference it)."""
    from bitnetd_trio._native import ffi, lib

    err = ffi.new("char[]", 128)
    assert lib.bn_model_load(ffi.NULL, err, 128) == ffi.NULL
    assert ffi.string(err)
    assert lib.bn_context_new(ffi.NULL, 1, 16, 1, err, 128) == ffi.NULL
    assert lib.bn_context_n_ctx(ffi.NULL) == 0
    assert lib.bn_context_n_slots(ffi.NULL) == 0
    assert lib.bn_context_set_threads(ffi.NULL, 2) == -1
    assert lib.bn_seq_pos(ffi.NULL, 0) == -1
    assert lib.bn_seq_truncate(ffi.NULL, 0, 0) == -1
    lib.bn_seq_reset(ffi.NULL, 0)
    assert lib.bn_logits(ffi.NULL, 0, 0) == ffi.NULL
    assert lib.bn_forward(ffi.NULL, ffi.NULL, 0, err, 128) == -1
    lib.bn_cancel_set(ffi.NULL)
    lib.bn_cancel_clear(ffi.NULL)
    assert lib.bn_cancel_is_set(ffi.NULL) == 0
    assert lib.bn_meta_count(ffi.NULL) == 0 and lib.bn_meta_find(ffi.NULL, b"x") == -1
    assert lib.bn_sampler_sample(ffi.NULL, ffi.NULL) == -1
    lib.bn_context_free(ffi.NULL)
    lib.bn_model_free(ffi.NULL)


def test_float_key_that_rounds_to_zero_is_refused(tmp_path: Path) -> None:
    """An f64 epsilon below the float range passed the > 0 check and loaded as 0.0 (then a
    zero row normalizes to NaN); it is out of range like any other non-positive value."""
    from gguf import GGUFValueType

    from bitnetd_trio.engine import gguf_writer as gw
    key = f"{gw.SMALLEST.architecture}.attention.layer_norm_rms_epsilon"
    path = gw.write_model(
        tmp_path / "eps.gguf",
        gw.SMALLEST,
        0,
        extra_metadata={key: (1e-50, GGUFValueType.FLOAT64)},
    )
    with pytest.raises(engine.ModelLoadError, match="layer_norm_rms_epsilon.*out of range"):
        engine.Model.load(path)


def test_call_level_errors_blame_no_entry(model: engine.Model) -> None:
    """Too many entries is the call's fault, not entry 0's: every status -2 (entry 0 used to
    get -1, the mark of the offending entry)."""
    from bitnetd_trio._native import ffi, lib

    with engine.Context(model, 1, 16, 1) as c:
        toks = ffi.new("int32_t[]", [1])
        ents = ffi.new("bn_batch_entry[]", 2)
        for i in range(2):
            ents[i].slot, ents[i].n_tokens, ents[i].tokens = i, 1, toks
            ents[i].logits = lib.BN_LOGITS_LAST
        err = ffi.new("char[]", 128)
        assert lib.bn_forward(c._live(), ents, 2, err, 128) == -1
        assert b"2 entries for 1 slots" in ffi.string(err)
        assert [ents[0].status, ents[1].status] == [-2, -2]
        ents[0].slot = 5  # an entry at fault is still named
        assert lib.bn_forward(c._live(), ents, 1, err, 128) == -1
        assert ents[0].status == -1 and c.pos(0) == 0
