"""POST /v1/responses, OpenAI's Responses API without server-side state (http-api §5): the
request (`input` as a string or items, `instructions`, ...), the `response` object with one
assistant `message` item, and the named-event stream with `sequence_number`s
(`response.created` ... `response.completed`). Errors keep the OpenAI envelope.

Stateless: `previous_response_id`, `conversation`, `store: true` and `background: true` are
400s. Function `tools` go through the chat tool path (`api/tools.py`): the calls read back
out of the text become `function_call` output items (streamed with
`response.function_call_arguments.delta` events); `text.format` json_schema / json_object
constrains the text as chat's `response_format` does (http-api §1.6).

Thinking (http-api §5.1): with a template that marks it with `<think>` (engine/reasoning.py)
the think block becomes a `reasoning` output item (its text as `reasoning_text` content,
streamed with `response.reasoning_text.delta`) before the message and function_call items;
`reasoning.effort` "none" turns thinking off as chat's `reasoning_effort` does, and
`reasoning` input items become the next assistant turn's reasoning_content.
"""

from __future__ import annotations

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
from bitnetd_trio.api.json_body import Fields, as_str, invalid, json_type, object_array
from bitnetd_trio.api.reply import Choice, Piece, Reply
from bitnetd_trio.api.response_format import ANY_JSON_OBJECT, ConstraintSpec, json_schema_spec
from bitnetd_trio.api.schema import (
    INT32_MAX,
    GenerationRequest,
    SchemaDefaults,
    parse_logit_bias,
    parse_reasoning_effort,
    parse_sampling,
    parse_seed,
    parse_template_kwargs,
    resolve_model,
)
from bitnetd_trio.api.sse import sse_named_event
from bitnetd_trio.api.tools import ToolRequest, check_function, check_tool_list
from bitnetd_trio.engine.chat import join_text_parts

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


_CHOICE_SHAPES = "'none', 'auto', 'required' or {\"type\": \"function\", \"name\": ...}"


def parse_responses_tools(d: dict, max_size: int) -> tuple[ToolRequest | None, list[dict]]:
    """Function `tools` (`name`, `description`, `parameters`, `strict`), `tool_choice` and
    `parallel_tool_calls` as the chat path's ToolRequest (None without tools), and the tools
    as the response echoes them."""
    tools = d.get("tools")
    choice = d.get("tool_choice")
    parallel = d.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", f"must be a boolean, got {json_type(parallel)}")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "is only allowed when 'tools' are given")
        return None, []
    names: set[str] = set()
    out = [
        check_function(t, f"tools[{i}]", names)
        for i, t in check_tool_list(
            tools, max_size, lambda t: t.get("type") == "function",
            "only function tools are supported (no built-in tools on this server)",
        )
    ]
    echo = [
        {"type": "function", "name": t["function"]["name"],
         "description": t["function"].get("description"),
         "parameters": t["function"].get("parameters"),
         "strict": tools[i].get("strict")}
        for i, t in enumerate(out)
    ]
    req = ToolRequest(tools=out, parallel=True if parallel is None else parallel)
    if choice is None or choice in ("auto", "none", "required"):
        req.choice = choice or "auto"
    elif isinstance(choice, dict) and choice.get("type") == "function":
        name = choice.get("name")
        if not isinstance(name, str):
            raise invalid("tool_choice.name", f"must be a string, got {json_type(name)}")
        if name not in names:
            raise invalid("tool_choice.name", f"'{name[:64]}' is not among the tools")
        req.choice, req.name = "function", name
    else:
        raise invalid("tool_choice", f"must be {_CHOICE_SHAPES}")
    return req, echo


def parse_text_format(d: dict, max_size: int) -> tuple[ConstraintSpec | None, dict]:
    """`text.format`: text, json_object or json_schema (`name`, `schema`, `strict`,
    `description`) as a constraint, and the format as the response echoes it."""
    plain = {"type": "text"}
    text = Fields(d).object("text")
    if text is None:
        return None, plain
    fmt = text.get("format")
    if fmt is None:
        return None, plain
    if not isinstance(fmt, dict):
        raise invalid("text.format", f"must be an object, got {json_type(fmt)}")
    kind = fmt.get("type")
    if kind == "text":
        return None, plain
    if kind == "json_object":
        return json_schema_spec(ANY_JSON_OBJECT, "text.format", max_size,
                                kind="json_object"), {"type": "json_object"}
    if kind != "json_schema":
        shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
        raise invalid("text.format.type",
                      f"must be 'text', 'json_object' or 'json_schema', got {shown}")
    echo: dict[str, Any] = {"type": "json_schema"}
    for key in ("name", "description"):
        v = fmt.get(key)
        if v is not None:
            echo[key] = as_str(v, f"text.format.{key}")
    strict = fmt.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid("text.format.strict", f"must be a boolean, got {json_type(strict)}")
    schema = fmt.get("schema")
    if schema is None:
        raise invalid("text.format.schema", "is required")
    spec = json_schema_spec(schema, "text.format.schema", max_size)
    echo.update(schema=schema, strict=strict)
    echo.setdefault("name", "response")
    return spec, echo


_SUMMARIES = ("auto", "concise", "detailed")


def parse_reasoning(d: dict) -> tuple[bool | None, dict | None]:
    """`reasoning` (`effort`, `summary`) as the template's enable_thinking (effort "none":
    False) and as the response echoes it (None when absent). No summaries are written: the
    reasoning item's `summary` stays empty whatever `summary` asks."""
    v = Fields(d).object("reasoning")
    if v is None:
        return None, None
    effort = v.get("effort")
    enable = parse_reasoning_effort(effort, "reasoning.effort")
    summary = v.get("summary")
    if summary is not None and summary not in _SUMMARIES:
        raise invalid("reasoning.summary", f"must be one of {', '.join(_SUMMARIES)}")
    return enable, {"effort": effort, "summary": summary}


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
    return join_text_parts(texts)


def _arguments(item: dict, where: str) -> str:
    args = as_str(item.get("arguments"), f"{where}.arguments")
    try:
        json.loads(args)
    except ValueError:
        raise invalid(f"{where}.arguments", "is not valid JSON") from None
    return args


def _reasoning_text(item: dict, where: str) -> str:
    """The text of a past `reasoning` item: its `reasoning_text` content (its summary when it
    has none; `encrypted_content` is not this server's and is ignored)."""
    parts = item.get("content") or []
    kind, key = "reasoning_text", "content"
    if not parts:
        parts, kind, key = item.get("summary") or [], "summary_text", "summary"
    if not isinstance(parts, list):
        raise invalid(f"{where}.{key}", f"must be an array, got {json_type(parts)}")
    texts = []
    for j, part in enumerate(parts):
        if not isinstance(part, dict) or part.get("type") != kind:
            raise invalid(f"{where}.{key}[{j}]", f"must be a {kind} part")
        texts.append(as_str(part.get("text"), f"{where}.{key}[{j}].text"))
    return join_text_parts(texts)


def _assistant_turn(out: list[dict], reasoning: list[str]) -> dict:
    """The assistant turn a past output item belongs to: the last turn if it is one that has
    no content after its calls, else a new one, which takes the reasoning items before it."""
    last = out[-1] if out else None
    if last is None or last["role"] != "assistant" or reasoning:
        last = {"role": "assistant", "content": ""}
        out.append(last)
    if reasoning:
        last["reasoning_content"] = join_text_parts(reasoning)
        reasoning.clear()
    return last


def _input_messages(d: dict) -> list[dict]:
    """`input` as chat turns. Past `function_call` items become the `tool_calls` of an
    assistant turn (the one just before, or a new one), a `function_call_output` a `tool`
    turn; the chat template writes them in its tool syntax. A `reasoning` item becomes the
    `reasoning_content` of the assistant turn after it (the template decides whether to
    write it back)."""
    v = d.get("input")
    if v is None:
        raise invalid("input", "is required")
    if isinstance(v, str):
        return [{"role": "user", "content": v}]
    out: list[dict] = []
    reasoning: list[str] = []  # reasoning items waiting for their assistant turn
    for where, item in object_array(v, "input", "input item"):
        kind = item.get("type", "message")
        if kind == "message":
            role = item.get("role")
            if role not in _ROLES:
                shown = f"'{role[:40]}'" if isinstance(role, str) else json_type(role)
                raise invalid(f"{where}.role",
                              f"must be one of {', '.join(sorted(_ROLES))}, got {shown}")
            text = _content_text(item.get("content"), f"{where}.content")
            if role == "assistant":
                turn = _assistant_turn(out, reasoning)
                if turn["content"] or turn.get("tool_calls"):  # a turn of its own
                    turn = {"role": "assistant", "content": ""}
                    out.append(turn)
                turn["content"] = text
            else:
                out.append({"role": "system" if role == "developer" else role, "content": text})
        elif kind == "reasoning":
            text = _reasoning_text(item, where)
            if text:
                reasoning.append(text)
        elif kind == "function_call":
            call = {
                "id": as_str(item.get("call_id"), f"{where}.call_id"),
                "type": "function",
                "function": {"name": as_str(item.get("name"), f"{where}.name"),
                             "arguments": _arguments(item, where)},
            }
            _assistant_turn(out, reasoning).setdefault("tool_calls", []).append(call)
        elif kind == "function_call_output":
            cid = as_str(item.get("call_id"), f"{where}.call_id")
            output = item.get("output")
            text = output if isinstance(output, str) else _content_text(output, f"{where}.output")
            out.append({"role": "tool", "content": text, "tool_call_id": cid})
        else:
            shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
            raise invalid(f"{where}.type", f"input items of type {shown} are not supported "
                                           f"(only message, reasoning, function_call, "
                                           f"function_call_output)")
    if not out:
        raise invalid("input", "holds no messages (reasoning items alone are no conversation)")
    return out


def parse_responses_request(
    d: dict, defaults: SchemaDefaults, *, counting: bool = False
) -> GenerationRequest:
    """POST /v1/responses (and, with `counting`, /v1/responses/input_tokens)."""
    f = Fields(d)
    refuse_state(d)
    tools, tools_echo = parse_responses_tools(d, defaults.max_grammar_size)
    constraint, text_format = parse_text_format(d, defaults.max_grammar_size)
    if constraint is not None and tools is not None and tools.calls_possible:
        raise invalid("text.format", "cannot be combined with tools (unless tool_choice is "
                                     "'none')")
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
    enable_thinking, reasoning = parse_reasoning(d)
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
            "tools": tools_echo,
            "parallel_tool_calls": tools.parallel if tools is not None else True,
            "text_format": text_format,
            "reasoning": reasoning,
        },
        constraint=constraint,
        tools=tools,
        template_kwargs=parse_template_kwargs(d, enable_thinking),
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
        # written: the prompt tokens this request prefilled, which stay in the slot's KV
        # cache for a later request with the same prefix (http-api §5.1)
        "input_tokens_details": {
            "cached_tokens": u["prompt_tokens_details"]["cached_tokens"],
            "cache_write_tokens": u["prompt_tokens"] - u["prompt_tokens_details"]["cached_tokens"],
        },
        "output_tokens": u["completion_tokens"],
        "output_tokens_details": {
            "reasoning_tokens": sum(c.reasoning_tokens for c in reply.choices)
        },
        "total_tokens": u["total_tokens"],
    }


def _text_part(text: str) -> dict:
    return {"type": "output_text", "text": text, "annotations": [], "logprobs": []}


def _reasoning_part(text: str) -> dict:
    return {"type": "reasoning_text", "text": text}


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
        "parallel_tool_calls": opts.get("parallel_tool_calls", True),
        "previous_response_id": None,
        "reasoning": opts.get("reasoning"),
        "store": False,
        "temperature": g.sampling.temperature,
        "text": {"format": opts.get("text_format", {"type": "text"})},
        "tool_choice": opts.get("tool_choice", "auto"),
        "tools": opts.get("tools", []),
        "top_p": g.sampling.top_p,
        "truncation": "disabled",
        "usage": usage,
        "user": g.user,
        "metadata": opts.get("metadata", {}),
    }


class _Output(CallEvents):
    """The output items of one answer, built from an AnswerReader's events (CallEvents;
    stream events without sequence numbers): thinking goes into a `reasoning` item, text
    into `message` items, each call is a `function_call` item."""

    def __init__(self, reply: Reply) -> None:
        self.reply = reply
        self.items: list[dict] = []
        self.calls = 0
        self._open: dict | None = None
        self._text = ""

    def open_message(self) -> list[dict]:
        first = not any(it["type"] == "message" for it in self.items)
        item_id = _item_id(self.reply) if first else "msg_" + uuid.uuid4().hex[:24]
        out = self._start({"id": item_id, "type": "message", "role": "assistant",
                           "status": "in_progress", "content": []})
        out.append({"type": "response.content_part.added", **self._where(),
                    "part": _text_part("")})
        return out

    def reasoning(self, text: str) -> list[dict]:
        out: list[dict] = []
        if self._open is None or self._open["type"] != "reasoning":
            out += self.close("completed")
            out += self._start({"id": "rs_" + uuid.uuid4().hex[:24], "type": "reasoning",
                                "status": "in_progress", "summary": [], "content": []})
            out.append({"type": "response.content_part.added", **self._where(),
                        "part": _reasoning_part("")})
        self._text += text
        out.append({"type": "response.reasoning_text.delta", **self._where(), "delta": text})
        return out

    def text(self, text: str) -> list[dict]:
        out: list[dict] = []
        if self._open is None or self._open["type"] != "message":
            out += self.close("completed") + self.open_message()
        self._text += text
        out.append({"type": "response.output_text.delta", **self._where(), "delta": text,
                    "logprobs": []})
        return out

    def call(self, name: str) -> list[dict]:
        out = self.close("completed")
        self.calls += 1
        suffix = uuid.uuid4().hex[:24]
        return out + self._start({"id": "fc_" + suffix, "type": "function_call",
                                  "status": "in_progress", "arguments": "",
                                  "call_id": "call_" + suffix, "name": name})

    def arguments(self, fragment: str) -> list[dict]:
        self._text += fragment
        return [{"type": "response.function_call_arguments.delta",
                 "item_id": self._open["id"],  # type: ignore[index]
                 "output_index": len(self.items) - 1, "delta": fragment}]

    def finish(self, status: str) -> list[dict]:
        """Close the last item with `status`; an answer without any gets one empty
        message."""
        if not self.items:
            return self.open_message() + self.close(status)
        return self.close(status)

    def close(self, status: str) -> list[dict]:
        item = self._open
        if item is None:
            return []
        self._open = None
        index = len(self.items) - 1
        item["status"] = status
        text, self._text = self._text, ""
        if item["type"] == "function_call":
            item["arguments"] = text
            return [
                {"type": "response.function_call_arguments.done", "item_id": item["id"],
                 "output_index": index, "arguments": text},
                {"type": "response.output_item.done", "output_index": index, "item": dict(item)},
            ]
        where = {"item_id": item["id"], "output_index": index, "content_index": 0}
        if item["type"] == "reasoning":
            part = _reasoning_part(text)
            done = {"type": "response.reasoning_text.done", **where, "text": text}
        else:
            part = _text_part(text)
            done = {"type": "response.output_text.done", **where, "text": text, "logprobs": []}
        item["content"] = [part]
        return [
            done,
            {"type": "response.content_part.done", **where, "part": part},
            {"type": "response.output_item.done", "output_index": index, "item": dict(item)},
        ]

    def _start(self, item: dict) -> list[dict]:
        self._open = item
        self.items.append(item)
        return [{"type": "response.output_item.added", "output_index": len(self.items) - 1,
                 "item": dict(item)}]

    def _where(self) -> dict:
        return {"item_id": self._open["id"],  # type: ignore[index]
                "output_index": len(self.items) - 1, "content_index": 0}


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
        output = _Output(reply)
        output.apply(AnswerReader(reply).read("".join(c.text)))
        output.finish(status)
        return response_object(reply, status, output.items, _usage(reply))

    def stream(self, reply: Reply) -> _ResponsesStream:
        return _ResponsesStream(reply)


class _ResponsesStream(DialectStream):
    """response.created, response.in_progress, response.output_item.added,
    response.content_part.added, response.output_text.delta per piece, then
    response.output_text.done, response.content_part.done, response.output_item.done and
    response.completed (response.incomplete when cut short), numbered from 0. When the
    request may call tools or the template thinks, the items open as the text turns out to
    be thinking, text or calls: a reasoning item is streamed with
    response.reasoning_text.delta / .done, a call's item with
    response.function_call_arguments.delta / .done."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(reply)
        self.sequence_number = 0
        self.output = _Output(reply)
        self.reader = AnswerReader(reply)

    def _event(self, kind: str, fields: dict) -> bytes:
        event = {"type": kind, "sequence_number": self.sequence_number, **fields}
        self.sequence_number += 1
        return sse_named_event(kind, event)

    def _events(self, events: list[dict]) -> bytes:
        return b"".join(self._event(e.pop("type"), e) for e in events)

    def opening(self) -> bytes:
        started = response_object(self.reply, "in_progress", [], None)
        out = self._event("response.created", {"response": started}) + self._event(
            "response.in_progress", {"response": started}
        )
        if self.reader.plain:  # one message item, open from the start
            out += self._events(self.output.open_message())
        return out

    def shape_piece(self, choice: Choice, piece: Piece) -> bytes:
        return self._events(self.output.apply(self.reader.feed(piece.text)))

    def finish(self, choice: Choice, last: Piece) -> bytes:
        out = self.piece(choice, last) + self._events(self.output.apply(self.reader.finish()))
        return out + self._events(self.output.finish(_status(choice)))

    def closing(self) -> bytes:
        c = self.reply.choices[0]
        status = _status(c)
        final = response_object(self.reply, status, self.output.items, _usage(self.reply))
        kind = "response.completed" if status == "completed" else "response.incomplete"
        return self._event(kind, {"response": final})

    def error_event(self, err: ApiError) -> bytes:
        return self._event(
            "error", {"code": err.code or err.type, "message": err.message, "param": err.param}
        )
