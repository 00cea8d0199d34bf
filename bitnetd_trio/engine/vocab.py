"""The vocabularies of the GGUF writer: the tiny test vocabulary (byte tokens, BPE merges
learnt from a short text, the first Llama-3 special tokens) and the real Llama-3 vocabulary,
derived from the tiktoken rank file that `llama-models` ships (model-format §6.1, §8.2).
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from bitnetd_trio.engine.tokenizer import (
    byte_to_unicode,  # the one byte-level alphabet, shared with decoding
)

#: The Llama-3 pre-tokenizer split pattern (model-format §6.2).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Bump when the derived Llama-3 vocabulary format changes.
LLAMA3_VOCAB_CACHE_VERSION = "llama3-vocab-v1"

LLAMA3_N_BASE = 128000
LLAMA3_N_VOCAB = 128256
LLAMA3_N_MERGES = 280147


#: Vocabulary size of the tiny test vocabulary (256 bytes + merges + 10 specials).
TINY_VOCAB_SIZE = 512


def cache_dir() -> Path:
    """Where derived vocabularies, the demo model and benchmark models are kept."""
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "bitnetd-trio"


@contextlib.contextmanager
def replaced_atomically(path: Path) -> Iterator[Path]:
    """A temporary file next to `path` to write; renamed over `path` when the block succeeds,
    removed when it fails (readers never see a partial file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# --------------------------------------------------------------------------------------------
# Byte-level tokens


def bytes_to_token(data: bytes) -> str:
    table = byte_to_unicode()
    return "".join(table[b] for b in data)


def _byte_order() -> list[int]:
    """Bytes in the order GPT-2 style vocabularies give them ids: printable ones first."""
    table = byte_to_unicode()
    return sorted(range(256), key=lambda b: ord(table[b]))


# --------------------------------------------------------------------------------------------
# Vocabularies


@dataclass(frozen=True)
class Vocab:
    tokens: list[str]
    token_types: list[int]  # 1 normal, 3 control
    merges: list[str]
    bos_id: int
    eos_id: int
    eot_id: int

    def __len__(self) -> int:
        return len(self.tokens)

    def padded(self, n_vocab: int) -> Vocab:
        """Extend with extra reserved control tokens up to n_vocab entries."""
        if n_vocab < len(self.tokens):
            raise ValueError(f"n_vocab={n_vocab} is smaller than the vocabulary ({len(self)})")
        existing = set(self.tokens)
        tokens, types = list(self.tokens), list(self.token_types)
        i = 0
        while len(tokens) < n_vocab:
            name = f"<|reserved_special_token_{i}|>"
            i += 1
            if name not in existing:
                tokens.append(name)
                types.append(3)
        return dataclasses.replace(self, tokens=tokens, token_types=types)


#: Special tokens of the original Llama-3 vocabulary, ids 128000.. (then reserved ones).
LLAMA3_SPECIALS_HEAD = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|reserved_special_token_0|>",
    "<|reserved_special_token_1|>",
    "<|reserved_special_token_2|>",
    "<|reserved_special_token_3|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|reserved_special_token_4|>",
    "<|eot_id|>",
]


def llama3_special_tokens() -> list[str]:
    names = list(LLAMA3_SPECIALS_HEAD)
    i = 5
    while len(names) < LLAMA3_N_VOCAB - LLAMA3_N_BASE:
        names.append(f"<|reserved_special_token_{i}|>")
        i += 1
    return names


TINY_TRAINING_TEXT = """\
The quick brown fox jumps over the lazy dog. A small model is a fine thing to test with: it
loads in a moment, it answers in a blink, and when it is wrong, it is wrong in the same way
every time. We write the weights ourselves, we read them back, and we compare the numbers
the engine computes with the numbers that a plain reference computes from the specification.
Hello, world! Hello again, world. How are you today? I am fine, thank you, and you?
The server streams tokens to the client as they are generated; the client reads them one by
one and prints them on the screen. When the client goes away, the server stops generating.
There are 3 apples, 12 pears and 365 days in the year 2026; 1000 tokens per second is fast.
Numbers like 42, 7, 99 and 1024 appear in text, and so do words such as "the", "and", "of".
In the morning the weather was cold and the streets were quiet; in the evening it rained.
Python, C and Unix: the daemon forks, writes its pid file, drops its privileges and serves.
Ünïcödé text matters too: café, naïve, résumé, Zürich, São Paulo, Kraków, Ελληνικά, русский.
日本語のテキストも少しあります。中文也有一点。한국어도 조금 있습니다. Emoji: 🙂 🚀 ✨.
User: What is the capital of France?
Assistant: The capital of France is Paris. It is known for the Eiffel Tower and the Louvre.
User: Tell me a story about a robot.
Assistant: Once upon a time, a little robot wanted to learn how to paint the sea at night.
"""

TINY_N_SPECIALS = len(LLAMA3_SPECIALS_HEAD)


def _pretokenize(text: str) -> list[str]:
    import regex

    return regex.findall(LLAMA3_SPLIT_PATTERN, text)


def train_bpe(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Learn up to n_merges byte-level BPE merges from text (most frequent pair first,
    ties broken by the smaller pair, so the result is deterministic)."""
    words: Counter[tuple[str, ...]] = Counter()
    for piece in _pretokenize(text):
        words[tuple(bytes_to_token(bytes([b])) for b in piece.encode("utf-8"))] += 1
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:]):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged: Counter[tuple[str, ...]] = Counter()
        for word, count in words.items():
            out: list[str] = []
            i = 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] += count
        words = merged
    return merges


@lru_cache(maxsize=1)
def tiny_vocab() -> Vocab:
    """256 byte tokens + BPE merges learnt from TINY_TRAINING_TEXT + 10 control tokens
    (the first ten Llama-3 specials, ids at the end), TINY_VOCAB_SIZE entries in all."""
    tokens = [bytes_to_token(bytes([b])) for b in _byte_order()]
    n_merges = TINY_VOCAB_SIZE - 256 - TINY_N_SPECIALS
    merges = train_bpe(TINY_TRAINING_TEXT, n_merges)
    seen = set(tokens)
    for left, right in merges:
        if left + right not in seen:  # a merge may re-create an existing token: keep ids unique
            seen.add(left + right)
            tokens.append(left + right)
    types = [1] * len(tokens)
    vocab = Vocab(tokens=tokens, token_types=types, merges=[f"{a} {b}" for a, b in merges],
                  bos_id=0, eos_id=0, eot_id=0)
    # Pad normal tokens so that the specials always sit at the same, final ids.
    while len(tokens) < TINY_VOCAB_SIZE - TINY_N_SPECIALS:
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(1)
    base = len(tokens)
    tokens.extend(LLAMA3_SPECIALS_HEAD)
    types.extend([3] * TINY_N_SPECIALS)
    return dataclasses.replace(vocab, bos_id=base, eos_id=base + 1, eot_id=base + 9)


#: Special tokens at the start of the Falcon3 vocabulary (Falcon's), ids 0..11; id 11,
#: `<|endoftext|>`, is both BOS and EOS of Falcon3 (model-families A.2).
FALCON3_SPECIALS_HEAD = [
    ">>TITLE<<", ">>ABSTRACT<<", ">>INTRODUCTION<<", ">>SUMMARY<<", ">>COMMENT<<",
    ">>ANSWER<<", ">>QUESTION<<", ">>DOMAIN<<", ">>EMAIL_ADDRESS<<", ">>IP_ADDRESS<<",
    "<|startoftext|>", "<|endoftext|>",
]
#: Falcon3's chat-role and padding tokens, at the end of the tiny Falcon3 vocabulary.
FALCON3_SPECIALS_TAIL = ["<|system|>", "<|user|>", "<|assistant|>", "<|pad|>"]
FALCON3_EOS_ID = 11


@lru_cache(maxsize=1)
def tiny_falcon3_vocab() -> Vocab:
    """The tiny vocabulary laid out as Falcon3's: its 12 special tokens first (BOS = EOS =
    11), the byte tokens and merges of the tiny vocabulary, the role and padding tokens last
    (TINY_VOCAB_SIZE entries in all)."""
    tiny = tiny_vocab()
    n_tiny = TINY_VOCAB_SIZE - TINY_N_SPECIALS
    head, tail = FALCON3_SPECIALS_HEAD, FALCON3_SPECIALS_TAIL
    # the last merged tokens make room for the extra specials; their merges go too
    body = [t for t in tiny.tokens[:n_tiny] if not t.startswith("<|unused_")]
    body = body[: n_tiny - len(head) - len(tail)]
    body_types = [1] * len(body)
    known = set(body)
    merges = [m for m in tiny.merges
              if (parts := m.split(" ")) and len(parts) == 2 and parts[0] in known
              and parts[1] in known and parts[0] + parts[1] in known]
    tokens = head + body
    types = [3] * len(head) + body_types
    while len(tokens) < TINY_VOCAB_SIZE - len(tail):
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(1)
    tokens += tail
    types += [3] * len(tail)
    if len(tokens) != TINY_VOCAB_SIZE:
        raise ValueError(f"tiny Falcon3 vocabulary has {len(tokens)} entries")
    return Vocab(tokens=tokens, token_types=types, merges=merges,
                 bos_id=FALCON3_EOS_ID, eos_id=FALCON3_EOS_ID, eot_id=FALCON3_EOS_ID)


#: Qwen's special tokens, at the end of the tiny Qwen3 vocabulary in Qwen's order
#: (151643-151645 in the real one); `<|endoftext|>` is the EOS the BitNet embedding model's
#: converter forces and appends (model-families B.1).
QWEN3_SPECIALS_TAIL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@lru_cache(maxsize=1)
def tiny_qwen3_vocab() -> Vocab:
    """The tiny vocabulary laid out as Qwen's: the byte tokens and merges of the tiny
    vocabulary, then `<|endoftext|>` (EOS, also BOS and padding), `<|im_start|>` and
    `<|im_end|>` (end of turn) as the last three of TINY_VOCAB_SIZE ids."""
    tiny = tiny_vocab()
    n_tiny = TINY_VOCAB_SIZE - TINY_N_SPECIALS
    tail = QWEN3_SPECIALS_TAIL
    body = [t for t in tiny.tokens[:n_tiny] if not t.startswith("<|unused_")]
    body = body[: TINY_VOCAB_SIZE - len(tail)]
    known = set(body)
    merges = [m for m in tiny.merges
              if (parts := m.split(" ")) and len(parts) == 2 and parts[0] in known
              and parts[1] in known and parts[0] + parts[1] in known]
    tokens, types = list(body), [1] * len(body)
    while len(tokens) < TINY_VOCAB_SIZE - len(tail):
        tokens.append(f"<|unused_{len(tokens)}|>")
        types.append(1)
    eos = len(tokens)
    tokens += tail
    types += [3] * len(tail)
    return Vocab(tokens=tokens, token_types=types, merges=merges, bos_id=eos, eos_id=eos,
                 eot_id=eos + 2)


def _llama3_tokenizer_model() -> Path:
    try:
        import llama_models  # type: ignore[import-not-found]
    except ImportError as exc:
        raise RuntimeError(
            "vocab='llama3' needs the llama-models package "
            "(pip install llama-models --no-deps)") from exc
    path = Path(llama_models.__file__).parent / "llama3" / "tokenizer.model"
    if not path.is_file():
        raise RuntimeError(f"llama-models does not ship {path}")
    return path


def derive_llama3_vocab(tokenizer_model: Path) -> tuple[list[str], list[str]]:
    """GGUF token strings and merges from a tiktoken rank file (base64 token, rank per line).

    Every multi-byte token contributes one merge per split into two existing tokens; merges
    are ordered by the rank of the merged token, then by the ranks of the two halves."""
    ranks: dict[bytes, int] = {}
    for line in tokenizer_model.read_bytes().splitlines():
        if line.strip():
            b64, rank = line.split()
            ranks[base64.b64decode(b64)] = int(rank)
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{tokenizer_model}: ranks are not 0..n-1")
    by_rank = sorted(ranks, key=ranks.__getitem__)
    tokens = [bytes_to_token(t) for t in by_rank]
    merges: list[str] = []
    for token in by_rank:
        if len(token) < 2:
            continue
        splits = []
        for i in range(1, len(token)):
            left, right = token[:i], token[i:]
            if left in ranks and right in ranks:
                splits.append((ranks[left], ranks[right], left, right))
        splits.sort()
        merges.extend(f"{bytes_to_token(l)} {bytes_to_token(r)}" for _, _, l, r in splits)
    return tokens, merges


@lru_cache(maxsize=1)
def llama3_vocab() -> Vocab:
    """The real Llama-3 vocabulary (128256 tokens, 280147 merges), cached on disk as JSON."""
    cache = cache_dir() / f"{LLAMA3_VOCAB_CACHE_VERSION}.json"
    data = None
    if cache.is_file():
        try:
            data = json.loads(cache.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            data = None
    if data is None:
        tokens, merges = derive_llama3_vocab(_llama3_tokenizer_model())
        if len(tokens) != LLAMA3_N_BASE or len(merges) != LLAMA3_N_MERGES:
            raise ValueError(f"derived {len(tokens)} tokens / {len(merges)} merges, "
                             f"expected {LLAMA3_N_BASE} / {LLAMA3_N_MERGES}")
        data = {"tokens": tokens, "merges": merges}
        with replaced_atomically(cache) as tmp:
            tmp.write_bytes(json.dumps(data, ensure_ascii=False).encode("utf-8"))
    tokens = list(data["tokens"]) + llama3_special_tokens()
    types = [1] * LLAMA3_N_BASE + [3] * (LLAMA3_N_VOCAB - LLAMA3_N_BASE)
    return Vocab(tokens=tokens, token_types=types, merges=list(data["merges"]),
                 bos_id=LLAMA3_N_BASE, eos_id=LLAMA3_N_BASE + 1, eot_id=LLAMA3_N_BASE + 9)


def get_vocab(kind: str) -> Vocab:
    if kind == "tiny":
        return tiny_vocab()
    if kind == "tiny-falcon3":
        return tiny_falcon3_vocab()
    if kind == "tiny-qwen3":
        return tiny_qwen3_vocab()
    if kind == "llama3":
        return llama3_vocab()
    raise ValueError(f"unknown vocab {kind!r} (expected 'tiny', 'tiny-falcon3', 'tiny-qwen3' "
                     f"or 'llama3')")
