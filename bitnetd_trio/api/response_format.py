"""Constrained output requests (http-api §1.6): what `response_format` (OpenAI chat and
completions), `grammar` and `json_schema` (llama.cpp) ask for, checked and turned into one
`ConstraintSpec`; and, later, compiled into the engine's `Constraint` off the Trio thread.

Validation here is sans-I/O and cheap (types, size, nesting depth); what needs llguidance
(the grammar's syntax, unknown schema keywords, a first mask) happens in `compile_constraint`,
which runs in a worker thread because a large grammar can take milliseconds to compile. Both
answer a bad constraint with a 400 naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import threading
import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import trio

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import invalid, json_type
from bitnetd_trio.engine import constraints as C
from bitnetd_trio.engine.reasoning import THINK_CLOSE, THINK_OPEN

__all__ = [
    "THINK_RULES",
    "THINK_START",
    "ConstraintSpec",
    "after_thinking",
    "compile_constraint",
    "constraint_limits",
    "gbnf_spec",
    "json_schema_spec",
    "parse_response_format",
]

#: `{"type": "object"}` with compact separators: what json_object mode allows.
ANY_JSON_OBJECT: dict = {"type": "object"}


@dataclass(frozen=True)
class ConstraintSpec:
    """A request's constraint before compilation."""

    kind: str  # "json_object" | "json_schema" | "grammar" | "tools"
    source: str  # what to compile: a JSON schema (JSON text) or a Lark grammar
    fmt: str  # "json_schema" | "lark" | "gbnf"
    param: str  # the request field that carried it (for errors)
    schema: Any = None  # the JSON schema, for the depth and satisfiability checks


# A think block before the answer (engine/reasoning.py), as Qwen3-style templates write it:
# `<think>`, the thinking, `</think>`, a blank line. The thinking is a lazy lexeme ending at
# the first `</think>`: as a greedy lexeme followed by a `</think>` lexeme, llguidance would
# keep "</think" inside the thinking and then refuse the ">". THINK_START is the start of a
# Lark `start:` rule by the prompt's think mode (engine/reasoning.think_mode): "closed" lets
# the answer open a block first, "open" makes it finish the block the prompt opened.
THINK_START = {"closed": "think? ", "open": "think_rest "}
THINK_RULES = [
    "think: " + json.dumps(THINK_OPEN) + " think_rest",
    'think_rest: think_text "\\n\\n"',
    "think_text[lazy]: /[\\s\\S]*" + re.escape(THINK_CLOSE).replace("/", "\\/") + "/",
]


def after_thinking(spec: ConstraintSpec, thinking: str | None) -> ConstraintSpec:
    """A JSON constraint (response_format, json_schema) for a model whose template thinks:
    the think block first (THINK_START), then the JSON, as vLLM and llama.cpp leave reasoning
    unconstrained. Without thinking ("off", None) and for a request's own grammar (which
    describes the whole answer) the spec is unchanged."""
    if thinking not in THINK_START or spec.fmt != "json_schema":
        return spec
    schema = json.loads(spec.source)
    if schema is False:
        return spec  # nothing matches: refused as it is
    schema = {} if schema is True else dict(schema)
    schema["x-guidance"] = {"whitespace_flexible": False}  # as json_schema_grammar compiles it
    lines = ["start: " + THINK_START[thinking] + "answer",
             "answer: %json " + json.dumps(schema, ensure_ascii=False)] + THINK_RULES
    return dataclasses.replace(spec, source="\n".join(lines) + "\n", fmt="lark")


def constraint_limits(config: Any) -> C.ConstraintLimits:
    """The limits of the `[server]` keys (bitnetd.conf(5))."""
    s = config.server
    step = s.grammar_step_limit
    return C.ConstraintLimits(
        max_size=s.max_grammar_size,
        max_depth=s.max_grammar_depth,
        step_max_items=step,
        step_lexer_fuel=4 * step,
    )


def _size_check(text: str, param: str, max_size: int) -> None:
    if len(text.encode("utf-8", "surrogatepass")) > max_size:
        raise invalid(param, f"is larger than the limit of {max_size} bytes")


def json_schema_spec(schema: Any, param: str, max_size: int, kind: str = "json_schema"
                     ) -> ConstraintSpec:
    """A JSON schema (an object, or true/false) as a constraint."""
    if not isinstance(schema, (dict, bool)):
        raise invalid(param, f"must be a JSON schema object, got {json_type(schema)}")
    text = json.dumps(schema, ensure_ascii=False)
    _size_check(text, param, max_size)
    return ConstraintSpec(kind, text, "json_schema", param, schema)


def gbnf_spec(grammar: Any, param: str, max_size: int) -> ConstraintSpec:
    """llama.cpp's `grammar` field: GBNF (or Lark, which llguidance reads too)."""
    if not isinstance(grammar, str):
        raise invalid(param, f"must be a string (a GBNF grammar), got {json_type(grammar)}")
    if not grammar.strip():
        raise invalid(param, "must not be empty")
    _size_check(grammar, param, max_size)
    return ConstraintSpec("grammar", grammar, "gbnf", param)


def parse_response_format(v: Any, max_size: int, param: str = "response_format"
                          ) -> ConstraintSpec | None:
    """OpenAI's response_format: {"type": "text" | "json_object" | "json_schema"}."""
    if v is None:
        return None
    if not isinstance(v, dict):
        raise invalid(param, f"must be an object, got {json_type(v)}")
    kind = v.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return json_schema_spec(ANY_JSON_OBJECT, param, max_size, kind="json_object")
    if kind == "json_schema":
        js = v.get("json_schema")
        where = f"{param}.json_schema"
        if not isinstance(js, dict):
            raise invalid(where, f"is required and must be an object, got {json_type(js)}")
        name = js.get("name")
        if name is not None and not isinstance(name, str):
            raise invalid(f"{where}.name", f"must be a string, got {json_type(name)}")
        strict = js.get("strict")
        if strict is not None and not isinstance(strict, bool):
            raise invalid(f"{where}.strict", f"must be a boolean, got {json_type(strict)}")
        schema = js.get("schema")
        if schema is None:  # OpenAI: a json_schema without schema allows any JSON object
            schema = ANY_JSON_OBJECT
        return json_schema_spec(schema, f"{where}.schema", max_size)
    shown = f"'{kind[:40]}'" if isinstance(kind, str) else json_type(kind)
    raise invalid(f"{param}.type", f"must be 'text', 'json_object' or 'json_schema', got {shown}")


# ---- the checks that need no compiler ----

_COUNT_KEYWORDS = ("minItems", "minLength", "minProperties", "minContains")


def check_schema(schema: Any, param: str, max_depth: int, n_ctx: int) -> None:
    """400 for a schema nested deeper than `max_depth`, or one that asks for more items or
    characters than `n_ctx` tokens can hold (each costs at least one token): it could
    never be finished."""
    stack: list[tuple[Any, int, str]] = [(schema, 0, param)]
    while stack:
        node, depth, where = stack.pop()
        if isinstance(node, list):
            for i, x in enumerate(node):
                stack.append((x, depth, f"{where}[{i}]"))
            continue
        if not isinstance(node, dict):
            continue
        if depth > max_depth:
            raise invalid(param, f"nests deeper than the limit of {max_depth} levels")
        for key in _COUNT_KEYWORDS:
            n = node.get(key)
            if isinstance(n, (int, float)) and not isinstance(n, bool) and (
                not math.isfinite(n) or n > n_ctx
            ):
                raise invalid(
                    f"{where}.{key}",
                    f"({n}) can never be satisfied: the context holds {n_ctx} tokens",
                )
        for key, value in node.items():
            if isinstance(value, (dict, list)):
                stack.append((value, depth + 1, f"{where}.{key}"))


# ---- compilation ----

#: Compiled grammars kept per tokenizer, and the schema/grammar text they may hold together.
CACHE_ENTRIES = 64
CACHE_BYTES = 16 << 20


class CompileCache:
    """Compiled constraints by what was compiled (format, text, limits, context size), least
    recently used first out. Clients send the same schema again and again (one per tool set,
    one per pydantic model): a hit costs a matcher copy (microseconds) instead of a compile
    in a worker thread, so a burst of identical requests reaches the engine together, as
    unconstrained ones do. Only successful compiles are kept; thread-safe."""

    def __init__(self, entries: int = CACHE_ENTRIES, max_bytes: int = CACHE_BYTES) -> None:
        self.entries = entries
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self._items: OrderedDict[tuple, C.Constraint] = OrderedDict()
        self._bytes = 0
        self.hits = self.misses = 0

    def get(self, key: tuple) -> C.Constraint | None:
        """A fresh copy of the constraint compiled for `key`, or None."""
        with self._lock:
            c = self._items.get(key)
            if c is None:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
        return c.copy()  # the kept one is never advanced: copies only read it

    def put(self, key: tuple, c: C.Constraint) -> None:
        size = len(key[1])
        if size > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = c.copy()
            self._bytes += size
            while len(self._items) > self.entries or self._bytes > self.max_bytes:
                old, _ = self._items.popitem(last=False)
                self._bytes -= len(old[1])

    def __len__(self) -> int:
        return len(self._items)


class _Compilers:
    """llguidance's view of one tokenizer (made on first use: a request without a
    constraint never pays for it) and its cache of compiled grammars."""

    def __init__(self) -> None:
        self.cache = CompileCache()
        self._lock = threading.Lock()
        self._compiler: C.ConstraintCompiler | None = None

    def compiler(self, tokenizer: Any) -> C.ConstraintCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = C.ConstraintCompiler(tokenizer)
            return self._compiler


_compilers: weakref.WeakKeyDictionary[Any, _Compilers] = weakref.WeakKeyDictionary()


def compilers_of(tokenizer: Any) -> _Compilers:
    """The compiler and cache of `tokenizer`, kept as long as the tokenizer lives."""
    entry = _compilers.get(tokenizer)
    if entry is None:
        entry = _compilers.setdefault(tokenizer, _Compilers())
    return entry


def _cache_key(spec: ConstraintSpec, limits: C.ConstraintLimits, n_ctx: int) -> tuple:
    # the text second: CompileCache counts its size
    return (spec.fmt, spec.source, limits, n_ctx)


def _compile_sync(spec: ConstraintSpec, tokenizer: Any, limits: C.ConstraintLimits,
                  n_ctx: int) -> C.Constraint:
    entry = compilers_of(tokenizer)
    key = _cache_key(spec, limits, n_ctx)
    # Requests with the same grammar that queued behind the one compiling it get its result.
    hit = entry.cache.get(key)
    if hit is not None:
        return hit
    if spec.schema is not None:
        check_schema(spec.schema, spec.param, limits.max_depth, n_ctx)
    comp = entry.compiler(tokenizer)
    try:
        if spec.fmt == "json_schema":
            grammar = comp.json_schema_grammar(json.loads(spec.source))
        elif spec.fmt == "gbnf":
            grammar = comp.gbnf_grammar(spec.source)
        else:
            grammar = comp.lark_grammar(spec.source)
        c = comp.compile(grammar, limits)
    except C.ConstraintError as exc:
        raise ApiError(400, f"invalid '{spec.param}': {exc}", param=spec.param) from None
    except ValueError as exc:  # the schema is not a valid JSON schema object
        raise ApiError(400, f"invalid '{spec.param}': {exc}", param=spec.param) from None
    entry.cache.put(key, c)
    return c


_compile_limiter = trio.CapacityLimiter(1)  # one compile at a time: the cores are the engine's


async def compile_constraint(spec: ConstraintSpec | None, engine: Any, config: Any
                             ) -> C.Constraint | None:
    """The engine constraint of `spec` (None for none); ApiError 400 naming the field when
    the schema or grammar is refused. A grammar compiled before is a copy from the cache, made
    on the Trio thread (microseconds); a new one is compiled in a worker thread: never on
    the Trio thread, and never on the inference thread."""
    if spec is None:
        return None
    if not C.available():
        raise ApiError(400, "constrained output is not available on this server "
                            "(llguidance is not installed)", param=spec.param)
    limits = constraint_limits(config)
    n_ctx = engine.info.n_ctx
    hit = compilers_of(engine.tokenizer).cache.get(_cache_key(spec, limits, n_ctx))
    if hit is not None:
        return hit
    return await trio.to_thread.run_sync(
        _compile_sync, spec, engine.tokenizer, limits, n_ctx, limiter=_compile_limiter,
    )
