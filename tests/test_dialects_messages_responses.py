"""The Anthropic Messages and OpenAI Responses dialects as plain functions, without a server
(http-api §4, §5): request parsing into chat turns, whole bodies, the named-event streams,
stop reasons and error bodies, on hand-made replies."""

from __future__ import annotations

import json

import pytest
from test_dialects import DEFAULTS, done, reply

from bitnetd_trio.api.dialects.anthropic_messages import (
    AnthropicMessages,
    anthropic_error_body,
    parse_messages_request,
)
from bitnetd_trio.api.dialects.openai_responses import OpenAIResponses, parse_responses_request
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.reply import Piece

ASK = {"model": "m", "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}


def named_events(data: bytes) -> list[tuple[str, dict]]:
    """(event name, data object) of each named SSE event in `data`."""
    out = []
    for block in data.decode().split("\n\n")[:-1]:
        name_line, data_line = block.split("\n")
        assert name_line.startswith("event: ") and data_line.startswith("data: ")
        payload = json.loads(data_line[len("data: "):])
        assert payload["type"] == name_line[len("event: "):]
        out.append((payload["type"], payload))
    return out


def error_of(parse, body: dict) -> ApiError:
    with pytest.raises(ApiError) as e:
        parse(body, DEFAULTS)
    return e.value


# ---- Anthropic Messages ------------------------------------------------------------------------


def test_messages_become_chat_turns_with_system_and_tool_blocks() -> None:
    g = parse_messages_request({
        **ASK,
        "system": [{"type": "text", "text": "Be terse."}, {"type": "text", "text": "Be kind."}],
        "messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [
                {"type": "text", "text": "checking"},
                {"type": "tool_use", "id": "t1", "name": "w", "input": {"city": "Oslo"}}]},
            {"role": "user", "content": [
                {"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "rain"}]},
                {"type": "tool_result", "tool_use_id": "t2", "content": "boom", "is_error": True},
                {"type": "text", "text": "so?"}]},
        ],
        "stop_sequences": ["END"],
        "temperature": 0.5,
        "top_k": 3,
    }, DEFAULTS)
    assert g.messages == [
        {"role": "system", "content": "Be terse.\nBe kind."},
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "checking", "tool_calls": [
            {"id": "t1", "type": "function",
             "function": {"name": "w", "arguments": {"city": "Oslo"}}}]},
        {"role": "tool", "content": "rain", "tool_call_id": "t1"},
        {"role": "tool", "content": "error: boom", "tool_call_id": "t2"},
        {"role": "user", "content": "so?"},
    ]
    assert (g.max_tokens, g.stop, g.n) == (8, ["END"], 1)
    assert (g.sampling.temperature, g.sampling.top_k) == (0.5, 3)
    assert g.model == "m"
    # an unknown name: the served model answers
    assert parse_messages_request({**ASK, "model": "claude-x"}, DEFAULTS).model is None


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"model": None}, "model"),
        ({"temperature": 1.5}, "temperature"),
        ({"tools": [{"name": "f"}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f b", "input_schema": {}}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search_20250305", "name": "web_search"}]}, "tools[0].type"),
        ({"tools": {"name": "f"}}, "tools"),
        ({"tool_choice": {"type": "any"}}, "tool_choice"),
        ({"tool_choice": "any"}, "tool_choice"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
        ({"tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool"}},
         "tool_choice.name"),
        ({"tools": [{"name": "f", "input_schema": {}}],
          "tool_choice": {"type": "tool", "name": "g"}}, "tool_choice.name"),
        ({"tools": [{"name": "f", "input_schema": {}}],
          "tool_choice": {"type": "any", "disable_parallel_tool_use": "yes"}},
         "tool_choice.disable_parallel_tool_use"),
        ({"tools": [{"name": "f", "input_schema": []}]}, "tools[0].input_schema"),
        ({"tools": [{"name": "f", "input_schema": {}}, {"name": "f", "input_schema": {}}]},
         "tools[1].name"),
        ({"messages": [{"role": "user", "content": [{"type": "image"}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "assistant", "content": [{"type": "tool_result"}]}]},
         "messages[0].content[0].type"),
        ({"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]},
         "messages[1]"),
        ({"stop_sequences": ["ok", 3]}, "stop_sequences[1]"),
        ({"metadata": {"user_id": 5}}, "metadata.user_id"),
    ],
)
def test_messages_request_errors_name_the_field(change: dict, param: str) -> None:
    body = {k: v for k, v in {**ASK, **change}.items() if v is not None}
    e = error_of(parse_messages_request, body)
    assert (e.status, e.param) == (400, param), e
    assert anthropic_error_body(e) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": e.message}}


def test_count_tokens_does_not_need_max_tokens() -> None:
    body = {k: v for k, v in ASK.items() if k != "max_tokens"}
    assert parse_messages_request(body, DEFAULTS, counting=True).max_tokens is None


def test_anthropic_error_types_by_status() -> None:
    types = {s: anthropic_error_body(ApiError(s, "x"))["error"]["type"]
             for s in (400, 401, 404, 405, 413, 429, 500, 503, 504)}
    assert types == {400: "invalid_request_error", 401: "authentication_error",
                     404: "not_found_error", 405: "invalid_request_error",
                     413: "request_too_large", 429: "rate_limit_error", 500: "api_error",
                     503: "overloaded_error", 504: "timeout_error"}


@pytest.mark.parametrize(
    ("fields", "reason", "sequence"),
    [
        ({"finish": "stop", "stop_type": "eos"}, "end_turn", None),
        ({"finish": "stop", "stop_type": "word", "stopping_word": "END"}, "stop_sequence", "END"),
        ({"finish": "length", "n_generated": 8}, "max_tokens", None),
        ({"finish": "length", "n_generated": 3}, "model_context_window_exceeded", None),
        ({"finish": "cancelled", "n_generated": 3}, "max_tokens", None),
    ],
)
def test_messages_whole_body_and_stop_reasons(fields: dict, reason: str, sequence) -> None:
    d = AnthropicMessages()
    r = reply(d, ASK, [done(0, "Hello", n_cached=1, **fields)])
    assert d.whole(r) == {
        "id": "msg_abc", "type": "message", "role": "assistant", "model": "m",
        "content": [{"type": "text", "text": "Hello"}],
        "stop_reason": reason, "stop_sequence": sequence,
        "usage": {"input_tokens": 1, "output_tokens": fields.get("n_generated", 0),
                  "cache_creation_input_tokens": 0, "cache_read_input_tokens": 1},
    }


def test_messages_stream_event_sequence() -> None:
    d = AnthropicMessages()
    c = done(0, finish="stop", stop_type="eos", n_generated=2)
    r = reply(d, {**ASK, "stream": True}, [c])
    s = d.stream(r)
    data = s.opening() + s.piece(c, Piece("He")) + s.piece(c, Piece("")) + \
        s.finish(c, Piece("llo")) + s.closing()
    ev = named_events(data)
    assert [k for k, _ in ev] == [
        "message_start", "content_block_start", "ping", "content_block_delta",
        "content_block_delta", "content_block_stop", "message_delta", "message_stop"]
    start = ev[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 2 and start["usage"]["output_tokens"] == 0
    assert [e["delta"] for k, e in ev if k == "content_block_delta"] == [
        {"type": "text_delta", "text": "He"}, {"type": "text_delta", "text": "llo"}]
    assert ev[6][1]["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert ev[6][1]["usage"]["output_tokens"] == 2
    err = named_events(s.error_event(ApiError(500, "boom")))
    assert err == [("error", {"type": "error", "error": {"type": "api_error", "message": "boom"}})]


# ---- OpenAI Responses --------------------------------------------------------------------------


def test_responses_input_items_become_chat_turns() -> None:
    g = parse_responses_request({
        "input": [
            {"role": "developer", "content": "rules"},
            {"type": "message", "role": "user",
             "content": [{"type": "input_text", "text": "a"}, {"type": "input_text", "text": "b"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"},
        ],
        "instructions": "Be terse.",
        "max_output_tokens": 5,
        "metadata": {"k": "v"},
        "store": False,
    }, DEFAULTS)
    assert g.messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "system", "content": "rules"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},
    ]
    assert g.max_tokens == 5 and g.dialect_options["metadata"] == {"k": "v"}
    assert parse_responses_request({"input": "hi"}, DEFAULTS).messages == [
        {"role": "user", "content": "hi"}]


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"input": None}, "input"),
        ({"input": []}, "input"),
        ({"input": [{"type": "item_reference", "id": "x"}]}, "input[0].type"),
        ({"previous_response_id": "resp_1"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "function"}]}, "tools[0].name"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"tools": "f"}, "tools"),
        ({"tools": [{"type": "function", "name": "f", "parameters": 3}]}, "tools[0].parameters"),
        ({"tools": [{"type": "function", "name": "f", "strict": "yes"}]}, "tools[0].strict"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"tools": [{"type": "function", "name": "f"}], "tool_choice": "sometimes"},
         "tool_choice"),
        ({"tools": [{"type": "function", "name": "f"}],
          "tool_choice": {"type": "function", "name": "g"}}, "tool_choice.name"),
        ({"tools": [{"type": "function", "name": "f"}], "parallel_tool_calls": 1},
         "parallel_tool_calls"),
        ({"tools": [{"type": "function", "name": "f"}], "text": {"format": {"type": "json_object"}}},
         "text.format"),
        ({"text": {"format": {"type": "json_schema"}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": []}}}, "text.format.schema"),
        ({"text": {"format": {"type": "json_schema", "schema": {}, "strict": 1}}},
         "text.format.strict"),
        ({"text": {"format": {"type": "xml"}}}, "text.format.type"),
        ({"text": "json"}, "text"),
        ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
         "input[0].arguments"),
        ({"max_output_tokens": 0}, "max_output_tokens"),
    ],
)
def test_responses_request_errors_name_the_field(change: dict, param: str) -> None:
    body = {k: v for k, v in {"input": "hi", **change}.items() if v is not None}
    e = error_of(parse_responses_request, body)
    assert (e.status, e.param) == (400, param), e


def test_responses_whole_body() -> None:
    d = OpenAIResponses()
    r = reply(d, {"input": "hi", "instructions": "x", "temperature": 0.3},
              [done(0, "Hi", "stop", n_generated=1, n_cached=1)])
    r.id = "resp_abc"
    body = d.whole(r)
    assert body["status"] == "completed" and body["incomplete_details"] is None
    assert body["output"] == [{
        "id": "msg_abc", "type": "message", "role": "assistant", "status": "completed",
        "content": [{"type": "output_text", "text": "Hi", "annotations": [], "logprobs": []}]}]
    assert body["usage"] == {"input_tokens": 2,
                             "input_tokens_details": {"cached_tokens": 1, "cache_write_tokens": 1},
                             "output_tokens": 1, "output_tokens_details": {"reasoning_tokens": 0},
                             "total_tokens": 3}
    assert (body["instructions"], body["temperature"], body["store"]) == ("x", 0.3, False)
    cut = reply(d, {"input": "hi"}, [done(0, "Hi", "length", n_generated=1)])
    assert d.whole(cut)["incomplete_details"] == {"reason": "max_output_tokens"}


def test_responses_stream_event_sequence_and_numbers() -> None:
    d = OpenAIResponses()
    c = done(0, finish="length", n_generated=2)
    r = reply(d, {"input": "hi", "stream": True}, [c])
    s = d.stream(r)
    data = s.opening() + s.piece(c, Piece("He")) + s.finish(c, Piece("llo")) + s.closing()
    ev = named_events(data)
    assert [k for k, _ in ev] == [
        "response.created", "response.in_progress", "response.output_item.added",
        "response.content_part.added", "response.output_text.delta",
        "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "response.incomplete"]
    assert [e["sequence_number"] for _, e in ev] == list(range(10))
    assert ev[6][1]["text"] == "Hello" and ev[7][1]["part"]["text"] == "Hello"
    assert ev[8][1]["item"]["status"] == "incomplete"
    assert ev[9][1]["response"]["output"][0]["content"][0]["text"] == "Hello"
    err = named_events(s.error_event(ApiError(500, "boom")))
    assert err[0][1] == {"type": "error", "sequence_number": 10, "code": "server_error",
                         "message": "boom", "param": None}
