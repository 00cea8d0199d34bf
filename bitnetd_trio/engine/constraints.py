"""Constrained decoding: grammars compiled with llguidance, one matcher per sequence, and the
helper thread that computes the step's token masks while the forward pass runs.

- `ConstraintCompiler` holds llguidance's view of OUR tokenizer (every id's raw bytes; control
  tokens marked special with a 0xFF prefix, so no grammar text can produce them; the stop ids
  as its end-of-sequence tokens) and turns a grammar (llguidance's JSON form: JSON schema,
  Lark, regex, GBNF converted to Lark) into a `Constraint`, or a `ConstraintError` naming what
  is wrong. Compiling is bounded by `ConstraintLimits` (grammar size, lexer fuel) and runs off
  the Trio thread (the API layer calls it through a worker thread).
- `Constraint` is one sequence's matcher and its allowed-token bitset (n_vocab bits in uint32
  words, bit i % 32 of word i // 32, the layout `bn_sampler_sample_masked` reads). The mask
  for step t+1 depends only on the tokens up to t, so it can be computed while the forward of
  step t+1 runs.
- `MaskWorker` is that computation: one helper thread that the inference thread hands the
  step's constrained sequences before it calls the forward (which releases the GIL), and waits
  for after it. llguidance releases the GIL too, so the two overlap; a step without
  constrained sequences never touches the worker.

Hostile grammars: llguidance bounds the work of each mask (`step_max_items`, lexer fuel per
step); a mask that runs out ends that sequence (finish "error", naming the limit), never the
thread. Grammars that can never finish still end at max_tokens or the context's end.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = [
    "Constraint",
    "ConstraintCompiler",
    "ConstraintError",
    "ConstraintLimits",
    "MaskWorker",
    "available",
    "supported_kinds",
]

try:  # the daemon runs without it, refusing constrained requests
    import llguidance as _llg
    from llguidance import LLMatcher, LLParserLimits, LLTokenizer
except ImportError:  # pragma: no cover - llguidance is a dependency
    _llg = None

#: Marks a special (control) token in llguidance's token bytes: 0xFF never occurs in UTF-8, so
#: no text a grammar matches can spell it.
SPECIAL_PREFIX = b"\xff"


def available() -> bool:
    """llguidance is installed."""
    return _llg is not None


def supported_kinds() -> list[str]:
    """The constraint kinds requests may use (empty without llguidance)."""
    if _llg is None:
        return []
    return ["json_object", "json_schema", "tools", "grammar", "regex"]


class ConstraintError(ValueError):
    """A grammar or schema that cannot be compiled (the message says why)."""


@dataclass(frozen=True)
class ConstraintLimits:
    """Bounds on what one request's grammar may cost."""

    max_size: int = 65536  # bytes of schema or grammar text
    max_depth: int = 32  # nesting of a JSON schema's objects and arrays
    step_max_items: int = 50_000  # llguidance: Earley items per mask (~20 k/ms)
    step_lexer_fuel: int = 200_000  # llguidance: lexer work per mask (~14 k/ms)
    initial_lexer_fuel: int = 1_000_000  # llguidance: lexer work at compile time (~50 k/ms)
    max_grammar_size: int = 500_000  # llguidance: symbols in the compiled grammar

    def llg(self) -> Any:
        return LLParserLimits(
            step_max_items=self.step_max_items,
            step_lexer_fuel=self.step_lexer_fuel,
            initial_lexer_fuel=self.initial_lexer_fuel,
            max_grammar_size=self.max_grammar_size,
            verbose_errors=False,  # errors go to clients: no parser state in them
        )


class _TokenizerView:
    """What llguidance's TokenizerWrapper reads from a tokenizer: token bytes, EOS/BOS,
    special ids, and an encoder from bytes to ids (used for forced text)."""

    is_tokenizer_wrapper = True

    def __init__(self, tok: Any) -> None:
        n = tok.n_vocab
        self.tokens: list[bytes] = []
        self.special_token_ids: list[int] = []
        for i in range(n):
            b = tok.token_bytes(i)
            if tok.is_control(i):
                self.special_token_ids.append(i)
                b = SPECIAL_PREFIX + b
            self.tokens.append(b)
        stops = sorted(tok.stop_ids)
        self.eos_token_id = tok.eot_id if tok.eot_id is not None else (stops[0] if stops else 0)
        self.bos_token_id = tok.bos_id
        self._tok = tok

    def __call__(self, text: bytes | str) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", "replace")
        return self._tok.encode(text, add_bos=False, parse_special=False)


class ConstraintCompiler:
    """Compiles grammars against one tokenizer; thread-safe (llguidance objects are)."""

    def __init__(self, tok: Any, limits: ConstraintLimits | None = None) -> None:
        if _llg is None:
            raise ConstraintError("constrained decoding needs the llguidance package")
        self.limits = limits or ConstraintLimits()
        self.n_vocab = tok.n_vocab
        self.stop_ids = frozenset(tok.stop_ids)
        eos = sorted(tok.stop_ids) or None
        self.lltok = LLTokenizer(_TokenizerView(tok), n_vocab=tok.n_vocab, eos_token=eos)

    # ---- grammar texts (llguidance's top-level JSON form) ----

    @staticmethod
    def json_schema_grammar(schema: dict | bool) -> str:
        return LLMatcher.grammar_from_json_schema(
            json.dumps(schema), defaults={"whitespace_flexible": False}
        )

    @staticmethod
    def lark_grammar(lark: str) -> str:
        return LLMatcher.grammar_from_lark(lark)

    @staticmethod
    def regex_grammar(regex: str) -> str:
        return LLMatcher.grammar_from_regex(regex)

    @staticmethod
    def gbnf_grammar(gbnf: str) -> str:
        try:
            return _llg.grammar_from("gbnf", gbnf)
        except ValueError as exc:
            raise ConstraintError(str(exc)) from None
        except Exception as exc:  # noqa: BLE001 - the converter raises what it meets
            raise ConstraintError(f"cannot read the grammar: {exc}") from None

    def compile(self, grammar: str, limits: ConstraintLimits | None = None) -> Constraint:
        """A fresh constraint for `grammar` (from one of the *_grammar functions); the
        compile is bounded by the limits; ConstraintError when it is invalid."""
        limits = limits or self.limits
        matcher = LLMatcher(self.lltok, grammar, log_level=0, limits=limits.llg())
        if matcher.is_error():
            raise ConstraintError(_clean(matcher.get_error()))
        c = Constraint(matcher, self.n_vocab)
        # The first mask at once: a grammar that cannot produce anything, or whose first step
        # already exceeds the limits, is the client's error, not a failed generation.
        c.compute_mask()
        if c.error is not None:
            raise ConstraintError(c.error)
        if not c.mask.any():
            raise ConstraintError("the grammar allows no output at all")
        return c


def _clean(msg: str) -> str:
    msg = msg.strip().splitlines()[0] if msg.strip() else "invalid grammar"
    return msg[:500]


class Constraint:
    """One sequence's matcher and its current allowed-token mask."""

    __slots__ = ("_pending", "error", "mask", "matcher", "n_vocab")

    def __init__(self, matcher: Any, n_vocab: int) -> None:
        self.matcher = matcher
        self.n_vocab = n_vocab
        self.mask = np.zeros((n_vocab + 31) // 32, dtype=np.uint32)
        self.error: str | None = None
        self._pending = False  # the mask is stale: the last token was accepted after it

    def copy(self) -> Constraint:
        """An independent copy in the same state (n choices of one request)."""
        c = Constraint(self.matcher.deep_copy(), self.n_vocab)
        c.mask[:] = self.mask
        c.error = self.error
        c._pending = self._pending
        return c

    @property
    def needs_mask(self) -> bool:
        return self._pending

    def compute_mask(self) -> None:
        """The allowed tokens of the next step into `mask` (releases the GIL)."""
        m = self.matcher
        if self.error is None:
            m.unsafe_compute_mask_ptr(self.mask.ctypes.data, self.mask.nbytes)
            if m.is_error():
                self.error = f"constraint: {_clean(m.get_error())}"
        self._pending = False

    def accept(self, token: int) -> None:
        """Advance past a sampled token; the next mask must be computed before sampling."""
        if self.error is None and not self.matcher.consume_token(int(token)):
            self.error = f"constraint: {_clean(self.matcher.get_error())}"
        self._pending = True

    @property
    def finished(self) -> bool:
        """The grammar is complete and allows nothing but the end of the sequence."""
        return self.error is None and self.matcher.is_stopped()


class MaskWorker:
    """One helper thread computing the masks of a step's constrained sequences while the
    inference thread runs the forward. `start(constraints)` then `wait()`: both on the
    inference thread."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._work: Sequence[Constraint] = ()
        self._busy = False
        self._closed = False
        self._thread: threading.Thread | None = None

    def _ensure_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="bitnetd-masks", daemon=True)
            self._thread.start()

    def start(self, constraints: Sequence[Constraint]) -> bool:
        """Begin computing; False (nothing started) when none needs a mask."""
        work = [c for c in constraints if c.needs_mask]
        if not work:
            return False
        self._ensure_thread()
        with self._cond:
            self._work = work
            self._busy = True
            self._cond.notify_all()
        return True

    def wait(self) -> None:
        with self._cond:
            while self._busy:
                self._cond.wait()

    def close(self) -> None:
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._busy and not self._closed:
                    self._cond.wait()
                if self._closed:
                    self._busy = False
                    self._cond.notify_all()
                    return
                work = self._work
            for c in work:
                try:
                    c.compute_mask()
                except Exception as exc:  # noqa: BLE001 - that sequence fails, not the thread
                    c.error = f"constraint: {exc}"
            with self._cond:
                self._work = ()
                self._busy = False
                self._cond.notify_all()
