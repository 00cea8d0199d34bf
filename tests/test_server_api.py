"""The HTTP API against a live server (hypercorn on 127.0.0.1:0, the real engine, a tiny model):
every endpoint's shape, streaming rules, errors."""

from __future__ import annotations

import json

import httpx
import pytest
from conftest import RunningServer, running_server, server_config

from bitnetd_trio.api.asgi import DEMO_MODEL_ID


def sse_events(body: str) -> list[str]:
    """The `data:` payloads of an SSE body, in order (comments skipped)."""
    assert body.endswith("\n\n"), "an SSE body ends with a blank line"
    events = []
    for block in body.split("\n\n")[:-1]:
        lines = [ln for ln in block.split("\n") if not ln.startswith(":")]
        if not lines:
            continue
        assert len(lines) == 1 and lines[0].startswith("data: "), block
        events.append(lines[0][len("data: ") :])
    return events


def model_id(server: RunningServer) -> str:
    return server.app.model_id  # type: ignore[attr-defined]


async def test_health_models_and_model_by_id(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.get("/health")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        r = await c.head("/health")  # load balancers' probes
        assert r.status_code == 200 and r.content == b""
        r = await c.get("/v1/models")
        assert r.status_code == 200
        body = r.json()
        assert body["object"] == "list"
        card = body["data"][0]
        assert card["id"] == model_id(server) == "server.gguf"
        assert card["object"] == "model" and card["owned_by"] and card["created"] > 0
        assert card["meta"]["n_ctx_train"] == 16384 and card["meta"]["demo"] is False
        assert card["meta"]["n_params"] > 0 and card["meta"]["size"] > 0
        assert card["meta"]["kind"] == "generation"
        r = await c.get(f"/v1/models/{card['id']}")
        assert r.status_code == 200 and r.json()["id"] == card["id"]
        r = await c.get("/v1/models/nope")
        assert r.status_code == 404
        assert r.json()["error"]["code"] == "model_not_found"


async def test_chat_completion_whole(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": model_id(server),
                "messages": [{"role": "user", "content": "Hello"}],
                "max_tokens": 8,
                "temperature": 0,
                "some_future_field": {"x": 1},
            },
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"].startswith("chatcmpl-") and body["object"] == "chat.completion"
    assert body["model"] == model_id(server) and isinstance(body["created"], int)
    (choice,) = body["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    assert isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    u = body["usage"]
    assert u["prompt_tokens"] > 3 and 1 <= u["completion_tokens"] <= 8
    assert u["total_tokens"] == u["prompt_tokens"] + u["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert u["completion_tokens"] == 8


async def test_chat_stream_shape(server: RunningServer) -> None:
    req = {
        "model": model_id(server),
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": 12,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/v1/chat/completions", json=req)
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len({ch["id"] for ch in chunks}) == 1
    assert len({ch["created"] for ch in chunks}) == 1
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    usage_chunk, finish_chunk = chunks[-1], chunks[-2]
    assert usage_chunk["choices"] == [] and usage_chunk["usage"]["completion_tokens"] == 12
    assert finish_chunk["choices"][0]["delta"] == {}
    assert finish_chunk["choices"][0]["finish_reason"] == "length"
    for ch in chunks[:-1]:
        assert "usage" in ch and ch["usage"] is None
    for ch in chunks[1:-2]:
        assert set(ch["choices"][0]["delta"]) == {"content"}
        assert ch["choices"][0]["finish_reason"] is None
    # the stream says the same as the whole response with the same settings
    async with httpx.AsyncClient(base_url=server.url) as c:
        whole = (
            await c.post(
                "/v1/chat/completions", json={**req, "stream": False, "stream_options": None}
            )
        ).json()
    text = "".join(ch["choices"][0]["delta"].get("content", "") for ch in chunks[:-1])
    assert text == whole["choices"][0]["message"]["content"]


async def test_completions_whole_and_stream(server: RunningServer) -> None:
    req = {
        "model": model_id(server),
        "prompt": "Once upon a time",
        "max_tokens": 10,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(base_url=server.url) as c:
        whole = await c.post("/v1/completions", json=req)
        stream = await c.post("/v1/completions", json={**req, "stream": True})
    assert whole.status_code == 200
    body = whole.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    (choice,) = body["choices"]
    assert choice["finish_reason"] == "length" and body["usage"]["completion_tokens"] == 10
    events = sse_events(stream.text)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(ch["object"] == "text_completion" for ch in chunks)
    assert "".join(ch["choices"][0]["text"] for ch in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(ch["choices"][0]["finish_reason"] is None for ch in chunks[:-1])


async def test_completions_echo_and_default_max_tokens(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post(
            "/v1/completions",
            json={
                "model": model_id(server),
                "prompt": "Echo me",
                "echo": True,
                "temperature": 0,
                "ignore_eos": True,
            },
        )
    body = r.json()
    assert body["choices"][0]["text"].startswith("Echo me")
    assert body["usage"]["completion_tokens"] == 16  # OpenAI's default for /v1/completions


async def test_completions_several_prompts_and_n(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post(
            "/v1/completions",
            json={
                "model": model_id(server),
                "prompt": ["a", "b"],
                "n": 2,
                "max_tokens": 3,
                "ignore_eos": True,
                "seed": 5,
            },
        )
    body = r.json()
    assert [ch["index"] for ch in body["choices"]] == [0, 1, 2, 3]
    assert body["usage"]["completion_tokens"] == 12


async def test_stop_string_over_several_tokens_is_withheld(server: RunningServer) -> None:
    base = {
        "model": model_id(server),
        "prompt": "The",
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    async with httpx.AsyncClient(base_url=server.url) as c:
        free = (await c.post("/v1/completions", json=base)).json()["choices"][0]
        text = free["text"]
        tokens = free["logprobs"]["tokens"]
        offsets = free["logprobs"]["text_offset"]
        # a stop string spanning >= 3 tokens, starting after the 4th token
        start = offsets[4]
        end = offsets[7]
        stop = text[start:end]
        assert len(stop) >= 3 and text.find(stop) == start, (text, tokens)
        whole = (await c.post("/v1/completions", json={**base, "stop": [stop]})).json()
        r = await c.post("/v1/completions", json={**base, "stop": stop, "stream": True})
    assert whole["choices"][0]["text"] == text[:start]
    assert whole["choices"][0]["finish_reason"] == "stop"
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    pieces = [ch["choices"][0]["text"] for ch in chunks]
    assert "".join(pieces) == text[:start]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"


async def test_multibyte_text_never_split(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        ids = (await c.post("/tokenize", json={"content": "é✓"})).json()["tokens"]
        assert len(ids) >= 3  # byte tokens: the characters need several tokens each
        bias = {str(i): 30 for i in ids}
        req = {
            "model": model_id(server),
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 60,
            "seed": 3,
            "temperature": 1.0,
            "ignore_eos": True,
            "logit_bias": bias,
            "logprobs": True,
            "stream": True,
        }
        r = await c.post("/v1/chat/completions", json=req)
    chunks = [json.loads(e) for e in sse_events(r.text)[:-1]]
    texts, raw = [], b""
    for ch in chunks:
        delta = ch["choices"][0]["delta"]
        if delta.get("content"):
            texts.append(delta["content"])
        for entry in (ch["choices"][0]["logprobs"] or {}).get("content", []):
            raw += bytes(entry["bytes"])
    streamed = "".join(texts)
    whole = raw.decode("utf-8", errors="replace")
    assert "é" in whole or "✓" in whole  # the test did produce multi-byte characters
    # Splitting a character across chunks would have turned it into U+FFFD in the stream.
    assert streamed == whole


async def test_prompt_prefix_reused_from_the_slot_cache(server: RunningServer) -> None:
    req = {
        "model": model_id(server),
        "max_tokens": 8,
        "temperature": 0,
        "ignore_eos": True,
        "messages": [{"role": "user", "content": "A long shared prefix " * 20}],
    }
    async with httpx.AsyncClient(base_url=server.url) as c:
        first = (await c.post("/v1/chat/completions", json=req)).json()
        second = (await c.post("/v1/chat/completions", json=req)).json()
        fresh = (await c.post("/v1/chat/completions", json={**req, "cache_prompt": False})).json()
    p1, p2 = first["usage"]["prompt_tokens_details"], second["usage"]["prompt_tokens_details"]
    assert p1["cached_tokens"] == 0
    assert p2["cached_tokens"] == second["usage"]["prompt_tokens"] - 1
    assert fresh["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    text = first["choices"][0]["message"]["content"]
    assert second["choices"][0]["message"]["content"] == text
    assert fresh["choices"][0]["message"]["content"] == text


async def test_tokenize_detokenize_apply_template(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/tokenize", json={"content": "hello world", "add_special": True})
        ids = r.json()["tokens"]
        assert all(isinstance(i, int) for i in ids) and len(ids) >= 2
        r = await c.post("/detokenize", json={"tokens": ids[1:]})
        assert r.json() == {"content": "hello world", "prompt": "hello world"}
        r = await c.post("/tokenize", json={"content": "hi", "with_pieces": True})
        pieces = r.json()["tokens"]
        assert "".join(p["piece"] for p in pieces) == "hi"
        r = await c.post(
            "/apply-template",
            json={
                "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
            },
        )
        prompt = r.json()["prompt"]
        assert "System: S" in prompt and "User: U" in prompt and prompt.endswith("Assistant: ")
        r = await c.post("/detokenize", json={"tokens": [10**9]})
        assert r.status_code == 400 and r.json()["error"]["param"].startswith("tokens")


async def test_props_slots_model_info_metrics(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        props = (await c.get("/props")).json()
        assert props["total_slots"] == 4
        assert props["default_generation_settings"]["n_ctx"] == 16384
        slots = (await c.get("/slots")).json()
        assert [s["id"] for s in slots] == [0, 1, 2, 3]
        assert all(s["state"] == "idle" and s["n_ctx"] == 16384 for s in slots)
        info = (await c.get("/model_info")).json()
        assert info["instances"] == 4 and info["context_size"] == 16384
        await c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "ignore_eos": True})
        r = await c.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    text = r.text
    for name in (
        "bitnetd_requests_total",
        "bitnetd_tokens_generated_total",
        "bitnetd_model_loaded 1.0",
        "bitnetd_time_to_first_token_seconds_bucket",
        "bitnetd_tokens_after_disconnect_total",
        "bitnetd_prompt_tokens_total",
    ):
        assert name in text, name
    assert 'bitnetd_requests_total{endpoint="/v1/completions",status="200"} 1.0' in text


async def test_llama_completion_and_generate(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post(
            "/completion",
            json={"prompt": "Hi", "n_predict": 5, "ignore_eos": True, "temperature": 0},
        )
        body = r.json()
        assert body["stop"] is True and body["tokens_predicted"] == 5
        assert body["tokens_evaluated"] >= 2 and body["stop_type"] == "limit"
        assert body["timings"]["predicted_n"] == 5
        r = await c.post(
            "/completion",
            json={
                "prompt": "Hi",
                "n_predict": 5,
                "stream": True,
                "ignore_eos": True,
                "temperature": 0,
            },
        )
        events = [json.loads(e) for e in sse_events(r.text)]
        assert events[-1]["stop"] is True and all(e["stop"] is False for e in events[:-1])
        assert "".join(e["content"] for e in events) == body["content"]
        r = await c.post(
            "/completion",
            json={
                "prompt": "Hi",
                "n_predict": 3,
                "n_probs": 2,
                "ignore_eos": True,
                "temperature": 0,
            },
        )
        probs = r.json()["completion_probabilities"]
        assert len(probs) == 3 and all(len(p["top_logprobs"]) == 2 for p in probs)
        assert all(p["logprob"] <= 0 for p in probs)
        r = await c.post("/generate", json={"prompt": "Hi", "max_tokens": 4, "ignore_eos": True})
        body = r.json()
        assert set(body) == {"generated_text", "tokens_generated", "tokens_processed"}
        assert body["tokens_generated"] == 4 and body["tokens_processed"] > 4


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "param"),
    [
        ("GET", "/nope", None, 404, None),
        ("GET", "/v1/chat/completions", None, 405, None),
        ("POST", "/v1/models", None, 405, None),
        ("POST", "/v1/chat/completions", b"{not json", 400, None),
        ("POST", "/v1/chat/completions", b'{"messages": []}', 400, "messages"),
        (
            "POST",
            "/v1/chat/completions",
            b'{"messages": [{"role":"user","content":"x"}], "temperature": "hot"}',
            400,
            "temperature",
        ),
        (
            "POST",
            "/v1/chat/completions",
            b'{"model": "/models/gpt-4.gguf", "messages": [{"role":"user","content":"x"}]}',
            404,
            "model",
        ),
        ("POST", "/v1/completions", b'{"prompt": [99999999]}', 400, "prompt"),
        ("POST", "/v1/completions", b'{"prompt": "x", "max_tokens": -1}', 400, "max_tokens"),
        ("POST", "/v1/completions", b'{"prompt": "x", "suffix": "y"}', 400, "suffix"),
    ],
)
async def test_client_errors(
    server: RunningServer,
    method: str,
    path: str,
    body: bytes | None,
    status: int,
    param: str | None,
) -> None:
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.request(
            method, path, content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == status, r.text
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]
        if param is not None:
            assert err["param"] == param
        if status == 405:
            assert "allow" in r.headers
        # and the server keeps serving
        assert (await c.get("/health")).status_code == 200


async def test_prompt_longer_than_context(server_model_path) -> None:
    config = server_config(server_model_path, model_ctx_size=64)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.post("/v1/completions", json={"prompt": list(range(100)), "max_tokens": 1})
    assert r.status_code == 400
    assert r.json()["error"]["code"] == "context_length_exceeded"


async def test_body_too_large(server_model_path) -> None:
    config = server_config(server_model_path, server_max_body_size=1000)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        r = await c.post("/v1/completions", json={"prompt": "x" * 5000})
        assert r.status_code == 413

        # chunked upload without Content-Length: counted while reading
        async def chunks():
            for _ in range(10):
                yield b"x" * 500

        r = await c.post("/v1/completions", content=chunks())
        assert r.status_code == 413
        assert (await c.get("/health")).status_code == 200


async def test_demo_model_when_no_path(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    async with running_server(server_config(None)) as s, httpx.AsyncClient(base_url=s.url) as c:
        card = (await c.get("/v1/models")).json()["data"][0]
        assert card["id"] == DEMO_MODEL_ID and card["meta"]["demo"] is True
        r = await c.post(
            "/v1/chat/completions",
            json={
                "model": DEMO_MODEL_ID,
                "messages": [{"role": "user", "content": "hi"}],
                "max_tokens": 3,
            },
        )
        assert r.status_code == 200


async def test_model_load_failure_fails_startup(tmp_path) -> None:
    from hypercorn.utils import LifespanFailureError

    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 10)
    with pytest.raises(BaseExceptionGroup) as info:
        async with running_server(server_config(bad)):
            pass
    failures = leaves(info.value)
    assert len(failures) == 1 and isinstance(failures[0], LifespanFailureError)
    # the engine's reason reaches hypercorn (and so the daemon's exit message)
    assert "bad.gguf" in str(failures[0]) and "GGUF header" in str(failures[0])


def leaves(group: BaseException) -> list[BaseException]:
    if isinstance(group, BaseExceptionGroup):
        return [leaf for e in group.exceptions for leaf in leaves(e)]
    return [group]


async def test_api_keys_and_rate_limit(server_model_path) -> None:
    config = server_config(
        server_model_path, server_api_keys=["sekrit-key-123"], security_rate_limit=0.01
    )
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url) as c:
        assert (await c.get("/health")).status_code == 200  # no key needed, not rate limited
        r = await c.get("/v1/models")
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = await c.get("/v1/models", headers={"authorization": "Bearer wrong"})
        assert r.status_code == 401
        r = await c.get("/v1/models", headers={"authorization": "Bearer sekrit-key-123"})
        assert r.status_code == 200
        # the bucket (burst 1, refilled at 0.01/s) is now empty
        r = await c.get("/v1/models", headers={"authorization": "Bearer sekrit-key-123"})
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error"
