"""Chat templates: the one place that knows how messages become a prompt (spec section 6).

Which format:
- the BitNet trained format (`<|begin_of_text|>System: ...<|eot_id|>User: ...<|eot_id|>Assistant: `)
  when the file has no template, or has the known placeholder (`Human: ... BITNETAssistant: `);
- any other template in the file, or the operator's override, rendered as Jinja in a sandbox.

Roles in the trained format: system and developer -> `System`, user -> `User`, assistant ->
`Assistant`. The model was never trained on tool results; a `tool` message is rendered as a
`Tool: ...<|eot_id|>` turn (the format's own pattern, so the model sees that the text came
from neither the user nor itself). Any other role is an error.

Prompt injection: the template's own control tokens (`<|eot_id|>`, the BOS text) must become
control ids, while the same text inside a message must stay plain text. `render_segments`
therefore returns `(text, is_template)` pairs, and `render_tokens` turns only the control
tokens found in template pieces into ids; all other text, template and content alike, is
BPE-encoded in the pieces between those control tokens, exactly as if the whole prompt had been
tokenized at once (a split at the content boundary would change tokens: "User: " + "Hi" must
give "User", ":", " Hi", not "User", ":", " ", "Hi"). For Jinja templates,
control-token strings inside message fields are swapped for private-use placeholders before
rendering and swapped back, as content segments, afterwards. `render()` returns the plain
string (for display, logs and the API's echo); never tokenize it with parse_special=True.

A hostile or broken template cannot hang the caller: the sandbox refuses unsafe attribute
access, and a budget limits loop iterations (over `range` and over the messages), the size of
`*` / `**` results, the output size and the time spent.
"""

from __future__ import annotations

import contextvars
import json
import logging
import re
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from datetime import datetime
from typing import Any, Protocol

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

log = logging.getLogger(__name__)

BITNET_ROLES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}
EOT_TEXT = "<|eot_id|>"

#: Limits for Jinja rendering.
MAX_ITERATIONS = 1_000_000  # loop steps over range() and message lists, in all
MAX_SECONDS = 2.0
MAX_OUTPUT_BASE = 1 << 20  # characters, plus MAX_OUTPUT_PER_CONTENT per content character
MAX_OUTPUT_PER_CONTENT = 4
MAX_VALUE_SIZE = 1 << 20  # items of a str/list made by * in a template

# Private-use code points that bracket a placeholder's index.
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_PH_RE = re.compile(_PH_OPEN + r"(\d+)" + _PH_CLOSE)


class ChatTemplateError(ValueError):
    """A template that cannot be compiled or fails (or refuses) to render these messages."""


class _TokenizerLike(Protocol):
    control_regex: re.Pattern[str] | None
    bos_id: int | None
    add_bos_default: bool

    def encode(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]: ...


def is_placeholder_template(template: str | None) -> bool:
    """True for no template, or the placeholder stored in the official BitNet GGUF."""
    if template is None or not template.strip():
        return True
    return "BITNETAssistant" in template


# ---- messages ----


def _content_text(content: Any, index: int) -> str:
    """A message's content as one string (text parts joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, Sequence):
        texts = []
        for part in content:
            if isinstance(part, Mapping) and part.get("type") == "text" and isinstance(
                part.get("text"), str
            ):
                texts.append(part["text"])
            else:
                raise ChatTemplateError(f"messages[{index}]: only text content parts are supported")
        return "".join(texts)
    raise ChatTemplateError(f"messages[{index}]: content must be a string or a list of parts")


def _normalized(messages: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ChatTemplateError(f"messages[{i}] is not an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise ChatTemplateError(f"messages[{i}]: role must be a string")
        msg = dict(m)
        msg["content"] = _content_text(m.get("content"), i)
        out.append(msg)
    return out


# ---- the Jinja sandbox with a budget ----


class _Budget:
    def __init__(self, max_iterations: int, seconds: float) -> None:
        self.left = max_iterations
        self.deadline = time.monotonic() + seconds

    def spend(self, n: int = 1) -> None:
        self.left -= n
        if self.left < 0:
            raise ChatTemplateError("chat template exceeded its loop budget")
        if self.left % 1024 < n and time.monotonic() > self.deadline:
            raise ChatTemplateError("chat template took too long to render")


_budget: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("budget", default=None)


def _spend(n: int = 1) -> None:
    b = _budget.get()
    if b is not None:
        b.spend(n)


class _CountedList(list):
    """A list whose iteration (and that of its slices) draws on the render budget."""

    def __iter__(self) -> Iterator[Any]:
        for item in super().__iter__():
            _spend()
            yield item

    def __getitem__(self, key: Any) -> Any:
        item = super().__getitem__(key)
        return _CountedList(item) if isinstance(key, slice) else item


def _budgeted_range(*args: int) -> range:
    r = range(*args)
    if len(r) > 100_000:
        raise ChatTemplateError("chat template: range() too large")
    _spend(len(r))
    return r


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"chat template refused the request: {message}")


def _tojson(value: Any, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, separators=separators, sort_keys=sort_keys,
                      ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _ChatEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"*", "**"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "**":
            if isinstance(right, int) and abs(right) > 256 and not (
                isinstance(left, (int, float)) and abs(left) <= 1
            ):
                raise ChatTemplateError("chat template: exponent too large")
        elif operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int):
                    if len(seq) * n > MAX_VALUE_SIZE:
                        raise ChatTemplateError("chat template: repeated value too large")
        return super().call_binop(context, operator, left, right)


def _environment() -> jinja2.Environment:
    env = _ChatEnvironment(trim_blocks=True, lstrip_blocks=True,
                           extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["range"] = _budgeted_range
    return env


# ---- placeholders: control-token text inside message fields ----


class _Protector:
    """Swaps control-token strings (and stray placeholder brackets) in message fields for
    numbered placeholders, remembering the originals."""

    def __init__(self, control_regex: re.Pattern[str] | None) -> None:
        parts = [re.escape(_PH_OPEN), re.escape(_PH_CLOSE)]
        if control_regex is not None:
            parts.append(control_regex.pattern)
        self._re = re.compile("|".join(parts))
        self.originals: list[str] = []

    def _sub(self, m: re.Match[str]) -> str:
        self.originals.append(m.group(0))
        return f"{_PH_OPEN}{len(self.originals) - 1}{_PH_CLOSE}"

    def protect(self, value: Any) -> Any:
        if isinstance(value, str):
            return self._re.sub(self._sub, value)
        if isinstance(value, Mapping):
            return {k: (v if k == "role" else self.protect(v)) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return _CountedList(self.protect(v) for v in value)
        return value

    def segments(self, rendered: str) -> list[tuple[str, bool]]:
        out: list[tuple[str, bool]] = []
        pos = 0
        for m in _PH_RE.finditer(rendered):
            i = int(m.group(1))
            if i >= len(self.originals):
                continue  # not one of ours: leave it as template text
            if m.start() > pos:
                out.append((rendered[pos:m.start()], True))
            out.append((self.originals[i], False))
            pos = m.end()
        if pos < len(rendered):
            out.append((rendered[pos:], True))
        return out


def _merge(segments: Iterable[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Drop empty segments and join neighbours of the same kind."""
    out: list[tuple[str, bool]] = []
    for text, is_template in segments:
        if not text:
            continue
        if out and out[-1][1] == is_template:
            out[-1] = (out[-1][0] + text, is_template)
        else:
            out.append((text, is_template))
    return out


# ---- the template ----


class ChatTemplate:
    """Renders a conversation into a prompt; see the module docstring."""

    def __init__(self, jinja_source: str | None, *, bos_token: str | None = None,
                 eos_token: str | None = None, origin: str = "default") -> None:
        """`jinja_source` None means the BitNet trained format."""
        self.bos_token = bos_token or ""
        self.eos_token = eos_token or ""
        self.origin = origin  # "default", "model" or "override"
        self.source = jinja_source
        self._template: jinja2.Template | None = None
        if jinja_source is not None:
            try:
                self._template = _environment().from_string(jinja_source)
            except jinja2.TemplateError as exc:
                raise ChatTemplateError(
                    f"chat template ({origin}) does not compile: {exc}"
                ) from exc

    @property
    def kind(self) -> str:
        """'bitnet' (the trained format) or 'jinja'."""
        return "bitnet" if self._template is None else "jinja"

    @classmethod
    def from_model(cls, metadata_template: str | None, override: str | None,
                   bos_token: str | None, eos_token: str | None) -> ChatTemplate:
        """The template to use for a model: the override if given, else the file's own
        (the trained format if it is absent or the known placeholder).

        A broken override raises ChatTemplateError; a broken template inside the model file
        is logged and replaced by the trained format, so the model still serves."""
        if metadata_template is not None and not isinstance(metadata_template, str):
            log.warning(
                "tokenizer.chat_template in the model file is not a string (%s); using the "
                "BitNet trained chat format instead", type(metadata_template).__name__,
            )
            metadata_template = None
        if override is not None and override.strip():
            if is_placeholder_template(override):
                return cls(None, bos_token=bos_token, eos_token=eos_token, origin="override")
            return cls(override, bos_token=bos_token, eos_token=eos_token, origin="override")
        if is_placeholder_template(metadata_template):
            return cls(None, bos_token=bos_token, eos_token=eos_token, origin="default")
        try:
            return cls(metadata_template, bos_token=bos_token, eos_token=eos_token,
                       origin="model")
        except ChatTemplateError as exc:
            log.warning("%s; using the BitNet trained chat format instead", exc)
            return cls(None, bos_token=bos_token, eos_token=eos_token, origin="default")

    # ---- rendering ----

    def render(self, messages: Iterable[Mapping[str, Any]],
               add_generation_prompt: bool = True) -> str:
        """The prompt as one string (do not tokenize it with parse_special=True)."""
        return "".join(t for t, _ in self._segments(messages, add_generation_prompt, None))

    def render_segments(self, messages: Iterable[Mapping[str, Any]],
                        add_generation_prompt: bool = True,
                        control_regex: re.Pattern[str] | None = None,
                        ) -> list[tuple[str, bool]]:
        """The prompt as (text, is_template) pieces: template text may contain control tokens;
        content must be tokenized as plain text. `control_regex` finds control-token text in
        message fields (Tokenizer.control_regex); the trained format needs none."""
        return self._segments(messages, add_generation_prompt, control_regex)

    def render_tokens(self, messages: Iterable[Mapping[str, Any]], tokenizer: _TokenizerLike,
                      add_generation_prompt: bool = True) -> list[int]:
        """The prompt's token ids: control tokens written by the template become their ids,
        control-token text inside content stays plain text. Everything between two template
        control tokens is BPE-encoded as one piece, template text and content together, so
        token boundaries are exactly those of tokenizing the whole prompt (the model's training
        condition). BOS is added when the tokenizer wants it and the template did not write it.
        """
        control = tokenizer.control_regex
        ids: list[int] = []
        text: list[str] = []

        def flush() -> None:
            if text:
                ids.extend(tokenizer.encode("".join(text), add_bos=False, parse_special=False))
                text.clear()

        for seg, is_template in self._segments(messages, add_generation_prompt, control):
            if not is_template or control is None:
                text.append(seg)
                continue
            for i, part in enumerate(control.split(seg)):
                if i % 2:  # a control token written by the template
                    flush()
                    ids.extend(tokenizer.encode(part, add_bos=False, parse_special=True))
                elif part:
                    text.append(part)
        flush()
        bos = tokenizer.bos_id
        if tokenizer.add_bos_default and bos is not None and (not ids or ids[0] != bos):
            ids.insert(0, bos)
        return ids

    def _segments(self, messages: Iterable[Mapping[str, Any]], add_generation_prompt: bool,
                  control_regex: re.Pattern[str] | None) -> list[tuple[str, bool]]:
        msgs = _normalized(messages)
        if self._template is None:
            return self._bitnet_segments(msgs, add_generation_prompt)
        return self._jinja_segments(msgs, add_generation_prompt, control_regex)

    def _bitnet_segments(self, msgs: list[dict[str, Any]],
                         add_generation_prompt: bool) -> list[tuple[str, bool]]:
        segs: list[tuple[str, bool]] = [(self.bos_token, True)]
        for i, m in enumerate(msgs):
            label = BITNET_ROLES.get(m["role"])
            if label is None:
                raise ChatTemplateError(
                    f"messages[{i}]: unsupported role {m['role']!r} "
                    f"(expected one of {', '.join(BITNET_ROLES)})"
                )
            segs += [(f"{label}: ", True), (m["content"], False), (EOT_TEXT, True)]
        if add_generation_prompt:
            segs.append(("Assistant: ", True))
        return _merge(segs)

    def _jinja_segments(self, msgs: list[dict[str, Any]], add_generation_prompt: bool,
                        control_regex: re.Pattern[str] | None) -> list[tuple[str, bool]]:
        assert self._template is not None
        protector = _Protector(control_regex)
        context = {
            "messages": protector.protect(msgs),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        content_chars = sum(len(m["content"]) for m in msgs)
        limit = MAX_OUTPUT_BASE + MAX_OUTPUT_PER_CONTENT * content_chars
        token = _budget.set(_Budget(MAX_ITERATIONS, MAX_SECONDS))
        chunks: list[str] = []
        size = 0
        try:
            for chunk in self._template.generate(context):
                size += len(chunk)
                if size > limit:
                    raise ChatTemplateError(
                        f"chat template output exceeds {limit} characters"
                    )
                chunks.append(chunk)
                _spend()
        except ChatTemplateError:
            raise
        except jinja2.TemplateError as exc:
            raise ChatTemplateError(f"chat template ({self.origin}) failed: {exc}") from exc
        except RecursionError as exc:
            raise ChatTemplateError(f"chat template ({self.origin}) recursed too deeply") from exc
        except Exception as exc:  # the template's own bug (a TypeError, ...): the same for users
            raise ChatTemplateError(
                f"chat template ({self.origin}) failed: {type(exc).__name__}: {exc}"
            ) from exc
        finally:
            _budget.reset(token)
        return _merge(protector.segments("".join(chunks)))
