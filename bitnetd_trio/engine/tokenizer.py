"""Byte-level BPE tokenizer built from a GGUF file's lists (model-format §6).

Encoding uses the `tokenizers` library: BPE over the GGUF token strings and merges with
ignore_merges, the split pattern that `tokenizer.ggml.pre` names (the Llama-3 one for every
value supported so far, model-format §10.4.4; unknown values are refused), byte-level mapping. Control tokens (token_type 3)
keep their ids; whether their text in the input becomes those ids is decided per call:

- `parse_special=True` (the chat template's own text): the text is first cut at control-token
  strings, which become their ids, and the pieces between are BPE-encoded.
- `parse_special=False` (user content): everything is BPE-encoded, so "<|eot_id|>" typed by a
  user is a handful of ordinary tokens and can never end a turn.

User-defined tokens (token_type 4: added tokens that are text, such as Qwen3's `<think>` and
`<tool_call>`) are matched whole in every text, with either setting, as llama.cpp and Hugging
Face tokenizers do; their strings are stored as written (not byte-level mapped).

The cut is done here rather than by registering the control tokens with `tokenizers` as
special tokens, because that library can only switch special-token parsing for a whole
tokenizer object at a time (not per call, and not thread-safely).

Long text is BPE-encoded in pieces (`pretoken_pieces`): `tokenizers`' encode holds the GIL
for the whole call (about 0.7 s for 1 MB of text), which would stall the Trio thread even when
the encoding runs in a worker thread. Pieces of about PIECE_CHARS characters are cut only where
the Llama-3 pre-tokenizer always starts a new pre-token, so the ids equal those of encoding the
whole text at once, and the GIL can pass to other threads between pieces.

Decoding never goes through `tokenizers`: every id maps to its raw bytes (the inverse of the
byte-to-unicode table), so decoding and streaming are exact byte concatenation and UTF-8
decoding, with U+FFFD for invalid sequences.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Sequence
from functools import lru_cache
from typing import Any

from tokenizers import Regex, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as _HFTokenizer

#: The Llama-3 pre-tokenizer split pattern (the file has no tokenizer.ggml.pre).
LLAMA3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: The Qwen2 split (llama.cpp's QWEN2 pre-tokenizer, which `qwen2` names): the Llama-3 one
#: except that every digit is a pre-token of its own (model-format §10.5.5).
QWEN2_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

#: Split pattern per `tokenizer.ggml.pre` value (model-format §10.4.4); None is a file
#: without the key (BitNet 2B-4T, trained with the Llama-3 split). llama.cpp maps `falcon3`
#: (and a fix for bitnet.cpp's issue #622 maps `falcon_e`) to its Llama-3 pre-tokenizer.
#: Every pattern here must keep the piece cuts of `pretoken_pieces` valid (see _PRETOKEN_START).
PRE_TOKENIZER_PATTERNS: dict[str | None, str] = {
    None: LLAMA3_SPLIT_PATTERN,
    "llama-bpe": LLAMA3_SPLIT_PATTERN,
    "llama3": LLAMA3_SPLIT_PATTERN,
    "llama-v3": LLAMA3_SPLIT_PATTERN,
    "falcon3": LLAMA3_SPLIT_PATTERN,
    "falcon_e": LLAMA3_SPLIT_PATTERN,
    "qwen2": QWEN2_SPLIT_PATTERN,
}

#: Characters per call into `tokenizers` (about 2 ms of GIL each; see the module docstring).
PIECE_CHARS = 16384

# A space right after a character that is not whitespace. No pre-token of
# LLAMA3_SPLIT_PATTERN that starts before such a space can reach it: letter runs, digit groups,
# contractions and punctuation runs never contain a space except as their first character, and
# whitespace runs cannot start before it since the character before is not whitespace. The
# pattern has no look-behind, so matching resumes at the space exactly as it would at the start
# of a new text; and its one look-ahead, (?!\S) after a whitespace run, is never evaluated at
# the cut. So the space always starts a pre-token, and cutting the text there changes no id.
# "Not whitespace" is Python's \S, whose whitespace set contains the regex engine's.
_PRETOKEN_START = re.compile(r"(?<=\S) ")

TOKEN_TYPE_NORMAL = 1
TOKEN_TYPE_CONTROL = 3
#: Added tokens that are text, not control (Qwen3's `<think>`, `</think>`, `<tool_call>`):
#: their string is stored as written, not byte-level mapped, and they are matched whole in
#: any text, as llama.cpp and Hugging Face tokenizers match added tokens (model-format §6).
TOKEN_TYPE_USER_DEFINED = 4

#: Control tokens that end a generation when the vocabulary has them (besides EOS).
END_OF_GENERATION_TEXTS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>")


def pretoken_pieces(text: str, size: int = PIECE_CHARS) -> list[str]:
    """`text` cut into pieces of at least `size` characters (the last may be shorter) at
    places where a Llama-3 pre-token always starts (see _PRETOKEN_START). Encoding the pieces
    one by one gives the ids of the whole text. Text without such places stays one piece."""
    pieces: list[str] = []
    start = 0
    while len(text) - start > size:
        cut = _PRETOKEN_START.search(text, start + size)
        if cut is None:
            break
        pieces.append(text[start : cut.start()])
        start = cut.start()
    pieces.append(text[start:])
    return pieces


class TokenizerError(ValueError):
    """The GGUF tokenizer data is unusable, or an id is out of range."""


@lru_cache(maxsize=1)
def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (space -> 'Ġ')."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    return {c: b for b, c in byte_to_unicode().items()}


def token_string_to_bytes(s: str) -> bytes:
    """Raw bytes of a byte-level token string. A character outside the byte alphabet (a
    vocabulary entry that is not byte-level) contributes its own UTF-8 encoding."""
    inv = _unicode_to_byte()
    try:
        return bytes(inv[c] for c in s)
    except KeyError:
        out = bytearray()
        for c in s:
            b = inv.get(c)
            if b is None:
                out += c.encode("utf-8", "surrogatepass")
            else:
                out.append(b)
        return bytes(out)


class StreamDecoder:
    """Turns ids into text as they arrive; never emits part of a UTF-8 character.

    Invalid byte sequences come out as U+FFFD as soon as they are known to be invalid
    (at most 3 bytes are ever held back)."""

    def __init__(self, tokenizer: Tokenizer, *, skip_special: bool = False) -> None:
        self._tok = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token: int) -> str:
        """Text completed by this token ('' while a character is incomplete)."""
        if self._skip_special and self._tok.is_control(token):
            return ""
        return self._utf8.decode(self._tok.token_bytes(token), final=False)

    def flush(self) -> str:
        """Whatever is held back, incomplete characters as U+FFFD; resets the decoder."""
        text = self._utf8.decode(b"", final=True)
        self._utf8.reset()
        return text


class Tokenizer:
    """GGUF byte-level BPE tokenizer (see the module docstring)."""

    def __init__(
        self,
        tokens: Sequence[str],
        merges: Iterable[str],
        token_types: Sequence[int] | None = None,
        *,
        bos_id: int | None = None,
        eos_id: int | None = None,
        add_bos: bool = True,
        add_eos: bool = False,
        pre: str | None = None,
    ) -> None:
        if pre not in PRE_TOKENIZER_PATTERNS:
            known = ", ".join(repr(k) for k in PRE_TOKENIZER_PATTERNS if k is not None)
            raise TokenizerError(
                f"tokenizer.ggml.pre is {pre!r}: an unknown pre-tokenizer (supported: {known})"
            )
        self.pre = pre
        n = len(tokens)
        if n == 0:
            raise TokenizerError("tokenizer.ggml.tokens is empty")
        if token_types is not None and len(token_types) != n:
            raise TokenizerError(
                f"tokenizer.ggml.token_type has {len(token_types)} entries, "
                f"tokenizer.ggml.tokens has {n}"
            )
        types = list(token_types) if token_types is not None else [TOKEN_TYPE_NORMAL] * n
        self.n_vocab = n
        self._types = types
        self._tokens = list(tokens)
        self._token_bytes = [
            t.encode("utf-8", "surrogatepass")
            if ty in (TOKEN_TYPE_CONTROL, TOKEN_TYPE_USER_DEFINED)
            else token_string_to_bytes(t)
            for t, ty in zip(self._tokens, types)
        ]

        # First occurrence wins when a string repeats; later duplicates are never produced.
        # Control tokens stay out of the BPE model: only the explicit cut in encode() may
        # produce them (with ignore_merges, a pre-token equal to one would otherwise map to it).
        vocab: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(self._tokens, types)):
            if ty != TOKEN_TYPE_CONTROL:
                vocab.setdefault(t, i)
        missing = [b for b, c in byte_to_unicode().items() if c not in vocab]
        if missing:
            raise TokenizerError(
                f"the vocabulary lacks {len(missing)} of the 256 byte tokens "
                f"(first: byte 0x{missing[0]:02x}); it is not a byte-level BPE vocabulary"
            )
        pairs: list[tuple[str, str]] = []
        for m in merges:
            left, sep, right = m.partition(" ")
            # A malformed merge, or one whose parts are unknown, could never apply: skip it.
            if sep and left in vocab and right in vocab and left + right in vocab:
                pairs.append((left, right))
        hf = _HFTokenizer(models.BPE(vocab=vocab, merges=pairs, ignore_merges=True))
        hf.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(PRE_TOKENIZER_PATTERNS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        hf.decoder = decoders.ByteLevel()
        self._hf = hf

        self._control_ids: dict[str, int] = {}
        self._user_ids: dict[str, int] = {}
        for i, (t, ty) in enumerate(zip(self._tokens, types)):
            if ty == TOKEN_TYPE_CONTROL and t:
                self._control_ids.setdefault(t, i)
            elif ty == TOKEN_TYPE_USER_DEFINED and t:
                self._user_ids.setdefault(t, i)
        # Cuts of the text before BPE: control and user-defined tokens with parse_special,
        # user-defined ones always. Longest first, so a token that is a prefix of another
        # never wins wrongly.
        self._control_re = _alternatives(self._control_ids)
        self._user_re = _alternatives(self._user_ids)
        self._special_re = _alternatives({**self._user_ids, **self._control_ids})

        def valid(i: int | None) -> int | None:
            return i if i is not None and 0 <= i < n else None

        self.bos_id = valid(bos_id) if bos_id is not None else self.find("<|begin_of_text|>")
        self.eos_id = valid(eos_id) if eos_id is not None else self.find("<|end_of_text|>")
        self.eot_id = self.find("<|eot_id|>")
        self.add_bos_default = bool(add_bos)
        #: tokenizer.ggml.add_eos_token: text inputs end with EOS (the BitNet embedding
        #: model pools that EOS, model-format §10.5.5)
        self.add_eos_default = bool(add_eos) and self.eos_id is not None
        stops = {self.find(t) for t in END_OF_GENERATION_TEXTS} | {self.eos_id, self.eot_id}
        stops.discard(None)
        self.stop_ids: frozenset[int] = frozenset(stops)  # type: ignore[arg-type]

    # ---- construction from GGUF metadata ----

    @classmethod
    def from_metadata(cls, get: Callable[[str], Any]) -> Tokenizer:
        """Build from a metadata getter (key -> value, or None when absent).

        Every key is type-checked here, and a bad one raises TokenizerError naming it: the
        values come from model files downloaded from anywhere."""
        model = _typed(get, "tokenizer.ggml.model", str, "a string")
        if model is not None and model != "gpt2":
            raise TokenizerError(
                f"tokenizer.ggml.model is {model!r}; only 'gpt2' (byte-level BPE) is supported"
            )
        tokens = _typed_list(get, "tokenizer.ggml.tokens", str, "strings")
        merges = _typed_list(get, "tokenizer.ggml.merges", str, "strings")
        if not tokens:
            raise TokenizerError("the model has no tokenizer.ggml.tokens")
        if merges is None:
            raise TokenizerError("the model has no tokenizer.ggml.merges")
        token_types = _typed_list(get, "tokenizer.ggml.token_type", int, "integers")
        ids = {}
        for key in ("tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id"):
            value = _typed(get, key, int, "an integer")
            if value is not None and not 0 <= value < len(tokens):
                raise TokenizerError(
                    f"{key} is {value}, outside the vocabulary (0..{len(tokens) - 1})"
                )
            ids[key] = value
        add_bos = _typed(get, "tokenizer.ggml.add_bos_token", bool, "a boolean")
        add_eos = _typed(get, "tokenizer.ggml.add_eos_token", bool, "a boolean")
        pre = _typed(get, "tokenizer.ggml.pre", str, "a string")
        return cls(
            tokens,
            merges,
            token_types,
            bos_id=ids["tokenizer.ggml.bos_token_id"],
            eos_id=ids["tokenizer.ggml.eos_token_id"],
            add_bos=True if add_bos is None else add_bos,
            add_eos=bool(add_eos),
            pre=pre,
        )

    @classmethod
    def from_model(cls, model: Any) -> Tokenizer:
        """Build from an engine.Model (reads its tokenizer.* metadata)."""
        return cls.from_metadata(lambda key: model.metadata(key, None))

    # ---- lookups ----

    def find(self, text: str) -> int | None:
        """Id of the control token (or else any token) whose text is exactly `text`."""
        i = self._control_ids.get(text)
        if i is not None:
            return i
        try:
            return self._tokens.index(text)
        except ValueError:
            return None

    @property
    def control_regex(self) -> re.Pattern[str] | None:
        """Matches any control token's text (one capture group); None if there are none."""
        return self._control_re

    def is_control(self, token: int) -> bool:
        self._check(token)
        return self._types[token] == TOKEN_TYPE_CONTROL

    def token_bytes(self, token: int) -> bytes:
        """Raw bytes of one token (a control token: its text in UTF-8)."""
        self._check(token)
        return self._token_bytes[token]

    def piece(self, token: int) -> str:
        """One token as text; bytes that are not whole UTF-8 characters show as U+FFFD."""
        return self.token_bytes(token).decode("utf-8", "replace")

    def _check(self, token: int) -> None:
        if not 0 <= token < self.n_vocab:
            raise TokenizerError(f"token id {token} out of range [0, {self.n_vocab})")

    # ---- encode / decode ----

    def encode(self, text: str, *, add_bos: bool, parse_special: bool,
               add_eos: bool = False) -> list[int]:
        """Token ids of `text`; see the module docstring for `parse_special`. add_eos appends
        the EOS token (when the vocabulary has one)."""
        ids = self._encode(text, add_bos=add_bos, parse_special=parse_special)
        if add_eos and self.eos_id is not None:
            ids.append(self.eos_id)
        return ids

    def _encode(self, text: str, *, add_bos: bool, parse_special: bool) -> list[int]:
        ids: list[int] = [self.bos_id] if add_bos and self.bos_id is not None else []
        if not text:
            return ids
        cuts = self._special_re if parse_special else self._user_re
        if cuts is None:
            ids.extend(self._bpe(text))
            return ids
        for i, part in enumerate(cuts.split(text)):
            if i % 2:  # the capture group: a control or user-defined token
                found = self._control_ids.get(part) if parse_special else None
                ids.append(found if found is not None else self._user_ids[part])
            elif part:
                ids.extend(self._bpe(part))
        return ids

    def _bpe(self, text: str) -> list[int]:
        if len(text) <= PIECE_CHARS:
            return self._hf.encode(text, add_special_tokens=False).ids
        ids: list[int] = []
        for piece in pretoken_pieces(text):  # the GIL is free between pieces
            ids.extend(self._hf.encode(piece, add_special_tokens=False).ids)
        return ids

    def decode(self, ids: Iterable[int], *, skip_special: bool = False) -> str:
        """Text of a token sequence; invalid UTF-8 becomes U+FFFD."""
        tb, types = self._token_bytes, self._types
        parts = []
        for i in ids:
            self._check(i)
            if skip_special and types[i] == TOKEN_TYPE_CONTROL:
                continue
            parts.append(tb[i])
        return b"".join(parts).decode("utf-8", "replace")

    def stream_decoder(self, *, skip_special: bool = False) -> StreamDecoder:
        return StreamDecoder(self, skip_special=skip_special)


def _alternatives(texts: Iterable[str]) -> re.Pattern[str] | None:
    """A pattern matching any of `texts` (one capture group, longest first); None if none."""
    alternatives = sorted(texts, key=len, reverse=True)
    if not alternatives:
        return None
    return re.compile("(" + "|".join(map(re.escape, alternatives)) + ")")


def _kind(value: Any) -> str:
    return "a list" if isinstance(value, list) else f"a {type(value).__name__}"


def _typed(get: Callable[[str], Any], key: str, kind: type, described: str) -> Any:
    """get(key) when it is absent (None) or of `kind` (bool is not an int here)."""
    value = get(key)
    if value is None:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TokenizerError(f"{key} must be {described}, not {_kind(value)}")
    return value


def _typed_list(get: Callable[[str], Any], key: str, kind: type, described: str) -> Any:
    """get(key) when it is absent (None) or a list whose items are all of `kind`."""
    value = get(key)
    if value is None:
        return None
    if not isinstance(value, list) or not all(
        isinstance(v, kind) and not (kind is int and isinstance(v, bool)) for v in value
    ):
        raise TokenizerError(f"{key} must be an array of {described}")
    return value
