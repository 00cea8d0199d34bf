"""Thinking kept apart from the answer (http-api §1.1, engine/reasoning.py): the incremental
splitter against the whole-text split, and a server whose Jinja chat template marks thinking
with `<think>`: reasoning_content whole and streamed, chat_template_kwargs reaching the
template, and a template without `<think>` left alone."""

from __future__ import annotations

import dataclasses
import json
import random
from pathlib import Path

import httpx
import pytest
from conftest import running_server, server_config

from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.engine.reasoning import (
    ThinkSplitter,
    split_reasoning,
    template_thinks,
    think_mode,
)

TEXTS = [
    ("<think>abc</think>xyz", False, ("abc", "xyz")),
    ("<think>\nlet me see\n\n</think>\n\nThe answer.", False, ("let me see", "The answer.")),
    ("  <think> a </ b </think> c </think>", False, ("a </ b", "c </think>")),
    ("plain <think>x</think> text", False, (None, "plain <think>x</think> text")),
    ("<thin", False, (None, "<thin")),
    ("<think>never closed \n", False, ("never closed", "")),
    ("", False, (None, "")),
    ("\n  steps\n</think>\n\nanswer", True, ("steps", "answer")),
    ("no close at all", True, ("no close at all", "")),
]


@pytest.mark.parametrize(("text", "opened", "expected"), TEXTS)
def test_split_of_whole_texts(text: str, opened: bool, expected: tuple) -> None:
    assert split_reasoning(text, opened) == expected


@pytest.mark.parametrize(("text", "opened", "expected"), TEXTS)
def test_any_chunking_gives_the_whole_text_split(text: str, opened: bool,
                                                 expected: tuple) -> None:
    rng = random.Random(text)
    for _ in range(200):
        cuts = sorted(rng.sample(range(len(text) + 1), rng.randint(0, len(text) + 1)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        s = ThinkSplitter(opened)
        events = [e for p in pieces for e in s.feed(p)] + s.finish()
        assert all(t for _, t in events)
        reasoning = "".join(t for k, t in events if k == "reasoning")
        content = "".join(t for k, t in events if k == "content")
        assert ((reasoning if s.saw_block else None), content) == expected


def test_detection() -> None:
    assert template_thinks("{{ '<think>' }}") and not template_thinks("{{ x }}")
    assert not template_thinks(None)
    assert think_mode("Assistant: <think>\n") == "open"
    assert think_mode("Assistant: <think>\n\n</think>\n\n") == "off"
    assert think_mode("Assistant: ") == "closed"


THINK_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: "
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n"
    "{% endif %}{% endif %}"
)
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: {% endif %}"
)
FORCED = {"grammar": 'root ::= "<think>abc</think>xyz"', "max_tokens": 64, "temperature": 0}
MESSAGES = [{"role": "user", "content": "Hi"}]


def _model(tmp_path: Path, template: str) -> Path:
    shape = dataclasses.replace(gw.TINY, n_ctx=1024)
    return gw.write_model(tmp_path / "think.gguf", shape, 5, chat_template=template)


async def _stream(c: httpx.AsyncClient, body: dict) -> list[dict]:
    deltas = []
    async with c.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                deltas += [ch["delta"] for ch in json.loads(line[6:])["choices"]]
    return deltas


async def test_thinking_template_splits_reasoning(tmp_path: Path) -> None:
    config = server_config(_model(tmp_path, THINK_TEMPLATE), model_ctx_size=1024)
    async with running_server(config) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={"messages": MESSAGES, **FORCED})
            assert r.status_code == 200, r.text
            msg = r.json()["choices"][0]["message"]
            assert msg["reasoning_content"] == "abc" and msg["content"] == "xyz"
            usage = r.json()["usage"]
            assert 0 < usage["completion_tokens_details"]["reasoning_tokens"] \
                < usage["completion_tokens"]

            deltas = await _stream(c, {"messages": MESSAGES, **FORCED})
            assert "".join(d.get("reasoning_content", "") for d in deltas) == "abc"
            assert "".join(d.get("content") or "" for d in deltas) == "xyz"
            assert not any("<think>" in (d.get("content") or "") for d in deltas)

            # chat_template_kwargs and reasoning_effort "none" reach the template
            for extra in ({"chat_template_kwargs": {"enable_thinking": False}},
                          {"reasoning_effort": "none"}):
                r = await c.post("/apply-template", json={"messages": MESSAGES, **extra})
                assert r.status_code == 200, r.text
                assert r.json()["prompt"].endswith("assistant: <think>\n\n</think>\n\n")
                r = await c.post("/v1/chat/completions", json={
                    "messages": MESSAGES, "max_tokens": 1, **extra})
                assert r.status_code == 200, r.text
            r = await c.post("/apply-template", json={"messages": MESSAGES})
            assert r.json()["prompt"].endswith("assistant: ")
            r = await c.post("/apply-template", json={
                "messages": MESSAGES, "chat_template_kwargs": {"enable_thinking": True}})
            assert r.json()["prompt"].endswith("assistant: ")
            for bad, param in (({"chat_template_kwargs": [1]}, "chat_template_kwargs"),
                               ({"chat_template_kwargs": {"messages": []}},
                                "chat_template_kwargs.messages"),
                               ({"reasoning_effort": "max"}, "reasoning_effort")):
                r = await c.post("/v1/chat/completions", json={"messages": MESSAGES, **bad})
                assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


async def test_template_without_think_is_unaffected(tmp_path: Path) -> None:
    config = server_config(_model(tmp_path, PLAIN_TEMPLATE), model_ctx_size=1024)
    async with running_server(config) as srv:
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as c:
            r = await c.post("/v1/chat/completions", json={"messages": MESSAGES, **FORCED})
            assert r.status_code == 200, r.text
            msg = r.json()["choices"][0]["message"]
            assert "reasoning_content" not in msg
            assert "completion_tokens_details" not in r.json()["usage"]
            assert msg["content"] == "<think>abc</think>xyz"
            deltas = await _stream(c, {"messages": MESSAGES, **FORCED})
            assert not any("reasoning_content" in d for d in deltas)
            assert "".join(d.get("content") or "" for d in deltas) == "<think>abc</think>xyz"
