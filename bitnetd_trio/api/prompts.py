"""From a validated request to the token ids the engine runs: chat rendering, prompt
tokenization, and the checks that need the tokenizer or the vocabulary."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.schema import GenerationRequest
from bitnetd_trio.engine.chat import ChatTemplateError
from bitnetd_trio.engine.inference import InferenceThread

__all__ = ["check_context", "check_samplable", "prepare_prompts", "render_chat"]


@contextmanager
def _template_errors_are_client_errors() -> Iterator[None]:
    # The messages passed validation, so a template that fails on them (or refuses them with
    # raise_exception) is answered as the client's 400, naming the messages.
    try:
        yield
    except ChatTemplateError as exc:
        raise ApiError(
            400, f"the chat template failed on these messages: {exc}", param="messages"
        ) from None


def render_chat(
    engine: InferenceThread,
    messages: list[dict],
    add_generation_prompt: bool = True,
    extra: dict | None = None,
) -> str:
    """The prompt text the model's chat template makes of `messages` (for display: never
    tokenize it with special tokens parsed). `extra`: chat_template_kwargs."""
    with _template_errors_are_client_errors():
        return engine.chat_template.render(
            messages, add_generation_prompt=add_generation_prompt, extra=extra
        )


def _chat_tokens(
    engine: InferenceThread,
    messages: list[dict],
    tools: list[dict] | None = None,
    extra: dict | None = None,
) -> list[int]:
    with _template_errors_are_client_errors():
        return engine.chat_template.render_tokens(
            messages, engine.tokenizer, tools=tools, extra=extra
        )


def prepare_prompts(
    g: GenerationRequest, engine: InferenceThread
) -> tuple[list[list[int]], list[str]]:
    """Token ids and text of each prompt (chat: the rendered conversation); ApiError 400 for
    an empty prompt or one that leaves no room in the context."""
    tok = engine.tokenizer
    if g.messages is not None:
        tools = g.tools.tools if g.tools is not None else None
        ids = _chat_tokens(engine, g.messages, tools, g.template_kwargs)
        prompts, texts, param = [ids], [tok.decode(ids)], "messages"
    else:
        prompts, texts, param = [], [], "prompt"
        for p in g.prompts or []:
            if isinstance(p, str):
                prompts.append(tok.encode(p, add_bos=tok.add_bos_default, parse_special=True))
                texts.append(p)
            else:  # token ids, range-checked by the schema against the vocabulary
                prompts.append(list(p))
                texts.append(tok.decode(p))
    for ids in prompts:
        if not ids:
            raise ApiError(400, "the prompt is empty (no tokens)", param=param)
        err = check_context(len(ids), g.max_tokens, engine.info.n_ctx, param=param)
        if err is not None:
            raise err
    return prompts, texts


def check_samplable(g: GenerationRequest, engine: InferenceThread) -> None:
    """ApiError 400 when logit_bias bans every token (ignore_eos and min_tokens ban the stop
    tokens too): the engine could sample nothing and would fail the request as a server
    error."""
    banned = {t for t, b in g.sampling.logit_bias.items() if b == -math.inf}
    if not banned:
        return
    if g.ignore_eos or g.min_tokens > 0:
        banned |= engine.tokenizer.stop_ids
    if len(banned) >= engine.info.hparams.n_vocab:
        raise ApiError(
            400, "'logit_bias' bans every token: nothing can be sampled", param="logit_bias"
        )


def check_context(
    prompt_tokens: int,
    max_tokens: int | None,
    n_ctx: int,
    *,
    param: str = "messages",
    strict: bool = False,
) -> ApiError | None:
    """The 400 `context_length_exceeded` error if the prompt does not fit, else None.

    The prompt must leave room for one token (or fit exactly when max_tokens is 0, prompt
    scoring). With `strict`, prompt + max_tokens must fit as well (OpenAI's rule); otherwise a
    generation that reaches the end of the context stops with finish_reason "length"
    (llama.cpp's rule).
    """
    need = prompt_tokens + (0 if max_tokens == 0 else 1)
    if need > n_ctx:
        return ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens. However, your prompt has "
            f"{prompt_tokens} tokens"
            + ("" if max_tokens == 0 else " and leaves no room for a completion")
            + ". Please shorten it.",
            param=param,
            code="context_length_exceeded",
        )
    if strict and max_tokens is not None and prompt_tokens + max_tokens > n_ctx:
        return ApiError(
            400,
            f"This model's maximum context length is {n_ctx} tokens. However, you requested "
            f"{prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} "
            f"in the completion). Please reduce the prompt or the completion length.",
            param=param,
            code="context_length_exceeded",
        )
    return None
