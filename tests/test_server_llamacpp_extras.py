"""llama.cpp `/completion` extras against the real server (http-api §3.2): `return_tokens` and
the `tokens` of stream events, `timings_per_token`, and the type checks of the extras that
are accepted but not implemented (`post_sampling_probs`, `return_progress`)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import RunningServer

BODY = {"prompt": "Building a website can be done in", "n_predict": 8, "seed": 5,
        "temperature": 1.0, "ignore_eos": True, "cache_prompt": False}


async def _events(h: httpx.AsyncClient, body: dict) -> list[dict]:
    events = []
    async with h.stream("POST", "/completion", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: "):
                events.append(json.loads(line[6:]))
    return events


async def _text_of(h: httpx.AsyncClient, ids: list[int]) -> str:
    r = await h.post("/detokenize", json={"tokens": ids})
    return r.json()["content"]


async def test_return_tokens_whole_and_streamed(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        plain = (await h.post("/completion", json=BODY)).json()
        assert plain["tokens"] == []
        whole = (await h.post("/completion", json={**BODY, "return_tokens": True})).json()
        ids = whole["tokens"]
        assert len(ids) == whole["tokens_predicted"] == 8
        assert all(isinstance(t, int) for t in ids)
        assert whole["content"] == plain["content"] == await _text_of(h, ids)

        # a stream carries every token's id, in its events, as llama.cpp's does
        events = await _events(h, BODY)
        assert events[-1]["stop"] is True
        for e in events[:-1]:
            assert e["stop"] is False and isinstance(e["tokens"], list)
        streamed = [t for e in events for t in e["tokens"]]
        assert streamed == ids
        assert "".join(e["content"] for e in events) == whole["content"]


async def test_timings_per_token(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        events = await _events(h, BODY)
        assert all("timings" not in e for e in events[:-1])  # only when asked
        events = await _events(h, {**BODY, "timings_per_token": True})
        seen = []
        for e in events:
            t = e["timings"]
            assert {"prompt_n", "prompt_ms", "predicted_n", "predicted_ms", "cache_n",
                    "predicted_per_second", "prompt_per_second"} <= set(t)
            assert t["prompt_n"] + t["cache_n"] == e["tokens_evaluated"]
            seen.append(t["predicted_n"])
        assert seen == sorted(seen) and seen[-1] == 8
        assert events[-1]["timings"]["predicted_ms"] >= events[0]["timings"]["predicted_ms"]


@pytest.mark.parametrize(
    "field", ["return_tokens", "timings_per_token", "post_sampling_probs", "return_progress"]
)
async def test_extras_of_the_wrong_type_are_400(server: RunningServer, field: str) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        for bad in ("yes", 1, [], {"a": 1}):
            r = await h.post("/completion", json={**BODY, field: bad})
            assert r.status_code == 400, (field, bad, r.text)
            assert r.json()["error"]["param"] == field
        # accepted values: true / false (the last two are checked, not implemented)
        r = await h.post("/completion", json={**BODY, "n_predict": 1, field: True})
        assert r.status_code == 200
