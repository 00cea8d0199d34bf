"""Requests of the tokenizer and template helpers (http-api §2.4), sans-I/O: `/tokenize`,
`/detokenize` and `/apply-template` bodies in, normalized requests out."""

from __future__ import annotations

from dataclasses import dataclass

from bitnetd_trio.api.json_body import Fields, invalid, json_type
from bitnetd_trio.api.schema import (
    parse_messages,
    parse_reasoning_effort,
    parse_template_kwargs,
    parse_token_id,
)

__all__ = [
    "ApplyTemplateRequest",
    "DetokenizeRequest",
    "TokenizeRequest",
    "parse_apply_template",
    "parse_detokenize",
    "parse_tokenize",
]


@dataclass(frozen=True)
class TokenizeRequest:
    content: str
    add_special: bool = False  # prepend BOS
    parse_special: bool = True  # "<|eot_id|>" in the text becomes the control token
    with_pieces: bool = False  # answer [{"id", "piece"}] instead of ids


@dataclass(frozen=True)
class DetokenizeRequest:
    tokens: list[int]


@dataclass(frozen=True)
class ApplyTemplateRequest:
    messages: list[dict]
    add_generation_prompt: bool = True
    template_kwargs: dict | None = None  # chat_template_kwargs (and reasoning_effort)


def parse_tokenize(d: dict) -> TokenizeRequest:
    """POST /tokenize in llama.cpp's spelling {"content", "add_special", "parse_special",
    "with_pieces"} or vLLM's {"prompt", "add_special_tokens"} (lm-evaluation-harness's remote
    tokenizer sends the latter). BOS is prepended by default only in vLLM's spelling, as each
    server does: a client reading one server's documentation gets that server's tokens."""
    f = Fields(d)
    content, prompt = f.str("content"), f.str("prompt")
    if content is not None and prompt is not None:
        raise invalid("prompt", "send the text in either content or prompt, not both")
    if content is None and prompt is None:
        raise invalid("content", "is required (or prompt)")
    if f.present("add_special") and f.present("add_special_tokens"):
        raise invalid("add_special_tokens", "send either add_special or add_special_tokens")
    if f.present("add_special_tokens"):
        add_special = f.bool("add_special_tokens")
    else:
        add_special = f.bool("add_special", prompt is not None)
    return TokenizeRequest(
        content=content if content is not None else prompt,
        add_special=add_special,
        parse_special=f.bool("parse_special", True),
        with_pieces=f.bool("with_pieces", False),
    )


def parse_detokenize(d: dict, n_vocab: int | None = None) -> DetokenizeRequest:
    """POST /detokenize: {"tokens": [ids]}."""
    v = d.get("tokens")
    if v is None:
        raise invalid("tokens", "is required")
    if not isinstance(v, list):
        raise invalid("tokens", f"must be an array of token ids, got {json_type(v)}")
    return DetokenizeRequest([parse_token_id(t, f"tokens[{i}]", n_vocab) for i, t in enumerate(v)])


def parse_apply_template(d: dict) -> ApplyTemplateRequest:
    """POST /apply-template: {"messages"} -> the prompt the chat template makes of them."""
    f = Fields(d)
    return ApplyTemplateRequest(
        messages=parse_messages(d),
        add_generation_prompt=f.bool("add_generation_prompt", True),
        template_kwargs=parse_template_kwargs(
            d, parse_reasoning_effort(d.get("reasoning_effort"))
        ),
    )
