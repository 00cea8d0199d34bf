"""Embeddings: the engine's hidden-state output mode (model-format §5.3.1) and
POST /v1/embeddings (http-api §1.8) over a real server with the tiny models.

What must hold exactly (bit for bit): a token's hidden row does not depend on what else is in
the step, on the chunking of its prompt or on the thread count; so neither does an embedding,
whether its input comes alone or among 16, through a server with 1 or 2 threads.
"""

from __future__ import annotations

import base64
import dataclasses
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
from conftest import SERVER_SHAPE, running_server, server_config

from bitnetd_trio.api.embeddings import MAX_INPUTS
from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.embedding import pool

PROMPT = [5, 17, 99, 3, 250, 7, 8, 40, 41, 42]


@pytest.fixture(scope="module")
def model(gqa_model_path: Path):
    m = engine.Model.load(gqa_model_path)
    yield m
    m.close()


def hidden_rows(ctx: engine.Context, entry: int, n: int) -> np.ndarray:
    return np.stack([np.array(ctx.hidden(entry, t)) for t in range(n)])


def test_hidden_is_the_heads_input(model: engine.Model) -> None:
    """y of every token, times the tied F16 head, gives that token's logits."""
    from conftest import GQA

    head = gw.random_weights(GQA, 2)["token_embd.weight"]  # the gqa model's seed
    with engine.Context(model, 2, 64, 1) as ctx:
        ctx.forward([engine.BatchEntry(0, PROMPT, "all")])
        logits = np.stack([np.array(ctx.logits(0, i)) for i in range(len(PROMPT))])
        ctx.reset(0)
        ctx.forward([engine.BatchEntry(0, PROMPT, "hidden_all")])
        y = hidden_rows(ctx, 0, len(PROMPT))
        with pytest.raises(engine.EngineError):
            ctx.logits(0, 0)  # a hidden entry has no logits
    assert y.shape == (len(PROMPT), model.hparams.n_embd)
    np.testing.assert_allclose(y @ head.astype(np.float32).T, logits, rtol=1e-4, atol=1e-4)


def test_hidden_rows_are_batch_chunk_and_thread_invariant(model: engine.Model) -> None:
    with engine.Context(model, 1, 64, 1) as ctx:
        ctx.forward([engine.BatchEntry(0, PROMPT, "hidden_all")])
        want = hidden_rows(ctx, 0, len(PROMPT))
        ctx.reset(0)
        ctx.forward([engine.BatchEntry(0, PROMPT, "hidden_last")])
        assert np.array_equal(np.array(ctx.hidden(0, len(PROMPT) - 1)), want[-1])
        with pytest.raises(engine.EngineError):
            ctx.hidden(0, 0)  # hidden_last keeps only the last row
    with engine.Context(model, 4, 64, 2) as ctx:
        # beside logits and other hidden entries, in two calls of 3 + 7 tokens
        ctx.forward([engine.BatchEntry(1, [9, 9, 9], "last"), engine.BatchEntry(2, [300], "all"),
                     engine.BatchEntry(0, PROMPT[:3], "hidden_all")])
        first = hidden_rows(ctx, 2, 3)
        ctx.forward([engine.BatchEntry(3, [1, 2, 3, 4], "hidden_all"),
                     engine.BatchEntry(0, PROMPT[3:], "hidden_all"),
                     engine.BatchEntry(1, [12], "last")])
        rest = hidden_rows(ctx, 1, len(PROMPT) - 3)
        assert ctx.logits(2, 0) is not None
    assert np.array_equal(np.concatenate([first, rest]), want)


def test_logits_unchanged_beside_hidden_entries(model: engine.Model) -> None:
    with engine.Context(model, 2, 64, 1) as ctx:
        ctx.forward([engine.BatchEntry(0, PROMPT, "all")])
        want = np.stack([np.array(ctx.logits(0, i)) for i in range(len(PROMPT))])
    with engine.Context(model, 2, 64, 2) as ctx:
        ctx.forward([engine.BatchEntry(1, PROMPT[::-1], "hidden_all"),
                     engine.BatchEntry(0, PROMPT, "all")])
        got = np.stack([np.array(ctx.logits(1, i)) for i in range(len(PROMPT))])
    assert np.array_equal(got, want)


def test_pooling() -> None:
    rows = [np.array([3.0, 0.0], np.float32), np.array([0.0, 4.0], np.float32)]
    assert np.allclose(pool(rows, "mean"), [0.6, 0.8])
    assert np.allclose(pool(rows, "cls"), [1.0, 0.0])
    assert np.allclose(pool(rows, "last"), [0.0, 1.0])
    assert np.array_equal(pool([np.zeros(2, np.float32)], "mean"), np.zeros(2, np.float32))


# ---- the endpoint ---------------------------------------------------------------------------


def vectors(body: dict) -> list[np.ndarray]:
    out = []
    for i, d in enumerate(body["data"]):
        assert d["object"] == "embedding" and d["index"] == i
        e = d["embedding"]
        out.append(np.frombuffer(base64.b64decode(e), "<f4") if isinstance(e, str)
                   else np.array(e, np.float32))
    return out


def engine_mean_embedding(path: Path, ids: list[int]) -> np.ndarray:
    """The embedding computed straight from the engine: mean of y, L2-normalised."""
    with engine.Model.load(path) as m, engine.Context(m, 1, 256, 1) as ctx:
        ctx.forward([engine.BatchEntry(0, ids, "hidden_all")])
        rows = hidden_rows(ctx, 0, len(ids)).astype(np.float64)
    v = rows.mean(axis=0)
    return (v / np.linalg.norm(v)).astype(np.float32)


TEXTS = [f"input number {i} " + "words " * (i % 5) for i in range(16)]


async def test_batch_and_thread_invariance_and_usage(server_model_path: Path) -> None:
    results = {}
    for threads in (1, 2):
        config = server_config(server_model_path, model_threads=threads)
        async with running_server(config) as s, httpx.AsyncClient(base_url=s.url,
                                                                    timeout=60) as c:
            alone = await c.post("/v1/embeddings",
                                 json={"input": TEXTS[7], "encoding_format": "base64"})
            batch = await c.post("/v1/embeddings",
                                 json={"input": TEXTS, "encoding_format": "base64"})
            ids = (await c.post("/tokenize", json={"content": TEXTS[7],
                                                   "add_special": True})).json()["tokens"]
            by_ids = await c.post("/v1/embeddings", json={"input": ids})
            metrics = (await c.get("/metrics")).text
        assert alone.status_code == batch.status_code == by_ids.status_code == 200
        a, b = vectors(alone.json()), vectors(batch.json())
        assert len(b) == 16
        assert np.array_equal(a[0], b[7])
        assert np.array_equal(vectors(by_ids.json())[0], a[0])  # floats round-trip exactly
        assert abs(float(np.linalg.norm(a[0].astype(np.float64))) - 1.0) < 1e-5
        assert not np.array_equal(b[0], b[1])
        assert alone.json()["usage"] == {"prompt_tokens": len(ids), "total_tokens": len(ids)}
        assert batch.json()["usage"]["prompt_tokens"] > 16
        assert "bitnetd_requests_running 0.0" in metrics
        results[threads] = a[0]
        if threads == 1:
            want = engine_mean_embedding(server_model_path, ids)
            np.testing.assert_allclose(a[0], want, rtol=0, atol=1e-6)
    assert np.array_equal(results[1], results[2])


async def test_openai_sdk_embeddings(server_model_path: Path) -> None:
    async with running_server(server_config(server_model_path)) as s:
        c = openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=60)
        model_id = s.app.model_id
        floats = await c.embeddings.create(model=model_id, input=["one", "two"],
                                           encoding_format="float")
        b64 = await c.embeddings.create(model=model_id, input=["one", "two"])  # SDK: base64
        assert floats.model == model_id and len(floats.data) == 2
        assert floats.usage.prompt_tokens == floats.usage.total_tokens > 0
        assert np.array_equal(np.array(floats.data[1].embedding, np.float32),
                              np.array(b64.data[1].embedding, np.float32))
        assert len(floats.data[0].embedding) == SERVER_SHAPE.n_embd
        with pytest.raises(openai.BadRequestError):
            await c.embeddings.create(model=model_id, input="x", dimensions=3)
        with pytest.raises(openai.NotFoundError):
            await c.embeddings.create(model="no-such-model", input="x")


HOSTILE = [
    ({}, 400, "input"),
    ({"input": None}, 400, "input"),
    ({"input": ""}, 400, "input"),
    ({"input": []}, 400, "input"),
    ({"input": [[]]}, 400, "input"),
    ({"input": [""]}, 400, "input"),
    ({"input": 5}, 400, "input"),
    ({"input": {"a": 1}}, 400, "input"),
    ({"input": [1.5]}, 400, "input"),
    ({"input": [True]}, 400, "input"),
    ({"input": [-1]}, 400, "input"),
    ({"input": [10**12]}, 400, "input"),
    ({"input": [[1, "a"]]}, 400, "input"),
    ({"input": ["a", 3]}, 400, "input"),
    ({"input": [None]}, 400, "input"),
    ({"input": ["x"] * (MAX_INPUTS + 1)}, 400, "input"),
    ({"input": "word " * 20000}, 400, "input"),
    ({"input": list(range(5)) * 20000}, 400, "input"),
    ({"input": "x", "encoding_format": "hex"}, 400, "encoding_format"),
    ({"input": "x", "encoding_format": 1}, 400, "encoding_format"),
    ({"input": "x", "dimensions": 16}, 400, "dimensions"),
    ({"input": "x", "dimensions": "256"}, 400, "dimensions"),
    ({"input": "x", "model": 7}, 400, "model"),
    ({"input": "x", "model": "gpt-none"}, 404, "model"),
    ({"input": "x", "user": []}, 400, "user"),
]


async def test_hostile_inputs(server_model_path: Path) -> None:
    config = server_config(server_model_path, model_ctx_size=4096)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        for body, status, param in HOSTILE:
            r = await c.post("/v1/embeddings", json=body)
            assert r.status_code == status, (body, r.text)
            assert r.json()["error"]["param"] == param, body
        for raw in (b"[1, 2]", b"\xff\xfe", b"{", b'"text"'):
            r = await c.post("/v1/embeddings", content=raw,
                             headers={"content-type": "application/json"})
            assert r.status_code == 400, raw
        r = await c.get("/v1/embeddings")
        assert r.status_code == 405
        # a list longer than the slots and the queue together is served, not refused
        many = await c.post("/v1/embeddings", json={"input": [[1, 2, 3]] * 100})
        assert many.status_code == 200 and len(many.json()["data"]) == 100
        ok = await c.post("/v1/embeddings", json={"input": "still serving", "dimensions": 256})
        assert ok.status_code == 200


async def test_pooling_from_the_gguf(tmp_path: Path) -> None:
    """`ARCH.pooling_type` 3 (last): the normalised hidden state of the last token."""
    shape = dataclasses.replace(gw.TINY, n_ctx=256)
    path = gw.write_model(tmp_path / "last.gguf", shape, 4,
                          extra_metadata={"bitnet-b1.58.pooling_type": 3})
    ids = [1, 50, 60, 70]
    async with running_server(server_config(path, model_ctx_size=256)) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        r = await c.post("/v1/embeddings", json={"input": ids})
    got = vectors(r.json())[0]
    with engine.Model.load(path) as m, engine.Context(m, 1, 256, 1) as ctx:
        ctx.forward([engine.BatchEntry(0, ids, "hidden_last")])
        y = np.array(ctx.hidden(0, len(ids) - 1), np.float64)
    np.testing.assert_allclose(got, (y / np.linalg.norm(y)).astype(np.float32), atol=1e-6)
    assert not np.allclose(got, engine_mean_embedding(path, ids), atol=1e-3)


# ---- the BitNet embedding model (model-format §10.5) -----------------------------------------


def test_pooling_of_the_embedding_graph(caplog: pytest.LogCaptureFixture) -> None:
    """A decoder follows ARCH.pooling_type (else mean); the BitNet embedding graph is defined
    with last-token pooling: the key's CLS and LAST are honoured, its MEAN (the converter's
    default, model-families B.2.7) is not, with a warning."""
    from bitnetd_trio.engine.embedding import pooling_of_model

    def get(value):  # type: ignore[no-untyped-def]
        return lambda key: value if key == "qwen3.pooling_type" else None

    assert [pooling_of_model(get(v), "qwen3") for v in (None, 1, 2, 3)] == [
        "mean", "mean", "cls", "last"]
    with caplog.at_level("WARNING"):
        assert pooling_of_model(get(None), "qwen3", 3) == "last"
        assert not caplog.records
        assert pooling_of_model(get(3), "qwen3", 3) == "last"
        assert pooling_of_model(get(2), "qwen3", 3) == "cls"
        assert pooling_of_model(get(1), "qwen3", 3) == "last"
        assert "qwen3.pooling_type is 1 (mean)" in caplog.text
        assert pooling_of_model(get(True), "qwen3", 3) == "last"


async def test_serves_the_bitnet_embedding_graph(tmp_path: Path) -> None:
    """POST /v1/embeddings on a tiny Qwen3 embedding file (pooling_type MEAN, as the converter
    writes by default): the text gets EOS appended (tokenizer.ggml.add_eos_token) and the
    vector is the reference's last-token (EOS) final-norm row, L2-normalised."""
    import reference_model as ref

    from bitnetd_trio.engine.tokenizer import Tokenizer

    shape = dataclasses.replace(gw.TINY_QWEN3_EMBED, pooling_type=gw.POOLING_MEAN)
    path = gw.write_model(tmp_path / "embed.gguf", shape, 7)
    texts = ["What is the capital of France?", "Paris 2026: 12 arrondissements"]
    async with running_server(server_config(path, model_ctx_size=256)) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        r = await c.post("/v1/embeddings", json={"input": texts})
        assert r.status_code == 200, r.text
        got = vectors(r.json())
        ids_body = (await c.post("/v1/embeddings", json={"input": [[1, 2, 3]]})).json()
    with engine.Model.load(path) as m:
        assert m.hparams.pooling == 3 and m.hparams.head_dim == 128 and m.hparams.tied_head
        tok = Tokenizer.from_model(m)
    assert tok.pre == "qwen2" and tok.add_eos_default and tok.eos_id == 509
    w = ref.load_reference(path)
    n_tokens = 0
    for text, vec in zip(texts, got):
        ids = tok.encode(text, add_bos=tok.add_bos_default, add_eos=True, parse_special=False)
        assert ids[-1] == 509 and 509 not in ids[:-1] and len(ids) > 3
        n_tokens += len(ids)
        want = ref.pooled_embedding(ref.forward(w, ids, output="hidden"))
        assert vec.shape == (256,) and abs(float(np.linalg.norm(vec)) - 1) < 1e-5
        np.testing.assert_allclose(vec, want, atol=2e-3)
        assert float(vec @ want) > 1 - 1e-5
        # not the mean of the rows, which the file's pooling_type asked for
        mean = ref.pooled_embedding(ref.forward(w, ids, output="hidden"), "mean")
        assert float(vec @ mean) < 0.95
    assert r.json()["usage"]["prompt_tokens"] == n_tokens
    # token-id inputs are used as given (no EOS appended)
    assert ids_body["usage"]["prompt_tokens"] == 3


async def test_generation_on_an_embedding_model_is_a_400(tmp_path: Path) -> None:
    """An embedding model (a graph with its own pooling) does not generate: every generating
    route answers 400 naming the model, in its API's own error shape; /v1/models, /props and
    /model_info say the model's kind; /v1/embeddings still serves."""
    path = gw.write_model(tmp_path / "embed.gguf", gw.TINY_QWEN3_EMBED, 7)
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    requests = [
        ("/v1/chat/completions", {**chat, "stream": True}),
        ("/v1/chat/completions", chat),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 4}),
        ("/completion", {"prompt": "hi", "n_predict": 4}),
        ("/generate", {"prompt": "hi"}),
        ("/v1/responses", {"input": "hi"}),
        ("/v1/messages", {**chat, "model": "embed"}),
    ]
    async with running_server(server_config(path, model_ctx_size=256)) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        for route, body in requests:
            r = await c.post(route, json=body)
            assert r.status_code == 400, (route, r.text)
            if route == "/v1/messages":
                assert r.json()["type"] == "error"
                err = r.json()["error"]
                assert err["type"] == "invalid_request_error"
            else:
                err = r.json()["error"]
                assert err["param"] == "model" and err["code"] == "model_not_supported"
            assert "'embed.gguf' is an embedding model" in err["message"], route
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["meta"]["kind"] == "embedding"
        assert (await c.get("/props")).json()["model_kind"] == "embedding"
        assert (await c.get("/model_info")).json()["kind"] == "embedding"
        r = await c.post("/v1/embeddings", json={"input": "still an embedding model"})
        assert r.status_code == 200 and len(r.json()["data"][0]["embedding"]) == 256


async def test_instruction_prefixes_query_inputs(tmp_path: Path) -> None:
    """`instruction` turns each text input into Qwen3-Embedding's query form
    `Instruct: {task}\\nQuery:{text}` (http-api §1.8): the same vector and token count as the
    prefixed text sent plainly; a bad instruction is a 400 naming it."""
    from bitnetd_trio.api.embeddings import query_text

    assert query_text("Find it", "Paris") == "Instruct: Find it\nQuery:Paris"
    path = gw.write_model(tmp_path / "embed.gguf", gw.TINY_QWEN3_EMBED, 7)
    task = "Given a web search query, retrieve relevant passages that answer the query"
    queries = ["What is the capital of France?", "gravity"]
    async with running_server(server_config(path, model_ctx_size=256)) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=60) as c:
        with_field = await c.post("/v1/embeddings", json={"input": queries, "instruction": task})
        assert with_field.status_code == 200, with_field.text
        by_hand = await c.post("/v1/embeddings", json={
            "input": [f"Instruct: {task}\nQuery:{q}" for q in queries]})
        plain = await c.post("/v1/embeddings", json={"input": queries})
        assert np.array_equal(vectors(with_field.json()), vectors(by_hand.json()))
        assert with_field.json()["usage"] == by_hand.json()["usage"]
        assert not np.allclose(vectors(with_field.json()), vectors(plain.json()), atol=1e-3)
        for bad in (3, "", " ", "x" * 5000):
            r = await c.post("/v1/embeddings", json={"input": "q", "instruction": bad})
            assert r.status_code == 400 and r.json()["error"]["param"] == "instruction", bad
        r = await c.post("/v1/embeddings", json={"input": [1, 2, 3], "instruction": task})
        assert r.status_code == 400 and "token-id inputs" in r.json()["error"]["message"]
