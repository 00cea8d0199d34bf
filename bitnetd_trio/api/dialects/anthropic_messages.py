"""POST /v1/messages, Anthropic's Messages API (http-api §4): the request with its content
blocks, the `message` body, the named-event stream (`message_start` ... `message_stop`) and
Anthropic's error body `{"type": "error", "error": {"type", "message"}}` on every error of its
routes, including those raised before the body was read (API key, size, content type).

Tool use (http-api §4.1) goes through the chat tool path (`api/tools.py`): Anthropic's tool
definitions become the OpenAI-shaped `ToolRequest` whose grammar constrains the answer, and
the calls read back out of the text become `tool_use` content blocks (streamed as
`input_json_delta` fragments). Past `tool_use` blocks become the assistant turn's
`tool_calls`, `tool_result` blocks `tool` turns, which the chat template renders.

Thinking (http-api §4.1): with a template that marks it with `<think>` (engine/reasoning.py)
the think block becomes a `thinking` content block before the text and tool_use blocks
(streamed as `thinking_delta`s, then a `signature_delta`); the request's `thinking` maps onto
the template's enable_thinking, and past `thinking` blocks onto the turn's reasoning_content.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

from bitnetd_trio.api.dialects.base import (
    AnswerReader,
    CallEvents,
    Dialect,
    DialectStream,
)
from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import (
    Fields,
    as_int,
    as_str,
    invalid,
    json_type,
    object_array,
)
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.schema import (
    INT32_MAX,
    LLAMA_MAX_STOP,
    GenerationRequest,
    SchemaDefaults,
    parse_min_tokens,
    parse_sampling,
    parse_seed,
    parse_stop,
    parse_template_kwargs,
    resolve_model,
)
from bitnetd_trio.api.sse import sse_named_event
from bitnetd_trio.api.tools import ToolRequest, check_function, check_tool_list
from bitnetd_trio.engine.chat import join_text_parts

__all__ = [
    "AnthropicMessages",
    "anthropic_error_body",
    "parse_anthropic_tools",
    "parse_messages_request",
]


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


_CHOICES = ("auto", "any", "tool", "none")


def _tool_choice(d: dict) -> tuple[str | None, str | None, bool]:
    """Anthropic's `tool_choice` as the chat path's (choice, name, parallel); (None, None,
    True) when absent."""
    v = d.get("tool_choice")
    if v is None:
        return None, None, True
    if not isinstance(v, dict):
        raise invalid("tool_choice", f"must be an object, got {json_type(v)}")
    kind = v.get("type")
    if kind not in _CHOICES:
        shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
        raise invalid("tool_choice.type", f"must be one of {', '.join(_CHOICES)}, got {shown}")
    no_parallel = v.get("disable_parallel_tool_use")
    if no_parallel is not None and not isinstance(no_parallel, bool):
        raise invalid("tool_choice.disable_parallel_tool_use",
                      f"must be a boolean, got {json_type(no_parallel)}")
    name = None
    if kind == "tool":
        name = v.get("name")
        if not isinstance(name, str):
            raise invalid("tool_choice.name", f"is required for type 'tool' and must be a "
                                              f"string, got {json_type(name)}")
    choice = {"auto": "auto", "any": "required", "tool": "function", "none": "none"}[kind]
    return choice, name, not no_parallel


def parse_anthropic_tools(d: dict, max_size: int) -> ToolRequest | None:
    """`tools` (`name`, `description`, `input_schema`; custom tools only) and `tool_choice`
    as the chat path's ToolRequest; None without tools."""
    choice, name, parallel = _tool_choice(d)
    tools = d.get("tools")
    if tools is None or tools == []:
        if choice not in (None, "auto", "none"):
            raise invalid("tool_choice", "is only allowed when 'tools' are given")
        return None
    names: set[str] = set()
    out = [
        check_function(t, f"tools[{i}]", names, "input_schema", params_required=True)
        for i, t in check_tool_list(
            tools, max_size, lambda t: t.get("type") in (None, "custom"),
            "only custom tools (type 'custom' or absent) are supported: this server runs "
            "no server tools",
        )
    ]
    if choice == "function" and name not in names:
        raise invalid("tool_choice.name", f"'{name[:64]}' is not among the tools")
    return ToolRequest(tools=out, choice=choice or "auto", name=name, parallel=parallel)


_THINKING_TYPES = ("enabled", "disabled", "adaptive")


def _thinking(d: dict, max_tokens: int | None) -> bool | None:
    """`thinking` as the template's enable_thinking: "disabled" False, "enabled" True,
    "adaptive" and absent None (the template's default: Qwen3-style templates think).
    `budget_tokens` is checked as Anthropic checks it (below max_tokens) but not enforced: a
    think block ends when the model closes it, or at max_tokens."""
    v = Fields(d).object("thinking")
    if v is None:
        return None
    kind = v.get("type")
    if kind not in _THINKING_TYPES:
        shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
        raise invalid("thinking.type",
                      f"must be one of {', '.join(_THINKING_TYPES)}, got {shown}")
    if kind == "enabled":
        budget = v.get("budget_tokens")
        if budget is None:
            raise invalid("thinking.budget_tokens", "is required for type 'enabled'")
        budget = as_int(budget, "thinking.budget_tokens", 1, INT32_MAX)
        if max_tokens is not None and budget >= max_tokens:
            raise invalid("thinking.budget_tokens",
                          f"({budget}) must be less than max_tokens ({max_tokens})")
    display = v.get("display")
    if display not in (None, "summarized", "omitted"):
        raise invalid("thinking.display", "must be 'summarized' or 'omitted'")
    return {"enabled": True, "disabled": False}.get(kind)


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
    return [{"role": "system", "content": join_text_parts(texts)}]


def _tool_call(block: dict, where: str) -> dict:
    """A past `tool_use` block as the assistant turn's OpenAI-shaped tool call."""
    name = as_str(block.get("name"), f"{where}.name")
    cid = as_str(block.get("id"), f"{where}.id")
    args = block.get("input")
    if not isinstance(args, dict):
        raise invalid(f"{where}.input", f"must be an object, got {json_type(args)}")
    return {"id": cid, "type": "function", "function": {"name": name, "arguments": args}}


def _tool_result_text(block: dict, where: str) -> str:
    as_str(block.get("tool_use_id"), f"{where}.tool_use_id")
    content = block.get("content")
    if content is None:
        text = ""
    elif isinstance(content, str):
        text = content
    else:
        pairs = _block_list_text(content, f"{where}.content", ("text",))
        text = join_text_parts(
            as_str(b.get("text"), f"{where}.content[{j}].text") for j, (_, b) in enumerate(pairs)
        )
    is_error = block.get("is_error")
    if is_error is not None and not isinstance(is_error, bool):
        raise invalid(f"{where}.is_error", f"must be a boolean, got {json_type(is_error)}")
    return f"error: {text}" if is_error else text


_ASSISTANT_BLOCKS = ("text", "tool_use", "thinking", "redacted_thinking")


def _conversation(d: dict) -> list[dict]:
    """`messages` as chat turns: text blocks joined with newlines; a `tool_result` block
    becomes a `tool` turn of its own (in order), `tool_use` blocks the assistant turn's
    `tool_calls` (the chat template writes them in its tool syntax), `thinking` blocks its
    `reasoning_content` (the template decides whether to write it back; signatures are not
    checked); `redacted_thinking` blocks hold no text and are dropped."""
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
        allowed = _ASSISTANT_BLOCKS if role == "assistant" else ("text", "tool_result")
        texts: list[str] = []
        calls: list[dict] = []
        thoughts: list[str] = []
        for j, (kind, block) in enumerate(_block_list_text(content, f"{where}.content", allowed)):
            part = f"{where}.content[{j}]"
            if kind == "text":
                texts.append(as_str(block.get("text"), f"{part}.text"))
            elif kind == "tool_use":
                calls.append(_tool_call(block, part))
            elif kind == "thinking":
                thoughts.append(as_str(block.get("thinking"), f"{part}.thinking"))
            elif kind == "redacted_thinking":
                continue
            else:  # a tool's result is a turn of its own, after the text before it
                if texts:
                    out.append({"role": role, "content": join_text_parts(texts)})
                    texts = []
                out.append({"role": "tool", "content": _tool_result_text(block, part),
                            "tool_call_id": block["tool_use_id"]})
        if texts or calls or thoughts or not content:
            turn: dict = {"role": role, "content": join_text_parts(texts)}
            if calls:
                turn["tool_calls"] = calls
            if thoughts:
                turn["reasoning_content"] = join_text_parts(thoughts)
            out.append(turn)
    if items[-1][1].get("role") == "assistant":
        # Anthropic continues a final assistant turn ("prefill"); the chat template would
        # close it and open a new one, which is not what the client asked for.
        raise invalid(
            items[-1][0],
            "a final assistant turn (prefill) is not supported: end with a user message",
        )
    return out


def parse_messages_request(
    d: dict, defaults: SchemaDefaults, *, counting: bool = False
) -> GenerationRequest:
    """POST /v1/messages (and, with `counting`, /v1/messages/count_tokens, where
    `max_tokens` is not required)."""
    f = Fields(d)
    tools = parse_anthropic_tools(d, defaults.max_grammar_size)
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
        # llama.cpp's extras, read as on the OpenAI endpoints (http-api §4.1)
        min_tokens=parse_min_tokens(f, max_tokens),
        ignore_eos=f.bool("ignore_eos"),
        sampling=parse_sampling(f, defaults, logit_bias={}, seed=parse_seed(f)),
        stop=parse_stop(f, LLAMA_MAX_STOP, "stop_sequences", allow_string=False),
        stream=f.bool("stream"),
        tools=tools,
        template_kwargs=parse_template_kwargs(d, _thinking(d, max_tokens)),
    )


# ---- the answer ---------------------------------------------------------------------------------


def stop_reason(reply: Reply, c: Choice, called: bool = False) -> str:
    """Anthropic's stop_reason for a finished choice (`called`: its text held tool calls)."""
    if c.finish_reason == "stop":
        if called:
            return "tool_use"
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


def _message(reply: Reply, c: Choice, content: list[dict], *, final: bool,
             called: bool = False) -> dict:
    return {
        "id": reply.id,
        "type": "message",
        "role": "assistant",
        "model": reply.model_id,
        "content": content,
        "stop_reason": stop_reason(reply, c, called) if final else None,
        "stop_sequence": (c.stopping_word or None) if final else None,
        "usage": _usage(reply, c, final=final),
    }


def tool_use_id() -> str:
    """A fresh `tool_use` block id, Anthropic's shape."""
    return "toolu_" + uuid.uuid4().hex[:24]


def thinking_signature(thinking: str) -> str:
    """The `signature` of a thinking block. Anthropic's proves that Claude wrote the block;
    this server checks none it gets back, and gives a digest of the text so that clients that
    need a non-empty signature have one and a stream and a whole answer of the same text
    agree."""
    return "sha256:" + hashlib.sha256(thinking.encode("utf-8", "surrogatepass")).hexdigest()


class _Blocks(CallEvents):
    """The content blocks of an answer, built from an AnswerReader's events (CallEvents):
    thinking becomes a `thinking` block, text `text` blocks, each call a `tool_use` block
    whose `input` is its arguments."""

    def __init__(self) -> None:
        self.content: list[dict] = []
        self.calls = 0
        self._open: dict | None = None
        self._args = ""

    def reasoning(self, text: str) -> list[dict]:
        return self._add("thinking", text)

    def text(self, text: str) -> list[dict]:
        return self._add("text", text)

    def _add(self, kind: str, text: str) -> list[dict]:
        """`text` onto the open `kind` block ("text" or "thinking"), opening one if needed."""
        out: list[dict] = []
        if self._open is None or self._open["type"] != kind:
            out += self._close()
            block = {"type": kind, kind: ""}
            if kind == "thinking":
                block["signature"] = ""
            out.append(self._start(block))
        self._open[kind] += text  # type: ignore[index]
        out.append(self._delta({"type": f"{kind}_delta", kind: text}))
        return out

    def call(self, name: str) -> list[dict]:
        out = self._close()
        self.calls += 1
        out.append(self._start({"type": "tool_use", "id": tool_use_id(), "name": name,
                                "input": {}}))
        return out

    def arguments(self, fragment: str) -> list[dict]:
        self._args += fragment
        return [self._delta({"type": "input_json_delta", "partial_json": fragment})]

    def finish(self) -> list[dict]:
        """Close the last block; an answer without any gets one empty text block."""
        out = self._close()
        if not self.content:
            out.append(self._start({"type": "text", "text": ""}))
            out += self._close()
        return out

    def _start(self, block: dict) -> dict:
        self._open = dict(block)
        self.content.append(self._open)
        return {"type": "content_block_start", "index": len(self.content) - 1,
                "content_block": block}

    def _delta(self, delta: dict) -> dict:
        return {"type": "content_block_delta", "index": len(self.content) - 1, "delta": delta}

    def _close(self) -> list[dict]:
        if self._open is None:
            return []
        out = []
        if self._open["type"] == "thinking":
            # Anthropic sends the signature just before the block's content_block_stop
            signature = thinking_signature(self._open["thinking"])
            self._open["signature"] = signature
            out.append(self._delta({"type": "signature_delta", "signature": signature}))
        elif self._open["type"] == "tool_use":
            try:
                args = json.loads(self._args)
            except ValueError:  # cut short by max_tokens: what the client got is partial
                args = None
            self._open["input"] = args if isinstance(args, dict) else {}
            self._args = ""
        self._open = None
        return out + [{"type": "content_block_stop", "index": len(self.content) - 1}]


def _named(events: list[dict]) -> bytes:
    return b"".join(sse_named_event(e["type"], e) for e in events)


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
        reader = AnswerReader(reply)
        if reader.plain:
            return _message(reply, c, [{"type": "text", "text": "".join(c.text)}], final=True)
        blocks = _Blocks()
        blocks.apply(reader.read("".join(c.text)))
        blocks.finish()
        return _message(reply, c, blocks.content, final=True, called=bool(blocks.calls))

    def stream(self, reply: Reply) -> _MessagesStream:
        return _MessagesStream(reply)


class _MessagesStream(DialectStream):
    """message_start, content_block_start (one text block), ping, content_block_delta per
    piece, content_block_stop, message_delta (stop_reason, usage), message_stop. When the
    request may call tools or the template thinks: message_start, ping, then the blocks as
    the text turns out to be thinking, text or calls (`_Blocks`)."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.reader = AnswerReader(reply)
        self.blocks = _Blocks()

    def opening(self) -> bytes:
        c = self.reply.choices[0]
        start = sse_named_event(
            "message_start",
            {"type": "message_start", "message": _message(self.reply, c, [], final=False)},
        )
        if not self.reader.plain:
            return start + sse_named_event("ping", {"type": "ping"})
        return (
            start
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
        if not self.reader.plain:
            return _named(self.blocks.apply(self.reader.feed(piece.text)))
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
        out = self.piece(choice, last)
        if not self.reader.plain:
            out += _named(self.blocks.apply(self.reader.finish()) + self.blocks.finish())
        else:
            out += sse_named_event("content_block_stop",
                                   {"type": "content_block_stop", "index": 0})
        return (
            out
            + sse_named_event(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": stop_reason(self.reply, choice, bool(self.blocks.calls)),
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
