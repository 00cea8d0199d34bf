"""POST /v1/messages, Anthropic's Messages API (http-api §4): the request with its content
blocks, the `message` body, the named-event stream (`message_start` ... `message_stop`) and
Anthropic's error body `{"type": "error", "error": {"type", "message"}}` on every error of its
routes, including those raised before the body was read (API key, size, content type).

Tool use is refused with a 400 until the structured-output machinery (issue 9) lands: see
`refuse_tools`. Conversations that already hold `tool_use` / `tool_result` blocks are
accepted: they become text turns (`tool` role for results) the chat template renders.
"""

from __future__ import annotations

import json
from typing import Any

from bitnetd_trio.api.dialects.base import Dialect, DialectStream
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import Fields, as_str, invalid, json_type, object_array
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import (
    INT32_MAX,
    LLAMA_MAX_STOP,
    MAX_STOP_CHARS,
    GenerationRequest,
    SchemaDefaults,
    parse_sampling,
    parse_seed,
    resolve_model,
)
from bitnetd_trio.api.sse import sse_named_event

__all__ = ["AnthropicMessages", "anthropic_error_body", "parse_messages_request"]


# Anthropic's error types by HTTP status (the `anthropic` SDK's ErrorType). 503 keeps its
# status (the SDK retries it, and Retry-After says when) with the type Anthropic uses for
# "no capacity now".
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    408: "timeout_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    503: "overloaded_error",
    504: "timeout_error",
}


def anthropic_error_body(err: ApiError) -> dict:
    """`{"type": "error", "error": {"type", "message"}}` for an error of any status."""
    kind = _ERROR_TYPES.get(err.status)
    if kind is None:
        kind = "api_error" if err.status >= 500 else "invalid_request_error"
    return {"type": "error", "error": {"type": kind, "message": err.message}}


# ---- the request --------------------------------------------------------------------------------


def refuse_tools(d: dict) -> None:
    """`tools` / `tool_choice`: a 400 until constrained decoding exists.

    HOOK (issue 9): when the structured-output machinery lands, turn `tools` into its
    constraint here and emit `tool_use` blocks (`content_block_start` with a `tool_use`
    block, `input_json_delta` deltas, stop_reason "tool_use") in the shapes below."""
    tools = d.get("tools")
    if tools is not None and tools != []:
        raise invalid("tools", "tool use is not supported by this server yet")
    choice = d.get("tool_choice")
    if choice is not None and not (isinstance(choice, dict) and choice.get("type") == "none"):
        raise invalid("tool_choice", "tool use is not supported by this server yet")


def _block_list_text(blocks: Any, param: str, allowed: tuple[str, ...]) -> list[tuple[str, Any]]:
    """The (type, block) pairs of a content array, each checked to be an object of an
    allowed type."""
    if not isinstance(blocks, list):
        raise invalid(param, f"must be a string or an array of content blocks, got "
                             f"{json_type(blocks)}")
    out = []
    for j, block in enumerate(blocks):
        where = f"{param}[{j}]"
        if not isinstance(block, dict):
            raise invalid(where, f"must be a content block object, got {json_type(block)}")
        kind = block.get("type")
        if kind not in allowed:
            shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
            raise invalid(
                f"{where}.type",
                f"content blocks of type {shown} are not supported here (only "
                f"{', '.join(allowed)})",
            )
        out.append((kind, block))
    return out


def _system(d: dict) -> list[dict]:
    v = d.get("system")
    if v is None or v == "" or v == []:
        return []
    if isinstance(v, str):
        return [{"role": "system", "content": v}]
    texts = [
        as_str(block.get("text"), f"system[{j}].text")
        for j, (_, block) in enumerate(_block_list_text(v, "system", ("text",)))
    ]
    return [{"role": "system", "content": "\n".join(texts)}]


def _tool_use_text(block: dict, where: str) -> str:
    """A past tool call, as the text the model sees in the assistant's turn."""
    name = as_str(block.get("name"), f"{where}.name")
    as_str(block.get("id"), f"{where}.id")
    args = block.get("input")
    if not isinstance(args, dict):
        raise invalid(f"{where}.input", f"must be an object, got {json_type(args)}")
    return json.dumps({"tool_use": {"name": name, "input": args}}, ensure_ascii=False)


def _tool_result_text(block: dict, where: str) -> str:
    as_str(block.get("tool_use_id"), f"{where}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        pairs = _block_list_text(content, f"{where}.content", ("text",))
        text = "\n".join(
            as_str(b.get("text"), f"{where}.content[{j}].text") for j, (_, b) in enumerate(pairs)
        )
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise invalid(f"{where}.is_error", f"must be a boolean, got {json_type(is_error)}")
    return f"error: {text}" if is_error else text


def _conversation(d: dict) -> list[dict]:
    """`messages` as chat turns: text blocks joined with newlines; a `tool_result` block
    becomes a `tool` turn of its own (in order), a `tool_use` block a line of JSON in the
    assistant's turn."""
    items = object_array(d.get("messages"), "messages", "message")
    out: list[dict] = []
    for where, msg in items:
        role = msg.get("role")
        if role not in ("user", "assistant"):
            shown = f"'{role[:40]}'" if isinstance(role, str) else json_type(role)
            raise invalid(f"{where}.role", f"must be 'user' or 'assistant', got {shown}")
        content = msg.get("content")
        if content is None:
            raise invalid(f"{where}.content", "is required")
        if isinstance(content, str):
            out.append({"role": role, "content": content})
            continue
        allowed = ("text", "tool_use") if role == "assistant" else ("text", "tool_result")
        texts: list[str] = []
        for j, (kind, block) in enumerate(_block_list_text(content, f"{where}.content", allowed)):
            part = f"{where}.content[{j}]"
            if kind == "text":
                texts.append(as_str(block.get("text"), f"{part}.text"))
            elif kind == "tool_use":
                texts.append(_tool_use_text(block, part))
            else:  # a tool's result is a turn of its own, after the text before it
                if texts:
                    out.append({"role": role, "content": "\n".join(texts)})
                    texts = []
                out.append({"role": "tool", "content": _tool_result_text(block, part)})
        if texts or not content:
            out.append({"role": role, "content": "\n".join(texts)})
    if items[-1][1].get("role") == "assistant":
        # Anthropic continues a final assistant turn ("prefill"); the chat template would
        # close it and open a new one, which is not what the client asked for.
        raise invalid(
            items[-1][0],
            "a final assistant turn (prefill) is not supported: end with a user message",
        )
    return out


def _stop_sequences(d: dict) -> list[str]:
    v = d.get("stop_sequences")
    if v is None:
        return []
    if not isinstance(v, list):
        raise invalid("stop_sequences", f"must be an array of strings, got {json_type(v)}")
    if len(v) > LLAMA_MAX_STOP:
        raise invalid("stop_sequences", f"may hold at most {LLAMA_MAX_STOP} strings, got {len(v)}")
    out = []
    for i, s in enumerate(v):
        where = f"stop_sequences[{i}]"
        if not isinstance(s, str) or not s:
            raise invalid(where, f"must be a non-empty string, got {json_type(s)}")
        if len(s) > MAX_STOP_CHARS:
            raise invalid(where, f"must be at most {MAX_STOP_CHARS} characters, got {len(s)}")
        out.append(s)
    return out


def parse_messages_request(
    d: dict, defaults: SchemaDefaults, *, counting: bool = False
) -> GenerationRequest:
    """POST /v1/messages (and, with `counting`, /v1/messages/count_tokens, where
    `max_tokens` is not required)."""
    f = Fields(d)
    refuse_tools(d)
    model = f.str("model")
    if model is None:
        raise invalid("model", "is required")
    messages = _system(d) + _conversation(d)
    if counting:
        max_tokens = None
    else:
        max_tokens = f.int("max_tokens", 1, INT32_MAX)
        if max_tokens is None:
            raise invalid("max_tokens", "is required")
    metadata = d.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise invalid("metadata", f"must be an object, got {json_type(metadata)}")
        user_id = metadata.get("user_id")
        if user_id is not None:
            as_str(user_id, "metadata.user_id")
    f.number("temperature", 0.0, 1.0)  # Anthropic's range, narrower than OpenAI's
    return GenerationRequest(
        endpoint="messages",
        model=resolve_model(model, defaults) if model else None,
        messages=messages,
        max_tokens=max_tokens,
        sampling=parse_sampling(f, defaults, logit_bias={}, seed=parse_seed(f)),
        stop=_stop_sequences(d),
        stream=f.bool("stream"),
    )


# ---- the answer ---------------------------------------------------------------------------------


def stop_reason(reply: Reply, c: Choice) -> str:
    """Anthropic's stop_reason for a finished choice."""
    if c.finish_reason == "stop":
        return "stop_sequence" if c.stop_type == "word" else "end_turn"
    limit = reply.request.max_tokens
    if c.finish_reason == "length" and limit is not None and c.n_generated < limit:
        return "model_context_window_exceeded"  # the context filled up before max_tokens
    return "max_tokens"  # max_tokens, or cut short by a timeout or a shutdown


def _usage(reply: Reply, c: Choice, *, final: bool) -> dict:
    """Anthropic's usage: `input_tokens` excludes the prompt tokens read from the cache
    (their sum is the whole prompt). At the start (message_start) nothing is generated and
    the cache share is not known yet."""
    prompt = len(reply.prompts[0])
    cached = c.n_cached if final else 0
    return {
        "input_tokens": prompt - cached,
        "output_tokens": c.n_generated if final else 0,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def _message(reply: Reply, c: Choice, content: list[dict], *, final: bool) -> dict:
    return {
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model_id,
        "content": content,
        "stop_reason": stop_reason(reply, c) if final else None,
        "stop_sequence": (c.stopping_word or None) if final else None,
        "usage": _usage(reply, c, final=final),
    }


class AnthropicMessages(Dialect):
    """Anthropic's Messages dialect."""

    name = "messages"
    id_prefix = "msg_"
    logprob_format = None

    error_body = staticmethod(anthropic_error_body)

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_messages_request(body, defaults)

    def whole(self, reply: Reply) -> dict:
        c = reply.choices[0]
        return _message(reply, c, [{"type": "text", "text": "".join(c.text)}], final=True)

    def stream(self, reply: Reply) -> _MessagesStream:
        return _MessagesStream(reply)


class _MessagesStream(DialectStream):
    """message_start, content_block_start (one text block), ping, content_block_delta per
    piece, content_block_stop, message_delta (stop_reason, usage), message_stop."""

    def opening(self) -> bytes:
        c = self.reply.choices[0]
        return (
            sse_named_event(
                "message_start",
                {"type": "message_start", "message": _message(self.reply, c, [], final=False)},
            )
            + sse_named_event(
                "content_block_start",
                {
                    "type": "content_block_start",
                    "index": 0,
                    "content_block": {"type": "text", "text": ""},
                },
            )
            + sse_named_event("ping", {"type": "ping"})
        )

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        return sse_named_event(
            "content_block_delta",
            {
                "type": "content_block_delta",
                "index": 0,
                "delta": {"type": "text_delta", "text": piece.text},
            },
        )

    def finish(self, choice: Choice, last: Piece) -> bytes:
        usage = _usage(self.reply, choice, final=True)
        return (
            self.piece(choice, last)
            + sse_named_event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + sse_named_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": stop_reason(self.reply, choice),
                        "stop_sequence": choice.stopping_word or None,
                    },
                    "usage": usage,
                },
            )
        )

    def closing(self) -> bytes:
        return sse_named_event("message_stop", {"type": "message_stop"})

    def error_event(self, err: ApiError) -> bytes:
        return sse_named_event("error", anthropic_error_body(err))
