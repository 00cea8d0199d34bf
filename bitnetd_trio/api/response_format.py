"""Constrained output requests (http-api §1.6): what `response_format` (OpenAI chat and
completions), `grammar` and `json_schema` (llama.cpp) ask for, checked and turned into one
`ConstraintSpec`; and, later, compiled into the engine's `Constraint` off the Trio thread.

Validation here is sans-I/O and cheap (types, size, nesting depth); what needs llguidance
(the grammar's syntax, unknown schema keywords, a first mask) happens in `compile_constraint`,
which runs in a worker thread because a large grammar can take milliseconds to compile. Both
answer a bad constraint with a 400 naming the field.
"""

from __future__ import annotations

import json
import math
import weakref
from dataclasses import dataclass
from typing import Any

import trio

from bitnetd_trio.api.errors import ApiError
from bitnetd_trio.api.json_body import invalid, json_type
from bitnetd_trio.engine import constraints as C

__all__ = [
    "ConstraintSpec",
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

_compilers: weakref.WeakKeyDictionary[Any, C.ConstraintCompiler] = weakref.WeakKeyDictionary()


def _compiler(tokenizer: Any) -> C.ConstraintCompiler:
    """llguidance's view of `tokenizer`, made on first use (a request without a constraint
    never pays for it) and kept as long as the tokenizer lives."""
    comp = _compilers.get(tokenizer)
    if comp is None:
        comp = C.ConstraintCompiler(tokenizer)
        _compilers[tokenizer] = comp
    return comp


def _compile_sync(spec: ConstraintSpec, tokenizer: Any, limits: C.ConstraintLimits,
                  n_ctx: int) -> C.Constraint:
    if spec.schema is not None:
        check_schema(spec.schema, spec.param, limits.max_depth, n_ctx)
    comp = _compiler(tokenizer)
    try:
        if spec.fmt == "json_schema":
            grammar = comp.json_schema_grammar(json.loads(spec.source))
        elif spec.fmt == "gbnf":
            grammar = comp.gbnf_grammar(spec.source)
        else:
            grammar = comp.lark_grammar(spec.source)
        return comp.compile(grammar, limits)
    except C.ConstraintError as exc:
        raise ApiError(400, f"invalid '{spec.param}': {exc}", param=spec.param) from None
    except ValueError as exc:  # the schema is not a valid JSON schema object
        raise ApiError(400, f"invalid '{spec.param}': {exc}", param=spec.param) from None


_compile_limiter = trio.CapacityLimiter(1)  # one compile at a time: the cores are the engine's


async def compile_constraint(spec: ConstraintSpec | None, engine: Any, config: Any
                             ) -> C.Constraint | None:
    """The engine constraint of `spec` (None for none); ApiError 400 naming the field when
    the schema or grammar is refused. Runs in a worker thread: never on the Trio thread, and
    never on the inference thread."""
    if spec is None:
        return None
    if not C.available():
        raise ApiError(400, "constrained output is not available on this server "
                            "(llguidance is not installed)", param=spec.param)
    limits = constraint_limits(config)
    return await trio.to_thread.run_sync(
        _compile_sync, spec, engine.tokenizer, limits, engine.info.n_ctx,
        limiter=_compile_limiter,
    )
