"""Thinking and tool calls of Qwen3-style templates on every chat API (http-api §1.1, §1.7,
§4.1, §4.4, §5.1, §5.4): a think block then `<tool_call>` blocks read into reasoning and calls
by the chat, Messages and Responses dialects (whole and streamed, on hand-made replies); the
tool grammar that lets a thinking model think before it calls (engine steps through the
compiled constraint); and a server whose own Qwen3-like template takes `tools` and marks
thinking, driven through the official SDKs (random weights: what is asserted is the shape,
and what constrained decoding guarantees)."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import AsyncIterator
from pathlib import Path

import anthropic
import httpx
import jsonschema
import numpy as np
import openai
import openai.types.responses as R
import pytest
from test_dialects import DEFAULTS, done, events, reply
from test_dialects_messages_responses import named_events

from bitnetd_trio.api.dialects.anthropic_messages import (
    AnthropicMessages,
    parse_messages_request,
    thinking_signature,
)
from bitnetd_trio.api.dialects.openai_chat import OpenAIChat
from bitnetd_trio.api.dialects.openai_responses import OpenAIResponses, parse_responses_request
from bitnetd_trio.api.reply import Piece
from bitnetd_trio.api.response_format import after_thinking, gbnf_spec, json_schema_spec
from bitnetd_trio.api.tools import ToolRequest
from bitnetd_trio.engine import gguf_writer as gw
from bitnetd_trio.engine.constraints import ConstraintCompiler
from bitnetd_trio.engine.tokenizer import Tokenizer
from bitnetd_trio.engine.tool_syntax import BITNET_TOOLS
from bitnetd_trio.engine.vocab import tiny_qwen3_vocab
from tests.conftest import RunningServer, running_server, server_config

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

CITY = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]}},
        "required": ["city"], "additionalProperties": False}
THOUGHT = "The user wants weather.\nA lookup will do."
# arguments as constrained decoding writes them (compact JSON)
CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city":"Paris"}}\n</tool_call>'
TEXT = f"<think>\n{THOUGHT}\n</think>\n\n{CALL}"

CHAT_TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": CITY}}]
CLAUDE_TOOLS = [{"name": "get_weather", "input_schema": CITY}]
RESPONSES_TOOLS = [{"type": "function", "name": "get_weather", "parameters": CITY}]
BODIES = {
    "chat": {"messages": [{"role": "user", "content": "hi"}], "tools": CHAT_TOOLS},
    "messages": {"model": "m", "max_tokens": 64, "messages": [{"role": "user", "content": "hi"}],
                 "tools": CLAUDE_TOOLS},
    "responses": {"input": "hi", "tools": RESPONSES_TOOLS},
}


def _pieces(text: str, seed: int) -> list[str]:
    rng = random.Random(seed)
    cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 12)))
    return [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


def _streamed(dialect, body: dict, text: str, seed: int) -> bytes:
    r = reply(dialect, body, [done(0, "", None)])
    r.reasoning = "closed"
    c = r.choices[0]
    s = dialect.stream(r)
    *head, last = _pieces(text, seed)
    out = s.opening() + b"".join(s.piece(c, Piece(p)) for p in head)
    c.finish_reason = "stop"
    return out + s.finish(c, Piece(last)) + s.closing()


def _whole(dialect, body: dict, text: str = TEXT) -> dict:
    r = reply(dialect, body, [done(0, text, "stop")])
    r.reasoning = "closed"
    return dialect.whole(r)


# ---- the dialects on a think block and a call ---------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_chat_reads_thinking_then_calls(seed: int) -> None:
    d = OpenAIChat()
    msg = _whole(d, BODIES["chat"])["choices"][0]
    assert msg["finish_reason"] == "tool_calls"
    m = msg["message"]
    assert m["reasoning_content"] == THOUGHT and m["content"] is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
            for c in m["tool_calls"]] == [("get_weather", {"city": "Paris"})]
    deltas = [e["choices"][0]["delta"] for e in events(_streamed(d, BODIES["chat"], TEXT, seed))
              if e != "[DONE]" and e["choices"]]
    assert "".join(x.get("reasoning_content", "") for x in deltas) == THOUGHT
    assert not "".join(x.get("content") or "" for x in deltas)
    args = "".join(t["function"]["arguments"] for x in deltas for t in x.get("tool_calls", []))
    assert json.loads(args) == {"city": "Paris"}


@pytest.mark.parametrize("seed", range(4))
def test_messages_thinking_block_then_tool_use(seed: int) -> None:
    d = AnthropicMessages()
    body = _whole(d, BODIES["messages"])
    msg = anthropic.types.Message.model_validate(body)
    assert [b.type for b in msg.content] == ["thinking", "tool_use"]
    assert msg.content[0].thinking == THOUGHT
    assert msg.content[0].signature == thinking_signature(THOUGHT)
    assert (msg.content[1].name, msg.content[1].input) == ("get_weather", {"city": "Paris"})
    assert msg.stop_reason == "tool_use"

    evs = named_events(_streamed(d, BODIES["messages"], TEXT, seed))
    starts = [p["content_block"] for k, p in evs if k == "content_block_start"]
    assert starts[0] == {"type": "thinking", "thinking": "", "signature": ""}
    deltas = [(p["index"], p["delta"]) for k, p in evs if k == "content_block_delta"]
    assert "".join(x["thinking"] for i, x in deltas if x["type"] == "thinking_delta") == THOUGHT
    kinds = [x["type"] for _, x in deltas]
    # the signature comes last in its block, just before the block's stop
    sig = kinds.index("signature_delta")
    assert set(kinds[:sig]) == {"thinking_delta"} and deltas[sig][1]["signature"] == \
        thinking_signature(THOUGHT)
    stop_of_thinking = next(i for i, (k, p) in enumerate(evs)
                            if k == "content_block_stop" and p["index"] == 0)
    assert evs[stop_of_thinking - 1][1]["delta"]["type"] == "signature_delta"
    args = "".join(x["partial_json"] for i, x in deltas if x["type"] == "input_json_delta")
    assert json.loads(args) == {"city": "Paris"}
    assert next(p for k, p in evs if k == "message_delta")["delta"]["stop_reason"] == "tool_use"


@pytest.mark.parametrize("seed", range(4))
def test_responses_reasoning_item_then_function_call(seed: int) -> None:
    d = OpenAIResponses()
    body = _whole(d, BODIES["responses"])
    assert [o["type"] for o in body["output"]] == ["reasoning", "function_call"]
    item = R.ResponseReasoningItem.model_validate(body["output"][0])
    assert item.id.startswith("rs_") and item.summary == [] and item.status == "completed"
    assert [(c.type, c.text) for c in item.content] == [("reasoning_text", THOUGHT)]
    call = R.ResponseFunctionToolCall.model_validate(body["output"][1])
    assert json.loads(call.arguments) == {"city": "Paris"}

    evs = named_events(_streamed(d, BODIES["responses"], TEXT, seed))
    kinds = [k for k, _ in evs]
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert evs[2][1]["item"]["type"] == "reasoning"
    assert evs[3][1]["part"] == {"type": "reasoning_text", "text": ""}
    text = "".join(p["delta"] for k, p in evs if k == "response.reasoning_text.delta")
    done_ev = next(p for k, p in evs if k == "response.reasoning_text.done")
    assert text == done_ev["text"] == THOUGHT
    final = evs[-1][1]["response"]["output"]
    assert [o["type"] for o in final] == ["reasoning", "function_call"]
    assert R.ResponseReasoningItem.model_validate(final[0]).content[0].text == THOUGHT
    assert [p["sequence_number"] for _, p in evs] == list(range(len(evs)))


def test_answers_without_a_block_or_calls_keep_their_shape() -> None:
    # a template that thinks, an answer that does not: plain text, no reasoning
    chat = _whole(OpenAIChat(), BODIES["chat"], "just text")["choices"][0]["message"]
    assert (chat["content"], chat["reasoning_content"]) == ("just text", None)
    msg = _whole(AnthropicMessages(), BODIES["messages"], "just text")
    assert msg["content"] == [{"type": "text", "text": "just text"}]
    resp = _whole(OpenAIResponses(), BODIES["responses"], "<think>cut sh")
    assert [o["type"] for o in resp["output"]] == ["reasoning"]


def test_history_thinking_becomes_reasoning_content() -> None:
    g = parse_messages_request({
        "model": "m", "max_tokens": 8, "messages": [
            {"role": "user", "content": "hi"},
            {"role": "assistant", "content": [
                {"type": "thinking", "thinking": "hm", "signature": "x"},
                {"type": "redacted_thinking", "data": "opaque"},
                {"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1"}]}],
        "thinking": {"type": "disabled"}}, DEFAULTS)
    assert g.messages[1]["reasoning_content"] == "hm" and g.messages[1]["tool_calls"]
    assert g.template_kwargs == {"enable_thinking": False}

    g = parse_responses_request({"input": [
        {"role": "user", "content": "hi"},
        {"type": "reasoning", "id": "rs_1", "summary": [],
         "content": [{"type": "reasoning_text", "text": "hm"}]},
        {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"},
        {"type": "function_call_output", "call_id": "c1", "output": "sun"},
        {"type": "reasoning", "id": "rs_2", "summary": [{"type": "summary_text", "text": "ok"}]},
        {"role": "assistant", "content": "sunny"},
    ], "reasoning": {"effort": "none"}}, DEFAULTS)
    assert [(m["role"], m["content"], m.get("reasoning_content")) for m in g.messages] == [
        ("user", "hi", None), ("assistant", "", "hm"), ("tool", "sun", None),
        ("assistant", "sunny", "ok")]
    assert g.template_kwargs == {"enable_thinking": False}
    assert g.dialect_options["reasoning"] == {"effort": "none", "summary": None}


# ---- the tool grammar of a thinking template ----------------------------------------------------


@pytest.fixture(scope="module")
def compiler() -> ConstraintCompiler:
    v = tiny_qwen3_vocab()
    return ConstraintCompiler(Tokenizer(v.tokens, v.merges, v.token_types, bos_id=v.bos_id,
                                        eos_id=v.eos_id))


def _accepts(compiler: ConstraintCompiler, grammar: str, text: str) -> bool | None:
    """True: the Lark grammar takes `text` and may end there; None: takes it, cannot end;
    False: refuses a token of it."""
    return _accepts_grammar(compiler, compiler.lark_grammar(grammar), text)


def _accepts_grammar(compiler: ConstraintCompiler, grammar: str, text: str) -> bool | None:
    c = compiler.compile(grammar)
    for t in compiler.lltok.tokenize_str(text):
        bits = np.unpackbits(c.mask.view(np.uint8), bitorder="little")
        if not bits[t]:
            return False
        c.accept(t)
        c.compute_mask()
    bits = np.unpackbits(c.mask.view(np.uint8), bitorder="little")
    return True if any(bits[i] for i in compiler.stop_ids) else None


@pytest.mark.parametrize(("choice", "thinking", "text", "expected"), [
    # a closed prompt: a think block may come first, then the call; the block's text may hold
    # anything but its end tag
    ("required", "closed", TEXT, True),
    ("required", "closed", "<think>a </thin k <b></think>\n\n" + CALL, True),
    ("required", "closed", CALL, True),
    ("required", "closed", "<think>x</think>\n\nno call", False),
    ("required", "closed", "<think>x</think>\n\n", None),
    ("auto", "closed", "<think>x</think>\n\nJust text.", True),
    ("auto", "closed", "Just text.", True),
    # the prompt opened the block: the rest of it first, then the call
    ("required", "open", f"{THOUGHT}\n</think>\n\n{CALL}", True),
    ("required", "open", CALL, None),  # still thinking: the call is text of the block
    ("required", "open", "x</think>\n\nno call", False),
    # the prompt closed the block (thinking off): the call at once
    ("required", "off", CALL, True),
    ("required", "off", TEXT, False),
    ("required", None, TEXT, False),
])
def test_tool_grammar_lets_a_thinking_model_think_first(
        compiler: ConstraintCompiler, choice: str, thinking: str | None, text: str,
        expected: bool | None) -> None:
    tools = ToolRequest(tools=CHAT_TOOLS, choice=choice, parallel=False)
    assert _accepts(compiler, tools.grammar(BITNET_TOOLS, thinking), text) is expected


@pytest.mark.parametrize(("thinking", "text", "expected"), [
    # response_format json_schema: the block may (closed) or must (open) come before the JSON
    ("closed", '<think>\nlet me see\n</think>\n\n{"city":"Oslo"}', True),
    ("closed", '{"city":"Oslo"}', True),
    ("closed", '<think>x</think>\n\n{"city":"Rome"}', False),
    ("open", 'so, Oslo.\n</think>\n\n{"city":"Oslo"}', True),
    ("open", '{"city":"Oslo"}', None),  # still in the block: JSON there is thinking
    ("off", '{"city":"Oslo"}', True),
    ("off", '<think>x</think>\n\n{"city":"Oslo"}', False),
    (None, '{"city":"Oslo"}', True),
])
def test_json_constraint_lets_a_thinking_model_think_first(
        compiler: ConstraintCompiler, thinking: str | None, text: str,
        expected: bool | None) -> None:
    spec = json_schema_spec(CITY, "response_format", 1 << 20)
    spec = after_thinking(spec, thinking)
    if thinking in ("closed", "open"):
        assert spec.fmt == "lark"
        grammar = compiler.lark_grammar(spec.source)
    else:
        assert spec.fmt == "json_schema"
        grammar = compiler.json_schema_grammar(json.loads(spec.source))
    assert _accepts_grammar(compiler, grammar, text) is expected
    # a request's own grammar describes the whole answer: never changed
    own = gbnf_spec('root ::= "x"', "grammar", 100)
    assert after_thinking(own, thinking) is own


# ---- a server with a Qwen3-like template -------------------------------------------------------

# Written for these tests in the shape of Qwen3's chat format: tools listed in the system turn,
# calls as <tool_call> blocks, a past turn's reasoning_content written back as a think block,
# enable_thinking false writing an empty block into the generation prompt; `open_think` makes
# the generation prompt open the block for the model instead (as some thinking templates do).
QWEN_LIKE_TEMPLATE = """\
{%- if tools or messages[0].role == 'system' %}<|im_start|>system
{% if messages[0].role == 'system' %}{{ messages[0].content }}
{% endif %}{% if tools %}Tools (one JSON object each):
{% for t in tools %}{{ t | tojson }}
{% endfor %}A call is written <tool_call>
{"name": ..., "arguments": {...}}
</tool_call>{% endif %}<|im_end|>
{% endif %}
{%- for m in messages %}{% if m.role == 'assistant' %}<|im_start|>assistant
{% if m.reasoning_content %}<think>
{{ m.reasoning_content }}
</think>

{% endif %}{{ m.content }}{% for c in m.tool_calls or [] %}
<tool_call>
{"name": {{ c.function.name | tojson }}, "arguments": {% if c.function.arguments is string %}\
{{ c.function.arguments }}{% else %}{{ c.function.arguments | tojson }}{% endif %}}
</tool_call>{% endfor %}<|im_end|>
{% elif m.role == 'tool' %}<|im_start|>user
<tool_response>
{{ m.content }}
</tool_response><|im_end|>
{% elif m.role != 'system' %}<|im_start|>{{ m.role }}
{{ m.content }}<|im_end|>
{% endif %}{% endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% if enable_thinking is defined and not enable_thinking %}<think>

</think>

{% elif open_think is defined and open_think %}<think>
{% endif %}{% endif %}"""

OPEN = {"chat_template_kwargs": {"open_think": True}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture
async def served(tmp_path: Path) -> AsyncIterator[RunningServer]:
    shape = dataclasses.replace(gw.TINY_BONSAI, n_ctx=1024)
    # the Qwen3 layout has no chat template key of its own: appended, as Bonsai files have one
    path = gw.write_model(tmp_path / "bonsai.gguf", shape, 5,
                          extra_metadata={"tokenizer.chat_template": QWEN_LIKE_TEMPLATE})
    async with running_server(server_config(path, model_ctx_size=1024)) as s:
        yield s


def claude(s: RunningServer) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=s.url, api_key="x", max_retries=0, timeout=120)


def oai(s: RunningServer) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=s.url + "/v1", api_key="x", max_retries=0, timeout=120)


def _token(text: str) -> str:
    v = tiny_qwen3_vocab()
    ids = Tokenizer(v.tokens, v.merges, v.token_types, bos_id=v.bos_id,
                    eos_id=v.eos_id).encode(text, add_bos=False, parse_special=False)
    assert len(ids) == 1
    return str(ids[0])


async def test_template_renders_tools_thinking_and_history(served: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=served.url, timeout=60) as h:
        history = ASK + [{"role": "assistant", "content": None, "reasoning_content": "hm",
                          "tool_calls": [{"id": "c1", "type": "function", "function": {
                              "name": "get_weather", "arguments": '{"city":"Paris"}'}}]},
                         {"role": "tool", "tool_call_id": "c1", "content": "sun"}]
        r = await h.post("/apply-template", json={"messages": history})
        prompt = r.json()["prompt"]
        assert f"<think>\nhm\n</think>\n\n{CALL}<|im_end|>" in prompt, prompt
        assert prompt.endswith("<|im_start|>assistant\n")
        r = await h.post("/apply-template", json={"messages": ASK, **OPEN})
        assert r.json()["prompt"].endswith("<|im_start|>assistant\n<think>\n")


async def test_messages_thinking_blocks_from_the_server(served: RunningServer) -> None:
    c = claude(served)
    kwargs = dict(model="m", max_tokens=6, messages=ASK,
                  extra_body={"seed": 2, "ignore_eos": True, **OPEN})
    msg = await c.messages.create(**kwargs)
    # the prompt opened the block and the random model never closes it: all thinking
    assert [b.type for b in msg.content] == ["thinking"] and msg.stop_reason == "max_tokens"
    assert msg.content[0].thinking and msg.content[0].signature
    async with c.messages.stream(**kwargs) as stream:
        kinds = [e.type async for e in stream]
        final = await stream.get_final_message()
    assert final.content == msg.content
    assert "thinking" in kinds and "signature" in kinds  # the SDK's names of the deltas

    # thinking disabled: the template closes the block in the prompt, the answer is text
    off = await c.messages.create(thinking={"type": "disabled"}, **kwargs)
    assert [b.type for b in off.content] == ["text"]
    # enabled takes a budget below max_tokens (checked, not enforced)
    on = await c.messages.create(thinking={"type": "enabled", "budget_tokens": 4}, **kwargs)
    assert [b.type for b in on.content] == ["thinking"]
    for bad in ({"type": "enabled", "budget_tokens": 6}, {"type": "enabled"}, {"type": "x"}):
        with pytest.raises(anthropic.BadRequestError):
            await c.messages.create(thinking=bad, **kwargs)
    # a past thinking block goes back to the template as the turn's reasoning
    turn = {"role": "assistant", "content": [{"type": "text", "text": "Sunny."}]}
    plain = await c.messages.count_tokens(model="m", messages=ASK + [turn] + ASK)
    turn["content"].insert(0, {"type": "thinking", "thinking": "easy", "signature": "s"})
    more = await c.messages.count_tokens(model="m", messages=ASK + [turn] + ASK)
    assert more.input_tokens > plain.input_tokens


async def test_responses_reasoning_items_from_the_server(served: RunningServer) -> None:
    c = oai(served)
    kwargs = dict(model="m", input="Weather?", max_output_tokens=6,
                  extra_body={"seed": 3, "ignore_eos": True, **OPEN})
    r = await c.responses.create(**kwargs)
    assert [o.type for o in r.output] == ["reasoning"] and r.status == "incomplete"
    assert r.output[0].content[0].type == "reasoning_text" and r.output[0].content[0].text
    # every token went into the unclosed block
    assert r.usage.output_tokens_details.reasoning_tokens == r.usage.output_tokens == 6
    evs = [e async for e in await c.responses.create(stream=True, **kwargs)]
    deltas = "".join(e.delta for e in evs if e.type == "response.reasoning_text.delta")
    assert deltas == r.output[0].content[0].text
    assert evs[-1].type == "response.incomplete"
    assert evs[-1].response.output[0].content == r.output[0].content

    off = await c.responses.create(reasoning={"effort": "none"}, **kwargs)
    assert [o.type for o in off.output] == ["message"]
    assert off.usage.output_tokens_details.reasoning_tokens == 0
    assert off.reasoning.effort == "none"


async def test_required_call_with_thinking_off_on_every_api(served: RunningServer) -> None:
    """The prompt closes the block (each API's way of turning thinking off): the grammar goes
    straight to the call, which every API reads as a call."""
    common = {"seed": 1, "temperature": 1.0}
    chat = await oai(served).chat.completions.create(
        model="m", messages=ASK, tools=CHAT_TOOLS, tool_choice="required", max_tokens=80,
        reasoning_effort="none", parallel_tool_calls=False, extra_body=common)
    m = chat.choices[0].message
    assert m.reasoning_content is None and chat.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(m.tool_calls[0].function.arguments), CITY)

    kwargs = dict(model="m", max_tokens=80, messages=ASK, tools=CLAUDE_TOOLS,
                  tool_choice={"type": "any", "disable_parallel_tool_use": True},
                  thinking={"type": "disabled"}, extra_body=common)
    msg = await claude(served).messages.create(**kwargs)
    assert [b.type for b in msg.content] == ["tool_use"] and msg.stop_reason == "tool_use"
    jsonschema.validate(msg.content[0].input, CITY)
    async with claude(served).messages.stream(**kwargs) as stream:
        final = await stream.get_final_message()
    assert [(b.type, b.input) for b in final.content] == [("tool_use", msg.content[0].input)]

    kwargs = dict(model="m", input="Weather?", tools=RESPONSES_TOOLS, tool_choice="required",
                  parallel_tool_calls=False, max_output_tokens=80, reasoning={"effort": "none"},
                  extra_body=common)
    r = await oai(served).responses.create(**kwargs)
    assert [o.type for o in r.output] == ["function_call"]
    evs = [e async for e in await oai(served).responses.create(stream=True, **kwargs)]
    assert evs[-1].response.output[0].arguments == r.output[0].arguments


async def test_required_call_lets_the_model_think_first(served: RunningServer) -> None:
    """tool_choice required with thinking on: the grammar lets the block come first. The
    random model is steered with logit_bias at the fork of `<think>` and `<tool_call>`
    ("<t" then "h" or "o"): straight to the call, or into the block."""
    c = oai(served)
    base = dict(model="m", messages=ASK, tools=CHAT_TOOLS, tool_choice="required",
                parallel_tool_calls=False, max_tokens=60)
    r = await c.chat.completions.create(**base, logit_bias={_token("o"): 50},
                                        extra_body={"seed": 1})
    m = r.choices[0].message
    assert m.reasoning_content is None and r.choices[0].finish_reason == "tool_calls"
    jsonschema.validate(json.loads(m.tool_calls[0].function.arguments), CITY)

    r = await c.chat.completions.create(**{**base, "max_tokens": 12},
                                        logit_bias={_token("h"): 50}, extra_body={"seed": 1})
    m = r.choices[0].message
    # in the block, still thinking when max_tokens ran out: reasoning, no call, no content
    assert m.reasoning_content and not m.tool_calls and not m.content
    assert r.choices[0].finish_reason == "length"

    # the prompt opened the block: the answer starts inside it, never with a forced call
    # (which would have been read as thinking)
    for api in ("chat", "messages"):
        if api == "chat":
            r = await c.chat.completions.create(**{**base, "max_tokens": 10},
                                                extra_body={"seed": 4, **OPEN})
            m = r.choices[0].message
            assert m.reasoning_content and "<tool_call>" not in m.reasoning_content
            assert not m.tool_calls
        else:
            msg = await claude(served).messages.create(
                model="m", max_tokens=10, messages=ASK, tools=CLAUDE_TOOLS,
                tool_choice={"type": "any"}, extra_body={"seed": 4, **OPEN})
            assert [b.type for b in msg.content] == ["thinking"]
            assert "<tool_call>" not in msg.content[0].thinking


async def test_json_response_format_with_a_thinking_template(served: RunningServer) -> None:
    """response_format json_schema and a template that thinks: with thinking off the JSON
    comes at once; when the prompt opened the block the answer starts inside it (the JSON is
    not forced into the thinking, where it would be read as reasoning)."""
    c = oai(served)
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": CITY, "strict": True}}
    r = await c.chat.completions.create(model="m", messages=ASK, response_format=fmt,
                                        max_tokens=60, reasoning_effort="none",
                                        extra_body={"seed": 1})
    m = r.choices[0].message
    assert m.reasoning_content is None and r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(m.content), CITY)

    r = await c.chat.completions.create(model="m", messages=ASK, response_format=fmt,
                                        max_tokens=10, extra_body={"seed": 4, **OPEN})
    m = r.choices[0].message
    assert m.reasoning_content and not m.reasoning_content.startswith('{"city"')
    assert not m.content and r.choices[0].finish_reason == "length"
