"""Hostile inputs against the live server: every case gets the right 4xx with the OpenAI error
envelope (and `param` where one field is to blame), and the server keeps serving afterwards.

One real hypercorn server (Trio, 127.0.0.1 port 0) serves the whole table: it runs in its own
thread with its own Trio loop, so the model is loaded once and each case is its own test.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import trio
from conftest import running_server, server_config

MAX_BODY = 64 * 1024  # [server] max_body_size of the test server
N_CTX = 256  # [model] ctx_size of the test server
ALIAS = "hostile-alias"
LONG_TEXT = "hello world, " * 1500  # far beyond the 256-token context


class ServerThread:
    """conftest's `running_server` on a Trio loop of its own in a background thread, so one
    server (one model load) serves every case of the module."""

    def __init__(self, config: Any) -> None:
        self.config = config
        self.url: str | None = None
        self.error: BaseException | None = None
        self._ready = threading.Event()
        self._token: trio.lowlevel.TrioToken | None = None
        self._shutdown: trio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="hostile-server", daemon=True)

    def start(self, timeout: float = 120.0) -> None:
        self._thread.start()
        if not self._ready.wait(timeout):
            raise RuntimeError("the test server did not start")
        if self.error is not None or self.url is None:
            raise RuntimeError(f"the test server failed to start: {self.error!r}")

    def stop(self) -> None:
        if self._token is not None and self._shutdown is not None:
            try:
                self._token.run_sync_soon(self._shutdown.set)
            except trio.RunFinishedError:
                pass
        self._thread.join(60)

    def _run(self) -> None:
        try:
            trio.run(self._main)
        except BaseException as exc:  # reported by start()
            self.error = exc
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._token = trio.lowlevel.current_trio_token()
        self._shutdown = trio.Event()
        async with running_server(self.config) as s:
            self.url = s.url
            self._ready.set()
            await self._shutdown.wait()


def start_server(model_path, **changes: object) -> ServerThread:
    """A server for the test model; `changes` as conftest's server_config takes them."""
    settings: dict[str, object] = {
        "model_alias": ALIAS,
        "model_ctx_size": N_CTX,
        "model_threads": 1,
        "model_parallel": 2,
        "server_max_body_size": MAX_BODY,
        **changes,
    }
    srv = ServerThread(server_config(model_path, **settings))
    srv.start()
    return srv


@pytest.fixture(scope="module")
def table_server(server_model_path):
    srv = start_server(server_model_path)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(table_server):
    with httpx.Client(base_url=table_server.url, timeout=60) as c:
        yield c


# ---- the table ------------------------------------------------------------------------------


@dataclass
class Case:
    id: str
    path: str
    body: Any = None  # dict/list -> JSON; bytes -> as is; callable -> chunked; None -> none
    status: int = 400
    param: str | None = None
    type: str = "invalid_request_error"
    code: str | None = None
    method: str = "POST"
    headers: dict[str, str] = field(default_factory=dict)


CHAT = "/v1/chat/completions"
COMP = "/v1/completions"
USER = [{"role": "user", "content": "hi"}]


def chat(pid: str, param: str | None, status: int = 400, code: str | None = None, **fields) -> Case:
    body = {"model": ALIAS, "messages": USER, "max_tokens": 2, **fields}
    return Case(pid, CHAT, {k: v for k, v in body.items() if v is not _DROP}, status, param,
                code=code)


def comp(pid: str, param: str | None, status: int = 400, code: str | None = None, **fields) -> Case:
    body = {"model": ALIAS, "prompt": "hi", "max_tokens": 2, **fields}
    return Case(pid, COMP, {k: v for k, v in body.items() if v is not _DROP}, status, param,
                code=code)


_DROP = object()  # leave the field out of the body
_VALID_CHAT = json.dumps({"messages": USER, "max_tokens": 2}).encode()

CASES: list[Case] = [
    # -- routing --
    Case("unknown-route", "/nope", method="GET", status=404, type="not_found_error"),
    Case("unknown-v1-route", "/v1/chat", {"messages": USER}, status=404, type="not_found_error"),
    Case("embeddings-empty-input", "/v1/embeddings", {"input": ""}, status=400, param="input",
         type="invalid_request_error"),
    Case("dotdot-route", "/%2e%2e/etc/passwd", method="GET", status=404, type="not_found_error"),
    Case("get-on-chat", CHAT, method="GET", status=405),
    Case("put-on-completions", COMP, {"prompt": "x"}, method="PUT", status=405),
    Case("delete-models", "/v1/models", method="DELETE", status=405),
    Case("post-health", "/health", {}, status=405),
    Case("get-tokenize", "/tokenize", method="GET", status=405),
    Case("options-preflight", CHAT, method="OPTIONS", status=405),
    Case("non-ascii-route", "/v1/m\u00f6dels", method="GET", status=404, type="not_found_error"),
    Case("unknown-model-by-id", "/v1/models/no-such-model", method="GET", status=404,
         param="model", code="model_not_found"),
    # -- the body --
    Case("empty-body", CHAT, b""),
    Case("whitespace-body", CHAT, b"  \r\n "),
    Case("truncated-json", CHAT, b'{"messages": [{"role": "user"'),
    Case("trailing-comma", CHAT, b'{"messages": [], }'),
    Case("single-quotes", CHAT, b"{'messages': []}"),
    Case("json-array", CHAT, b"[1, 2, 3]"),
    Case("json-string", CHAT, b'"hello"'),
    Case("json-null", CHAT, b"null"),
    Case("nan-literal", CHAT, b'{"messages": [{"role": "user", "content": "x"}], "temperature": NaN}'),
    Case("infinity-literal", CHAT, b'{"messages": [], "top_p": Infinity}'),
    Case("overflowing-number", CHAT, b'{"messages": [], "temperature": 1e999}'),
    Case("huge-integer-literal", CHAT, b'{"max_tokens": ' + b"9" * 5000 + b"}"),
    Case("invalid-utf8", CHAT, b'{"messages": [{"role": "user", "content": "\xc3\x28"}]}'),
    Case("latin1-bytes", CHAT, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'),
    Case("lone-surrogate", CHAT, b'{"messages": [{"role": "user", "content": "\\ud800"}]}'),
    Case("utf8-bom", CHAT, b"\xef\xbb\xbf" + _VALID_CHAT),
    Case("deep-nesting", CHAT, b"[" * 30000 + b"]" * 30000),
    Case("body-too-large", CHAT, {"messages": [{"role": "user", "content": "x" * (MAX_BODY + 10)}]},
         status=413),
    Case("garbage-too-large", COMP, b"\x00" * (MAX_BODY * 2), status=413),
    # No Content-Length: the server counts the chunks as they come.
    Case("chunked-body-too-large", CHAT, lambda: (b"x" * 8192 for _ in range(MAX_BODY // 8192 + 2)),
         status=413),
    Case("multipart-content-type", CHAT, _VALID_CHAT, status=415,
         headers={"content-type": "multipart/form-data; boundary=xyz"}),
    Case("html-content-type", CHAT, _VALID_CHAT, status=415, headers={"content-type": "text/html"}),
    Case("latin1-charset", CHAT, _VALID_CHAT, status=415,
         headers={"content-type": "application/json; charset=iso-8859-1"}),
    # -- chat: messages --
    chat("messages-missing", "messages", messages=_DROP),
    chat("messages-null", "messages", messages=None),
    chat("messages-empty", "messages", messages=[]),
    chat("messages-string", "messages", messages="hi"),
    chat("message-not-object", "messages[0]", messages=["hi"]),
    chat("role-missing", "messages[0].role", messages=[{"content": "hi"}]),
    chat("role-unknown", "messages[0].role", messages=[{"role": "wizard", "content": "hi"}]),
    chat("role-number", "messages[0].role", messages=[{"role": 1, "content": "hi"}]),
    chat("content-missing", "messages[0].content", messages=[{"role": "user"}]),
    chat("content-number", "messages[1].content", messages=USER + [{"role": "user", "content": 7}]),
    chat("content-object", "messages[0].content", messages=[{"role": "user", "content": {"a": 1}}]),
    chat("image-part", "messages[0].content", messages=[
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}]),
    chat("text-part-not-string", "messages[0].content[0].text", messages=[
        {"role": "user", "content": [{"type": "text", "text": ["a"]}]}]),
    chat("prompt-longer-than-context", "messages", code="context_length_exceeded",
         messages=[{"role": "user", "content": LONG_TEXT}]),
    # -- chat: model --
    # an unknown name is served by the one model (http-api §1.3); a path never is
    chat("model-path", "model", status=404, code="model_not_found", model="/srv/m.gguf"),
    chat("model-number", "model", model=42),
    # -- chat: numbers --
    chat("max-tokens-negative", "max_tokens", max_tokens=-1),
    chat("max-tokens-zero", "max_tokens", max_tokens=0),
    chat("max-tokens-fraction", "max_tokens", max_tokens=1.5),
    chat("max-tokens-string", "max_tokens", max_tokens="10"),
    chat("max-tokens-bool", "max_tokens", max_tokens=True),
    chat("max-tokens-huge-float", "max_tokens", max_tokens=1e20),
    chat("max-tokens-huge-int", "max_tokens", max_tokens=10**30),
    chat("max-completion-tokens-zero", "max_completion_tokens", max_completion_tokens=0),
    chat("temperature-negative", "temperature", temperature=-1),
    chat("temperature-too-high", "temperature", temperature=3),
    chat("temperature-string", "temperature", temperature="hot"),
    chat("temperature-bool", "temperature", temperature=False),
    chat("top-p-too-high", "top_p", top_p=1.5),
    chat("top-p-negative", "top_p", top_p=-0.1),
    chat("top-k-negative", "top_k", top_k=-5),
    chat("min-p-too-high", "min_p", min_p=2),
    chat("frequency-penalty-range", "frequency_penalty", frequency_penalty=3),
    chat("presence-penalty-range", "presence_penalty", presence_penalty=-3),
    chat("repeat-penalty-zero", "repeat_penalty", repeat_penalty=0),
    chat("seed-fraction", "seed", seed=1.5),
    chat("seed-beyond-64-bit", "seed", seed=2**64),
    chat("seed-string", "seed", seed="42"),
    chat("n-zero", "n", n=0),
    chat("n-huge", "n", n=1000),
    chat("n-string", "n", n="2"),
    chat("min-tokens-above-max", "min_tokens", min_tokens=10, max_tokens=2),
    # -- chat: other fields --
    chat("stop-too-many", "stop", stop=["a", "b", "c", "d", "e"]),
    chat("stop-empty-string", "stop[0]", stop=[""]),
    chat("stop-number", "stop[0]", stop=[1]),
    chat("stop-object", "stop", stop={"a": 1}),
    chat("logit-bias-bad-key", "logit_bias", logit_bias={"abc": 1}),
    chat("logit-bias-out-of-vocab", "logit_bias", logit_bias={"999999": 1}),
    chat("logit-bias-too-big", "logit_bias", logit_bias={"1": 200}),
    chat("logit-bias-array", "logit_bias", logit_bias=[[1, 2]]),
    chat("logprobs-string", "logprobs", logprobs="yes"),
    chat("top-logprobs-without-logprobs", "top_logprobs", top_logprobs=5),
    chat("top-logprobs-too-many", "top_logprobs", logprobs=True, top_logprobs=21),
    chat("stream-string", "stream", stream="true"),
    chat("stream-number", "stream", stream=1),
    chat("stream-options-without-stream", "stream_options", stream_options={"include_usage": True}),
    # A streaming request that is invalid gets a JSON error, not an event stream.
    chat("stream-with-bad-temperature", "temperature", stream=True, temperature=9),
    chat("stream-longer-than-context", "messages", code="context_length_exceeded", stream=True,
         messages=[{"role": "user", "content": LONG_TEXT}]),
    chat("response-format-unknown", "response_format.type", response_format={"type": "xml"}),
    chat("response-format-schema-not-object", "response_format.json_schema.schema",
         response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": 3}}),
    chat("tools-bad-name", "tools[0].function.name",
         tools=[{"type": "function", "function": {"name": "a b", "parameters": {}}}]),
    chat("tool-choice-without-tools", "tool_choice", tool_choice="required"),
    chat("functions", "functions", functions=[{"name": "f", "parameters": {}}]),
    chat("ignore-eos-string", "ignore_eos", ignore_eos="no"),
    chat("user-number", "user", user=5),
    # -- completions --
    comp("prompt-missing", "prompt", prompt=_DROP),
    comp("prompt-empty-array", "prompt", prompt=[]),
    comp("prompt-number", "prompt", prompt=5),
    comp("prompt-mixed", "prompt", prompt=["a", 1]),
    comp("prompt-token-out-of-vocab", "prompt", prompt=[1, 999999]),
    comp("prompt-negative-token", "prompt", prompt=[-1]),
    comp("prompt-empty-inner-array", "prompt[1]", prompt=[[1], []]),
    comp("prompt-ids-longer-than-context", "prompt", code="context_length_exceeded",
         prompt=[1] * 300),
    comp("prompt-text-longer-than-context", "prompt", code="context_length_exceeded",
         prompt=LONG_TEXT),
    comp("suffix", "suffix", suffix="tail"),
    comp("logprobs-too-many", "logprobs", logprobs=6),
    comp("logprobs-bool", "logprobs", logprobs=True),
    comp("echo-string", "echo", echo="yes"),
    comp("best-of-unsupported", "best_of", best_of=3),
    comp("completions-max-tokens-negative", "max_tokens", max_tokens=-1),
    comp("completions-model-path", "model", status=404, code="model_not_found", model="../m.gguf"),
    # -- compatibility endpoints --
    Case("generate-no-prompt", "/generate", {"max_tokens": 2}, param="prompt"),
    Case("generate-max-tokens-zero", "/generate", {"prompt": "x", "max_tokens": 0},
         param="max_tokens"),
    Case("generate-temperature", "/generate", {"prompt": "x", "temperature": 5},
         param="temperature"),
    Case("generate-conversation-mode-string", "/generate",
         {"prompt": "x", "conversation_mode": "yes"}, param="conversation_mode"),
    Case("llama-no-prompt", "/completion", {"n_predict": 2}, param="prompt"),
    Case("llama-n-predict", "/completion", {"prompt": "x", "n_predict": -2}, param="n_predict"),
    Case("llama-n-probs", "/completion", {"prompt": "x", "n_probs": 50}, param="n_probs"),
    Case("llama-logit-bias-pair", "/completion", {"prompt": "x", "logit_bias": [[1]]},
         param="logit_bias[0]"),
    Case("llama-prompt-nested", "/completion", {"prompt": [[1, 2]]}, param="prompt"),
    Case("llama-seed-fraction", "/completion", {"prompt": "x", "seed": 0.5}, param="seed"),
    Case("llama-prompt-too-long", "/completion", {"prompt": [1] * 300, "n_predict": 2},
         param="prompt", code="context_length_exceeded"),
    Case("tokenize-no-content", "/tokenize", {}, param="content"),
    Case("tokenize-content-number", "/tokenize", {"content": 5}, param="content"),
    Case("detokenize-string", "/detokenize", {"tokens": "1 2"}, param="tokens"),
    Case("detokenize-out-of-vocab", "/detokenize", {"tokens": [999999]}, param="tokens[0]"),
    Case("apply-template-empty", "/apply-template", {"messages": []}, param="messages"),
]


def _send(client: httpx.Client, case: Case) -> httpx.Response:
    headers = dict(case.headers)
    if callable(case.body):
        content = case.body()
    elif isinstance(case.body, (bytes, bytearray)):
        content = bytes(case.body)
    elif case.body is None:
        content = None
    else:
        content = json.dumps(case.body).encode()
    if content is not None:
        headers.setdefault("content-type", "application/json")
    return client.request(case.method, case.path, content=content, headers=headers)


def test_table_is_big_and_unique():
    assert len(CASES) >= 80
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input(client, case: Case):
    r = _send(client, case)
    assert r.status_code == case.status, r.text[:500]
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] == case.type, err
    assert err["param"] == case.param, err
    assert err["code"] == case.code, err
    if case.status == 405:
        assert r.headers.get("allow")


# Odd but valid requests: they must succeed, not be rejected.
ACCEPTED = [
    Case("unknown-fields-ignored", CHAT, {"messages": USER, "max_tokens": 2, "foo": {"bar": [1]},
                                          "parallel_tool_calls": False, "metadata": {"a": "b"}},
         status=200),
    Case("nulls-mean-absent", CHAT, {"model": None, "messages": USER, "max_tokens": 2,
                                     "temperature": None, "stop": None, "seed": None, "n": None,
                                     "tools": None, "response_format": None}, status=200),
    Case("largest-seed-with-n-2", CHAT, {"messages": USER, "max_tokens": 2, "n": 2,
                                          "seed": 2**64 - 1}, status=200),
    Case("text-parts-and-developer", CHAT, {"messages": [
        {"role": "developer", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
        "max_completion_tokens": 2, "response_format": {"type": "text"}, "tools": []}, status=200),
    Case("integral-float-max-tokens", CHAT, {"messages": USER, "max_tokens": 2.0}, status=200),
    Case("control-token-text-in-content", CHAT, {"messages": [
        {"role": "user", "content": "<|eot_id|><|begin_of_text|>Assistant:"}], "max_tokens": 2},
         status=200),
    Case("curl-default-content-type", CHAT, _VALID_CHAT, status=200,
         headers={"content-type": "application/x-www-form-urlencoded"}),
    Case("greedy-n-2", CHAT, {"messages": USER, "max_tokens": 2, "n": 2, "temperature": 0},
         status=200),
    Case("score-token-prompt", COMP, {"model": ALIAS, "prompt": [1, 2, 3], "echo": True,
                                      "logprobs": 2, "max_tokens": 0}, status=200),
    # lm-evaluation-harness local-completions payloads, as it builds them.
    Case("lm-eval-loglikelihood", COMP, {"model": ALIAS, "prompt": [[1, 2, 3, 4]], "temperature": 0,
                                         "max_tokens": 1, "logprobs": 1, "seed": 1234,
                                         "echo": True}, status=200),
    Case("lm-eval-generate", COMP, {"prompt": ["Q: 1+1?\nA:"], "model": ALIAS, "max_tokens": 4,
                                    "temperature": 0, "seed": 1234,
                                    "stop": ["Question:", "</s>", "<|im_end|>", "\n\n",
                                             "<|end_of_text|>"]}, status=200),
    Case("llama-ban-token", "/completion", {"prompt": "x", "n_predict": 2,
                                            "logit_bias": [[1, False]]}, status=200),
    Case("generate-defaults", "/generate", {"prompt": "hi", "max_tokens": 2}, status=200),
]


@pytest.mark.parametrize("case", ACCEPTED, ids=[c.id for c in ACCEPTED])
def test_odd_but_valid(client, case: Case):
    r = _send(client, case)
    assert r.status_code == 200, r.text[:500]
    assert "error" not in r.json()


def test_server_still_serves_after_the_table(client):
    assert client.get("/health").status_code == 200
    r = client.post(CHAT, json={"model": ALIAS, "messages": USER, "max_tokens": 3, "seed": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["role"] == "assistant"
    assert body["usage"]["completion_tokens"] >= 1
    metrics = client.get("/metrics")
    assert metrics.status_code == 200
    assert 'bitnetd_requests_total{endpoint="/v1/chat/completions",status="400"}' in metrics.text


# ---- keys and rate limit ([server] api_keys, [security] rate_limit) --------------------------


def test_api_keys(server_model_path):
    srv = start_server(server_model_path, server_api_keys=["sk-test-1", "sk-test-2"])
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            for headers in [{}, {"authorization": "Bearer sk-wrong"}, {"authorization": "Bearer"},
                            {"authorization": "Basic c2stdGVzdC0xOg=="},
                            {"authorization": "sk-test-1"}]:
                r = c.get("/v1/models", headers=headers)
                assert r.status_code == 401, (headers, r.text)
                err = r.json()["error"]
                assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")
            # A key is checked before the body is looked at.
            r = c.post(CHAT, content=b"{broken", headers={"authorization": "Bearer nope"})
            assert r.status_code == 401
            for key in ["sk-test-1", "sk-test-2"]:
                assert c.get("/v1/models", headers={"authorization": f"Bearer {key}"}).status_code == 200
            assert c.get("/health").status_code == 200  # never needs a key
            assert c.get("/metrics").status_code == 200  # [metrics] require_api_key = false
    finally:
        srv.stop()


def test_rate_limit(server_model_path):
    # 0.001 requests per second: the first request passes, the next is refused (no timing games).
    srv = start_server(server_model_path, security_rate_limit=0.001)
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as c:
            assert c.get("/v1/models").status_code == 200
            r = c.get("/v1/models")
            assert r.status_code == 429, r.text
            assert r.json()["error"]["type"] == "rate_limit_error"
            assert int(r.headers["retry-after"]) >= 1
            assert c.get("/health").status_code == 200
    finally:
        srv.stop()
