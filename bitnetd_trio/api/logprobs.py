"""The three logprob formats of the API, sans-I/O: engine results in, JSON shapes out.

- OpenAI chat (http-api §1.1): `logprobs.content`, one object per token with its text,
  logprob, UTF-8 bytes and alternatives.
- OpenAI legacy completions (http-api §1.2): parallel lists `tokens`, `token_logprobs`,
  `top_logprobs` (text -> logprob), `text_offset`.
- llama.cpp `/completion` (http-api §3): `completion_probabilities`, one object per token with
  its id, text, bytes, logprob and alternatives.

An entry is the engine's `TokenResult`: (token id, logprob or None, [(id, logprob), ...]).
A None logprob is a prompt token without one (the first token of a scored prompt).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

from bitnetd_trio.engine.inference import TokenResult

__all__ = [
    "TokenBytes",
    "chat_content",
    "chat_logprob_entry",
    "chat_logprobs",
    "legacy_lists",
    "llama_probabilities",
    "token_text",
]

TokenBytes = Callable[[int], bytes]  # a token id's bytes (the tokenizer's token_bytes)


def token_text(data: bytes) -> str:
    """A token's text for logprobs: its UTF-8 text, or `bytes:\\xNN..` for a partial character."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


def chat_logprob_entry(data: bytes, logprob: float, top: Sequence[tuple[bytes, float]]) -> dict:
    """One element of a chat choice's `logprobs.content`."""
    return {
        "token": token_text(data),
        "logprob": logprob,
        "bytes": list(data),
        "top_logprobs": [
            {"token": token_text(b), "logprob": lp, "bytes": list(b)} for b, lp in top
        ],
    }


def chat_content(entries: Iterable[TokenResult], token_bytes: TokenBytes) -> list[dict]:
    """The OpenAI chat `logprobs.content` list for generated tokens."""
    tb = token_bytes
    return [
        chat_logprob_entry(tb(t), lp if lp is not None else 0.0, [(tb(i), v) for i, v in top])
        for t, lp, top in entries
    ]


def chat_logprobs(content: list[dict]) -> dict:
    """A chat choice's `logprobs` object. OpenAI's schema requires `refusal` beside `content`
    (nullable); the daemon never produces refusal tokens."""
    return {"content": content, "refusal": None}


def legacy_lists(
    entries: Iterable[TokenResult], token_bytes: TokenBytes, offset: int = 0
) -> dict:
    """The legacy completions `logprobs` object; `text_offset` counts characters from
    `offset` (where these tokens' text starts in the choice's text)."""
    tb = token_bytes
    tokens, lps, tops, offsets = [], [], [], []
    pos = offset
    for t, lp, top in entries:
        tokens.append(token_text(tb(t)))
        lps.append(lp)
        tops.append(None if lp is None else {token_text(tb(i)): v for i, v in top})
        offsets.append(pos)
        pos += len(tb(t).decode("utf-8", errors="replace"))
    return {
        "tokens": tokens,
        "token_logprobs": lps,
        "top_logprobs": tops,
        "text_offset": offsets,
    }


def llama_probabilities(
    entries: Iterable[TokenResult], token_bytes: TokenBytes, post_sampling: bool = False
) -> list[dict]:
    """llama.cpp's `completion_probabilities` (n_probs) for generated tokens. With
    `post_sampling` the entries hold probabilities after the sampling chain (the job's
    post_sampling_probs), shown as `prob` / `top_probs` instead of `logprob` /
    `top_logprobs`."""
    tb = token_bytes
    key, top_key = ("prob", "top_probs") if post_sampling else ("logprob", "top_logprobs")

    def one(t: int, v: float | None) -> dict:
        return {"id": t, "token": token_text(tb(t)), "bytes": list(tb(t)), key: v}

    return [{**one(t, v), top_key: [one(i, p) for i, p in top]} for t, v, top in entries]
