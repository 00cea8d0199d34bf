"""The Llama-graph I2_S family (Falcon3-1.58bit, Falcon-E, Llama3-8B-1.58) around the engine:
the pre-tokenizers its files name (model-format §10.4.4), its special tokens and chat template
from the file, and serving such a file. The engine's arithmetic is checked in
test_reference.py, its load-time validation in test_gguf_malformed.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import httpx
import numpy as np
import pytest
from conftest import running_server, server_config
from test_kernels import logits_from_each_kernel
from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine import vocab as vocab_mod
from bitnetd_trio.engine.chat import ChatTemplate
from bitnetd_trio.engine.tokenizer import Tokenizer, TokenizerError

#: The Llama-3 split as llama.cpp defines it for its LLAMA3 pre-tokenizer type, which the
#: names llama-bpe, falcon3 and falcon_e select (typed here, not imported from the code).
LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

TEXTS = [
    "Hello, world! How are you today?",
    "There are 3 apples, 12345 pears and 365 days in the year 2026.",
    "  leading spaces,\ttabs\n\nand newlines\r\n  ",
    "I'm sure they'll say it's fine; WE'RE ready. DON'T stop!!!",
    "Ünïcödé café naïve — 日本語のテキスト, 🙂 🚀",
    "x" * 40 + " " + "ab12cd34" * 5,
]


def hf_reference(v: vocab_mod.Vocab, pattern: str) -> HFTokenizer:
    """A `tokenizers` BPE over the same vocabulary and merges, split by `pattern`."""
    vocab: dict[str, int] = {}
    for i, (t, ty) in enumerate(zip(v.tokens, v.token_types)):
        if ty != 3:
            vocab.setdefault(t, i)
    merges = []
    for m in v.merges:
        left, _, right = m.partition(" ")
        if left in vocab and right in vocab and left + right in vocab:
            merges.append((left, right))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    hf.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    hf.decoder = decoders.ByteLevel()
    return hf


@pytest.mark.parametrize("vocab_kind", ["tiny", "tiny-falcon3"])
@pytest.mark.parametrize("pre", [None, "llama-bpe", "llama3", "falcon3", "falcon_e"])
def test_pre_tokenizer_ids_match_tokenizers(pre: str | None, vocab_kind: str) -> None:
    v = vocab_mod.get_vocab(vocab_kind)
    tok = Tokenizer(v.tokens, v.merges, v.token_types, bos_id=v.bos_id, eos_id=v.eos_id,
                    pre=pre)
    hf = hf_reference(v, LLAMA3_REGEX)
    assert tok.pre == pre
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False, parse_special=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    # a different split gives different ids on these texts: the comparison can fail
    digits = hf_reference(v, r"\p{N}|[^\p{N}]+")
    assert any(tok.encode(t, add_bos=False, parse_special=False)
               != digits.encode(t, add_special_tokens=False).ids for t in TEXTS)


def test_unknown_or_mistyped_pre_tokenizer_is_a_load_error() -> None:
    v = vocab_mod.tiny_vocab()
    for pre in ("qwen35", "deepseek-llm", "", "LLAMA-BPE", "QWEN2"):
        with pytest.raises(TokenizerError, match=f"tokenizer.ggml.pre is {pre!r}"):
            Tokenizer(v.tokens, v.merges, v.token_types, pre=pre)
    meta = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": v.tokens,
            "tokenizer.ggml.merges": v.merges, "tokenizer.ggml.token_type": v.token_types}
    with pytest.raises(TokenizerError, match="'falcon-h2'"):
        Tokenizer.from_metadata(({**meta, "tokenizer.ggml.pre": "falcon-h2"}).get)
    with pytest.raises(TokenizerError, match="tokenizer.ggml.pre must be a string"):
        Tokenizer.from_metadata(({**meta, "tokenizer.ggml.pre": 3}).get)
    assert Tokenizer.from_metadata(({**meta, "tokenizer.ggml.pre": "falcon_e"}).get).pre == \
        "falcon_e"


@pytest.fixture(scope="module")
def falcon3_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny Llama-graph file with the Falcon3 vocabulary layout, pre and chat template."""
    shape = dataclasses.replace(gw.TINY_LLAMA, n_ctx=2048)
    return gw.write_model(tmp_path_factory.mktemp("falcon3") / "falcon3.gguf", shape, 41,
                          vocab="tiny-falcon3")


def test_falcon3_specials_and_template_come_from_the_file(falcon3_path: Path) -> None:
    model = engine.Model.load(falcon3_path)
    try:
        assert model.hparams.architecture == "llama" and not model.hparams.tied_head
        tok = Tokenizer.from_model(model)
        template = model.metadata("tokenizer.chat_template", None)
    finally:
        model.close()
    assert tok.pre == "falcon3"
    assert tok.bos_id == tok.eos_id == 11 and tok.piece(11) == "<|endoftext|>"
    assert 11 in tok.stop_ids
    user = tok.find("<|user|>")
    assert user is not None and tok.is_control(user)
    ct = ChatTemplate.from_model(template, None, tok.piece(tok.bos_id), tok.piece(tok.eos_id))
    assert ct.kind == "jinja"
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "<|user|>"}]
    text = ct.render(msgs)
    assert text == ("<|system|>\nBe brief.\n<|user|>\nHi\n<|assistant|>\nHello.<|endoftext|>\n"
                    "<|user|>\n<|user|>\n<|assistant|>\n")
    ids = ct.render_tokens(msgs, tok)
    assert ids[0] == 11  # BOS (add_bos defaults to true, as llama.cpp does for these files)
    assert ids.count(user) == 2  # the template's two turns; the user's text is plain text
    assert ids[-2:] == tok.encode("<|assistant|>\n", add_bos=False, parse_special=True)[-2:]


async def test_serves_a_llama_graph_file(falcon3_path: Path) -> None:
    config = server_config(falcon3_path, model_parallel=2, model_ctx_size=2048)
    async with running_server(config) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            models = (await c.get("/v1/models")).json()
            card = models["data"][0]
            assert card["meta"]["architecture"] == "llama"
            assert card["meta"]["n_vocab"] == 512
            r = await c.post("/v1/chat/completions", json={
                "model": card["id"], "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say something."}],
                "ignore_eos": True, "logprobs": True})
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["choices"][0]["finish_reason"] == "length"
            assert body["usage"]["completion_tokens"] == 8
            # the prompt is the Falcon3 format: BOS + '<|user|>\nSay something.\n<|assistant|>\n'
            model = engine.Model.load(falcon3_path)
            try:
                tok = Tokenizer.from_model(model)
            finally:
                model.close()
            want = [11] + tok.encode("<|user|>", add_bos=False, parse_special=True) + \
                tok.encode("\nSay something.\n", add_bos=False, parse_special=False) + \
                tok.encode("<|assistant|>\n", add_bos=False, parse_special=True)
            assert body["usage"]["prompt_tokens"] == len(want)
            again = (await c.post("/v1/chat/completions", json={
                "model": card["id"], "max_tokens": 8, "temperature": 0,
                "messages": [{"role": "user", "content": "Say something."}],
                "ignore_eos": True})).json()
            assert again["choices"][0]["message"]["content"] == \
                body["choices"][0]["message"]["content"]


def sequence_rows(model: engine.Model, a: list[int], b: list[int], mode: str, threads: int,
                  batched: bool, split: int) -> np.ndarray:
    """Sequence a's rows (logits for mode "all", hidden rows for "hidden_all") from a fresh
    context: fed in two calls split at `split`, each beside sequence b when batched."""
    ctx = engine.Context(model, 2, 128, threads)
    try:
        out = []
        for part in (a[:split], a[split:]):
            ents = [engine.BatchEntry(0, part, mode, None)]
            if batched:
                ents.append(engine.BatchEntry(1, b, "all", None))
                ctx.reset(1)
            assert list(ctx.forward(ents)) == [0] * len(ents)
            get = ctx.logits if mode == "all" else ctx.hidden
            out += [np.array(get(0, t), copy=True) for t in range(len(part))]
        return np.stack(out)
    finally:
        ctx.close()


def check_invariance(path: Path, mode: str, seed: int, n_a: int, n_b: int) -> None:
    """model-format §5.5: a sequence's rows are bit-identical alone, batched with another
    sequence, split into several calls, and at 1 or 2 threads."""
    rng = np.random.default_rng(seed)
    a = [int(t) for t in rng.integers(0, 512, size=n_a)]
    b = [int(t) for t in rng.integers(0, 512, size=n_b)]
    model = engine.Model.load(path)
    try:
        base = sequence_rows(model, a, b, mode, 1, False, n_a - 1)
        assert np.isfinite(base).all()
        for threads, batched, split in ((2, False, n_a - 1), (2, True, 20), (1, True, 5)):
            got = sequence_rows(model, a, b, mode, threads, batched, split)
            assert np.array_equal(got, base), (threads, batched, split)
    finally:
        model.close()


def test_llama_graph_is_batch_and_thread_invariant(falcon3_path: Path) -> None:
    """model-format §5.5 holds for the Llama graph too (SiLU, no-norm quantization, adjacent
    RoPE)."""
    check_invariance(falcon3_path, "all", 3, 37, 23)


# ---- the Qwen3 embedding family (model-format §10.5) ------------------------------------

#: llama.cpp's QWEN2 split: the Llama-3 one with single digits (typed here, not imported).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def test_qwen2_pre_tokenizer_and_eos() -> None:
    v = vocab_mod.get_vocab("tiny-qwen3")
    tok = Tokenizer(v.tokens, v.merges, v.token_types, bos_id=v.bos_id, eos_id=v.eos_id,
                    add_bos=False, add_eos=True, pre="qwen2")
    hf = hf_reference(v, QWEN2_REGEX)
    for text in TEXTS:
        ids = tok.encode(text, add_bos=False, parse_special=False)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert tok.decode(ids) == text
    # digits split one by one, unlike the Llama-3 split (groups of up to three)
    llama = Tokenizer(v.tokens, v.merges, v.token_types, pre="llama-bpe")
    text = "year 2026 and 12345"
    assert tok.encode(text, add_bos=False, parse_special=False) != llama.encode(
        text, add_bos=False, parse_special=False)
    assert tok.add_eos_default and tok.piece(v.eos_id) == "<|endoftext|>"
    ids = tok.encode("hello", add_bos=tok.add_bos_default, add_eos=tok.add_eos_default,
                     parse_special=False)
    assert ids[-1] == v.eos_id and ids[0] != v.bos_id
    assert tok.encode("hello", add_bos=False, parse_special=False) == ids[:-1]


def test_qwen3_embedding_file_metadata(tmp_path: Path) -> None:
    """The writer's Qwen3 embedding layout (model-families B.1): the keys the converter
    writes, the tokenizer from them, and the engine's view of the graph."""
    from reference_model import read_gguf

    path = gw.write_model(tmp_path / "q.gguf", gw.TINY_QWEN3_EMBED, 1)
    f = read_gguf(path)
    md = f.metadata
    assert md["general.architecture"] == "qwen3" and md["general.file_type"] == 40
    assert md["qwen3.attention.key_length"] == md["qwen3.attention.value_length"] == \
        md["qwen3.rope.dimension_count"] == 128
    assert md["qwen3.pooling_type"] == 3 and md["tokenizer.ggml.add_eos_token"] is True
    assert md["tokenizer.ggml.pre"] == "qwen2" and "general.quantization_version" not in md
    assert {f.tensors[n].ggml_type for n in f.tensors if n.endswith("norm.weight")
            or n.endswith("norm_in.weight")} == {gw.GGML_TYPE_F16}
    assert len(f.tensors) == 2 + 18 * 2 and "output.weight" not in f.tensors
    model = engine.Model.load(path)
    try:
        hp = model.hparams
        assert (hp.architecture, hp.head_dim, hp.pooling, hp.tied_head) == ("qwen3", 128, 3, True)
        tok = Tokenizer.from_model(model)
    finally:
        model.close()
    assert tok.pre == "qwen2" and tok.add_eos_default and not tok.add_bos_default


def test_qwen3_graph_is_batch_and_thread_invariant(tmp_path: Path) -> None:
    """model-format §5.5 for the embedding graph (one quantization per projection, QK-norm),
    on the hidden rows embeddings are made of."""
    path = gw.write_model(tmp_path / "q.gguf", gw.TINY_QWEN3_EMBED, 2)
    check_invariance(path, "hidden_all", 4, 29, 17)


# ---- Ternary Bonsai (model-format §10.6) ---------------------------------------------------


def test_bonsai_graph_is_batch_thread_and_kernel_invariant(tmp_path: Path) -> None:
    """model-format §5.5 for the Q2_0 graph (Q2_0 embedding rows, projections and head), and
    the same logits bit for bit from every kernel set this CPU has."""
    path = gw.write_model(tmp_path / "b.gguf", gw.TINY_BONSAI, 5, tie_head=False)
    check_invariance(path, "all", 6, 31, 19)
    model = engine.Model.load(path)
    try:
        assert model.hparams.architecture == "qwen3" and model.hparams.pooling == 0
        out = logits_from_each_kernel(model)
    finally:
        model.close()
    assert len(out) >= 2 and np.isfinite(out["scalar"]).all()
    for k, v in out.items():
        np.testing.assert_array_equal(v, out["scalar"], err_msg=k)
