"""OpenAI tool calling (http-api §1.7): the `tools`, `tool_choice` and `parallel_tool_calls`
fields, assistant `tool_calls` and `tool` messages in the conversation, and the grammar that
makes the model's answer either free text or well-formed calls.

The call syntax itself (how calls look in the text, how they are read back) is the chat
template's: `bitnetd_trio.engine.tool_syntax`.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import invalid, json_type
from bitnetd_trio.api.response_format import (
    THINK_RULES,
    THINK_START,
    ConstraintSpec,
    after_thinking,
)
from bitnetd_trio.engine.tool_syntax import BITNET_TOOLS, ToolSyntax, syntax_for

__all__ = [
    "ToolRequest",
    "call_id",
    "check_function",
    "check_tool_list",
    "constraint_of",
    "parse_message_tool_calls",
    "parse_tools",
    "tool_syntax",
]

_NAME_RE = re.compile(r"[A-Za-z0-9_\-]{1,64}")
MAX_TOOLS = 128


def call_id() -> str:
    """A fresh tool call id, OpenAI's shape."""
    return "call_" + uuid.uuid4().hex[:24]


@dataclass
class ToolRequest:
    """The tools of a chat request and what the model may do with them."""

    tools: list[dict] = field(default_factory=list)  # [{"type": "function", "function": {...}}]
    choice: str = "auto"  # "none" | "auto" | "required" | "function"
    name: str | None = None  # the function tool_choice names
    parallel: bool = True
    syntax: ToolSyntax = BITNET_TOOLS  # the chat template's (set when the request is served)

    @property
    def calls_possible(self) -> bool:
        return bool(self.tools) and self.choice != "none"

    def grammar(self, syntax: ToolSyntax, thinking: str | None = None) -> str:
        """The Lark grammar of the allowed answers: calls matching one function's parameter
        schema (required / named), or, with "auto", free text that does not start like a
        call, or calls. `thinking` (engine/reasoning.think_mode, None for a template that
        does not think): "closed" lets the answer start with a think block, "open" makes it
        start with the rest of the block the prompt opened, so a thinking model still
        thinks before it calls; "off" (the prompt closed the block) goes straight on."""
        funcs = [t["function"] for t in self.tools]
        if self.choice == "function":
            funcs = [f for f in funcs if f["name"] == self.name]
        rules = []
        alts = []
        for i, f in enumerate(funcs):
            params = dict(f.get("parameters") or {"type": "object", "properties": {},
                                                    "additionalProperties": False})
            params.setdefault("type", "object")
            params["x-guidance"] = {"whitespace_flexible": False}
            rules.append(f"args_{i}: %json " + json.dumps(params, ensure_ascii=False))
            alts.append(
                _lark_literal(syntax.call_prefix(f["name"])) + f" args_{i} "
                + _lark_literal(syntax.call_suffix)
            )
        lines = ["call: " + " | ".join(alts)]
        if self.parallel:
            lines.append("calls: call (" + _lark_literal(syntax.separator) + " call)*")
        else:
            lines.append("calls: call")
        answer = "calls"
        if self.choice == "auto":
            first = re.escape(syntax.open[0])
            answer = "(calls | TEXT)?"
            lines.append(f"TEXT: /[^{first}][\\s\\S]*/")
        lines.insert(0, "start: " + THINK_START.get(thinking, "") + answer)
        if thinking in ("open", "closed"):
            lines += THINK_RULES
        return "\n".join(lines + rules) + "\n"

    def spec(self, syntax: ToolSyntax, thinking: str | None = None) -> ConstraintSpec | None:
        if not self.calls_possible:
            return None
        return ConstraintSpec("tools", self.grammar(syntax, thinking), "lark", "tools")


def _lark_literal(s: str) -> str:
    return json.dumps(s, ensure_ascii=True)


def parse_tools(d: dict, max_size: int) -> ToolRequest | None:
    """tools, tool_choice and parallel_tool_calls of a chat request; None without tools."""
    tools = d.get("tools")
    choice = d.get("tool_choice")
    parallel = d.get("parallel_tool_calls")
    if parallel is not None and not isinstance(parallel, bool):
        raise invalid("parallel_tool_calls", f"must be a boolean, got {json_type(parallel)}")
    if d.get("functions") is not None or d.get("function_call") is not None:
        name = "functions" if d.get("functions") is not None else "function_call"
        raise invalid(name, "is deprecated and not supported: use 'tools' and 'tool_choice'")
    if tools is None or tools == []:
        if choice not in (None, "none", "auto"):
            raise invalid("tool_choice", "is only allowed when 'tools' are given")
        return None
    names: set[str] = set()
    out = [
        check_function(t.get("function") if isinstance(t, dict) else None,
                       f"tools[{i}].function", names)
        for i, t in check_tool_list(tools, max_size, lambda t: t.get("type") == "function",
                                    "must be 'function'")
    ]
    req = ToolRequest(tools=out, parallel=True if parallel is None else parallel)
    if choice is None or choice in ("auto", "none", "required"):
        req.choice = choice or "auto"
    elif isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if choice.get("type") != "function" or not isinstance(name, str):
            raise invalid("tool_choice",
                          "must be 'none', 'auto', 'required' or "
                          '{"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise invalid("tool_choice.function.name", f"'{name[:64]}' is not among the tools")
        req.choice, req.name = "function", name
    else:
        raise invalid("tool_choice", "must be 'none', 'auto', 'required' or an object naming "
                                     "a function")
    return req


def check_tool_list(tools: Any, max_size: int, is_function: Callable[[dict], bool],
                    not_function: str) -> list[tuple[int, dict]]:
    """The (index, tool) pairs of a `tools` array of any dialect, checked: an array of at
    most MAX_TOOLS objects, no larger than `max_size` bytes of JSON, each a function tool
    (`is_function`; else 400 on `tools[i].type` saying `not_function`)."""
    if not isinstance(tools, list):
        raise invalid("tools", f"must be an array of tools, got {json_type(tools)}")
    if len(tools) > MAX_TOOLS:
        raise invalid("tools", f"may hold at most {MAX_TOOLS} tools, got {len(tools)}")
    if len(json.dumps(tools, ensure_ascii=False).encode("utf-8", "surrogatepass")) > max_size:
        raise invalid("tools", f"is larger than the limit of {max_size} bytes")
    out = []
    for i, t in enumerate(tools):
        if not isinstance(t, dict):
            raise invalid(f"tools[{i}]", f"must be an object, got {json_type(t)}")
        if not is_function(t):
            raise invalid(f"tools[{i}].type", not_function)
        out.append((i, t))
    return out


def check_function(fn: Any, where: str, names: set[str], params_key: str = "parameters",
                   params_required: bool = False) -> dict:
    """One function definition (`name`, `description`, the parameters' JSON schema under
    `params_key`, `strict`) as the OpenAI tool `{"type": "function", "function": {...}}`
    every dialect hands to the prompt and the grammar; `names` collects the names seen."""
    if not isinstance(fn, dict):
        raise invalid(where, f"must be an object, got {json_type(fn)}")
    prefix = f"{where}." if where else ""
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise invalid(f"{prefix}name", "must be 1-64 letters, digits, underscores or dashes")
    if name in names:
        raise invalid(f"{prefix}name", f"'{name}' is defined twice")
    names.add(name)
    desc = fn.get("description")
    if desc is not None and not isinstance(desc, str):
        raise invalid(f"{prefix}description", "must be a string")
    params = fn.get(params_key)
    if params is None and params_required:
        raise invalid(f"{prefix}{params_key}", "is required")
    if params is not None and not isinstance(params, dict):
        raise invalid(f"{prefix}{params_key}",
                      f"must be a JSON schema object, got {json_type(params)}")
    strict = fn.get("strict")
    if strict is not None and not isinstance(strict, bool):
        raise invalid(f"{prefix}strict", "must be a boolean")
    clean: dict[str, Any] = {"name": name}
    if desc:
        clean["description"] = desc
    if params is not None:
        clean["parameters"] = params
    return {"type": "function", "function": clean}


def parse_message_tool_calls(msg: dict, where: str) -> list[dict] | None:
    """An assistant message's `tool_calls`, checked: [{"id", "type", "function": {"name",
    "arguments"}}] with arguments a JSON string (or object)."""
    calls = msg.get("tool_calls")
    if calls is None or calls == []:
        return None
    if msg.get("role") != "assistant":
        raise invalid(f"{where}.tool_calls", "is only allowed in assistant messages")
    if not isinstance(calls, list):
        raise invalid(f"{where}.tool_calls", f"must be an array, got {json_type(calls)}")
    out = []
    for j, c in enumerate(calls):
        w = f"{where}.tool_calls[{j}]"
        if not isinstance(c, dict):
            raise invalid(w, f"must be an object, got {json_type(c)}")
        fn = c.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise invalid(f"{w}.function", "must be an object with a 'name'")
        args = fn.get("arguments", "{}")
        if isinstance(args, str):
            try:
                json.loads(args)
            except ValueError:
                raise ApiError(400, f"'{w}.function.arguments' is not valid JSON",
                               param=f"{w}.function.arguments") from None
        elif not isinstance(args, dict):
            raise invalid(f"{w}.function.arguments", "must be a JSON string")
        cid = c.get("id")
        out.append({
            "id": cid if isinstance(cid, str) else call_id(),
            "type": "function",
            "function": {"name": fn["name"], "arguments": args},
        })
    return out


def tool_message_fields(msg: dict, where: str) -> dict:
    """The extra fields a `tool` message keeps for templates: tool_call_id and name."""
    out = {}
    for key in ("tool_call_id", "name"):
        v = msg.get(key)
        if v is not None:
            if not isinstance(v, str):
                raise invalid(f"{where}.{key}", f"must be a string, got {json_type(v)}")
            out[key] = v
    return out


def message_tool_calls(calls: list[list[str]]) -> list[dict]:
    """OpenAI `message.tool_calls` of parsed [name, arguments] pairs."""
    return [
        {"id": call_id(), "type": "function", "function": {"name": n, "arguments": a}}
        for n, a in calls
    ]


def tool_syntax(engine: Any) -> ToolSyntax:
    """The tool call syntax of `engine`'s chat template."""
    return syntax_for(engine.chat_template.source)


def constraint_of(g: Any, engine: Any, thinking: str | None = None) -> ConstraintSpec | None:
    """What a request constrains its output to: its response_format / grammar / json_schema,
    or the grammar of its tools (in the syntax of `engine`'s chat template; `thinking`: the
    prompt's think mode, engine/reasoning.think_mode, for a template that thinks)."""
    if g.constraint is not None:
        return after_thinking(g.constraint, thinking)
    if g.tools is not None:
        g.tools.syntax = tool_syntax(engine)  # the replies read calls in the same syntax
        return g.tools.spec(g.tools.syntax, thinking)
    return None
