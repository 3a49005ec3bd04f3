"""The ClassAd built-in functions a ``Requirements`` expression may call.

Each takes a list of :mod:`dispatch.classad.values` values and, like the operators,
is total: it returns a value (ERROR when the call makes no sense) and never raises.

``regexp()`` runs a pattern the job chose against machine attributes, so it must not
let a hostile pattern hang the worker: patterns and targets are bounded in length,
patterns whose counted repeats (``a{1000}``) would expand into a huge program are
refused, and a search that runs longer than :data:`REGEX_TIMEOUT_S` is ERROR.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable, Sequence
from typing import NamedTuple, TypeGuard

import regex  # type: ignore[import-untyped,unused-ignore]

from dispatch.classad.values import (
    BINARY_OPERATORS,
    ERROR,
    INT_MAX,
    INT_MIN,
    UNDEFINED,
    Special,
    Value,
    special,
    to_value,
    truth,
)

__all__ = ["FUNCTIONS", "Function"]

MAX_PATTERN_CHARS = 256
MAX_TARGET_CHARS = 4096
MAX_REPEAT_PRODUCT = 10_000
REGEX_TIMEOUT_S = 0.05

_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_REAL_TEXT = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)
_REGEX_FLAGS = {
    "i": regex.IGNORECASE, "m": regex.MULTILINE, "s": regex.DOTALL, "x": regex.VERBOSE,
}
_COUNTED_REPEAT = re.compile(r"\{([0-9]*)(?:,([0-9]*))?\}", re.ASCII)


class Function(NamedTuple):
    """A built-in function: how many arguments it takes and how it computes its value."""

    min_args: int
    max_args: int | None
    apply: Callable[[Sequence[Value]], Value]


def _text(value: Value) -> str | None:
    """The ClassAd ``string()`` of a scalar, or None for lists and special values."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return value
    return repr(value) if isinstance(value, int | float) else None


def _truncate(number: float) -> Value:
    return int(number) if math.isfinite(number) and INT_MIN <= number <= INT_MAX else ERROR


def _int_of_text(text: str) -> Value:
    try:
        if _INT_TEXT.fullmatch(text):
            return to_value(int(text))
        return _truncate(float(text)) if _REAL_TEXT.fullmatch(text) else ERROR
    except ValueError:  # more digits than int() converts
        return ERROR


def _to_int(args: Sequence[Value]) -> Value:
    value = args[0]
    if isinstance(value, Special):
        return value
    if isinstance(value, int | float):  # bool is an int
        return _truncate(value) if isinstance(value, float) else int(value)
    return _int_of_text(value) if isinstance(value, str) else ERROR


def _to_real(args: Sequence[Value]) -> Value:
    value = args[0]
    if isinstance(value, Special):
        return value
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str) and _REAL_TEXT.fullmatch(value):
        return float(value)
    return ERROR


def _string_function(convert: Callable[[str], Value]) -> Callable[[Sequence[Value]], Value]:
    def apply(args: Sequence[Value]) -> Value:
        missing = special(*args)
        if missing is not None:
            return missing
        texts = [_text(arg) for arg in args]
        return ERROR if None in texts else convert("".join(t for t in texts if t is not None))
    return apply


def _size(args: Sequence[Value]) -> Value:
    value = args[0]
    if isinstance(value, Special):
        return value
    return len(value) if isinstance(value, str | tuple) else ERROR


def _if_then_else(args: Sequence[Value]) -> Value:
    condition = truth(args[0])
    if isinstance(condition, Special):
        return condition
    return args[1] if condition else args[2]


def _substr(args: Sequence[Value]) -> Value:
    missing = special(*args)
    if missing is not None:
        return missing
    text, offset, length = args[0], args[1], args[2] if len(args) > 2 else None
    if isinstance(text, str) and _is_int(offset) and (length is None or _is_int(length)):
        return _slice(text, offset, length)
    return ERROR


def _slice(text: str, offset: int, length: int | None) -> str:
    """ClassAd substr(): a negative offset counts from the end, a negative length stops short."""
    start = offset if offset >= 0 else max(len(text) + offset, 0)
    if length is None:
        return text[start:]
    end = start + length if length >= 0 else len(text) + length
    return text[start:end] if end > start else ""


def _is_int(value: Value) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _regexp(args: Sequence[Value]) -> Value:
    missing = special(*args)
    if missing is not None:
        return missing
    pattern, target, options = args[0], args[1], args[2] if len(args) > 2 else ""
    if not (isinstance(pattern, str) and isinstance(target, str) and isinstance(options, str)):
        return ERROR
    compiled = _compile(pattern, options.lower())
    if compiled is None or len(target) > MAX_TARGET_CHARS:
        return ERROR
    try:
        return compiled.search(target, timeout=REGEX_TIMEOUT_S) is not None
    except TimeoutError:  # catastrophic backtracking, e.g. "(a|a)*$"
        return ERROR


@functools.lru_cache(maxsize=256)
def _compile(pattern: str, options: str) -> regex.Pattern[str] | None:
    """Compile a regexp() pattern, or None when it is too big, malformed or has bad options."""
    flags = 0
    for letter in options:
        if letter not in _REGEX_FLAGS:
            return None
        flags |= _REGEX_FLAGS[letter]
    if len(pattern) > MAX_PATTERN_CHARS or _repeat_product(pattern) > MAX_REPEAT_PRODUCT:
        return None
    try:
        return regex.compile(pattern, flags)
    except (regex.error, ValueError, OverflowError, RecursionError):
        return None


def _repeat_product(pattern: str) -> int:
    """An upper bound on how many times counted repeats unroll the pattern.

    ``regex`` expands ``a{1000}`` while compiling, with no timeout, so nested counts
    (``(?:a{1000}){1000}``) could stall the worker before the search even starts.
    Multiplying every count, nested or not, over-estimates that safely.
    """
    product = 1
    for match in _COUNTED_REPEAT.finditer(pattern):
        product *= max([1, *(int(digits) for digits in match.groups() if digits)])
        if product > MAX_REPEAT_PRODUCT:
            break
    return product


def _string_list_member(fold: bool) -> Callable[[Sequence[Value]], Value]:
    def apply(args: Sequence[Value]) -> Value:
        missing = special(*args)
        if missing is not None:
            return missing
        item, text, delimiters = args[0], args[1], args[2] if len(args) > 2 else ", "
        if not (isinstance(item, str) and isinstance(text, str) and isinstance(delimiters, str)):
            return ERROR
        pieces = [text]
        for delimiter in delimiters:
            pieces = [part for piece in pieces for part in piece.split(delimiter)]
        members = [piece.strip() for piece in pieces if piece.strip()]
        if fold:
            return item.lower() in (member.lower() for member in members)
        return item in members
    return apply


def _member(args: Sequence[Value]) -> Value:
    item, items = args
    if isinstance(item, Special | tuple):
        return ERROR if isinstance(item, tuple) else item
    if not isinstance(items, tuple):
        return items if items is UNDEFINED else ERROR
    equals = BINARY_OPERATORS["=="]
    return any(equals(item, candidate) is True for candidate in items)


FUNCTIONS: dict[str, Function] = {
    "isundefined": Function(1, 1, lambda args: args[0] is UNDEFINED),
    "iserror": Function(1, 1, lambda args: args[0] is ERROR),
    "ifthenelse": Function(3, 3, _if_then_else),
    "int": Function(1, 1, _to_int),
    "real": Function(1, 1, _to_real),
    "string": Function(1, 1, _string_function(lambda text: text)),
    "tolower": Function(1, 1, _string_function(str.lower)),
    "toupper": Function(1, 1, _string_function(str.upper)),
    "size": Function(1, 1, _size),
    "strcat": Function(0, None, _string_function(lambda text: text)),
    "substr": Function(2, 3, _substr),
    "regexp": Function(2, 3, _regexp),
    "stringlistmember": Function(2, 3, _string_list_member(fold=False)),
    "stringlistimember": Function(2, 3, _string_list_member(fold=True)),
    "member": Function(2, 2, _member),
}
