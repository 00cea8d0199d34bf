"""llama.cpp `/completion` extras against the real server (http-api §3.2): `return_tokens` and
the `tokens` of stream events, `timings_per_token`, `post_sampling_probs`, `return_progress`
and the type checks of the extras."""

from __future__ import annotations

import json
import math

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
        # accepted values: true / false
        r = await h.post("/completion", json={**BODY, "n_predict": 1, field: True})
        assert r.status_code == 200


# ---- post_sampling_probs ----------------------------------------------------------------------


async def _probabilities(h: httpx.AsyncClient, body: dict) -> list[dict]:
    r = await h.post("/completion", json=body)
    assert r.status_code == 200, r.text
    return r.json()["completion_probabilities"]


# The chain sees the engine's logits as they are: no penalties, and no ban of the end tokens
# (ignore_eos) that the pre-sampling logprobs would not show.
AS_IS = {"repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0,
         "ignore_eos": False}


@pytest.mark.parametrize("temperature", [0.7, 1.6])
async def test_post_sampling_probs_match_the_engines_logits_with_top_k(
    server: RunningServer, temperature: float
) -> None:
    """With top_k = n_probs = K and nothing else in the chain, the distribution drawn from is
    softmax(logit / T) over the K best: recomputed here from the same request's pre-sampling
    logprobs (log-softmax of the engine's logits, so the same up to a shift)."""
    k = 5
    body = {**BODY, **AS_IS, "temperature": temperature, "top_k": k, "top_p": 1.0,
            "min_p": 0.0, "n_probs": k}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        post = await _probabilities(h, {**body, "post_sampling_probs": True})
        pre = await _probabilities(h, body)
    assert [e["id"] for e in post] == [e["id"] for e in pre]  # the same draws
    assert post
    for p, q in zip(post, pre):
        assert set(p) == {"id", "token", "bytes", "prob", "top_probs"}
        assert p["token"] == q["token"] and p["bytes"] == q["bytes"]
        w = {e["id"]: math.exp(e["logprob"] / temperature) for e in q["top_logprobs"]}
        z = sum(w.values())
        expected = {i: v / z for i, v in w.items()}
        got = {e["id"]: e["prob"] for e in p["top_probs"]}
        assert got.keys() == expected.keys()
        for i in got:
            assert got[i] == pytest.approx(expected[i], rel=1e-4, abs=1e-6)
        assert p["prob"] == pytest.approx(expected[p["id"]], rel=1e-4, abs=1e-6)
        probs = [e["prob"] for e in p["top_probs"]]
        assert probs == sorted(probs, reverse=True)
        assert sum(probs) <= 1.0 + 1e-5
        for e in p["top_probs"]:
            assert set(e) == {"id", "token", "bytes", "prob"}


async def test_post_sampling_probs_greedy_is_one(server: RunningServer) -> None:
    body = {**BODY, **AS_IS, "temperature": 0.0, "n_probs": 4}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        post = await _probabilities(h, {**body, "post_sampling_probs": True})
        pre = await _probabilities(h, body)
    assert post
    for p, q in zip(post, pre, strict=True):
        assert p["id"] == q["id"] == q["top_logprobs"][0]["id"]  # the argmax
        assert p["prob"] == 1.0
        assert [(e["id"], e["prob"]) for e in p["top_probs"]] == [(p["id"], 1.0)]


async def test_post_sampling_probs_default_chain_and_stream(server: RunningServer) -> None:
    body = {**BODY, "n_probs": 10, "post_sampling_probs": True}  # top-k, top-p, min-p on
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        whole = await _probabilities(h, body)
        events = await _events(h, body)
    streamed = [e for ev in events for e in ev.get("completion_probabilities", [])]
    assert streamed == whole  # the same seed: the same draws and distributions
    assert len(whole) == 8
    for p in whole:
        assert 0.0 < p["prob"] <= 1.0
        top = {e["id"]: e["prob"] for e in p["top_probs"]}
        assert all(v > 0.0 for v in top.values())
        assert sum(top.values()) <= 1.0 + 1e-5
        if len(top) < 10:  # fewer survivors than asked: they are the whole distribution
            assert sum(top.values()) == pytest.approx(1.0, rel=1e-5)
        if p["id"] in top:
            assert top[p["id"]] == p["prob"]
        else:
            assert p["prob"] <= min(top.values())


# ---- return_progress ----------------------------------------------------------------------------

LONG_PROMPT = [(i * 37 + 5) % 500 for i in range(300)]  # more than one prefill chunk


async def test_return_progress_events_come_before_the_first_token(
    server: RunningServer,
) -> None:
    body = {"prompt": LONG_PROMPT, "n_predict": 3, "ignore_eos": True, "cache_prompt": False,
            "temperature": 0.0}
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        plain = await _events(h, body)
        assert all("prompt_progress" not in e for e in plain)  # only when asked
        events = await _events(h, {**body, "return_progress": True})
        # not in a whole response (llama.cpp sends them in streams only)
        r = await h.post("/completion", json={**body, "return_progress": True})
        assert "prompt_progress" not in r.json()
    first_token = next(i for i, e in enumerate(events) if e["tokens"])
    progress = [e for e in events if "prompt_progress" in e]
    assert progress and all(
        i < first_token for i, e in enumerate(events) if "prompt_progress" in e
    )
    assert len(progress) >= 2  # one per prefill chunk
    seen = [e["prompt_progress"] for e in progress]
    for p in seen:
        assert set(p) == {"total", "cache", "processed", "time_ms"}
        assert p["total"] == len(LONG_PROMPT) and p["cache"] == 0
    processed = [p["processed"] for p in seen]
    assert processed == sorted(set(processed)) and processed[-1] == len(LONG_PROMPT)
    times = [p["time_ms"] for p in seen]
    assert times == sorted(times)
    for e in progress:
        assert e["content"] == "" and e["stop"] is False and e["tokens"] == []
    # the generation is the one without progress events
    assert [t for e in events for t in e["tokens"]] == [t for e in plain for t in e["tokens"]]
