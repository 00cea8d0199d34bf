"""Request validation shared by every generating endpoint, sans-I/O: plain dicts in, normalized
requests out.

`GenerationRequest` is the normalized form of every generating request; each endpoint family's
dialect (`bitnetd_trio.api.dialects`) parses its own request shape with the field parsers here
(model, sampling, stop strings, logit_bias, seed, messages, prompts, grammars), so a field
means the same wherever it appears. A parser returns the value or raises `ApiError(400, ..., param=...)` naming the offending
field the way OpenAI does ("messages[1].content"). Unknown fields are ignored (SDKs add fields
every month); wrong types and out-of-range values never pass: booleans must be JSON booleans,
integers may not be booleans or fractional numbers.

Decoding the body and typed field access are in `bitnetd_trio.api.json_body`; what needs the
tokenizer (prompt length against the context) is checked later, in `bitnetd_trio.api.prompts`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import (
    Fields,
    as_bool,
    as_number,
    as_str,
    invalid,
    json_type,
    object_array,
    quoted,
)
from bitnetd_trio.api.response_format import (
    ConstraintSpec,
    gbnf_spec,
    json_schema_spec,
)
from bitnetd_trio.api.tools import (
    ToolRequest,
    parse_message_tool_calls,
    tool_message_fields,
)
from bitnetd_trio.engine.chat import join_text_parts
from bitnetd_trio.engine.sampling import SamplingParams

__all__ = [
    "CHAT_ROLES",
    "COMPLETIONS_MAX_TOKENS",
    "GenerationRequest",
    "INT32_MAX",
    "LLAMA_MAX_STOP",
    "MAX_CHOICES_PER_REQUEST",
    "MAX_LOGPROBS_COMPLETIONS",
    "MAX_N_PROBS",
    "MAX_STOP",
    "MAX_STOP_CHARS",
    "MAX_TOP_LOGPROBS_CHAT",
    "SchemaDefaults",
    "check_model_id",
    "looks_like_path",
    "parse_content_text",
    "parse_grammar_constraint",
    "parse_llama_prompt",
    "parse_logit_bias",
    "parse_logit_bias_llama",
    "parse_messages",
    "parse_min_tokens",
    "parse_model",
    "parse_n",
    "parse_openai_common",
    "parse_prompts",
    "parse_reasoning_effort",
    "parse_sampling",
    "parse_seed",
    "parse_stop",
    "parse_stream_options",
    "parse_template_kwargs",
    "parse_token_id",
    "resolve_model",
]

# Defaults of the Docker "BitNet LLM HTTP Server" /generate endpoint (http-api §3).

COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
MAX_STOP = 4  # OpenAI's limit on stop strings (chat)
# llama.cpp and vLLM have no limit, and lm-evaluation-harness's local-completions sends a task's
# `until` list plus the EOS text untruncated (often 4-6 strings): a bound only keeps the stop
# matcher's work small.
LLAMA_MAX_STOP = 16
# The stop matcher holds back up to the longest stop string's length and, on the inference
# thread, compares every candidate prefix per token: a long stop string that the output keeps
# matching (logit_bias can force that) costs quadratic work per token and stalls every sequence.
MAX_STOP_CHARS = 256
MAX_TOP_LOGPROBS_CHAT = 20
MAX_LOGPROBS_COMPLETIONS = 5
MAX_N_PROBS = 20
MAX_CHOICES_PER_REQUEST = 256  # prompts x n of one /v1/completions request
INT32_MAX = (1 << 31) - 1  # the largest count a request may give (int32, as llama.cpp reads it)
_SEED_MIN, _SEED_END = -(1 << 63), 1 << 64

CHAT_ROLES = {"system", "developer", "user", "assistant", "tool"}


@dataclass(frozen=True)
class SchemaDefaults:
    """What validation needs from the configuration and the loaded model."""

    temperature: float = 0.8
    top_k: int = 40
    top_p: float = 0.95
    min_p: float = 0.05
    max_tokens_default: int | None = None  # None: until the context is full
    n_vocab: int | None = None  # token ids (prompt, logit_bias, detokenize) must be below it
    model_ids: frozenset[str] = frozenset()  # accepted `model` values; empty: any
    max_n: int = 8  # most choices (`n`) per request
    # [model] strict_model_name: an unknown `model` is 404 instead of served by the one model
    strict_model_name: bool = False
    # the served model's tokenizer, for fields that name text (llama.cpp's string-keyed
    # logit_bias, prompts mixing ids and text); None in unit tests without a model
    tokenizer: Any = None
    max_grammar_size: int = 64 << 10  # bytes of a schema, grammar or tool list

    @classmethod
    def from_config(
        cls,
        config: Any,
        *,
        n_vocab: int | None = None,
        model_ids: Iterable[str] = (),
        tokenizer: Any = None,
    ) -> SchemaDefaults:
        """From a `config.Config` and facts of the loaded model."""
        m = config.model
        return cls(
            temperature=m.temperature,
            top_k=m.top_k,
            top_p=m.top_p,
            min_p=m.min_p,
            max_tokens_default=m.max_tokens_default,
            n_vocab=n_vocab,
            model_ids=frozenset(model_ids),
            strict_model_name=m.strict_model_name,
            tokenizer=tokenizer,
            max_grammar_size=config.server.max_grammar_size,
        )


@dataclass
class GenerationRequest:
    """The one normalized form of every generating endpoint."""

    # which parser made it: "chat" | "completions" | "generate" | "completion" (for tests and
    # logs; the response is shaped by the route's dialect, never by this)
    endpoint: str
    model: str | None = None
    messages: list[dict] | None = None  # chat: [{"role", "content": str}], developer -> system
    prompts: list[str | list[int]] | None = None  # text or token-id prompts
    max_tokens: int | None = None  # None: until the context is full
    min_tokens: int = 0
    ignore_eos: bool = False
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: list[str] = field(default_factory=list)
    n: int = 1
    stream: bool = False
    include_usage: bool = False
    logprobs: bool = False  # return the logprob of each generated token
    top_logprobs: int = 0  # and this many alternatives per position
    echo: bool = False  # /v1/completions: prepend the prompt (with its logprobs if asked)
    user: str | None = None
    cache_prompt: bool = True  # llama.cpp's flag: reuse a cached prompt prefix
    return_tokens: bool = False  # the engine reports the generated token ids (llama.cpp)
    # llama.cpp: probabilities after the sampling chain instead of logprobs (with logprobs)
    post_sampling_probs: bool = False
    return_progress: bool = False  # llama.cpp: prefill progress events in the stream
    # /generate only: what the Docker server took per request; there is one engine here, so
    # these are validated and reported back, not applied.
    context_size: int | None = None
    threads: int | None = None
    # Fields only one dialect reads back when shaping its answer (Responses: `instructions`,
    # `metadata`; llama.cpp: `return_tokens`, ...), keyed by their request names.
    dialect_options: dict[str, Any] = field(default_factory=dict)
    # constrained decoding: response_format, grammar, json_schema or the tools' grammar
    constraint: ConstraintSpec | None = None
    tools: ToolRequest | None = None  # chat: the tools and tool_choice
    # extra variables for a Jinja chat template (`chat_template_kwargs`, and enable_thinking
    # from chat's `reasoning_effort`, Responses' `reasoning` or Anthropic's `thinking`)
    template_kwargs: dict[str, Any] | None = None


# ---- shared pieces ------------------------------------------------------------------------------


def check_model_id(model: str, accepted: Iterable[str]) -> str:
    """`model` if the server answers to it (any id when `accepted` is empty), else ApiError
    404 model_not_found. The one check of a model id, for request bodies and for
    /v1/models/{id}."""
    if accepted and model not in accepted:
        raise ApiError.model_not_found(model)
    return model


def looks_like_path(model: str) -> bool:
    """A `model` that names a file by its path (absolute, relative, home or Windows): never
    a model name, and never served (the host's layout is not part of the API, http-api §1.3).
    `org/name` (Hugging Face style) is a name, not a path."""
    return model.startswith(("/", "./", "../", "~")) or "\\" in model or model in (".", "..")


def resolve_model(model: str, defaults: SchemaDefaults) -> str | None:
    """The `model` of a request: itself when the server answers to it; None (the one served
    model, whose id the response then shows) for another name, as llama.cpp's server does,
    unless `[model] strict_model_name` is set; ApiError 404 model_not_found for a path or,
    strictly, an unknown name (http-api §1.3)."""
    if not defaults.model_ids or model in defaults.model_ids:
        return model
    if defaults.strict_model_name or looks_like_path(model):
        raise ApiError.model_not_found(model)
    return None


def parse_model(f: Fields, defaults: SchemaDefaults) -> str | None:
    model = f.str("model") or None  # "" like absent: the served model
    return None if model is None else resolve_model(model, defaults)


def parse_stop(f: Fields, limit: int, name: str = "stop", *, allow_string: bool = True
               ) -> list[str]:
    """Stop strings: up to `limit` non-empty strings of at most MAX_STOP_CHARS each, under
    the field `name` (OpenAI's `stop` also takes one bare string; Anthropic's
    `stop_sequences` does not)."""
    v = f.d.get(name)
    if v is None:
        return []
    if isinstance(v, str) and allow_string:
        v = [v]
        where = lambda i: name  # noqa: E731 - a bare string is the field itself
    else:
        where = lambda i: f"{name}[{i}]"  # noqa: E731
        if not isinstance(v, list):
            kinds = "a string or an array of strings" if allow_string else "an array of strings"
            raise invalid(name, f"must be {kinds}, got {json_type(v)}")
    if len(v) > limit:
        raise invalid(name, f"may hold at most {limit} strings, got {len(v)}")
    out = []
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise invalid(where(i), f"must be a string, got {json_type(s)}")
        if not s:
            raise invalid(where(i), "must not be an empty string")
        if len(s) > MAX_STOP_CHARS:
            raise invalid(
                where(i), f"must be at most {MAX_STOP_CHARS} characters, got {len(s)}"
            )
        out.append(s)
    return out


def parse_token_id(v: Any, param: str, n_vocab: int | None) -> int:
    hi = (n_vocab - 1) if n_vocab else INT32_MAX
    if isinstance(v, bool) or not isinstance(v, int):
        raise invalid(param, f"must be a token id (an integer), got {quoted(v)}")
    if not 0 <= v <= hi:
        raise invalid(param, f"token id {v} is out of range (0..{hi})")
    return v


def parse_logit_bias(f: Fields, n_vocab: int | None) -> dict[int, float]:
    """{"<token id>": bias -100..100}."""
    v = f.d.get("logit_bias")
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise invalid(
            "logit_bias", f"must be an object mapping token ids to biases, got {json_type(v)}"
        )
    out: dict[int, float] = {}
    hi = (n_vocab - 1) if n_vocab else INT32_MAX
    for key, bias in v.items():
        if not re.fullmatch(r"[0-9]{1,10}", key):
            raise invalid("logit_bias", f"keys must be token ids, got '{key[:40]}'")
        tok = int(key)
        if tok > hi:
            raise invalid("logit_bias", f"token id {tok} is out of range (0..{hi})")
        out[tok] = as_number(bias, "logit_bias", -100.0, 100.0)
    return out


def _text_token_ids(text: str, param: str, tokenizer: Any) -> list[int]:
    """The token ids of a piece of text a llama.cpp field names (no BOS, control-token text
    kept as plain text); 400 when no model's tokenizer is at hand."""
    if tokenizer is None:
        raise invalid(param, "text needs the model's tokenizer (none is loaded)")
    return tokenizer.encode(text, add_bos=False, parse_special=False)


def parse_logit_bias_llama(
    f: Fields, n_vocab: int | None, tokenizer: Any = None
) -> dict[int, float]:
    """llama.cpp: [[id, bias], ...] or {"id": bias}; a bias of false bans the token. A key
    that is text rather than an id ([["Hello", -1]], {"Hello": -1}) biases every token of
    that text, as llama.cpp's server does."""
    v = f.d.get("logit_bias")
    if v is None:
        return {}
    if isinstance(v, dict):
        pairs = list(v.items())
    elif isinstance(v, list):
        pairs = []
        for i, pair in enumerate(v):
            if not isinstance(pair, list) or len(pair) != 2:
                raise invalid(f"logit_bias[{i}]", "must be a pair [token id, bias]")
            pairs.append((pair[0], pair[1]))
    else:
        raise invalid("logit_bias", f"must be an array of [token id, bias] pairs or an object, "
                                 f"got {json_type(v)}")
    out: dict[int, float] = {}
    for key, bias in pairs:
        value = -math.inf if bias is False else as_number(bias, "logit_bias", -1e6, 1e6)
        if isinstance(key, str) and not re.fullmatch(r"[0-9]{1,10}", key):
            for tok in _text_token_ids(key, "logit_bias", tokenizer):
                out[tok] = value
            continue
        tok = parse_token_id(int(key) if isinstance(key, str) else key, "logit_bias", n_vocab)
        out[tok] = value
    return out


def parse_llama_prompt(prompt: Any, defaults: SchemaDefaults) -> list[int]:
    """llama.cpp's prompt array mixing token ids and strings ([12, "text", 34]): the strings
    tokenized in place (control-token text becomes the control id), BOS first when the first
    element is a string and the model wants BOS, as llama.cpp's server does."""
    tok = defaults.tokenizer
    ids: list[int] = []
    for i, part in enumerate(prompt):
        if isinstance(part, str):
            if tok is None:
                raise invalid("prompt", "text needs the model's tokenizer (none is loaded)")
            ids.extend(tok.encode(part, add_bos=i == 0 and tok.add_bos_default,
                                  parse_special=True))
        else:
            ids.append(parse_token_id(part, f"prompt[{i}]", defaults.n_vocab))
    if not ids:
        raise invalid("prompt", "makes no tokens")
    return ids


def _penalty_window(f: Fields) -> int:
    return f.int("repeat_last_n", -1, 1 << 20, 64)


def _repeat_penalty(f: Fields) -> float:
    # llama.cpp calls it repeat_penalty, vLLM and transformers repetition_penalty.
    name = "repeat_penalty" if f.present("repeat_penalty") else "repetition_penalty"
    v = f.d.get(name)
    if v is None:
        return 1.0
    value = as_number(v, name, 0.0, 10.0)
    if value == 0.0:
        raise invalid(name, "must be greater than 0 (1 means no penalty)")
    return value


def parse_sampling(
    f: Fields,
    defaults: SchemaDefaults,
    *,
    temperature: float | None = None,
    top_p: float | None = None,
    logit_bias: dict[int, float],
    seed: int | None,
) -> SamplingParams:
    top_k_hi = defaults.n_vocab if defaults.n_vocab else 1 << 24
    return SamplingParams(
        temperature=f.number(
            "temperature", 0.0, 2.0, defaults.temperature if temperature is None else temperature
        ),
        top_k=f.int("top_k", -1, top_k_hi, defaults.top_k),
        top_p=f.number("top_p", 0.0, 1.0, defaults.top_p if top_p is None else top_p),
        min_p=f.number("min_p", 0.0, 1.0, defaults.min_p),
        repeat_penalty=_repeat_penalty(f),
        repeat_last_n=_penalty_window(f),
        presence_penalty=f.number("presence_penalty", -2.0, 2.0, 0.0),
        frequency_penalty=f.number("frequency_penalty", -2.0, 2.0, 0.0),
        seed=seed,
        logit_bias=logit_bias,
    )


def parse_seed(f: Fields) -> int | None:
    return f.int("seed", _SEED_MIN, _SEED_END - 1)


def parse_min_tokens(f: Fields, max_tokens: int | None) -> int:
    min_tokens = f.int("min_tokens", 0, INT32_MAX, 0)
    if max_tokens is not None and min_tokens > max_tokens:
        raise invalid("min_tokens", f"({min_tokens}) must not exceed max_tokens ({max_tokens})")
    return min_tokens


def parse_stream_options(f: Fields, stream: bool) -> bool:
    """include_usage; stream_options without stream=true is a 400 (OpenAI does the same)."""
    v = f.d.get("stream_options")
    if v is None:
        return False
    if not stream:
        raise invalid("stream_options", "is only allowed when 'stream' is true")
    if not isinstance(v, dict):
        raise invalid("stream_options", f"must be an object, got {json_type(v)}")
    include = v.get("include_usage")
    return False if include is None else as_bool(include, "stream_options.include_usage")


def parse_n(f: Fields, defaults: SchemaDefaults) -> int:
    return f.int("n", 1, defaults.max_n, 1)


def parse_content_text(content: Any, param: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict):
                raise invalid(
                    f"{param}[{j}]", f"must be a content part object, got {json_type(part)}"
                )
            kind = part.get("type")
            if kind != "text":
                shown = f"'{kind}'" if isinstance(kind, str) else json_type(kind)
                raise ApiError(
                    400,
                    f"'{param}' holds a content part of type {shown[:60]}; only text parts are "
                    f"supported",
                    param=param,
                )
            texts.append(as_str(part.get("text"), f"{param}[{j}].text"))
        return join_text_parts(texts)
    raise invalid(param, f"must be a string or an array of text parts, got {json_type(content)}")


def parse_messages(d: dict) -> list[dict]:
    out = []
    for where, msg in object_array(d.get("messages"), "messages", "message"):
        role = msg.get("role")
        if not isinstance(role, str) or role not in CHAT_ROLES:
            shown = f"'{role[:40]}'" if isinstance(role, str) else json_type(role)
            raise invalid(
                f"{where}.role",
                f"must be one of {', '.join(sorted(CHAT_ROLES))}, got {shown}",
            )
        content = msg.get("content")
        if content is None:
            if role != "assistant":  # an assistant turn that only called tools has null content
                raise invalid(f"{where}.content", "is required")
            content = ""
        text = parse_content_text(content, f"{where}.content")
        m: dict[str, Any] = {"role": "system" if role == "developer" else role, "content": text}
        calls = parse_message_tool_calls(msg, where)
        if calls:
            m["tool_calls"] = calls
        reasoning = msg.get("reasoning_content")
        if reasoning is not None and role == "assistant":
            # a past turn's thinking, for templates that write it back (Qwen3-style ones
            # keep it for the turns of an unfinished tool loop)
            m["reasoning_content"] = as_str(reasoning, f"{where}.reasoning_content")
        if role == "tool":
            m.update(tool_message_fields(msg, where))
        out.append(m)
    return out


def parse_prompts(d: dict, n_vocab: int | None) -> list[str | list[int]]:
    """A string, an array of strings, an array of token ids, or an array of arrays of ids."""
    v = d.get("prompt")
    if v is None:
        raise invalid("prompt", "is required")
    if isinstance(v, str):
        return [v]
    if not isinstance(v, list):
        raise invalid("prompt", f"must be a string, an array of strings or of token ids, "
                             f"got {json_type(v)}")
    if not v:
        raise invalid("prompt", "must not be an empty array")
    if all(isinstance(x, str) for x in v):
        return list(v)
    if all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return [[parse_token_id(t, "prompt", n_vocab) for t in v]]
    if all(isinstance(x, list) for x in v):
        out: list[str | list[int]] = []
        for i, ids in enumerate(v):
            if not ids:
                raise invalid(f"prompt[{i}]", "must not be an empty array")
            out.append([parse_token_id(t, f"prompt[{i}]", n_vocab) for t in ids])
        return out
    raise invalid("prompt", "must be a string, an array of strings, an array of token ids or an "
                         "array of arrays of token ids (not a mixture)")


def parse_grammar_constraint(d: dict, defaults: SchemaDefaults) -> ConstraintSpec | None:
    """llama.cpp's `grammar` (GBNF) or `json_schema` fields (one of them)."""
    grammar, schema = d.get("grammar"), d.get("json_schema")
    if grammar is not None and grammar != "" and schema is not None:
        raise invalid("grammar", "send either grammar or json_schema, not both")
    if schema is not None:
        return json_schema_spec(schema, "json_schema", defaults.max_grammar_size)
    if grammar is not None and grammar != "":
        return gbnf_spec(grammar, "grammar", defaults.max_grammar_size)
    return None


def parse_openai_common(f: Fields, defaults: SchemaDefaults, max_tokens: int | None,
                        stop_limit: int) -> dict[str, Any]:
    """The `GenerationRequest` fields OpenAI's chat and completions read alike: min_tokens,
    ignore_eos, the sampling chain with logit_bias and seed, stop strings, stream and
    stream_options, user, cache_prompt."""
    stream = f.bool("stream")
    return {
        "min_tokens": parse_min_tokens(f, max_tokens),
        "ignore_eos": f.bool("ignore_eos"),
        "sampling": parse_sampling(
            f, defaults, logit_bias=parse_logit_bias(f, defaults.n_vocab), seed=parse_seed(f)
        ),
        "stop": parse_stop(f, stop_limit),
        "stream": stream,
        "include_usage": parse_stream_options(f, stream),
        "user": f.str("user"),
        "cache_prompt": f.bool("cache_prompt", True),
    }


#: Template variables a request may not set through chat_template_kwargs (the server sets them).
RESERVED_TEMPLATE_VARS = frozenset(
    {"messages", "tools", "add_generation_prompt", "bos_token", "eos_token"}
)
#: OpenAI's reasoning effort values (chat's `reasoning_effort`, Responses' `reasoning.effort`).
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh")


def parse_reasoning_effort(v: Any, param: str = "reasoning_effort") -> bool | None:
    """An OpenAI reasoning effort as enable_thinking: False for "none" (thinking off), None
    (the template's default) for the others, which have no counterpart in a template."""
    if v is None:
        return None
    if v not in REASONING_EFFORTS:
        raise invalid(param, f"must be one of {', '.join(REASONING_EFFORTS)}, not {quoted(v)}")
    return False if v == "none" else None


def parse_template_kwargs(d: dict, enable_thinking: bool | None = None) -> dict[str, Any] | None:
    """`chat_template_kwargs` (an object: extra variables for a Jinja chat template, as vLLM
    and llama.cpp take them), plus `enable_thinking` when the dialect's own field set it
    (OpenAI's reasoning effort, Anthropic's `thinking`) and the kwargs do not."""
    kwargs = d.get("chat_template_kwargs")
    out: dict[str, Any] = {}
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise invalid("chat_template_kwargs", f"must be an object, not {json_type(kwargs)}")
        for k in kwargs:
            if k in RESERVED_TEMPLATE_VARS:
                raise invalid(f"chat_template_kwargs.{k}", "is set by the server")
        out.update(kwargs)
    if enable_thinking is not None:
        out.setdefault("enable_thinking", enable_thinking)
    return out or None
