"""Chat templates: the one place that knows how messages become a prompt (model-format §6).

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

A hostile or broken template cannot hang the daemon or take its memory: Jinja templates are
rendered in a separate worker process (template_worker, template_sandbox), which runs with an
address-space limit of MAX_MEMORY_MB and is killed when a render takes longer than MAX_SECONDS;
either is a ChatTemplateError for that request ("chat template: took longer than 2 s", "...
used more than 512 MB"), and the next render starts a fresh worker. Inside the worker the
sandbox still refuses unsafe attribute access and mutation, and a budget on loop steps (over
`range` and the messages), on `*` / `**` results and on the output size stops the common
runaways early with a precise message; those checks alone could not bound a loop over a long
string or a `join` that builds gigabytes. The trained format is plain Python over the messages
and runs in the caller's thread.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Protocol

import jinja2

from bitnetd_trio.engine import template_worker
from bitnetd_trio.engine.reasoning import template_thinks
from bitnetd_trio.engine.template_sandbox import ChatTemplateError, compile_template
from bitnetd_trio.engine.tool_syntax import syntax_for

log = logging.getLogger(__name__)

BITNET_ROLES = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}
EOT_TEXT = "<|eot_id|>"

#: Limits for Jinja rendering (MAX_ITERATIONS and MAX_VALUE_SIZE, inside the sandbox, are in
#: template_sandbox).
MAX_SECONDS = 2.0  # wall time of one render, after which the worker is killed
MAX_MEMORY_MB = 512  # the worker's address space (RLIMIT_AS)
MAX_OUTPUT_BASE = 1 << 20  # characters, plus MAX_OUTPUT_PER_CONTENT per content character
MAX_OUTPUT_PER_CONTENT = 4

# Private-use code points that bracket a placeholder's index.
_PH_OPEN, _PH_CLOSE = "\ue000", "\ue001"
_PH_RE = re.compile(_PH_OPEN + r"(\d+)" + _PH_CLOSE)


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


def join_text_parts(texts: Iterable[str]) -> str:
    """A message's text parts as the one string the model sees: one part per line, whichever
    API the parts came from (OpenAI content parts, Anthropic text blocks, Responses items)."""
    return "\n".join(texts)


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
        return join_text_parts(texts)
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
            return [self.protect(v) for v in value]
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


def bitnet_format_as_jinja(bos_token: str) -> str:
    """The BitNet trained format written as a Jinja chat template, for clients that render
    prompts themselves from the server's template (lm-evaluation-harness's remote tokenizer
    reads it from /tokenizer_info). It renders what `ChatTemplate(None).render` does for
    messages with string contents; BOS is written literally because such clients pass only
    `messages` and `add_generation_prompt`."""
    roles = json.dumps(BITNET_ROLES)
    return (
        "{% raw %}" + bos_token + "{% endraw %}"
        "{% for message in messages %}"
        "{{ " + roles + "[message['role']] }}: {{ message['content'] }}" + EOT_TEXT
        + "{% endfor %}"
        "{% if add_generation_prompt %}Assistant: {% endif %}"
    )


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
            # Compiled here so that a broken template is refused at load; the worker compiles
            # (and caches) its own copy, since compiled templates cannot cross processes.
            self._template = compile_template(jinja_source, origin)

    @property
    def kind(self) -> str:
        """'bitnet' (the trained format) or 'jinja'."""
        return "bitnet" if self._template is None else "jinja"

    @property
    def thinks(self) -> bool:
        """A Jinja template that marks thinking with `<think>` (engine/reasoning.py)."""
        return self._template is not None and template_thinks(self.source)

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
               add_generation_prompt: bool = True, tools: list[dict] | None = None,
               extra: Mapping[str, Any] | None = None) -> str:
        """The prompt as one string (do not tokenize it with parse_special=True)."""
        return "".join(
            t for t, _ in self._segments(messages, add_generation_prompt, None, tools, extra)
        )

    def render_segments(self, messages: Iterable[Mapping[str, Any]],
                        add_generation_prompt: bool = True,
                        control_regex: re.Pattern[str] | None = None,
                        ) -> list[tuple[str, bool]]:
        """The prompt as (text, is_template) pieces: template text may contain control tokens;
        content must be tokenized as plain text. `control_regex` finds control-token text in
        message fields (Tokenizer.control_regex); the trained format needs none."""
        return self._segments(messages, add_generation_prompt, control_regex)

    def render_tokens(self, messages: Iterable[Mapping[str, Any]], tokenizer: _TokenizerLike,
                      add_generation_prompt: bool = True,
                      tools: list[dict] | None = None,
                      extra: Mapping[str, Any] | None = None) -> list[int]:
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

        for seg, is_template in self._segments(messages, add_generation_prompt, control, tools,
                                               extra):
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
                  control_regex: re.Pattern[str] | None,
                  tools: list[dict] | None = None,
                  extra: Mapping[str, Any] | None = None) -> list[tuple[str, bool]]:
        """`tools`: OpenAI tool definitions. The trained format gets them, and assistant
        tool calls, written in this server's tool syntax (engine/tool_syntax.py); a Jinja
        template gets `tools` and the messages' `tool_calls` as they are. `extra`: more
        variables for a Jinja template (`chat_template_kwargs`, e.g. enable_thinking); they
        never replace messages, tools, add_generation_prompt or the special tokens, and the
        trained format ignores them."""
        msgs = _normalized(messages)
        if self._template is None:
            if tools or any(m.get("tool_calls") for m in msgs):
                msgs = syntax_for(None).render_messages(msgs, tools)
            return self._bitnet_segments(msgs, add_generation_prompt)
        return self._jinja_segments(msgs, add_generation_prompt, control_regex, tools, extra)

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
                        control_regex: re.Pattern[str] | None,
                        tools: list[dict] | None = None,
                        extra: Mapping[str, Any] | None = None) -> list[tuple[str, bool]]:
        assert self._template is not None
        protector = _Protector(control_regex)
        context = {k: protector.protect(v) for k, v in (extra or {}).items()}
        context |= {
            "messages": protector.protect(msgs),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.bos_token,
            "eos_token": self.eos_token,
        }
        if tools:
            context["tools"] = protector.protect(tools)
        content_chars = sum(len(m["content"]) for m in msgs)
        rendered = template_worker.shared_worker(MAX_MEMORY_MB).render(
            self.source, context,
            output_limit=MAX_OUTPUT_BASE + MAX_OUTPUT_PER_CONTENT * content_chars,
            origin=self.origin, deadline_seconds=MAX_SECONDS,
        )
        return _merge(protector.segments(rendered))
