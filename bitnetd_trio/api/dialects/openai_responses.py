"""POST /v1/responses, OpenAI's Responses API without server-side state (http-api §5): the
request (`input` as a string or items, `instructions`, ...), the `response` object with one
assistant `message` item, and the named-event stream with `sequence_number`s
(`response.created` ... `response.completed`). Errors keep the OpenAI envelope.

Stateless: `previous_response_id`, `conversation`, `store: true` and `background: true` are
400s. Function tools and `text.format` other than text are 400s until the structured-output
machinery (issue 9) lands: see `refuse_tools_and_formats`.
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
    GenerationRequest,
    SchemaDefaults,
    parse_logit_bias,
    parse_sampling,
    parse_seed,
    resolve_model,
)
from bitnetd_trio.api.sse import sse_named_event

__all__ = ["OpenAIResponses", "parse_responses_request"]

_ROLES = {"user", "assistant", "system", "developer"}
_TEXT_PARTS = ("input_text", "output_text", "text")


# ---- the request --------------------------------------------------------------------------------


def refuse_state(d: dict) -> None:
    """Fields that need responses kept on the server: this server keeps none."""
    for name in ("previous_response_id", "conversation"):
        if d.get(name) is not None:
            raise invalid(name, "is not supported: this server keeps no responses (send the "
                                "whole conversation in 'input')")
    if d.get("store") is True:
        raise invalid("store", "true is not supported: this server keeps no responses (send "
                               "store: false)")
    if d.get("background") is True:
        raise invalid("background", "true is not supported by this server")


def refuse_tools_and_formats(d: dict) -> None:
    """Function tools and structured output: 400 until constrained decoding exists.

    HOOK (issue 9): when the structured-output machinery lands, hand `tools` and a
    `text.format` of type json_schema / json_object to it here, and add `function_call`
    output items (with `response.function_call_arguments.delta` events) below."""
    tools = d.get("tools")
    if tools is not None and tools != []:
        raise invalid("tools", "tools are not supported by this server yet")
    choice = d.get("tool_choice")
    if choice is not None and choice not in ("none", "auto"):
        raise invalid("tool_choice", "tools are not supported by this server yet")
    text = d.get("text")
    if text is None:
        return
    if not isinstance(text, dict):
        raise invalid("text", f"must be an object, got {json_type(text)}")
    fmt = text.get("format")
    if fmt is None:
        return
    if not isinstance(fmt, dict):
        raise invalid("text.format", f"must be an object, got {json_type(fmt)}")
    kind = fmt.get("type")
    if kind != "text":
        shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
        raise invalid("text.format", f"type {shown} is not supported by this server yet "
                                     f"(only 'text')")


def _content_text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise invalid(where, f"must be a string or an array of content parts, got "
                             f"{json_type(content)}")
    texts = []
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise invalid(f"{where}[{j}]", f"must be a content part object, got {json_type(part)}")
        kind = part.get("type")
        if kind not in _TEXT_PARTS:
            shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
            raise invalid(f"{where}[{j}].type",
                          f"content parts of type {shown} are not supported (only text)")
        texts.append(as_str(part.get("text"), f"{where}[{j}].text"))
    return "\n".join(texts)


def _input_messages(d: dict) -> list[dict]:
    """`input` as chat turns. A past `function_call` item becomes a line of JSON in an
    assistant turn, a `function_call_output` a `tool` turn."""
    v = d.get("input")
    if v is None:
        raise invalid("input", "is required")
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    out = []
    for where, item in object_array(v, "input", "input item"):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                shown = f"'{role[:40]}'" if isinstance(role, str) else json_type(role)
                raise invalid(f"{where}.role",
                              f"must be one of {', '.join(sorted(_ROLES))}, got {shown}")
            text = _content_text(item.get("content"), f"{where}.content")
            out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "function_call":
            call = {
                "name": as_str(item.get("name"), f"{where}.name"),
                "arguments": as_str(item.get("arguments"), f"{where}.arguments"),
            }
            as_str(item.get("call_id"), f"{where}.call_id")
            out.append({"role": "assistant",
                        "content": json.dumps({"function_call": call}, ensure_ascii=False)})
        elif kind == "function_call_output":
            as_str(item.get("call_id"), f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
            out.append({"role": "tool", "content": text})
        else:
            shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
            raise invalid(f"{where}.type", f"input items of type {shown} are not supported "
                                           f"(only message, function_call, "
                                           f"function_call_output)")
    return out


def parse_responses_request(
    d: dict, defaults: SchemaDefaults, *, counting: bool = False
) -> GenerationRequest:
    """POST /v1/responses (and, with `counting`, /v1/responses/input_tokens)."""
    f = Fields(d)
    refuse_state(d)
    refuse_tools_and_formats(d)
    model = f.str("model")
    instructions = f.str("instructions")
    messages = _input_messages(d)
    if instructions:
        messages.insert(0, {"role": "system", "content": instructions})
    max_output = f.int("max_output_tokens", 1, INT32_MAX)
    metadata = d.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise invalid("metadata", f"must be an object, got {json_type(metadata)}")
        for key, value in metadata.items():
            as_str(value, f"metadata.{key[:40]}")
    stream = f.bool("stream")
    if counting:
        stream = False
    return GenerationRequest(
        endpoint="responses",
        model=resolve_model(model, defaults) if model else None,
        messages=messages,
        max_tokens=max_output if max_output is not None else defaults.max_tokens_default,
        sampling=parse_sampling(
            f, defaults, logit_bias=parse_logit_bias(f, defaults.n_vocab), seed=parse_seed(f)
        ),
        stream=stream,
        user=f.str("user"),
        dialect_options={
            "instructions": instructions,
            "max_output_tokens": max_output,
            "metadata": metadata or {},
            "tool_choice": d.get("tool_choice") or "auto",
        },
    )


# ---- the answer ---------------------------------------------------------------------------------


def _item_id(reply: Reply) -> str:
    """The id of the response's one message item, derived from the response's id."""
    return "msg_" + reply.id.removeprefix("resp_")


def _status(c: Choice) -> str:
    return "completed" if c.finish_reason == "stop" else "incomplete"


def _usage(reply: Reply) -> dict:
    u = reply.usage()
    return {
        "input_tokens": u["prompt_tokens"],
        "input_tokens_details": {"cached_tokens": u["prompt_tokens_details"]["cached_tokens"]},
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {"reasoning_tokens": 0},
        "total_tokens": u["total_tokens"],
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _message_item(reply: Reply, c: Choice, content: list[dict], status: str) -> dict:
    return {
        "id": _item_id(reply),
        "type": "message",
        "role": "assistant",
        "status": status,
        "content": content,
    }


def response_object(reply: Reply, status: str, output: list[dict], usage: dict | None) -> dict:
    """The `response` object, as the whole body or inside a stream's lifecycle events."""
    g = reply.request
    opts = g.dialect_options
    incomplete = {"reason": "max_output_tokens"} if status == "incomplete" else None
    return {
        "id": reply.id,
        "object": "response",
        "created_at": reply.created,
        "status": status,
        "error": None,
        "incomplete_details": incomplete,
        "instructions": opts.get("instructions"),
        "max_output_tokens": opts.get("max_output_tokens"),
        "model": reply.model_id,
        "output": output,
        "parallel_tool_calls": False,
        "previous_response_id": None,
        "reasoning": None,
        "store": False,
        "temperature": g.sampling.temperature,
        "text": {"format": {"type": "text"}},
        "tool_choice": opts.get("tool_choice", "auto"),
        "tools": [],
        "top_p": g.sampling.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": g.user,
        "metadata": opts.get("metadata", {}),
    }


class OpenAIResponses(Dialect):
    """OpenAI's Responses dialect (stateless)."""

    name = "responses"
    id_prefix = "resp_"
    logprob_format = None

    def parse(self, body: dict, defaults: SchemaDefaults) -> GenerationRequest:
        return parse_responses_request(body, defaults)

    def whole(self, reply: Reply) -> dict:
        c = reply.choices[0]
        status = _status(c)
        item = _message_item(reply, c, [_text_part("".join(c.text))], status)
        return response_object(reply, status, [item], _usage(reply))

    def stream(self, reply: Reply) -> _ResponsesStream:
        return _ResponsesStream(reply)


class _ResponsesStream(DialectStream):
    """response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta per piece, then
    response.output_text.done, response.content_part.done, response.output_item.done and
    response.completed (response.incomplete when cut short), numbered from 0."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.sequence_number = 0
        self.item_id = _item_id(reply)
        self.text: list[str] = []

    def _event(self, kind: str, fields: dict) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_named_event(kind, event)

    def _where(self) -> dict:
        return {"item_id": self.item_id, "output_index": 0, "content_index": 0}

    def opening(self) -> bytes:
        started = response_object(self.reply, "in_progress", [], None)
        item = _message_item(self.reply, self.reply.choices[0], [], "in_progress")
        return (
            self._event("response.created", {"response": started})
            + self._event("response.in_progress", {"response": started})
            + self._event("response.output_item.added", {"output_index": 0, "item": item})
            + self._event("response.content_part.added", {**self._where(), "part": _text_part("")})
        )

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        self.text.append(piece.text)
        return self._event(
            "response.output_text.delta", {**self._where(), "delta": piece.text, "logprobs": []}
        )

    def finish(self, choice: Choice, last: Piece) -> bytes:
        out = self.piece(choice, last)
        text = "".join(self.text)
        part = _text_part(text)
        item = _message_item(self.reply, choice, [part], _status(choice))
        return (
            out
            + self._event("response.output_text.done",
                          {**self._where(), "text": text, "logprobs": []})
            + self._event("response.content_part.done", {**self._where(), "part": part})
            + self._event("response.output_item.done", {"output_index": 0, "item": item})
        )

    def closing(self) -> bytes:
        c = self.reply.choices[0]
        status = _status(c)
        item = _message_item(self.reply, c, [_text_part("".join(self.text))], status)
        final = response_object(self.reply, status, [item], _usage(self.reply))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return self._event(kind, {"response": final})

    def error_event(self, err: ApiError) -> bytes:
        return self._event(
            "error", {"code": err.code or err.type, "message": err.message, "param": err.param}
        )
