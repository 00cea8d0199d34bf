"""Anthropic's Messages API and OpenAI's Responses API against a live server, through the
official `anthropic` and `openai` SDKs (http-api §4, §5), the token-counting endpoints, the
model-name rule (http-api §1.3), and hostile inputs on every new endpoint: a 4xx in that API's
own error shape, never a 5xx."""

from __future__ import annotations

import json

import anthropic
import httpx
import openai
import pytest
from conftest import RunningServer, running_server, server_config
from openai.types.responses import Response

USER = [{"role": "user", "content": "Say something."}]


def claude(server: RunningServer, key: str = "unused") -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(base_url=server.url, api_key=key, max_retries=0, timeout=60)


def oai(server: RunningServer, key: str = "unused") -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=60)


def served_id(server: RunningServer) -> str:
    return server.app.model_id  # type: ignore[attr-defined]


def eos_id(server: RunningServer) -> int:
    return server.app.engine.tokenizer.eos_id  # type: ignore[attr-defined]


# ---- Anthropic Messages ------------------------------------------------------------------------


async def test_anthropic_sdk_create_stream_and_count_tokens(server: RunningServer) -> None:
    c = claude(server)
    # A model name the server does not know is served by its one model (llama.cpp's rule).
    msg = await c.messages.create(
        model="local-claude",
        max_tokens=6,
        system=[{"type": "text", "text": "You are terse."}],
        messages=USER,
        stop_sequences=["\n\n\n"],
        metadata={"user_id": "u-1"},
        extra_body={"temperature": 0, "top_k": 5, "ignore_eos": True},
        extra_headers={"anthropic-version": "2023-06-01"},
    )
    assert msg.type == "message" and msg.role == "assistant"
    assert msg.model == served_id(server)
    assert msg.stop_reason == "max_tokens" and msg.stop_sequence is None
    assert msg.usage.output_tokens == 6
    assert [b.type for b in msg.content] == ["text"]

    counted = await c.messages.count_tokens(
        model="local-claude", system=[{"type": "text", "text": "You are terse."}],
        messages=USER,
    )
    # The whole prompt: fresh tokens plus those read from the cache.
    assert counted.input_tokens == msg.usage.input_tokens + msg.usage.cache_read_input_tokens

    # Greedy: the stream says what the whole answer said, in Anthropic's event order.
    kinds, texts = [], []
    async with c.messages.stream(
        model=served_id(server), max_tokens=6, system="You are terse.", messages=USER,
        extra_body={"temperature": 0, "top_k": 5, "ignore_eos": True},
    ) as stream:
        async for event in stream:
            kinds.append(event.type)
            if event.type == "content_block_delta":
                texts.append(event.delta.text)
        final = await stream.get_final_message()
    assert "".join(texts) == msg.content[0].text == final.content[0].text
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 6
    assert kinds[0] == "message_start" and kinds[1] == "content_block_start"
    assert kinds[-3:] == ["content_block_stop", "message_delta", "message_stop"]


async def test_anthropic_conversation_with_tool_blocks_and_end_turn(server: RunningServer) -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
        {"role": "assistant", "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Paris"}},
        ]},
        {"role": "user", "content": [
            {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
            {"type": "text", "text": "Thanks."},
        ]},
    ]
    msg = await claude(server).messages.create(
        model=served_id(server), max_tokens=5, messages=messages, extra_body={"temperature": 0}
    )
    assert msg.stop_reason in ("end_turn", "max_tokens")
    # the tool turns are part of the prompt: it is longer than the text alone would make
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        plain = [{"role": "user", "content": "Weather in Paris?"}]
        r = await h.post("/v1/messages/count_tokens", json={"model": "x", "messages": plain})
        assert r.status_code == 200, r.text
    total = msg.usage.input_tokens + msg.usage.cache_read_input_tokens
    assert total > r.json()["input_tokens"]


async def test_anthropic_errors_raise_the_sdk_classes(server_model_path) -> None:
    config = server_config(server_model_path, server_api_keys=["sekrit"])
    async with running_server(config) as srv:
        good = claude(srv, "sekrit")  # the SDK sends the key as x-api-key
        with pytest.raises(anthropic.AuthenticationError) as auth:
            await claude(srv, "wrong").messages.create(model="m", max_tokens=4, messages=USER)
        assert auth.value.type == "authentication_error"
        with pytest.raises(anthropic.BadRequestError) as bad:
            await good.messages.create(model="m", max_tokens=0, messages=USER)
        assert bad.value.type == "invalid_request_error" and "max_tokens" in bad.value.message
        with pytest.raises(anthropic.BadRequestError) as tools:
            await good.messages.create(
                model="m", max_tokens=4, messages=USER,
                tools=[{"name": "f", "input_schema": {"type": "object"}}],
                tool_choice={"type": "tool", "name": "g"},
            )
        assert "not among the tools" in tools.value.message
        with pytest.raises(anthropic.NotFoundError) as path:
            await good.messages.create(model="/etc/passwd", max_tokens=4, messages=USER)
        assert path.value.type == "not_found_error"
        with pytest.raises(anthropic.BadRequestError):
            await good.messages.count_tokens(model="m", messages=[])
        async with httpx.AsyncClient(base_url=srv.url, timeout=60) as h:
            r = await h.post("/v1/messages", json={"model": "m", "max_tokens": 2,
                                                   "messages": USER},
                             headers={"authorization": "Bearer sekrit"})
            assert r.status_code == 200


# ---- OpenAI Responses --------------------------------------------------------------------------


async def test_openai_sdk_responses_whole_and_streamed(server: RunningServer) -> None:
    c = oai(server)
    whole = await c.responses.create(
        model="gpt-4o-mini", input="Say something.", instructions="You are terse.",
        max_output_tokens=6, temperature=0, store=False, extra_body={"ignore_eos": True},
    )
    assert whole.status == "incomplete" and whole.incomplete_details.reason == "max_output_tokens"
    assert whole.model == served_id(server)
    assert whole.usage.output_tokens == 6 and whole.usage.total_tokens > 6
    text = whole.output_text

    kinds, deltas, numbers = [], [], []
    stream = await c.responses.create(
        model=served_id(server), instructions="You are terse.",
        input=[{"role": "user", "content": [{"type": "input_text", "text": "Say something."}]}],
        max_output_tokens=6, temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    async for event in stream:
        kinds.append(event.type)
        numbers.append(event.sequence_number)
        if event.type == "response.output_text.delta":
            deltas.append(event.delta)
        if event.type == "response.incomplete":
            assert event.response.output_text == text
    assert "".join(deltas) == text
    assert numbers == list(range(len(numbers)))
    assert kinds[:4] == ["response.created", "response.in_progress",
                         "response.output_item.added", "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done",
                          "response.output_item.done", "response.incomplete"]

    # The end-of-text token forced: a natural end, status completed.
    done = await c.responses.create(
        model=served_id(server), input="Hi", stream=True,
        extra_body={"logit_bias": {str(eos_id(server)): 100}},
    )
    last = [e async for e in done][-1]
    assert last.type == "response.completed" and last.response.status == "completed"

    counted = await c.responses.input_tokens.count(
        model="m", input="Say something.", instructions="You are terse."
    )
    assert counted.input_tokens == whole.usage.input_tokens

    # The whole body passes the SDK's model strictly (every required field, usage details
    # included), not only its lenient parsing.
    raw = await c.responses.with_raw_response.create(model="m", input="Hi", max_output_tokens=3)
    body = Response.model_validate(json.loads(raw.http_response.content), strict=True)
    details = body.usage.input_tokens_details
    assert details.cache_write_tokens + details.cached_tokens == body.usage.input_tokens


async def test_openai_sdk_responses_refusals(server: RunningServer) -> None:
    c = oai(server)
    cases = [
        ({"previous_response_id": "resp_123"}, "previous_response_id"),
        ({"store": True}, "store"),
        ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
        ({"text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format.schema"),
    ]
    for extra, param in cases:
        with pytest.raises(openai.BadRequestError) as bad:
            await c.responses.create(model="m", input="hi", max_output_tokens=2, **extra)
        assert bad.value.param == param, bad.value


async def test_chat_input_tokens_counts_the_chat_prompt(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        r = await h.post("/v1/chat/completions/input_tokens", json={"messages": USER})
        assert r.status_code == 200
        n = r.json()["input_tokens"]
        chat = await h.post("/v1/chat/completions",
                            json={"messages": USER, "max_tokens": 1})
        assert chat.json()["usage"]["prompt_tokens"] == n


# ---- model names (http-api §1.3) ---------------------------------------------------------------


async def test_unknown_model_names_are_served_unless_strict(server_model_path) -> None:
    body = {"prompt": "a", "max_tokens": 1}
    for strict in (False, True):
        config = server_config(server_model_path, model_strict_model_name=strict)
        async with running_server(config) as srv, httpx.AsyncClient(base_url=srv.url) as h:
            r = await h.post("/v1/completions", json={**body, "model": "gpt-3.5-turbo"})
            if strict:
                assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
            else:
                assert r.status_code == 200 and r.json()["model"] == "server.gguf"
            # a path is never a model name, strict or not
            for name in (str(server_model_path), "./server.gguf", "~/m.gguf", "C:\\m.gguf"):
                r = await h.post("/v1/completions", json={**body, "model": name})
                assert r.status_code == 404, name


# ---- hostile inputs ----------------------------------------------------------------------------

HUGE = 10**30
MESSAGES_CASES = [
    {"model": "m", "messages": USER},  # max_tokens missing
    {"max_tokens": 4, "messages": USER},  # model missing
    {"model": "m", "max_tokens": 4},  # messages missing
    {"model": "m", "max_tokens": "4", "messages": USER},
    {"model": "m", "max_tokens": HUGE, "messages": USER},
    {"model": "m", "max_tokens": 4.5, "messages": USER},
    {"model": 7, "max_tokens": 4, "messages": USER},
    {"model": "m", "max_tokens": 4, "messages": "hi"},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "system", "content": "x"}]},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": 5}]},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [{"type": "image"}]}]},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": [7]}]},
    {"model": "m", "max_tokens": 4, "messages": [{"role": "user", "content": "a"},
                                                  {"role": "assistant", "content": "b"}]},
    {"model": "m", "max_tokens": 4, "messages": USER, "system": 5},
    {"model": "m", "max_tokens": 4, "messages": USER, "system": [{"type": "text"}]},
    {"model": "m", "max_tokens": 4, "messages": USER, "stop_sequences": "x"},
    {"model": "m", "max_tokens": 4, "messages": USER, "stop_sequences": [""]},
    {"model": "m", "max_tokens": 4, "messages": USER, "stop_sequences": ["x" * 5000]},
    {"model": "m", "max_tokens": 4, "messages": USER, "temperature": 1.5},
    {"model": "m", "max_tokens": 4, "messages": USER, "temperature": "hot"},
    {"model": "m", "max_tokens": 4, "messages": USER, "top_p": 2},
    {"model": "m", "max_tokens": 4, "messages": USER, "top_k": HUGE},
    {"model": "m", "max_tokens": 4, "messages": USER, "metadata": [1]},
    {"model": "m", "max_tokens": 4, "messages": USER, "stream": "yes"},
    {"model": "m", "max_tokens": 4, "messages": USER, "tool_choice": {"type": "any"}},
    {"model": "m", "max_tokens": 4, "messages": USER, "tool_choice": "auto"},
    {"model": "m", "max_tokens": 4, "messages": USER, "tools": "f"},
    {"model": "m", "max_tokens": 4, "messages": USER, "tools": [5]},
    {"model": "m", "max_tokens": 4, "messages": USER, "tools": [{"name": "f"}]},
    {"model": "m", "max_tokens": 4, "messages": USER,
     "tools": [{"name": "f", "input_schema": {"type": "object"}}] * 200},
    {"model": "m", "max_tokens": 4, "messages": USER,
     "tools": [{"name": "f", "input_schema": {"type": "object", "description": "x" * 100000}}]},
    # refused when compiled (so not by count_tokens, which compiles nothing: max_tokens 5)
    {"model": "m", "max_tokens": 5, "messages": USER,
     "tools": [{"name": "f", "input_schema": {"type": "nonsense"}}],
     "tool_choice": {"type": "any"}},
    {"model": "m", "max_tokens": 4, "messages": USER,
     "tools": [{"name": "f", "input_schema": {}}], "tool_choice": {"type": "tool", "name": 5}},
    {"model": "m", "max_tokens": 4, "messages": USER,
     "tools": [{"name": "f", "input_schema": {}, "description": 3}]},
    {"model": "m", "max_tokens": 4, "messages": USER,
     "tools": [{"type": "bash_20250124", "name": "bash"}]},
    {"model": "m", "max_tokens": 4, "messages": [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t", "name": "f",
                                           "input": "{}"}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": 5}]}]},
]
RESPONSES_CASES = [
    {},  # input missing
    {"input": 5},
    {"input": []},
    {"input": [{"role": "robot", "content": "x"}]},
    {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
    {"input": [{"type": "reasoning", "summary": []}]},
    {"input": [{"type": "function_call_output", "output": "x"}]},  # call_id missing
    {"input": "hi", "max_output_tokens": 0},
    {"input": "hi", "max_output_tokens": HUGE},
    {"input": "hi", "max_output_tokens": True},
    {"input": "hi", "temperature": 3},
    {"input": "hi", "instructions": ["x"]},
    {"input": "hi", "text": "json"},
    {"input": "hi", "text": {"format": {"type": "json_schema", "schema": "x"}}},
    {"input": "hi", "text": {"format": {"type": "json_schema", "name": 5, "schema": {}}}},
    {"input": "hi", "max_output_tokens": 4,  # refused when compiled: not by input_tokens
     "text": {"format": {"type": "json_schema", "schema": {"type": "nope"}}}},
    {"input": "hi", "text": {"format": {"type": "grammar"}}},
    {"input": "hi", "max_output_tokens": 4,
     "tools": [{"type": "function", "name": "f", "parameters": {"type": "x"}}],
     "tool_choice": "required"},
    {"input": "hi", "tools": [{"type": "function", "name": "f" * 65}]},
    {"input": "hi", "tools": [{"type": "file_search"}]},
    {"input": "hi", "tools": [{"type": "function", "name": "f"}],
     "tool_choice": {"type": "allowed_tools", "tools": []}},
    {"input": "hi", "tools": [{"type": "function", "name": "f"}],
     "text": {"format": {"type": "json_object"}}},
    {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}]},
    {"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "{"}]},
    {"input": [{"type": "function_call_output", "call_id": "c", "output": 5}]},
    {"input": "hi", "metadata": {"k": 1}},
    {"input": "hi", "conversation": "conv_1"},
    {"input": "hi", "background": True},
    {"input": "hi", "tool_choice": "required"},
    {"input": "hi", "stream": 1},
]


async def test_hostile_inputs_get_4xx_in_each_apis_own_shape(server: RunningServer) -> None:
    def anthropic_shaped(r: httpx.Response) -> bool:
        body = r.json()
        return body["type"] == "error" and set(body["error"]) == {"type", "message"}

    def openai_shaped(r: httpx.Response) -> bool:
        return set(r.json()["error"]) == {"message", "type", "param", "code"}

    routes = [
        ("/v1/messages", MESSAGES_CASES, anthropic_shaped),
        ("/v1/messages/count_tokens",
         [c for c in MESSAGES_CASES if c.get("max_tokens") == 4],
         anthropic_shaped),
        ("/v1/responses", RESPONSES_CASES, openai_shaped),
        ("/v1/responses/input_tokens",
         [c for c in RESPONSES_CASES if "max_output_tokens" not in c and "stream" not in c],
         openai_shaped),
        ("/v1/chat/completions/input_tokens",
         [{}, {"messages": "x"}, {"messages": [{"role": "user", "content": 1}]}], openai_shaped),
    ]
    raw_bodies = [b"\xff\xfe{not utf-8", b"", b"[1, 2]", b'{"model": NaN}', b"{" * 100000]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        for path, cases, shaped in routes:
            for case in cases:
                r = await h.post(path, json=case)
                assert 400 <= r.status_code < 500, (path, case, r.status_code, r.text)
                assert shaped(r), (path, case, r.text)
            for raw in raw_bodies:
                r = await h.post(path, content=raw, headers={"content-type": "application/json"})
                assert 400 <= r.status_code < 500, (path, raw[:20], r.text)
                assert shaped(r), (path, raw[:20], r.text)
            r = await h.post(path, content=b"x" * (2 << 20))
            assert r.status_code == 413 and shaped(r), (path, r.text)
            r = await h.post(path, json={}, headers={"content-type": "image/png"})
            assert r.status_code == 415 and shaped(r), (path, r.text)
        # the server still serves
        r = await h.post("/v1/messages", json={"model": "m", "max_tokens": 2, "messages": USER})
        assert r.status_code == 200


# ---- llama.cpp /completion extras (http-api §3.2) ----------------------------------------------


async def test_llamacpp_text_logit_bias_mixed_prompts_and_cache_n(server: RunningServer) -> None:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as h:
        r = await h.post("/tokenize", json={"content": "hello world", "with_pieces": True})
        first = r.json()["tokens"][0]
        piece = first["piece"]
        assert isinstance(piece, str)
        # a text key biases that text's tokens: +100 makes greedy decoding repeat it
        for bias in ([[piece, 100]], {piece: 100}):
            r = await h.post("/completion", json={"prompt": "x", "n_predict": 3, "temperature": 0,
                                                  "logit_bias": bias, "cache_prompt": False})
            assert r.status_code == 200, r.text
            assert r.json()["content"] == piece * 3
        ids = (await h.post("/tokenize", json={"content": "abc"})).json()["tokens"]
        text_ids = (await h.post("/tokenize", json={"content": " tail"})).json()["tokens"]
        body = {"prompt": [*ids, " tail"], "n_predict": 1}
        r = await h.post("/completion", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["tokens_evaluated"] == len(ids) + len(text_ids)
        again = (await h.post("/completion", json=body)).json()
        assert again["timings"]["cache_n"] > 0
        assert again["timings"]["cache_n"] + again["timings"]["prompt_n"] == len(ids) + len(text_ids)
        r = await h.post("/completion", json={"prompt": [1, True], "n_predict": 1})
        assert r.status_code == 400
