"""Request validation (bitnetd_trio.api.schema, json_body; the context check of prompts):
pure functions, no server."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from bitnetd_trio.api.dialects.bitnet_generate import GENERATE_SYSTEM_PROMPT, parse_generate
from bitnetd_trio.api.dialects.llamacpp_completion import parse_llama_completion
from bitnetd_trio.api.dialects.openai_chat import parse_chat_completion
from bitnetd_trio.api.dialects.openai_completions import parse_completion
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import check_content_type, parse_json_body
from bitnetd_trio.api.ops_requests import parse_apply_template, parse_detokenize, parse_tokenize
from bitnetd_trio.api.prompts import check_context
from bitnetd_trio.api.schema import GenerationRequest, SchemaDefaults

DEFAULTS = SchemaDefaults(n_vocab=1000, model_ids=frozenset({"bitnet", "alias"}))
USER = [{"role": "user", "content": "hi"}]


def chat(**fields) -> GenerationRequest:
    return parse_chat_completion({"model": "bitnet", "messages": USER, **fields}, DEFAULTS)


def comp(**fields) -> GenerationRequest:
    return parse_completion({"model": "bitnet", "prompt": "hi", **fields}, DEFAULTS)


def error_of(fn, *args) -> ApiError:
    with pytest.raises(ApiError) as info:
        fn(*args)
    return info.value


# ---- the body --------------------------------------------------------------------------------


def test_json_body_ok():
    assert parse_json_body(b'{"a": [1, 2.5, "\xc3\xa9"]}') == {"a": [1, 2.5, "é"]}
    # Escaped surrogate pairs are fine: they make one character.
    assert parse_json_body(b'{"a": "\\ud83d\\ude00"}') == {"a": "\U0001f600"}


@pytest.mark.parametrize(
    "body, fragment",
    [
        (b"", "empty"),
        (b"   \n", "empty"),
        (b"{", "not valid JSON"),
        (b'{"a": 1,}', "not valid JSON"),
        (b"{'a': 1}", "not valid JSON"),
        (b'{"a": NaN}', "NaN is not valid JSON"),
        (b'{"a": Infinity}', "Infinity is not valid JSON"),
        (b'{"a": -Infinity}', "-Infinity is not valid JSON"),
        (b'{"a": "\xff"}', "not valid UTF-8"),
        (b"\xef\xbb\xbf{}", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object, not an array"),
        (b'"text"', "must be a JSON object, not a string"),
        (b"null", "must be a JSON object, not null"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
        (b'{"a": ' + b"9" * 5000 + b"}", "not valid JSON"),
        (b'{"a": "\\ud800"}', "unpaired UTF-16 surrogate"),
        (b'{"a": 1e999}', "out of range"),
        (b'{"a": -1e400}', "out of range"),
        (b'{"\\udfff": 1}', "unpaired UTF-16 surrogate"),
    ],
)
def test_json_body_rejects(body, fragment):
    e = error_of(parse_json_body, body)
    assert e.status == 400 and e.type == "invalid_request_error"
    assert fragment in e.message


@pytest.mark.parametrize(
    "value",
    [None, "", "application/json", "application/json; charset=utf-8", "Application/JSON;charset=UTF8",
     "text/plain", "application/x-www-form-urlencoded", "application/vnd.api+json"],
)
def test_content_type_ok(value):
    check_content_type(value)


@pytest.mark.parametrize(
    "value",
    ["multipart/form-data; boundary=x", "text/html", "application/xml", "image/png",
     "application/json; charset=latin-1"],
)
def test_content_type_rejected(value):
    e = error_of(check_content_type, value)
    assert e.status == 415 and e.type == "invalid_request_error"


# ---- chat ---------------------------------------------------------------------------------------


def test_chat_defaults():
    r = chat()
    assert r.endpoint == "chat" and r.model == "bitnet"
    assert r.messages == USER
    assert r.prompts is None
    assert r.max_tokens is None  # until the context is full
    assert (r.n, r.stream, r.include_usage, r.logprobs, r.top_logprobs) == (1, False, False, False, 0)
    assert r.stop == []
    s = r.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p) == (0.8, 40, 0.95, 0.05)
    assert (s.repeat_penalty, s.presence_penalty, s.frequency_penalty) == (1.0, 0.0, 0.0)
    assert s.seed is None and s.logit_bias == {}


def test_chat_config_defaults_apply():
    d = SchemaDefaults(temperature=0.1, top_k=5, top_p=0.5, min_p=0.0, max_tokens_default=77)
    r = parse_chat_completion({"messages": USER}, d)
    assert (r.sampling.temperature, r.sampling.top_k, r.sampling.top_p, r.sampling.min_p) == (
        0.1, 5, 0.5, 0.0)
    assert r.max_tokens == 77
    assert r.model is None  # model may be omitted (llama.cpp and vLLM accept that)


def test_chat_all_fields():
    r = chat(
        max_completion_tokens=50,
        max_tokens=10,
        temperature=0,
        top_p=1,
        seed=-5,
        stop=["\n\n", "END"],
        frequency_penalty=-2,
        presence_penalty=2.0,
        logit_bias={"5": -100, "999": 100, "7": 0.5},
        logprobs=True,
        top_logprobs=20,
        n=8,
        stream=True,
        stream_options={"include_usage": True},
        response_format={"type": "text"},
        top_k=-1,
        min_p=0.2,
        repetition_penalty=1.3,
        min_tokens=5,
        ignore_eos=True,
        cache_prompt=False,
        user="u-1",
        some_future_field={"x": 1},
        tools=[],
        tool_choice="none",
    )
    assert r.max_tokens == 50  # max_completion_tokens wins over the deprecated alias
    assert r.sampling.temperature == 0.0 and r.sampling.top_p == 1.0
    assert r.sampling.seed == -5
    assert r.stop == ["\n\n", "END"]
    assert (r.sampling.frequency_penalty, r.sampling.presence_penalty) == (-2.0, 2.0)
    assert r.sampling.logit_bias == {5: -100.0, 999: 100.0, 7: 0.5}
    assert (r.logprobs, r.top_logprobs, r.n) == (True, 20, 8)
    assert (r.stream, r.include_usage) == (True, True)
    assert (r.sampling.top_k, r.sampling.min_p, r.sampling.repeat_penalty) == (-1, 0.2, 1.3)
    assert (r.min_tokens, r.ignore_eos, r.cache_prompt, r.user) == (5, True, False, "u-1")


def test_chat_messages_normalized():
    r = parse_chat_completion(
        {
            "messages": [
                {"role": "developer", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
                {"role": "assistant", "content": None, "name": "bot"},
                {"role": "tool", "content": "42", "tool_call_id": "c1"},
                {"role": "user", "content": ""},
            ]
        },
        DEFAULTS,
    )
    assert r.messages == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "a\nb"},
        {"role": "assistant", "content": ""},
        {"role": "tool", "content": "42", "tool_call_id": "c1"},  # kept for templates
        {"role": "user", "content": ""},
    ]


def test_chat_integral_float_accepted():
    assert chat(max_tokens=5.0).max_tokens == 5
    assert chat(seed=2**64 - 1).sampling.seed == 2**64 - 1
    assert chat(seed=-(2**63)).sampling.seed == -(2**63)


def test_chat_null_means_absent():
    r = chat(temperature=None, stop=None, n=None, stream=None, max_tokens=None, seed=None,
             logit_bias=None, stream_options=None, response_format=None, tools=None, user=None)
    assert r.sampling.temperature == 0.8 and r.n == 1 and r.max_tokens is None


# (fields, param, fragment of the message)
CHAT_BAD = [
    ({"messages": None}, "messages", "is required"),
    ({"messages": []}, "messages", "at least one message"),
    ({"messages": "hi"}, "messages", "must be an array"),
    ({"messages": [1]}, "messages[0]", "must be an object"),
    ({"messages": [{"content": "x"}]}, "messages[0].role", "must be one of"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role", "got 'robot'"),
    ({"messages": [{"role": "user"}]}, "messages[0].content", "is required"),
    ({"messages": USER + [{"role": "user", "content": 5}]}, "messages[1].content", "must be a string"),
    ({"messages": USER + [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "messages[1].content", "type 'image_url'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
     "messages[0].content[0].text", "must be a string"),
    ({"messages": [{"role": "user", "content": ["text"]}]}, "messages[0].content[0]", "content part"),
    ({"model": 5}, "model", "must be a string"),
    ({"max_tokens": 0}, "max_tokens", "between 1 and"),
    ({"max_tokens": -1}, "max_tokens", "between 1 and"),
    ({"max_tokens": 1.5}, "max_tokens", "must be an integer, got 1.5"),
    ({"max_tokens": "10"}, "max_tokens", "must be an integer, got a string"),
    ({"max_tokens": True}, "max_tokens", "must be an integer, got true"),
    ({"max_tokens": 10**30}, "max_tokens", "between 1 and"),
    ({"max_tokens": 1e300}, "max_tokens", "between 1 and"),
    ({"max_completion_tokens": 0, "max_tokens": 5}, "max_completion_tokens", "between 1 and"),
    ({"temperature": -0.1}, "temperature", "between 0 and 2"),
    ({"temperature": 2.5}, "temperature", "between 0 and 2"),
    ({"temperature": "hot"}, "temperature", "must be a number"),
    ({"temperature": False}, "temperature", "must be a number, got false"),
    ({"temperature": 1e309}, "temperature", "finite"),
    ({"top_p": 1.01}, "top_p", "between 0 and 1"),
    ({"top_k": -2}, "top_k", "between -1 and"),
    ({"top_k": 1001}, "top_k", "between -1 and 1000"),
    ({"min_p": 2}, "min_p", "between 0 and 1"),
    ({"frequency_penalty": 2.5}, "frequency_penalty", "between -2 and 2"),
    ({"presence_penalty": -3}, "presence_penalty", "between -2 and 2"),
    ({"repeat_penalty": 0}, "repeat_penalty", "greater than 0"),
    ({"repetition_penalty": -1}, "repetition_penalty", "between 0 and 10"),
    ({"seed": 1.5}, "seed", "must be an integer"),
    ({"seed": 2**64}, "seed", "between"),
    ({"seed": "42"}, "seed", "must be an integer"),
    ({"stop": ""}, "stop", "empty string"),
    ({"stop": ["a", ""]}, "stop[1]", "empty string"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"stop": [1]}, "stop[0]", "must be a string"),
    ({"stop": 5}, "stop", "must be a string or an array"),
    ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"-1": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"\u0661": 1}}, "logit_bias", "token ids"),  # an Arabic-Indic digit one
    ({"logit_bias": {"1000": 1}}, "logit_bias", "out of range (0..999)"),
    ({"logit_bias": {"5": 101}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"5": "1"}}, "logit_bias", "must be a number"),
    ({"logit_bias": [[5, 1]]}, "logit_bias", "must be an object"),
    ({"logprobs": 1}, "logprobs", "must be a boolean"),
    ({"logprobs": "true"}, "logprobs", "must be a boolean"),
    ({"top_logprobs": 3}, "top_logprobs", "requires 'logprobs'"),
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs", "between 0 and 20"),
    ({"n": 0}, "n", "between 1 and 8"),
    ({"n": 9}, "n", "between 1 and 8"),
    ({"stream": "yes"}, "stream", "must be a boolean"),
    ({"stream": 1}, "stream", "must be a boolean"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed when 'stream'"),
    ({"stream": True, "stream_options": {"include_usage": 1}}, "stream_options.include_usage",
     "boolean"),
    ({"stream": True, "stream_options": []}, "stream_options", "must be an object"),
    ({"response_format": {"type": "json"}}, "response_format.type", "must be 'text'"),
    ({"response_format": {"type": "json_schema", "json_schema": []}},
     "response_format.json_schema", "must be an object"),
    ({"response_format": {"type": "json_schema", "json_schema": {"schema": 5}}},
     "response_format.json_schema.schema", "JSON schema object"),
    ({"response_format": "json"}, "response_format", "must be an object"),
    ({"tools": [{"type": "function", "function": {"name": "f g"}}]}, "tools[0].function.name",
     "letters, digits"),
    ({"tools": [{"type": "other"}]}, "tools[0].type", "must be 'function'"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "sometimes"},
     "tool_choice", "must be"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}},
     "tool_choice.function.name", "not among the tools"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}],
      "response_format": {"type": "json_object"}}, "response_format", "cannot be combined"),
    ({"tool_choice": "required"}, "tool_choice", "only allowed when 'tools'"),
    ({"parallel_tool_calls": 1}, "parallel_tool_calls", "must be a boolean"),
    ({"functions": [{"name": "f"}]}, "functions", "not supported"),
    ({"function_call": "auto"}, "function_call", "not supported"),
    ({"grammar": 5}, "grammar", "must be a string"),
    ({"grammar": "root ::= \"a\"", "json_schema": {}}, "grammar", "either grammar"),
    ({"min_tokens": 10, "max_tokens": 5}, "min_tokens", "must not exceed"),
    ({"min_tokens": -1}, "min_tokens", "between 0"),
    ({"ignore_eos": "no"}, "ignore_eos", "must be a boolean"),
    ({"user": 1}, "user", "must be a string"),
    ({"repeat_last_n": -2}, "repeat_last_n", "between -1"),
]


@pytest.mark.parametrize("fields, param, fragment", CHAT_BAD, ids=[c[1] + ":" + c[2] for c in CHAT_BAD])
def test_chat_rejects(fields, param, fragment):
    body = {"model": "bitnet", "messages": USER, **fields}
    body = {k: v for k, v in body.items() if not (k == "messages" and v is None)}
    e = error_of(parse_chat_completion, body, DEFAULTS)
    assert (e.status, e.type, e.param) == (400, "invalid_request_error", param)
    assert fragment in e.message, e.message
    assert e.envelope() == {
        "error": {"message": e.message, "type": "invalid_request_error", "param": param, "code": None}
    }


def test_unknown_model_is_served_by_the_one_model_unless_strict():
    # llama.cpp's rule: the response names the served model (model None here)
    assert parse_chat_completion({"model": "gpt-4o", "messages": USER}, DEFAULTS).model is None
    assert parse_chat_completion({"model": "org/name", "messages": USER}, DEFAULTS).model is None
    strict = dataclasses.replace(DEFAULTS, strict_model_name=True)
    e = error_of(parse_chat_completion, {"model": "gpt-4o", "messages": USER}, strict)
    assert (e.status, e.type, e.param, e.code) == (404, "invalid_request_error", "model", "model_not_found")
    # a path is never a model name, strict or not
    for path in ("/srv/m.gguf", "./m.gguf", "../m", "~/m.gguf", "C:\\m.gguf", ".."):
        e = error_of(parse_chat_completion, {"model": path, "messages": USER}, DEFAULTS)
        assert (e.status, e.code) == (404, "model_not_found"), path
    assert chat(model="alias").model == "alias"
    # Without a list of ids (no model loaded yet in a unit test), any name passes.
    assert parse_chat_completion({"model": "anything", "messages": USER}).model == "anything"
    assert chat(model="").model is None


# ---- completions ---------------------------------------------------------------------------------


def test_completion_defaults_and_prompt_shapes():
    r = comp()
    assert r.endpoint == "completions" and r.prompts == ["hi"]
    assert r.max_tokens == 16  # OpenAI's default for completions
    assert (r.logprobs, r.top_logprobs, r.echo) == (False, 0, False)
    assert comp(prompt=["a", "b"]).prompts == ["a", "b"]
    assert comp(prompt=[1, 2, 3]).prompts == [[1, 2, 3]]
    assert comp(prompt=[[1, 2], [3]]).prompts == [[1, 2], [3]]
    assert comp(prompt="").prompts == [""]


def test_completion_scoring_request():
    # lm-evaluation-harness: echo + logprobs + max_tokens 0 on a token-id prompt.
    r = comp(prompt=[[1, 2, 3]], echo=True, logprobs=0, max_tokens=0, temperature=0)
    assert (r.echo, r.logprobs, r.top_logprobs, r.max_tokens) == (True, True, 0, 0)
    r = comp(logprobs=5)
    assert (r.logprobs, r.top_logprobs) == (True, 5)


def test_completion_accepts_lm_eval_stop_lists():
    # local-completions sends the task's `until` plus the EOS text, not cut to 4.
    stops = ["Question:", "</s>", "<|im_end|>", "\n\n", "<|end_of_text|>"]
    assert comp(stop=stops).stop == stops
    assert error_of(parse_completion, {"prompt": "x", "stop": ["a"] * 17}, DEFAULTS).param == "stop"


def test_completion_misc():
    r = comp(best_of=2, n=2, suffix="", stream=True, stream_options={"include_usage": False})
    assert (r.n, r.stream, r.include_usage) == (2, True, False)
    assert comp(best_of=1, n=3).n == 3


COMPLETION_BAD = [
    ({"prompt": None}, "prompt", "is required"),
    ({"prompt": []}, "prompt", "empty array"),
    ({"prompt": 5}, "prompt", "must be a string"),
    ({"prompt": {"text": "a"}}, "prompt", "must be a string"),
    ({"prompt": ["a", 1]}, "prompt", "not a mixture"),
    ({"prompt": [1, True]}, "prompt", "not a mixture"),
    ({"prompt": [1, 1000]}, "prompt", "out of range (0..999)"),
    ({"prompt": [-1]}, "prompt", "out of range"),
    ({"prompt": [1.5]}, "prompt", "not a mixture"),
    ({"prompt": [[1], []]}, "prompt[1]", "empty array"),
    ({"prompt": [[1], [5000]]}, "prompt[1]", "out of range"),
    ({"prompt": [[1], ["a"]]}, "prompt[1]", "must be a token id"),
    ({"suffix": "tail"}, "suffix", "not supported"),
    ({"logprobs": 6}, "logprobs", "between 0 and 5"),
    ({"logprobs": True}, "logprobs", "must be an integer, got true"),
    ({"logprobs": -1}, "logprobs", "between 0 and 5"),
    ({"max_tokens": -1}, "max_tokens", "between 0 and"),
    ({"echo": "true"}, "echo", "must be a boolean"),
    ({"best_of": 3, "n": 2}, "best_of", "not supported"),
    ({"best_of": 0}, "best_of", "between 1"),
    ({"prompt": ["x"] * 40, "n": 8}, "prompt", "exceed the limit"),
    ({"stream_options": {"include_usage": True}}, "stream_options", "only allowed"),
    ({"model": "/nope.gguf"}, "model", "does not exist"),
]


@pytest.mark.parametrize(
    "fields, param, fragment", COMPLETION_BAD, ids=[c[1] + ":" + c[2] for c in COMPLETION_BAD]
)
def test_completion_rejects(fields, param, fragment):
    body = {"model": "bitnet", "prompt": "hi", **fields}
    if fields.get("prompt", 0) is None:
        del body["prompt"]
    e = error_of(parse_completion, body, DEFAULTS)
    assert e.param == param and fragment in e.message, (e.param, e.message)
    assert e.status == (404 if param == "model" else 400)


# ---- compatibility endpoints ----------------------------------------------------------------------


def test_generate_defaults():
    r = parse_generate({"prompt": "What is 2+2?"}, DEFAULTS)
    assert r.endpoint == "generate"
    assert r.messages == [
        {"role": "system", "content": GENERATE_SYSTEM_PROMPT},
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert r.max_tokens == 256
    assert (r.sampling.temperature, r.sampling.top_p) == (0.7, 0.9)
    assert GENERATE_SYSTEM_PROMPT.startswith("You are a helpful, harmless, and honest AI assistant.")


def test_generate_fields():
    r = parse_generate(
        {"prompt": "p", "system_prompt": "", "max_tokens": 5, "temperature": 0,
         "top_p": 0.5, "context_size": 2048, "threads": 2},
        DEFAULTS,
    )
    assert r.messages == [{"role": "user", "content": "p"}]  # an empty system prompt: no turn
    assert (r.max_tokens, r.sampling.temperature, r.sampling.top_p) == (5, 0.0, 0.5)
    assert (r.context_size, r.threads) == (2048, 2)
    raw = parse_generate({"prompt": "Once upon", "conversation_mode": False}, DEFAULTS)
    assert raw.messages is None and raw.prompts == ["Once upon"]


@pytest.mark.parametrize(
    "fields, param",
    [({}, "prompt"), ({"prompt": 1}, "prompt"), ({"prompt": "p", "system_prompt": 1}, "system_prompt"),
     ({"prompt": "p", "max_tokens": 0}, "max_tokens"), ({"prompt": "p", "temperature": 3}, "temperature"),
     ({"prompt": "p", "conversation_mode": "yes"}, "conversation_mode"),
     ({"prompt": "p", "context_size": -1}, "context_size"), ({"prompt": "p", "threads": 0}, "threads")],
)
def test_generate_rejects(fields, param):
    assert error_of(parse_generate, fields, DEFAULTS).param == param


def test_llama_completion():
    r = parse_llama_completion({"prompt": "Hello"}, DEFAULTS)
    assert r.endpoint == "completion" and r.prompts == ["Hello"]
    assert r.max_tokens is None  # n_predict -1: until the context is full
    assert r.sampling.seed is None and not r.stream
    r = parse_llama_completion(
        {"prompt": [1, 2], "n_predict": 8, "temperature": 0.5, "top_k": 0, "top_p": 1, "min_p": 0,
         "repeat_penalty": 1.1, "repeat_last_n": -1, "presence_penalty": 0.5,
         "frequency_penalty": 0.1, "seed": 7, "stop": ["\n"] * 10, "stream": True, "n_probs": 3,
         "ignore_eos": True, "cache_prompt": False, "logit_bias": [[1, -2], [2, False]]},
        DEFAULTS,
    )
    assert r.prompts == [[1, 2]] and r.max_tokens == 8
    s = r.sampling
    assert (s.temperature, s.top_k, s.top_p, s.min_p, s.repeat_penalty, s.repeat_last_n) == (
        0.5, 0, 1.0, 0.0, 1.1, -1)
    assert (s.presence_penalty, s.frequency_penalty, s.seed) == (0.5, 0.1, 7)
    assert s.logit_bias == {1: -2.0, 2: -math.inf}
    assert (r.stream, r.logprobs, r.top_logprobs, r.ignore_eos, r.cache_prompt) == (
        True, True, 3, True, False)
    assert len(r.stop) == 10
    assert parse_llama_completion({"prompt": "x", "logit_bias": {"5": 1}}, DEFAULTS).sampling.logit_bias == {5: 1.0}
    assert parse_llama_completion({"prompt": "x", "seed": -1}, DEFAULTS).sampling.seed is None
    assert parse_llama_completion({"prompt": "x", "max_tokens": 4}, DEFAULTS).max_tokens == 4
    assert parse_llama_completion({"prompt": "x", "n_predict": 0}, DEFAULTS).max_tokens == 0


@pytest.mark.parametrize(
    "fields, param",
    [({}, "prompt"), ({"prompt": []}, "prompt"), ({"prompt": [[1]]}, "prompt"),
     ({"prompt": [1, 5000]}, "prompt"), ({"prompt": "x", "n_predict": -2}, "n_predict"),
     ({"prompt": "x", "n_probs": 21}, "n_probs"), ({"prompt": "x", "logit_bias": [[1]]}, "logit_bias[0]"),
     ({"prompt": "x", "logit_bias": [[5000, 1]]}, "logit_bias"),
     ({"prompt": "x", "logit_bias": [[1, "a"]]}, "logit_bias"),
     ({"prompt": "x", "logit_bias": 3}, "logit_bias"), ({"prompt": "x", "stream": "true"}, "stream"),
     ({"prompt": "x", "stop": ["a"] * 17}, "stop")],
)
def test_llama_completion_rejects(fields, param):
    assert error_of(parse_llama_completion, fields, DEFAULTS).param == param


def test_tokenize_detokenize_apply_template():
    t = parse_tokenize({"content": "hello", "add_special": True, "with_pieces": True})
    assert (t.content, t.add_special, t.with_pieces, t.parse_special) == ("hello", True, True, True)
    assert parse_tokenize({"content": ""}).add_special is False
    assert error_of(parse_tokenize, {}).param == "content"
    assert error_of(parse_tokenize, {"content": "x", "add_special": 1}).param == "add_special"
    assert parse_detokenize({"tokens": [1, 2, 3]}, 1000).tokens == [1, 2, 3]
    assert parse_detokenize({"tokens": []}).tokens == []
    assert error_of(parse_detokenize, {"tokens": [1, 1000]}, 1000).param == "tokens[1]"
    assert error_of(parse_detokenize, {"tokens": "1 2"}).param == "tokens"
    assert error_of(parse_detokenize, {}).param == "tokens"
    a = parse_apply_template({"messages": [{"role": "developer", "content": "x"}]})
    assert a.messages == [{"role": "system", "content": "x"}] and a.add_generation_prompt
    assert error_of(parse_apply_template, {"messages": []}).param == "messages"


# ---- context ------------------------------------------------------------------------------------


def test_check_context():
    assert check_context(100, None, 256) is None
    assert check_context(255, None, 256) is None  # room for one token
    assert check_context(256, 0, 256) is None  # scoring needs no room
    e = check_context(256, None, 256, param="prompt")
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "prompt")
    assert "maximum context length is 256 tokens" in e.message
    assert check_context(300, 0, 256).code == "context_length_exceeded"
    # max_tokens beyond the context: lenient (llama.cpp) unless strict (OpenAI).
    assert check_context(200, 100, 256) is None
    e = check_context(200, 100, 256, strict=True)
    assert e.code == "context_length_exceeded" and "300 tokens" in e.message
    assert check_context(200, 56, 256, strict=True) is None


def test_defaults_from_config():
    from bitnetd_trio.config import load_config

    c = load_config(None, {"BITNETD_MODEL_TEMPERATURE": "0.3", "BITNETD_MODEL_MAX_TOKENS": "99"})
    d = SchemaDefaults.from_config(c, n_vocab=512, model_ids=["m"])
    assert (d.temperature, d.max_tokens_default, d.n_vocab, d.model_ids) == (0.3, 99, 512, frozenset({"m"}))


def test_error_envelopes():
    e = ApiError(401, "no key")
    assert (e.type, e.param, e.code) == ("authentication_error", None, None)
    assert ApiError(429, "slow down").type == "rate_limit_error"
    assert ApiError(500, "bug").type == "server_error"
    assert ApiError(503, "busy").type == "service_unavailable_error"
    assert ApiError(413, "big").type == "invalid_request_error"
    assert ApiError(422, "bad").type == "invalid_request_error"
    assert ApiError.route_not_found("GET", "/x").type == "not_found_error"
    assert ApiError.unavailable("busy", retry_after=3).headers == {"retry-after": "3"}
    m = ApiError.method_not_allowed("PUT", "/v1/models", ["GET"])
    assert (m.status, m.headers["allow"]) == (405, "GET")
    e = ApiError.model_not_found("x" * 5000)
    assert (e.status, e.param, e.code) == (404, "model", "model_not_found")
    assert len(e.message) < 300  # client text is clipped before it reaches messages and logs
    assert json.loads(e.body()) == e.envelope()
