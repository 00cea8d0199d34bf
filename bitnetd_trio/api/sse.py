"""Sans-I/O pieces of streaming responses: SSE framing and chunk shapes.

Nothing here does I/O or touches the engine, so every rule of http-api §1.5 about streams
(role delta first, one id and `created` for every chunk, the finish chunk with an empty delta,
the usage chunk, `[DONE]`) is tested as plain functions. The logprob shapes are in
`bitnetd_trio.api.logprobs`.
"""

from __future__ import annotations

import json
from typing import Any

from bitnetd_trio.api.logprobs import chat_logprobs

__all__ = [
    "SSE_DONE",
    "SSE_KEEPALIVE",
    "ChatChunks",
    "CompletionChunks",
    "json_bytes",
    "sse_event",
    "sse_named_event",
    "usage_object",
]

SSE_DONE = b"data: [DONE]\n\n"
SSE_KEEPALIVE = b": ping\n\n"


def json_bytes(obj: Any) -> bytes:
    """Compact UTF-8 JSON (non-ASCII text kept as is: clients decode UTF-8)."""
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def sse_event(obj: Any) -> bytes:
    """One server-sent event `data: <json>\\n\\n`."""
    return b"data: " + json_bytes(obj) + b"\n\n"


def sse_named_event(name: str, obj: Any) -> bytes:
    """One server-sent event with an `event:` line: Anthropic's and the Responses API's
    streams name every event (the SDKs dispatch on that name)."""
    return b"event: " + name.encode("ascii") + b"\ndata: " + json_bytes(obj) + b"\n\n"


class _Chunks:
    """What every chunk of one streamed response shares: id, created, model, fingerprint,
    and `"usage": null` on each choice chunk when the client asked for usage."""

    object_name = ""

    def __init__(
        self,
        id: str,
        created: int,
        model: str,
        system_fingerprint: str,
        include_usage: bool,
    ) -> None:
        self.base = {
            "id": id,
            "object": self.object_name,
            "created": created,
            "model": model,
            "system_fingerprint": system_fingerprint,
        }
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict]) -> dict:
        chunk = dict(self.base)
        chunk["choices"] = choices
        if self.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self, usage: dict) -> dict:
        chunk = dict(self.base)
        chunk["choices"] = []
        chunk["usage"] = usage
        return chunk


class ChatChunks(_Chunks):
    """The `chat.completion.chunk` objects of one streamed chat completion."""

    object_name = "chat.completion.chunk"

    def role(self, index: int) -> dict:
        return self._chunk(
            [
                {
                    "index": index,
                    # `refusal` as OpenAI sends it in the role delta (never a refusal here).
                    "delta": {"role": "assistant", "content": "", "refusal": None},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def content(self, index: int, text: str, logprobs: list[dict] | None = None) -> dict:
        return self._chunk(
            [
                {
                    "index": index,
                    "delta": {"content": text},
                    "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
                    "finish_reason": None,
                }
            ]
        )

    def reasoning(self, index: int, text: str, logprobs: list[dict] | None = None) -> dict:
        """A thinking delta (`reasoning_content`, as vLLM and llama.cpp stream it)."""
        return self._chunk(
            [
                {
                    "index": index,
                    "delta": {"reasoning_content": text},
                    "logprobs": chat_logprobs(logprobs) if logprobs is not None else None,
                    "finish_reason": None,
                }
            ]
        )

    def tool_call(self, index: int, call: int, *, call_id: str | None = None,
                  name: str | None = None, arguments: str = "") -> dict:
        """A tool call delta as OpenAI streams it: the call's index, id, type and name first
        (arguments ""), then argument fragments under the same index."""
        delta: dict = {"index": call}
        fn: dict = {}
        if call_id is not None:
            delta["id"] = call_id
            delta["type"] = "function"
        if name is not None:
            fn["name"] = name
        fn["arguments"] = arguments
        delta["function"] = fn
        return self._chunk(
            [
                {
                    "index": index,
                    "delta": {"tool_calls": [delta]},
                    "logprobs": None,
                    "finish_reason": None,
                }
            ]
        )

    def finish(self, index: int, reason: str) -> dict:
        return self._chunk(
            [{"index": index, "delta": {}, "logprobs": None, "finish_reason": reason}]
        )


class CompletionChunks(_Chunks):
    """The `text_completion` chunks of one streamed legacy completion (no role chunk)."""

    object_name = "text_completion"

    def text(self, index: int, text: str, logprobs: dict | None = None) -> dict:
        return self._chunk(
            [{"index": index, "text": text, "logprobs": logprobs, "finish_reason": None}]
        )

    def finish(self, index: int, reason: str) -> dict:
        return self._chunk(
            [{"index": index, "text": "", "logprobs": None, "finish_reason": reason}]
        )


def usage_object(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    """The OpenAI `usage` object."""
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }
