"""JSON request bodies: the Content-Type check, strict decoding to one JSON object, and typed
access to its fields with errors that name the field the way OpenAI does.

Strict: NaN and Infinity literals, numbers out of float range, lone UTF-16 surrogates and
non-objects are 400s; booleans must be JSON booleans, integers may not be booleans or
fractional numbers. The endpoint schemas (`bitnetd_trio.api.schema`) build on this.
"""

from __future__ import annotations

import json
import math
from typing import Any

from bitnetd_trio.api.errors import ApiError

__all__ = [
    "Fields",
    "as_bool",
    "as_int",
    "as_number",
    "as_str",
    "check_content_type",
    "invalid",
    "json_type",
    "object_array",
    "parse_json_body",
    "quoted",
]


# ---- the body ----------------------------------------------------------------------------------


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999 parses as inf
        raise ValueError(f"the number {text[:40]} is out of range")
    return value


_JSON_CHARSETS = {"utf-8", "utf8"}
# Types whose body we still parse as JSON: curl -d sends x-www-form-urlencoded unless told
# otherwise, and a curl script that forgot -H is not an attack.
_JSON_TYPES = {"application/json", "text/plain", "application/x-www-form-urlencoded"}


def check_content_type(value: str | None) -> None:
    """ApiError 415 unless the Content-Type can carry a JSON body (absent is fine)."""
    if value is None or not value.strip():
        return
    mime, _, params = value.partition(";")
    mime = mime.strip().lower()
    if mime not in _JSON_TYPES and not (mime.startswith("application/") and mime.endswith("+json")):
        raise ApiError(415, f"unsupported Content-Type '{value.strip()}': send application/json")
    for param in params.split(";"):
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset":
            charset = val.strip().strip('"').lower()
            if charset not in _JSON_CHARSETS:
                raise ApiError(415, f"unsupported charset '{charset}': JSON bodies are UTF-8")


def _find_lone_surrogate(obj: Any) -> bool:
    """True if any string (or key) holds a lone surrogate ("\\ud800"): it cannot be UTF-8."""
    stack = [obj]
    while stack:
        v = stack.pop()
        if isinstance(v, str):
            if not v.isascii():
                try:
                    v.encode("utf-8")
                except UnicodeEncodeError:
                    return True
        elif isinstance(v, dict):
            stack.extend(v.keys())
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return False


def parse_json_body(body: bytes) -> dict:
    """The request body as a JSON object, or ApiError 400 saying what is wrong with it."""
    if not body or not body.strip():
        raise ApiError(400, "the request body is empty; expected a JSON object")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiError(400, f"the request body is not valid UTF-8 (byte {e.start})") from None
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except json.JSONDecodeError as e:
        raise ApiError(
            400, f"the request body is not valid JSON: {e.msg} (line {e.lineno} column {e.colno})"
        ) from None
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except ValueError as e:  # NaN/Infinity, or an integer literal with thousands of digits
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(value, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {json_type(value)}")
    if _find_lone_surrogate(value):
        raise ApiError(400, "the request body holds a string with an unpaired UTF-16 surrogate")
    return value


# ---- typed field access ------------------------------------------------------------------------


def json_type(v: Any) -> str:
    """How an error message names a JSON value's type ("a string", "null", ...)."""
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "a boolean"
    if isinstance(v, (int, float)):
        return "a number"
    if isinstance(v, str):
        return "a string"
    if isinstance(v, list):
        return "an array"
    if isinstance(v, dict):
        return "an object"
    return type(v).__name__


def quoted(v: Any) -> str:
    """A value quoted in an error message: scalars as JSON (cut short), others by type."""
    if isinstance(v, (bool, int, float)) or v is None:
        text = json.dumps(v)
        return text if len(text) <= 40 else text[:37] + "..."
    return json_type(v)


def invalid(param: str, message: str) -> ApiError:
    """The 400 error for field `param`, its message starting with the field's name."""
    return ApiError(400, f"'{param}' {message}", param=param)


def as_int(v: Any, param: str, lo: int, hi: int) -> int:
    """An integer in lo..hi (a float with an integral value counts; a boolean does not)."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(param, f"must be an integer, got {quoted(v)}")
    if isinstance(v, float):
        if not math.isfinite(v) or not v.is_integer():
            raise invalid(param, f"must be an integer, got {quoted(v)}")
        if abs(v) > 2**53:  # beyond exact float integers: certainly out of every range
            raise invalid(param, f"must be between {lo} and {hi}, got {quoted(v)}")
        v = int(v)
    if not lo <= v <= hi:
        raise invalid(param, f"must be between {lo} and {hi}, got {quoted(v)}")
    return v


def as_number(v: Any, param: str, lo: float, hi: float) -> float:
    """A finite number in lo..hi."""
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise invalid(param, f"must be a number, got {quoted(v)}")
    if isinstance(v, float) and not math.isfinite(v):
        raise invalid(param, f"must be a finite number, got {quoted(v)}")
    if not lo <= v <= hi:
        raise invalid(param, f"must be between {lo:g} and {hi:g}, got {quoted(v)}")
    return float(v)


def as_bool(v: Any, param: str) -> bool:
    """A JSON boolean (not 0/1, not "true")."""
    if not isinstance(v, bool):
        raise invalid(param, f"must be a boolean (true or false), got {quoted(v)}")
    return v


def as_str(v: Any, param: str) -> str:
    """A string."""
    if not isinstance(v, str):
        raise invalid(param, f"must be a string, got {json_type(v)}")
    return v


def object_array(v: Any, param: str, noun: str) -> list[tuple[str, dict]]:
    """A required, non-empty array of objects (`messages`, `input`) as (where, object) pairs,
    `where` naming each element the way errors do ("messages[2]")."""
    if v is None:
        raise invalid(param, "is required")
    if not isinstance(v, list):
        raise invalid(param, f"must be an array of {noun}s, got {json_type(v)}")
    if not v:
        raise invalid(param, f"must hold at least one {noun}")
    out = []
    for i, item in enumerate(v):
        where = f"{param}[{i}]"
        if not isinstance(item, dict):
            raise invalid(where, f"must be an object, got {json_type(item)}")
        out.append((where, item))
    return out


class Fields:
    """Typed getters over one request object; null counts as absent."""

    def __init__(self, d: dict) -> None:
        self.d = d

    def present(self, name: str) -> bool:
        return self.d.get(name) is not None

    def int(self, name: str, lo: int, hi: int, default: Any = None) -> Any:
        v = self.d.get(name)
        return default if v is None else as_int(v, name, lo, hi)

    def number(self, name: str, lo: float, hi: float, default: Any = None) -> Any:
        v = self.d.get(name)
        return default if v is None else as_number(v, name, lo, hi)

    def bool(self, name: str, default: bool = False) -> bool:
        v = self.d.get(name)
        return default if v is None else as_bool(v, name)

    def str(self, name: str, default: Any = None) -> Any:
        v = self.d.get(name)
        return default if v is None else as_str(v, name)

    def object(self, name: str) -> dict | None:
        """An optional JSON object (a field with fields of its own)."""
        v = self.d.get(name)
        if v is not None and not isinstance(v, dict):
            raise invalid(name, f"must be an object, got {json_type(v)}")
        return v
