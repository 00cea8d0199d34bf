"""api/sse.py: SSE framing and chunk shapes; api/logprobs.py: token text and the chat entry."""

from __future__ import annotations

import json

import pytest

from bitnetd_trio.api.logprobs import chat_logprob_entry, token_text
from bitnetd_trio.api.sse import (
    SSE_DONE,
    ChatChunks,
    CompletionChunks,
    sse_event,
    usage_object,
)


def test_sse_event_framing_and_utf8() -> None:
    ev = sse_event({"t": "héllo ✓"})
    assert ev.startswith(b"data: ") and ev.endswith(b"\n\n")
    assert json.loads(ev[6:-2]) == {"t": "héllo ✓"}
    assert "✓".encode() in ev  # sent as UTF-8, not \\u escapes
    assert SSE_DONE == b"data: [DONE]\n\n"


def test_chat_chunks_share_id_and_created() -> None:
    c = ChatChunks("chatcmpl-1", 123, "m", "fp", include_usage=True)
    chunks = [c.role(0), c.content(0, "hi"), c.finish(0, "stop"), c.usage(usage_object(3, 2))]
    assert {ch["id"] for ch in chunks} == {"chatcmpl-1"}
    assert {ch["created"] for ch in chunks} == {123}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert chunks[1]["choices"][0]["delta"] == {"content": "hi"}
    assert chunks[2]["choices"][0]["delta"] == {}
    assert chunks[2]["choices"][0]["finish_reason"] == "stop"
    assert all(ch["usage"] is None for ch in chunks[:3])
    assert chunks[3]["choices"] == [] and chunks[3]["usage"]["total_tokens"] == 5
    assert all(ch["object"] == "chat.completion.chunk" for ch in chunks)


def test_chat_chunks_without_usage_have_no_usage_key() -> None:
    c = ChatChunks("x", 1, "m", "fp", include_usage=False)
    assert "usage" not in c.content(0, "a")


def test_completion_chunks_shape() -> None:
    c = CompletionChunks("cmpl-1", 5, "m", "fp", include_usage=False)
    ch = c.text(1, "abc")
    assert ch["object"] == "text_completion"
    assert ch["choices"] == [{"index": 1, "text": "abc", "logprobs": None, "finish_reason": None}]
    assert c.finish(1, "length")["choices"][0]["finish_reason"] == "length"


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"abc", "abc"), ("é".encode(), "é"), (b"\xc3", "bytes:\\xc3")],
)
def test_token_text(data: bytes, expected: str) -> None:
    assert token_text(data) == expected


def test_chat_logprob_entry() -> None:
    e = chat_logprob_entry(b" hi", -0.5, [(b" hi", -0.5), (b"\xe2", -2.0)])
    assert e == {
        "token": " hi",
        "logprob": -0.5,
        "bytes": [32, 104, 105],
        "top_logprobs": [
            {"token": " hi", "logprob": -0.5, "bytes": [32, 104, 105]},
            {"token": "bytes:\\xe2", "logprob": -2.0, "bytes": [226]},
        ],
    }
