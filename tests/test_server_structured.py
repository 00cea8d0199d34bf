"""Structured output and tool calling against the real server (http-api §1.6, §1.7): the
models have random weights, so every answer that parses is the constraint's doing."""

from __future__ import annotations

import enum
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated

import httpx
import jsonschema
import openai
import pydantic
import pytest
import trio

from tests.conftest import RunningServer, running_server, server_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


class Color(str, enum.Enum):
    red = "red"
    green = "green"
    blue = "blue"


class Person(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    age: int = pydantic.Field(ge=0, le=150)
    color: Color
    tags: list[Annotated[str, pydantic.StringConstraints(max_length=8)]] = pydantic.Field(
        max_length=3
    )


WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 16},
                "unit": {"enum": ["c", "f"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "unit", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "parameters": {
            "type": "object",
            "properties": {"zone": {"type": "string", "maxLength": 8}},
            "required": ["zone"],
            "additionalProperties": False,
        },
    },
}
SCHEMAS = {"get_weather": WEATHER["function"]["parameters"],
           "get_time": TIME["function"]["parameters"]}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def served(server_model_path) -> AsyncIterator[RunningServer]:
    async with running_server(server_config(server_model_path)) as s:
        yield s


def client(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)


async def model_id(server: RunningServer) -> str:
    models = await client(server).models.list()
    return models.data[0].id


async def test_parse_with_a_pydantic_model_always_parses(served: RunningServer) -> None:
    c, mid = client(served), await model_id(served)
    for seed in range(6):
        r = await c.chat.completions.parse(
            model=mid, messages=MESSAGES, response_format=Person, seed=seed,
            temperature=1.0, max_tokens=400,
        )
        choice = r.choices[0]
        assert choice.finish_reason == "stop", (seed, choice.message.content)
        person = choice.message.parsed
        assert isinstance(person, Person), choice.message.content
        assert isinstance(person.color, Color)
        assert len(person.tags) <= 3


async def test_json_object_always_parses(served: RunningServer) -> None:
    # No logit bias: the grammar alone decides where the object may close, and with room
    # enough (these seeds need 2 to a few hundred tokens on this model) every answer ends with
    # "stop" and parses. Seeded generation is deterministic, so this cannot turn flaky.
    c, mid = client(served), await model_id(served)
    objects = []
    for seed in range(8):
        r = await c.chat.completions.create(
            model=mid, messages=MESSAGES, response_format={"type": "json_object"}, seed=seed,
            max_tokens=1000,
        )
        text = r.choices[0].message.content
        assert r.choices[0].finish_reason == "stop", (seed, r.usage, text[-80:])
        objects.append(json.loads(text))
        assert isinstance(objects[-1], dict), text
    assert any(objects)  # not only "{}"


async def test_tool_choice_required_validates_streamed_and_not(served: RunningServer) -> None:
    c, mid = client(served), await model_id(served)
    for seed in range(4):
        kwargs = dict(model=mid, messages=MESSAGES, tools=[WEATHER, TIME],
                      tool_choice="required", parallel_tool_calls=False, seed=seed,
                      max_tokens=300, temperature=1.0)
        r = await c.chat.completions.create(**kwargs)
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        calls = choice.message.tool_calls
        assert len(calls) == 1 and calls[0].id.startswith("call_")
        name, args = calls[0].function.name, json.loads(calls[0].function.arguments)
        jsonschema.validate(args, SCHEMAS[name])

        # the same seed streamed: the deltas assemble into the same call
        stream = await c.chat.completions.create(stream=True, **kwargs)
        got: dict[int, dict] = {}
        finish = None
        async for chunk in stream:
            ch = chunk.choices[0]
            for tc in ch.delta.tool_calls or []:
                slot = got.setdefault(tc.index, {"id": None, "name": None, "arguments": ""})
                if tc.id:
                    assert slot["id"] is None, "id sent twice"
                    slot["id"], slot["name"] = tc.id, tc.function.name
                else:
                    assert slot["id"] is not None, "arguments before the call's id and name"
                slot["arguments"] += tc.function.arguments or ""
            assert not ch.delta.content
            finish = ch.finish_reason or finish
        assert finish == "tool_calls"
        assert [(s["name"], s["arguments"]) for s in got.values()] == [
            (name, calls[0].function.arguments)
        ]


async def test_named_tool_choice_and_parallel_calls(served: RunningServer) -> None:
    c, mid = client(served), await model_id(served)
    for seed in range(3):
        r = await c.chat.completions.create(
            model=mid, messages=MESSAGES, tools=[WEATHER, TIME], seed=seed, max_tokens=600,
            tool_choice={"type": "function", "function": {"name": "get_time"}},
        )
        choice = r.choices[0]
        if choice.finish_reason == "length":
            continue
        assert choice.finish_reason == "tool_calls"
        for call in choice.message.tool_calls:
            assert call.function.name == "get_time"
            jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_time"])


async def test_tool_choice_auto_is_text_or_valid_calls(served: RunningServer) -> None:
    c, mid = client(served), await model_id(served)
    for seed in range(6):
        r = await c.chat.completions.create(
            model=mid, messages=MESSAGES, tools=[WEATHER], seed=seed, max_tokens=200,
        )
        choice = r.choices[0]
        if choice.message.tool_calls:
            assert choice.finish_reason in ("tool_calls", "length")
            if choice.finish_reason == "tool_calls":
                for call in choice.message.tool_calls:
                    jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])
        else:
            assert not (choice.message.content or "").startswith("<tool_call>")


async def test_tool_messages_are_rendered_into_the_prompt(served: RunningServer) -> None:
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"},
    ]
    async with httpx.AsyncClient(base_url=served.url) as h:
        r = await h.post("/apply-template", json={"messages": messages})
        assert r.status_code == 200, r.text
        prompt = r.json()["prompt"]
        assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n' \
               "</tool_call>" in prompt
        assert "Tool: sunny, 21 C" in prompt
        r = await h.post("/v1/chat/completions", json={
            "messages": messages, "tools": [WEATHER], "max_tokens": 5, "seed": 1})
        assert r.status_code == 200, r.text
        usage = r.json()["usage"]
        r2 = await h.post("/v1/chat/completions", json={
            "messages": messages, "max_tokens": 5, "seed": 1})
        # the tool definitions went into the system turn
        assert usage["prompt_tokens"] > r2.json()["usage"]["prompt_tokens"] + 20


async def test_completions_response_format_and_llama_grammar(served: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as h:
        schema = {"type": "object", "properties": {"n": {"type": "integer"}},
                  "required": ["n"], "additionalProperties": False}
        r = await h.post("/v1/completions", json={
            "prompt": "Number:", "max_tokens": 100, "seed": 3,
            "response_format": {"type": "json_schema",
                                "json_schema": {"name": "n", "schema": schema}}})
        assert r.status_code == 200, r.text
        jsonschema.validate(json.loads(r.json()["choices"][0]["text"]), schema)

        r = await h.post("/completion", json={
            "prompt": "Answer:", "n_predict": 20, "seed": 5,
            "grammar": 'root ::= ("yes" | "no") "!"'})
        assert r.status_code == 200, r.text
        assert r.json()["content"] in ("yes!", "no!")

        r = await h.post("/completion", json={
            "prompt": "Answer:", "n_predict": 100, "seed": 5, "json_schema": schema})
        jsonschema.validate(json.loads(r.json()["content"]), schema)


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/completion", {"grammar": "root ::= undefined_rule"}, "grammar"),
        ("/completion", {"grammar": "root ::= root \"x\""}, "grammar"),
        ("/completion", {"json_schema": {"type": "strnig"}}, "json_schema"),
        ("/completion", {"json_schema": {"type": "array", "minItems": 10 ** 9}},
         "json_schema.minItems"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "deep", "schema": json.loads('{"type":"array","items":' * 60 + "{}"
                                                 + "}" * 60)}}},
         "response_format.json_schema.schema"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "huge", "schema": {"type": "object", "properties": {
                f"p{i}": {"type": "string", "description": "x" * 100} for i in range(1000)}}}}},
         "response_format.json_schema.schema"),
        ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {
            "name": "never", "schema": {"type": "string", "minLength": 5, "maxLength": 2}}}},
         "response_format.json_schema.schema"),
    ],
    ids=["undefined-rule", "left-recursive-unproductive", "bad-type", "min-items-beyond-context",
         "deep", "huge", "unsatisfiable"],
)
async def test_hostile_constraints_get_a_quick_400(
    served: RunningServer, path: str, body: dict, param: str
) -> None:
    body = dict(body)
    if path == "/completion":
        body["prompt"] = "x"
    else:
        body["messages"] = MESSAGES
    async with httpx.AsyncClient(base_url=served.url, timeout=30) as h:
        t0 = time.monotonic()
        r = await h.post(path, json=body)
        elapsed = time.monotonic() - t0
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["param"] == param, err
        assert elapsed < 5.0
        # the server still serves
        r = await h.post("/completion", json={"prompt": "x", "n_predict": 2})
        assert r.status_code == 200


async def test_props_and_models_name_the_constraint_kinds(served: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=served.url) as h:
        props = (await h.get("/props")).json()
        assert "json_schema" in props["constraints"] and "grammar" in props["constraints"]
        card = (await h.get("/v1/models")).json()["data"][0]
        assert "tools" in card["meta"]["constraints"]


async def test_langchain_with_structured_output(served: RunningServer) -> None:
    langchain_openai = pytest.importorskip("langchain_openai")
    mid = await model_id(served)
    llm = langchain_openai.ChatOpenAI(
        base_url=served.url + "/v1", api_key="x", model=mid, max_retries=0, max_tokens=400,
        temperature=1.0,
    )
    for method in ("json_schema", "function_calling"):
        structured = llm.with_structured_output(Person, method=method)
        for seed in range(2):
            # LangChain's async API needs asyncio: its sync API, in a thread, under Trio
            person = await trio.to_thread.run_sync(
                structured.bind(seed=seed).invoke, "Describe a person.")
            assert isinstance(person, Person), (method, person)


async def test_chat_takes_llama_grammar_and_json_schema(served: RunningServer) -> None:
    # http-api §1.6: llama.cpp's fields are accepted on /v1/chat/completions too
    schema = {"type": "object", "properties": {"n": {"type": "integer"}},
              "required": ["n"], "additionalProperties": False}
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as h:
        for seed in range(3):
            r = await h.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 20, "seed": seed, "temperature": 1.0,
                "grammar": 'root ::= ("yes" | "no") "!"'})
            assert r.status_code == 200, r.text
            choice = r.json()["choices"][0]
            assert choice["message"]["content"] in ("yes!", "no!")
            assert choice["finish_reason"] == "stop"

            r = await h.post("/v1/chat/completions", json={
                "messages": MESSAGES, "max_tokens": 100, "seed": seed, "json_schema": schema})
            assert r.status_code == 200, r.text
            jsonschema.validate(json.loads(r.json()["choices"][0]["message"]["content"]), schema)
        r = await h.post("/v1/chat/completions", json={
            "messages": MESSAGES, "grammar": "root ::= undefined_rule"})
        assert r.status_code == 400 and r.json()["error"]["param"] == "grammar"


def _wide_grammar(n: int) -> str:
    """A GBNF grammar whose first step is one token ("x") but whose second makes the parser
    predict n left-recursive rules at once: a few thousand parser items."""
    alts = " | ".join(f"y{i}" for i in range(n))
    rules = "\n".join(f'y{i} ::= "b" z{i}\nz{i} ::= "c" | z{i} "d{i}"' for i in range(n))
    return f'root ::= "x" y\ny ::= {alts}\n{rules}'


async def test_grammar_step_limit_ends_that_choice_only(server_model_path) -> None:
    grammar = _wide_grammar(300)
    config = server_config(server_model_path, server_grammar_step_limit=1000)
    async with running_server(config) as s, httpx.AsyncClient(base_url=s.url, timeout=60) as h:
        # A long free stream is running when the expensive grammar arrives.
        async with h.stream("POST", "/v1/completions", json={
            "prompt": "x", "max_tokens": 300, "ignore_eos": True, "seed": 1, "stream": True,
            "stream_options": {"include_usage": True},
        }) as stream:
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: {") and '"text":""' not in line:
                    break  # the free stream's first token: it is decoding
            # accepted (its first step is cheap), then ended at its second token
            r = await h.post("/completion", json={"prompt": "x", "n_predict": 20,
                                                  "grammar": grammar})
            assert r.status_code == 500, r.text
            assert "Too many items (limit 1000" in r.json()["error"]["message"]
            # a cheap grammar beside it is served as usual
            r = await h.post("/completion", json={"prompt": "x", "n_predict": 20, "seed": 2,
                                                  "grammar": 'root ::= ("yes" | "no") "!"'})
            assert r.status_code == 200 and r.json()["content"] in ("yes!", "no!")
            finish, usage = None, None
            async for line in lines:
                if line.startswith("data: {"):
                    chunk = json.loads(line[6:])
                    if chunk["choices"]:
                        finish = chunk["choices"][0]["finish_reason"] or finish
                    usage = chunk.get("usage") or usage
            assert finish == "length" and usage["completion_tokens"] == 300
        assert all(slot["state"] == "idle" for slot in (await h.get("/slots")).json())
    # the same grammar within the default limit is served
    async with running_server(server_config(server_model_path)) as s, \
            httpx.AsyncClient(base_url=s.url, timeout=60) as h:
        r = await h.post("/completion", json={"prompt": "x", "n_predict": 20, "seed": 3,
                                              "grammar": grammar})
        assert r.status_code == 200, r.text
        assert r.json()["content"].startswith("xbc")


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydantic, about litellm's own types
async def test_litellm_tool_call(served: RunningServer, monkeypatch) -> None:
    # litellm fetches a model price list from the network at import unless told not to
    monkeypatch.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
    litellm = pytest.importorskip("litellm")
    mid = await model_id(served)
    for seed in range(2):
        r = await trio.to_thread.run_sync(lambda seed=seed: litellm.completion(
            model=f"openai/{mid}", api_base=served.url + "/v1", api_key="x",
            messages=MESSAGES, tools=[WEATHER], tool_choice="required", seed=seed,
            max_tokens=300, temperature=1.0, num_retries=0,
        ))
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls"
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.function.name == "get_weather"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS["get_weather"])
