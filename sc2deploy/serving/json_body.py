"""JSON request bodies of the HTTP front end: parsed strictly, each field checked for its type and range, every
failure an HttpError that names the field (and never a traceback)."""
from __future__ import annotations

import json
import math
from typing import Any

from sc2deploy.errors import UserError
from sc2deploy.tokenizer import validate_text

MISSING: Any = object()


class HttpError(Exception):
    """A request the HTTP front end refuses: status, message, the field at fault, and OpenAI's error code."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _no_constant(name: str):
    raise ValueError(f"{name} is not JSON")


def parse_object(body: bytes) -> dict:
    """The body as a JSON object; 400 for bytes that are not UTF-8 JSON or not an object."""
    try:
        text = validate_text(body, "the request body")
        data = json.loads(text, parse_constant=_no_constant)
    except UserError as e:
        raise HttpError(400, str(e)) from None
    except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; RecursionError: deep nesting
        reason = str(e) if isinstance(e, ValueError) else "nested too deeply"
        raise HttpError(400, f"the request body is not valid JSON ({reason}); send a JSON object") from None
    if not isinstance(data, dict):
        raise HttpError(400, f"the request body is a JSON {_kind(data)}; send a JSON object")
    return data


def _kind(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean", type(None): "null"}.get(
        type(value), "number")


def _bad(name: str, expected: str, value: Any) -> HttpError:
    return HttpError(400, f"{name} must be {expected}, got {json.dumps(value)[:80]}", param=name)


def string(data: dict, name: str, default: Any = MISSING, *, path: str | None = None) -> Any:
    """data[name] as a str (null counts as absent); a 400 naming `path or name` when it is missing or not one."""
    value = data.get(name)
    label = path or name
    if value is None:
        if default is MISSING:
            raise HttpError(400, f"{label} is required", param=label)
        return default
    if not isinstance(value, str):
        raise _bad(label, "a string", value)
    try:
        return validate_text(value, label)
    except UserError as e:  # lone surrogates from \ud800 escapes
        raise HttpError(400, str(e), param=label) from None


def integer(data: dict, name: str, default: Any, lo: int | None = None, hi: int | None = None) -> Any:
    """data[name] as an int in [lo, hi] (null counts as absent); JSON booleans and fractions are refused."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**63:
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise _bad(name, "an integer", value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HttpError(400, f"{name} must be an integer {_bounds(lo, hi)}, got {value}", param=name)
    return value


def number(data: dict, name: str, default: Any, lo: float | None = None, hi: float | None = None) -> Any:
    """data[name] as a finite float in [lo, hi] (null counts as absent)."""
    value = data.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _bad(name, "a number", value)
    value = float(value)
    if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
        raise HttpError(400, f"{name} must be a finite number {_bounds(lo, hi)}, got {value:g}", param=name)
    return value


def _bounds(lo: float | None, hi: float | None) -> str:
    if lo is not None and hi is not None:
        return f"between {lo:g} and {hi:g}"
    return f"of at least {lo:g}" if lo is not None else (f"of at most {hi:g}" if hi is not None else "")


def boolean(data: dict, name: str, default: bool) -> bool:
    value = data.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise _bad(name, "true or false", value)
    return value


def strings(data: dict, name: str) -> list[str]:
    """A string or a list of strings (null: none)."""
    value = data.get(name)
    if value is None:
        return []
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise _bad(name, "a string or a list of strings", value)
    return [string({name: s}, name) for s in items]
