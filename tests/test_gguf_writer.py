"""The GGUF writer produces the official BitNet b1.58 layout (model-format §1-§4, §8)."""

from __future__ import annotations

import dataclasses
import os
import struct
from pathlib import Path

import numpy as np
import pytest
from reference_model import F16, F32, I2_S, decode_i2s, read_gguf

from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.engine import vocab as vocabs

U32, I32, F32V, BOOL, STRING, ARRAY = 4, 5, 6, 7, 8, 9


def official_keys(arch: str = "bitnet-b1.58") -> dict[str, int]:
    """The 24 keys of model-format §2.2 with their GGUF value types."""
    a = arch
    return {
        "general.architecture": STRING, "general.name": STRING,
        f"{a}.vocab_size": U32, f"{a}.context_length": U32, f"{a}.embedding_length": U32,
        f"{a}.block_count": U32, f"{a}.feed_forward_length": U32,
        f"{a}.rope.dimension_count": U32, f"{a}.attention.head_count": U32,
        f"{a}.attention.head_count_kv": U32, "tokenizer.ggml.add_bos_token": BOOL,
        f"{a}.attention.layer_norm_rms_epsilon": F32V, f"{a}.rope.freq_base": F32V,
        "general.file_type": U32, "tokenizer.ggml.model": STRING,
        "tokenizer.ggml.tokens": ARRAY, "tokenizer.ggml.scores": ARRAY,
        "tokenizer.ggml.token_type": ARRAY, "tokenizer.ggml.merges": ARRAY,
        "tokenizer.ggml.bos_token_id": U32, "tokenizer.ggml.eos_token_id": U32,
        "tokenizer.ggml.padding_token_id": U32, "tokenizer.chat_template": STRING,
        "general.quantization_version": U32,
    }


def test_metadata_is_the_official_key_set(tiny_model_path: Path) -> None:
    f = read_gguf(tiny_model_path)
    assert f.version == 3
    assert f.metadata_types == official_keys()
    assert f.array_types == {"tokenizer.ggml.tokens": STRING, "tokenizer.ggml.scores": F32V,
                             "tokenizer.ggml.token_type": I32,
                             "tokenizer.ggml.merges": STRING}
    md = f.metadata
    assert "general.alignment" not in md
    assert md["general.file_type"] == 40 and md["general.quantization_version"] == 2
    assert md["tokenizer.ggml.model"] == "gpt2" and md["tokenizer.ggml.add_bos_token"] is True
    assert md["bitnet-b1.58.rope.dimension_count"] == 64
    assert md["bitnet-b1.58.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert md["bitnet-b1.58.rope.freq_base"] == 500000.0
    assert md["tokenizer.chat_template"] == gw.OFFICIAL_CHAT_TEMPLATE
    assert "BITNETAssistant: " in md["tokenizer.chat_template"]


def test_gguf_package_reads_the_metadata(tmp_path: Path) -> None:
    # GGUFReader cannot read type-36 tensors: read the same model without them.
    gguf = pytest.importorskip("gguf")
    i2s = [s.name for s in gw.tensor_layout(gw.TINY) if s.ggml_type == gw.GGML_TYPE_I2_S]
    path = gw.write_model(tmp_path / "no_i2s.gguf", gw.TINY, drop_tensors=i2s)
    reader = gguf.GGUFReader(path)
    T = gguf.GGUFValueType
    fields = {k: v for k, v in reader.fields.items() if not k.startswith("GGUF.")}
    assert {k: int(v.types[0]) for k, v in fields.items()} == official_keys()
    assert [int(t) for t in fields["tokenizer.ggml.tokens"].types] == [T.ARRAY, T.STRING]
    assert [int(t) for t in fields["tokenizer.ggml.token_type"].types] == [T.ARRAY, T.INT32]
    assert fields["tokenizer.ggml.bos_token_id"].contents() == vocabs.tiny_vocab().bos_id
    assert fields["general.architecture"].contents() == "bitnet-b1.58"
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "blk.1.ffn_sub_norm.weight" in names


def test_tensor_layout_and_sizes(tiny_model_path: Path) -> None:
    f = read_gguf(tiny_model_path)
    e, ff, kv = 256, 384, 128
    expected = {"token_embd.weight": ((e, gw.TINY_VOCAB_SIZE), F16),
                "output_norm.weight": ((e,), F32)}
    for i in range(2):
        b = f"blk.{i}."
        expected.update({
            b + "attn_norm.weight": ((e,), F32), b + "attn_q.weight": ((e, e), I2_S),
            b + "attn_k.weight": ((e, kv), I2_S), b + "attn_v.weight": ((e, kv), I2_S),
            b + "attn_sub_norm.weight": ((e,), F32), b + "attn_output.weight": ((e, e), I2_S),
            b + "ffn_norm.weight": ((e,), F32), b + "ffn_gate.weight": ((e, ff), I2_S),
            b + "ffn_up.weight": ((e, ff), I2_S), b + "ffn_sub_norm.weight": ((ff,), F32),
            b + "ffn_down.weight": ((ff, e), I2_S)})
    assert {n: (t.ne, t.ggml_type) for n, t in f.tensors.items()} == expected
    # Offsets: 32-aligned, back to back, and the file ends with the last tensor.
    end = 0
    for name in sorted(f.tensors, key=lambda n: f.tensors[n].offset):
        t = f.tensors[name]
        assert t.offset % 32 == 0 and t.offset >= end
        n = int(np.prod(t.ne))
        assert t.nbytes == {F32: 4 * n, F16: 2 * n, I2_S: n // 4 + 32}[t.ggml_type]
        end = t.offset + t.nbytes
    assert os.path.getsize(tiny_model_path) == f.data_start + end
    # The 28 padding bytes of every I2_S tensor are zeros.
    for name, t in f.tensors.items():
        if t.ggml_type == I2_S:
            assert f.tensor_bytes(name)[-28:] == bytes(28)


def test_full_size_layout_matches_the_official_file() -> None:
    specs = gw.tensor_layout(gw.FULL_2B4T)
    assert len(specs) == 332
    assert sum(s.nbytes for s in specs) == 1_179_449_920
    assert sum(s.nbytes for s in specs if s.ggml_type == gw.GGML_TYPE_I2_S) == 521_017_920
    assert sum(s.nbytes for s in specs if s.ggml_type == gw.GGML_TYPE_F16) == 656_670_720


def test_pack_i2s_matches_a_hand_computed_block() -> None:
    t = np.zeros((2, 128), dtype=np.int8)
    t[0, 0], t[0, 32], t[0, 64], t[0, 96] = 1, -1, 0, 1  # byte 0: 10 00 01 10
    t[0, 33] = 1                                          # byte 1: 01 10 01 01
    t[1, 31] = -1                                         # row 1, byte 31: 00 01 01 01
    packed = gw.pack_i2s(t, 0.75)
    assert len(packed) == 256 // 4 + 32
    assert packed[0] == 0b10000110 == 0x86
    assert packed[1] == 0b01100101 == 0x65
    assert set(packed[2:32]) == {0x55}                    # all zeros -> code 1 everywhere
    assert packed[32 + 31] == 0b00010101
    assert set(packed[32:63]) == {0x55}
    assert struct.unpack("<f", packed[64:68])[0] == 0.75
    assert packed[68:] == bytes(28)
    back, scale = decode_i2s(packed, 2, 128)
    assert np.array_equal(back, t) and scale == np.float32(0.75)


def test_pack_i2s_rejects_bad_input() -> None:
    with pytest.raises(ValueError):
        gw.pack_i2s(np.zeros((2, 100), dtype=np.int8))
    with pytest.raises(ValueError):
        gw.pack_i2s(np.full((1, 128), 2, dtype=np.int8))


def test_random_weights_are_what_the_file_holds(tiny_model_path: Path) -> None:
    f = read_gguf(tiny_model_path)
    weights = gw.random_weights(gw.TINY, 0)
    assert set(weights) == set(f.tensors) | {
        n + ".scale" for n, t in f.tensors.items() if t.ggml_type == I2_S}
    for name, t in f.tensors.items():
        data = f.tensor_bytes(name)
        shape = tuple(reversed(t.ne))
        if t.ggml_type == I2_S:
            tern, scale = decode_i2s(data, *shape)
            assert np.array_equal(tern, weights[name]), name
            assert scale == weights[name + ".scale"]
            assert set(np.unique(tern)) <= {-1, 0, 1}
            assert 0.4 < scale * np.sqrt(shape[1] / 1.5) < 1.6
        else:
            dtype = np.float32 if t.ggml_type == F32 else np.float16
            assert np.array_equal(np.frombuffer(data, dtype).reshape(shape), weights[name]), name
    embd = weights["token_embd.weight"].astype(np.float32)
    assert 0.03 < embd.std() < 0.07
    assert np.all(np.abs(weights["output_norm.weight"] - 1) <= 0.2)


def test_seed_determines_the_bytes(tmp_path: Path) -> None:
    a = gw.write_model(tmp_path / "a.gguf", gw.SMALLEST, 5).read_bytes()
    b = gw.write_model(tmp_path / "b.gguf", gw.SMALLEST, 5).read_bytes()
    c = gw.write_model(tmp_path / "c.gguf", gw.SMALLEST, 6).read_bytes()
    assert a == b and a != c and len(a) == len(c)


def test_tiny_vocabulary_is_a_real_bpe_vocabulary(tiny_model_path: Path) -> None:
    md = read_gguf(tiny_model_path).metadata
    tokens, types, merges = (md["tokenizer.ggml.tokens"], md["tokenizer.ggml.token_type"],
                             md["tokenizer.ggml.merges"])
    assert len(tokens) == len(set(tokens)) == gw.TINY_VOCAB_SIZE == len(types)
    assert md["bitnet-b1.58.vocab_size"] == len(tokens)
    assert 200 <= len(merges) and all(m.replace(" ", "", 1) in tokens for m in merges)
    byte_tokens = set(tokens[:256])
    assert byte_tokens == set(vocabs.byte_to_unicode().values())
    assert tokens[:3] == ["!", '"', "#"]
    vocab = {t: i for i, t in enumerate(tokens)}
    bos, eos = md["tokenizer.ggml.bos_token_id"], md["tokenizer.ggml.eos_token_id"]
    assert tokens[bos] == "<|begin_of_text|>" and tokens[eos] == "<|end_of_text|>"
    assert md["tokenizer.ggml.padding_token_id"] == eos
    eot = vocab["<|eot_id|>"]
    assert {bos, eos, eot} <= {i for i, t in enumerate(types) if t == 3}
    assert [i for i, t in enumerate(types) if t == 3] == list(range(502, 512))
    assert "Ġthe" in vocab and "Ġand" in vocab  # learnt from English text


def test_options_change_the_file(tmp_path: Path) -> None:
    path = gw.write_model(
        tmp_path / "opts.gguf", gw.SMALLEST, tie_head=False, chat_template="{{ x }}",
        extra_metadata={"general.name": "renamed", "test.flag": True},
        drop_keys=("tokenizer.ggml.padding_token_id",),
        tensor_overrides={"output_norm.weight": np.full(128, 2.0, dtype=np.float32),
                          "blk.0.attn_q.weight": (np.ones((128, 128), np.int8), 0.25),
                          "blk.0.attn_k.weight": gw.RawTensor(b"\1" * 10, (64, 128), 36)},
        drop_tensors=("blk.1.ffn_down.weight",))
    f = read_gguf(path, check_sizes=False)
    md = f.metadata
    assert md["tokenizer.chat_template"] == "{{ x }}" and md["general.name"] == "renamed"
    assert md["test.flag"] is True and f.metadata_types["test.flag"] == BOOL
    assert "tokenizer.ggml.padding_token_id" not in md
    assert list(md)[1] == "general.name"  # replaced in place, order kept
    assert "output.weight" in f.tensors and f.tensors["output.weight"].ne == (128, 512)
    assert "blk.1.ffn_down.weight" not in f.tensors
    data = f.raw[f.data_start + f.tensors["output_norm.weight"].offset:][:512]
    assert np.all(np.frombuffer(data, np.float32) == 2.0)
    q = f.raw[f.data_start + f.tensors["blk.0.attn_q.weight"].offset:][:128 * 128 // 4 + 32]
    tern, scale = decode_i2s(q, 128, 128)
    assert np.all(tern == 1) and scale == np.float32(0.25)


def test_activations_stay_finite_in_a_deep_model(tmp_path: Path) -> None:
    from reference_model import forward, load_reference

    deep = dataclasses.replace(gw.SMALLEST, n_layer=30)
    w = load_reference(gw.write_model(tmp_path / "deep.gguf", deep, 9))
    logits = forward(w, [1, 2, 3, 300, 502])
    assert np.all(np.isfinite(logits))
    assert 0.1 < np.abs(logits).max() < 100


def test_demo_model_is_cached(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = gw.demo_model_path()
    assert first.parent == tmp_path / "bitnetd-trio" and first.is_file()
    stamp = first.stat().st_mtime_ns
    second = gw.demo_model_path()
    assert second == first and second.stat().st_mtime_ns == stamp
    assert [p.name for p in first.parent.iterdir()] == [first.name]  # no temp files left
    md = read_gguf(first).metadata
    assert md["bitnet-b1.58.context_length"] == 512


def test_cli_writes_a_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cli.gguf"
    assert gw.main(["--preset", "smallest", "--seed", "4", str(out)]) == 0
    assert "wrote" in capsys.readouterr().out
    assert out.read_bytes() == gw.write_model(tmp_path / "same.gguf", gw.SMALLEST, 4).read_bytes()


def test_llama3_vocabulary() -> None:
    pytest.importorskip("llama_models")
    v = vocabs.llama3_vocab()
    assert len(v.tokens) == 128256 and len(v.merges) == 280147
    assert v.tokens[128000] == "<|begin_of_text|>" and v.tokens[128009] == "<|eot_id|>"
    assert v.token_types[127999] == 1 and set(v.token_types[128000:]) == {3}
    assert v.merges[0] == "Ġ Ġ" and v.tokens[0] == "!"


def test_tiny_vocabulary_builds_a_working_tokenizer() -> None:
    # The recipe of shared/notes/python-stack.md, applied to the tiny vocabulary's lists.
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

    v = vocabs.tiny_vocab()
    normal = {t: i for i, t in enumerate(v.tokens) if v.token_types[i] == 1}
    bpe = models.BPE(vocab=normal, merges=[tuple(m.split(" ", 1)) for m in v.merges],
                     ignore_merges=True)
    tok = Tokenizer(bpe)
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(vocabs.LLAMA3_SPLIT_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    for text in ("Hello, world! The quick brown fox.", "café 日本語 🙂\n\nend", "x" * 50):
        ids = tok.encode(text).ids
        assert tok.decode(ids) == text
        assert all(0 <= i < v.bos_id for i in ids)
    english = "the server and the client"
    assert len(tok.encode(english).ids) < len(english.encode()) // 2
