"""The official `openai` SDK (AsyncOpenAI) against a live server, and prompt scoring
(echo + logprobs, lm-evaluation-harness style) checked against the engine directly."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest
from conftest import RunningServer

from bitnetd_trio.engine import native as engine
from bitnetd_trio.engine.sampling import logprobs as engine_logprobs


def client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60
    )


def mid(server: RunningServer) -> str:
    return server.app.model_id  # type: ignore[attr-defined]


MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say something."},
]


async def test_sdk_chat_whole_stream_usage_and_models(server: RunningServer) -> None:
    c = client(server)
    models = await c.models.list()
    assert [m.id for m in models.data] == [mid(server)]

    whole = await c.chat.completions.create(
        model=mid(server),
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert whole.choices[0].finish_reason == "length"
    assert whole.usage is not None and whole.usage.completion_tokens == 10

    stream = await c.chat.completions.create(
        model=mid(server),
        messages=MESSAGES,
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"ignore_eos": True},
    )
    text, usage, finish = "", None, None
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for ch in chunk.choices:
            text += ch.delta.content or ""
            finish = ch.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 10
    assert usage.prompt_tokens == whole.usage.prompt_tokens


async def test_sdk_seed_reproducibility_and_n(server: RunningServer) -> None:
    c = client(server)

    async def run(seed: int) -> str:
        r = await c.chat.completions.create(
            model=mid(server),
            messages=MESSAGES,
            max_tokens=16,
            temperature=1.0,
            seed=seed,
            extra_body={"ignore_eos": True},
        )
        return r.choices[0].message.content or ""

    a, b, other = await run(42), await run(42), await run(43)
    assert a == b
    assert a != other
    r = await c.chat.completions.create(
        model=mid(server),
        messages=MESSAGES,
        max_tokens=8,
        temperature=1.0,
        seed=7,
        n=2,
        extra_body={"ignore_eos": True},
    )
    assert [ch.index for ch in r.choices] == [0, 1]
    assert r.choices[0].message.content != r.choices[1].message.content
    assert r.usage is not None and r.usage.completion_tokens == 16


async def test_sdk_stop_and_logprobs(server: RunningServer) -> None:
    c = client(server)
    r = await c.chat.completions.create(
        model=mid(server),
        messages=MESSAGES,
        max_tokens=12,
        temperature=0,
        logprobs=True,
        top_logprobs=3,
        extra_body={"ignore_eos": True},
    )
    content = r.choices[0].logprobs.content
    assert len(content) == 12
    text = r.choices[0].message.content or ""
    assert b"".join(bytes(e.bytes) for e in content).decode("utf-8", "replace") == text
    for e in content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 3
        # greedy: the chosen token is the most likely one that ignore_eos did not ban
        allowed = [t for t in e.top_logprobs if not t.token.startswith("<|")]
        assert allowed[0].token == e.token and allowed[0].logprob == e.logprob
    # stop on a piece of that text
    stop = text[3:6]
    if stop and text.find(stop) == 3:
        r2 = await c.chat.completions.create(
            model=mid(server),
            messages=MESSAGES,
            max_tokens=12,
            temperature=0,
            stop=[stop],
            extra_body={"ignore_eos": True},
        )
        assert r2.choices[0].message.content == text[:3]
        assert r2.choices[0].finish_reason == "stop"


async def test_sdk_completions(server: RunningServer) -> None:
    c = client(server)
    r = await c.completions.create(
        model=mid(server),
        prompt="The cat",
        max_tokens=6,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    stream = await c.completions.create(
        model=mid(server),
        prompt="The cat",
        max_tokens=6,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    text = ""
    async for chunk in stream:
        text += "".join(ch.text for ch in chunk.choices)
    assert text == r.choices[0].text


async def test_sdk_errors_raise_matching_exceptions(server: RunningServer) -> None:
    c = client(server)
    with pytest.raises(openai.NotFoundError) as nf:
        await c.chat.completions.create(model="/no/such/model.gguf", messages=MESSAGES)
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as bad:
        await c.chat.completions.create(model=mid(server), messages=MESSAGES, temperature=5)
    assert bad.value.body["param"] == "temperature"  # type: ignore[index]
    with pytest.raises(openai.BadRequestError):
        await c.chat.completions.create(
            model=mid(server),
            messages=MESSAGES,
            tools=[{"type": "function", "function": {"name": "f g"}}],
        )


# The long prompt is scored over several prefill chunks (EngineSettings.prefill_chunk = 128).
@pytest.mark.parametrize(
    "prompt",
    [[5, 77, 300, 42, 9, 260, 101, 33, 400, 12, 7, 8], [(i * 37 + 5) % 500 for i in range(300)]],
    ids=["short", "chunked"],
)
async def test_prompt_scoring_matches_the_engine(
    server: RunningServer, server_model_path: Path, prompt: list[int]
) -> None:
    scoring = {"model": mid(server), "prompt": prompt, "max_tokens": 0, "echo": True,
               "logprobs": 3, "temperature": 0}
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post("/v1/completions", json=scoring)
    assert r.status_code == 200, r.text
    (choice,) = r.json()["choices"]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == len(prompt) and lp["token_logprobs"][0] is None
    assert r.json()["usage"]["completion_tokens"] == 0

    # streamed: the same values, in the stream's logprobs
    async with httpx.AsyncClient(base_url=server.url) as c:
        r = await c.post(
            "/v1/completions",
            json={**scoring, "stream": True},
        )
    streamed: list = []
    for line in r.text.split("\n"):
        if line.startswith("data: {"):
            ch = json.loads(line[6:])["choices"][0]
            if ch["logprobs"]:
                streamed += ch["logprobs"]["token_logprobs"]
    assert streamed == lp["token_logprobs"]

    model = engine.Model.load(server_model_path)
    ctx = engine.Context(model, 1, len(prompt), 1)
    try:
        ctx.forward([engine.BatchEntry(0, prompt, "all", None)])
        for t in range(len(prompt) - 1):
            want, top = engine_logprobs(ctx.logits(0, t), prompt[t + 1], 3)
            assert lp["token_logprobs"][t + 1] == want  # exactly the engine's value
            assert sorted(lp["top_logprobs"][t + 1].values(), reverse=True) == [v for _, v in top]
    finally:
        ctx.close()
        model.close()
