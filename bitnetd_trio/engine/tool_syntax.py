"""How tool calls look in a model's text (model-format §6.5), per chat template.

The BitNet trained format has no tool syntax, so this server defines one: the tool
definitions go into the system turn, and a call is written as

    <tool_call>
    {"name": "get_weather", "arguments": {"city": "Paris"}}
    </tool_call>

one block per call, blocks separated by one newline. The text is plain BPE text (the
vocabulary has no tool tokens). Jinja templates that use `tools` (Qwen3's and Hermes-style
templates) render the definitions themselves and use the same call blocks; a template with
another syntax gets its own `ToolSyntax`. `syntax_for(template)` picks one.

`ToolCallParser` reads calls back out of generated text, incrementally: it turns the text,
piece by piece as a stream delivers it, into content, call starts (name) and argument
fragments, which is exactly how OpenAI streams tool calls. Under constrained decoding the
text always follows the syntax; text that does not is left as content.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["BITNET_TOOLS", "ToolCallParser", "ToolSyntax", "syntax_for"]


@dataclass(frozen=True)
class ToolSyntax:
    """One way of writing tool calls."""

    open: str = "<tool_call>\n"
    close: str = "\n</tool_call>"
    separator: str = "\n"

    def call_prefix(self, name: str) -> str:
        """The text before a call's arguments."""
        return self.open + '{"name": ' + json.dumps(name) + ', "arguments": '

    @property
    def call_suffix(self) -> str:
        return "}" + self.close

    def render_call(self, name: str, arguments: str) -> str:
        """A call as the model writes it (`arguments`: JSON text of an object)."""
        return self.call_prefix(name) + arguments + self.call_suffix

    def system_text(self, tools: list[dict]) -> str:
        """The tool definitions and the call syntax, for the system turn of a template that
        has no tool support of its own."""
        lines = [json.dumps(t, ensure_ascii=False) for t in tools]
        return (
            "You can call these tools (each line: a function and the JSON schema of its "
            "parameters):\n" + "\n".join(lines) + "\n"
            "To call a tool, answer with one block per call and nothing else:\n"
            + self.render_call("<tool name>", "<arguments as a JSON object>")
        )

    def render_messages(self, messages: list[dict], tools: list[dict] | None) -> list[dict]:
        """Messages for a template without tool support: the definitions appended to the
        system turn (one is added first if there is none), assistant `tool_calls` written
        out in this syntax after the turn's content. Tool results stay `tool` turns."""
        out = [dict(m) for m in messages]
        if tools:
            text = self.system_text(tools)
            if out and out[0].get("role") == "system":
                first = str(out[0].get("content") or "")
                out[0]["content"] = (first + "\n\n" + text) if first else text
            else:
                out.insert(0, {"role": "system", "content": text})
        for m in out:
            calls = m.get("tool_calls")
            if m.get("role") == "assistant" and calls:
                blocks = self.separator.join(
                    self.render_call(c["function"]["name"], _arguments_text(c))
                    for c in calls
                )
                content = str(m.get("content") or "")
                m["content"] = (content + "\n" + blocks) if content else blocks
        return out


def _arguments_text(call: Mapping[str, Any]) -> str:
    args = call["function"].get("arguments")
    if isinstance(args, str):
        return args
    return json.dumps(args if args is not None else {}, ensure_ascii=False)


BITNET_TOOLS = ToolSyntax()


def syntax_for(template_source: str | None) -> ToolSyntax:
    """The tool syntax of a chat template (None: the BitNet trained format). Only one is
    defined so far; a template with another call syntax is matched here."""
    return BITNET_TOOLS


_NAME_RE = re.compile(r'\{"name": "([A-Za-z0-9_.\-]{1,64})", "arguments": ')


class ToolCallParser:
    """Incremental reader of tool calls in generated text (see the module docstring).

    `feed(text)` and `finish()` return events: ("content", text), ("call", index, name) and
    ("arguments", index, fragment). `calls` holds [name, arguments] of every call so far.
    """

    def __init__(self, syntax: ToolSyntax) -> None:
        self.syntax = syntax
        self.calls: list[list[str]] = []
        self._buf = ""
        self._state = "begin"  # begin | text | header | args | trailer
        self._depth = 0
        self._in_string = False
        self._escape = False

    def feed(self, text: str) -> list[tuple]:
        self._buf += text
        events: list[tuple] = []
        while self._step(events):
            pass
        return events

    def finish(self) -> list[tuple]:
        """Whatever is still held back: only text that never became a call is content."""
        events: list[tuple] = []
        if self._state in ("begin", "text") and self._buf:
            events.append(("content", self._buf))
        self._buf = ""
        return events

    def _step(self, events: list[tuple]) -> bool:
        s = self.syntax
        buf = self._buf
        if self._state == "begin":
            if not buf:
                return False
            if buf.startswith(s.open):
                self._state = "header"
                return True
            if s.open.startswith(buf):
                return False  # could still become a call
            self._state = "text"
            return True
        if self._state == "text":
            if buf:
                events.append(("content", buf))
                self._buf = ""
            return False
        if self._state == "header":
            i = 0
            while buf[i:].startswith(s.separator) and not buf[i:].startswith(s.open):
                i += len(s.separator)
            if not buf[i:].startswith(s.open):
                return False if s.open.startswith(buf[i:]) else self._give_up(events)
            j = i + len(s.open)
            m = _NAME_RE.match(buf, j)
            if m is None:
                head = buf[j:]
                return False if len(head) < 90 else self._give_up(events)
            self.calls.append([m.group(1), ""])
            events.append(("call", len(self.calls) - 1, m.group(1)))
            self._buf = buf[m.end():]
            self._state = "args"
            self._depth, self._in_string, self._escape = 0, False, False
            return True
        if self._state == "args":
            end = self._scan(buf)
            frag = buf if end is None else buf[:end]
            if frag:
                self.calls[-1][1] += frag
                events.append(("arguments", len(self.calls) - 1, frag))
            self._buf = "" if end is None else buf[end:]
            if end is None:
                return False
            self._state = "trailer"
            return True
        if self._state == "trailer":
            suffix = s.call_suffix
            if len(buf) < len(suffix):
                return False
            if not buf.startswith(suffix):
                return self._give_up(events)
            self._buf = buf[len(suffix):]
            self._state = "header"
            return True
        return False

    def _scan(self, buf: str) -> int | None:
        """Where the arguments' JSON value ends in `buf` (None: not yet)."""
        for k, ch in enumerate(buf):
            if self._in_string:
                if self._escape:
                    self._escape = False
                elif ch == "\\":
                    self._escape = True
                elif ch == '"':
                    self._in_string = False
            elif ch == '"':
                self._in_string = True
            elif ch in "{[":
                self._depth += 1
            elif ch in "}]":
                self._depth -= 1
                if self._depth == 0:
                    return k + 1
        return None

    def _give_up(self, events: list[tuple]) -> bool:
        """Text that breaks the syntax: from here on it is content."""
        if not self.calls:
            self._state = "text"
            return True
        events.append(("content", self._buf))
        self._buf = ""
        self._state = "text"
        return False


def parse_tool_calls(text: str, syntax: ToolSyntax) -> tuple[str, list[list[str]]]:
    """(content, [[name, arguments]]) of a whole generated text."""
    p = ToolCallParser(syntax)
    events = p.feed(text) + p.finish()
    content = "".join(e[1] for e in events if e[0] == "content")
    return content, p.calls


def tool_names(tools: Iterable[Mapping[str, Any]]) -> list[str]:
    return [t["function"]["name"] for t in tools]
