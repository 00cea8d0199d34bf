"""Tool use and structured output on Anthropic's Messages API and OpenAI's Responses API
against the real server, through the official `anthropic` and `openai` SDKs (http-api §4.1,
§4.4, §5.1, §5.4). The models have random weights: every call that validates is the
constraint's doing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import anthropic
import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import RunningServer, running_server, server_config
from tests.test_server_structured import SCHEMAS

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

WEATHER_SCHEMA, TIME_SCHEMA = SCHEMAS["get_weather"], SCHEMAS["get_time"]
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]

CLAUDE_TOOLS = [
    {"name": "get_weather", "description": "The weather in a city", "input_schema": WEATHER_SCHEMA},
    {"name": "get_time", "input_schema": TIME_SCHEMA},
]
RESPONSES_TOOLS = [
    {"type": "function", "name": "get_weather", "description": "The weather in a city",
     "parameters": WEATHER_SCHEMA, "strict": True},
    {"type": "function", "name": "get_time", "parameters": TIME_SCHEMA, "strict": True},
]


class City(pydantic.BaseModel):
    name: str = pydantic.Field(max_length=12)
    population: int = pydantic.Field(ge=0, le=10**8)


@pytest.fixture
async def served(server_model_path) -> AsyncIterator[RunningServer]:
    async with running_server(server_config(server_model_path)) as s:
        yield s


def claude(server: RunningServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key="x", max_retries=0, timeout=120)


def oai(server: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                              timeout=120)


def _blocks(msg: anthropic.types.Message) -> list[tuple]:
    return [(b.type, getattr(b, "name", None), getattr(b, "input", None),
             getattr(b, "text", None)) for b in msg.content]


# ---- Anthropic Messages ------------------------------------------------------------------------


async def test_anthropic_tool_choice_any_create_and_stream_agree(served: RunningServer) -> None:
    c = claude(served)
    for seed in range(3):
        kwargs = dict(
            model="claude-local", max_tokens=300, messages=ASK, tools=CLAUDE_TOOLS,
            tool_choice={"type": "any", "disable_parallel_tool_use": True},
            extra_body={"seed": seed, "temperature": 1.0},
        )
        msg = await c.messages.create(**kwargs)
        assert msg.stop_reason == "tool_use", msg
        assert [b.type for b in msg.content] == ["tool_use"]
        block = msg.content[0]
        assert block.id.startswith("toolu_") and block.name in SCHEMAS
        jsonschema.validate(block.input, SCHEMAS[block.name])

        kinds = []
        async with c.messages.stream(**kwargs) as stream:
            async for event in stream:
                kinds.append(event.type)
            final = await stream.get_final_message()
        assert final.stop_reason == "tool_use"
        assert _blocks(final) == _blocks(msg)
        assert final.content[0].id.startswith("toolu_")
        assert kinds[:2] == ["message_start", "content_block_start"]
        assert "input_json" in kinds  # the SDK's event for an input_json_delta
        assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_anthropic_raw_tool_stream_events(served: RunningServer) -> None:
    body = {"model": "m", "max_tokens": 300, "messages": ASK, "tools": CLAUDE_TOOLS,
            "tool_choice": {"type": "tool", "name": "get_time"}, "seed": 1, "stream": True}
    events = []
    async with httpx.AsyncClient(base_url=served.url, timeout=120) as h:
        async with h.stream("POST", "/v1/messages", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    events.append(json.loads(line[6:]))
    kinds = [e["type"] for e in events]
    assert kinds[:3] == ["message_start", "ping", "content_block_start"]
    start = events[2]["content_block"]
    assert start["type"] == "tool_use" and start["name"] == "get_time" and start["input"] == {}
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    assert deltas and all(d["type"] == "input_json_delta" for d in deltas)
    stop = next(e for e in events if e["type"] == "message_delta")
    if stop["delta"]["stop_reason"] == "tool_use":
        args = json.loads("".join(d["partial_json"] for d in deltas))
        jsonschema.validate(args, TIME_SCHEMA)
        # every call of get_time only (parallel calls allowed)
        assert {e["content_block"]["name"] for e in events
                if e["type"] == "content_block_start"} == {"get_time"}


async def test_anthropic_auto_none_and_tool_history(served: RunningServer) -> None:
    c = claude(served)
    # auto: text that does not start like a call, or calls that validate
    for seed in range(3):
        msg = await c.messages.create(
            model="m", max_tokens=200, messages=ASK, tools=CLAUDE_TOOLS,
            extra_body={"seed": seed},
        )
        calls = [b for b in msg.content if b.type == "tool_use"]
        if msg.stop_reason == "tool_use":
            for b in calls:
                jsonschema.validate(b.input, SCHEMAS[b.name])
        else:
            assert msg.stop_reason in ("end_turn", "max_tokens")
    # none: no call reading at all, the tools stay in the prompt (counted)
    msg = await c.messages.create(
        model="m", max_tokens=4, messages=ASK, tools=CLAUDE_TOOLS,
        tool_choice={"type": "none"}, extra_body={"ignore_eos": True},
    )
    assert [b.type for b in msg.content] == ["text"] and msg.stop_reason == "max_tokens"
    with_tools = await c.messages.count_tokens(model="m", messages=ASK, tools=CLAUDE_TOOLS)
    without = await c.messages.count_tokens(model="m", messages=ASK)
    assert with_tools.input_tokens > without.input_tokens
    assert msg.usage.input_tokens + msg.usage.cache_read_input_tokens == with_tools.input_tokens
    # a conversation holding a call and its result goes through
    history = ASK + [
        {"role": "assistant", "content": [
            {"type": "tool_use", "id": "toolu_1", "name": "get_weather",
             "input": {"city": "Paris", "unit": "c", "days": 1}}]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}]},
    ]
    msg = await c.messages.create(model="m", max_tokens=3, messages=history, tools=CLAUDE_TOOLS)
    assert msg.usage.output_tokens <= 3


async def test_anthropic_tool_errors_are_sdk_errors(served: RunningServer) -> None:
    c = claude(served)
    cases = [
        dict(tools=[{"name": "f"}]),
        dict(tools=[{"type": "web_search_20250305", "name": "web_search"}]),
        dict(tools=CLAUDE_TOOLS, tool_choice={"type": "tool", "name": "nope"}),
        dict(tool_choice={"type": "any"}),
    ]
    for extra in cases:
        with pytest.raises(anthropic.BadRequestError) as bad:
            await c.messages.create(model="m", max_tokens=4, messages=ASK, **extra)
        assert bad.value.body["error"]["type"] == "invalid_request_error", bad.value.body


# ---- OpenAI Responses --------------------------------------------------------------------------


async def test_responses_function_calls_streamed_and_not(served: RunningServer) -> None:
    c = oai(served)
    for seed in range(3):
        kwargs = dict(model="m", input="What is the weather in Paris?", tools=RESPONSES_TOOLS,
                      tool_choice="required", parallel_tool_calls=False, max_output_tokens=300,
                      temperature=1.0, extra_body={"seed": seed})
        r = await c.responses.create(**kwargs)
        assert r.status == "completed"
        assert [o.type for o in r.output] == ["function_call"]
        call = r.output[0]
        assert call.id.startswith("fc_") and call.call_id.startswith("call_")
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])
        assert [t.name for t in r.tools] == ["get_weather", "get_time"]
        assert r.tool_choice == "required" and r.parallel_tool_calls is False

        events = [e async for e in await c.responses.create(stream=True, **kwargs)]
        kinds = [e.type for e in events]
        assert kinds[:3] == ["response.created", "response.in_progress",
                             "response.output_item.added"]
        assert events[2].item.type == "function_call" and events[2].item.name == call.name
        deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
        done = next(e for e in events if e.type == "response.function_call_arguments.done")
        assert "".join(deltas) == done.arguments == call.arguments
        assert kinds[-2:] == ["response.output_item.done", "response.completed"]
        assert [e.sequence_number for e in events] == list(range(len(events)))
        final = events[-1].response
        assert final.output[0].arguments == call.arguments
        assert final.output[0].name == call.name


async def test_responses_function_call_output_round_trip(served: RunningServer) -> None:
    c = oai(served)
    first = await c.responses.create(
        model="m", input="What is the weather in Paris?", tools=RESPONSES_TOOLS,
        tool_choice={"type": "function", "name": "get_time"}, max_output_tokens=300,
        extra_body={"seed": 3},
    )
    calls = [o for o in first.output if o.type == "function_call"]
    assert calls and all(o.name == "get_time" for o in calls)
    # the client sends the calls back with their outputs: the prompt holds them
    follow = [{"role": "user", "content": "What is the weather in Paris?"}]
    follow += [{"type": "function_call", "call_id": o.call_id, "name": o.name,
                "arguments": o.arguments} for o in calls]
    follow += [{"type": "function_call_output", "call_id": o.call_id, "output": "12:00"}
               for o in calls]
    plain = await c.responses.input_tokens.count(model="m", input=follow[:1],
                                                 tools=RESPONSES_TOOLS)
    more = await c.responses.input_tokens.count(model="m", input=follow, tools=RESPONSES_TOOLS)
    assert more.input_tokens > plain.input_tokens
    r = await c.responses.create(model="m", input=follow, tools=RESPONSES_TOOLS,
                                 max_output_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.input_tokens == more.input_tokens


async def test_responses_text_format_json_schema_and_parse(served: RunningServer) -> None:
    c = oai(served)
    parsed_ok = 0
    for seed in range(4):
        r = await c.responses.parse(model="m", input="A city?", text_format=City,
                                    max_output_tokens=300, temperature=1.0,
                                    extra_body={"seed": seed})
        if r.status == "completed":
            assert isinstance(r.output_parsed, City), r.output_text
            parsed_ok += 1
        assert r.text.format.type == "json_schema"
    assert parsed_ok >= 3
    # json_object, streamed: the text starts an object and the deltas make the done text
    events = [e async for e in await c.responses.create(
        model="m", input="JSON please", text={"format": {"type": "json_object"}},
        max_output_tokens=40, stream=True, extra_body={"seed": 1})]
    text = next(e for e in events if e.type == "response.output_text.done").text
    assert text.startswith("{")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == text
    assert events[-1].response.text.format.type == "json_object"
