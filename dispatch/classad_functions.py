"""ClassAd values and the operators and built-in functions that work on them.

The value model behind :mod:`dispatch.requirements`: booleans, 64-bit integers,
reals, strings, lists (tuples), and the two special values ``UNDEFINED`` (an
attribute is missing) and ``ERROR`` (an operation makes no sense, like ``"a" < 1``).
Every operator and function here is total: it returns a value and never raises.
"""

from __future__ import annotations

import enum
import math
import operator
import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple, TypeAlias, TypeGuard

__all__ = [
    "BINARY_OPERATORS", "ERROR", "FUNCTIONS", "UNARY_OPERATORS", "UNDEFINED",
    "Function", "Special", "Value", "to_value", "truth",
]

MAX_PATTERN_CHARS = 256
MAX_TARGET_CHARS = 4096
_INT_MIN, _INT_MAX = -(1 << 63), (1 << 63) - 1


class Special(enum.Enum):
    """The two ClassAd values that are not data."""

    UNDEFINED = "UNDEFINED"
    ERROR = "ERROR"

    def __repr__(self) -> str:
        return self.value


UNDEFINED = Special.UNDEFINED
ERROR = Special.ERROR

Value: TypeAlias = bool | int | float | str | Special | tuple["Value", ...]
Binary: TypeAlias = Callable[[Value, Value], Value]
Unary: TypeAlias = Callable[[Value], Value]


def to_value(raw: object) -> Value:
    """Turn a machine attribute into a ClassAd value; ``None`` is UNDEFINED, odd types ERROR."""
    if raw is None:
        return UNDEFINED
    if isinstance(raw, bool | str | float | Special):
        return raw
    if isinstance(raw, int):
        return raw if _INT_MIN <= raw <= _INT_MAX else ERROR
    if isinstance(raw, list | tuple):
        return tuple(to_value(item) for item in raw)
    return ERROR


def truth(value: Value) -> bool | Special:
    """The boolean meaning of ``value``: numbers are true when nonzero, strings are ERROR."""
    if isinstance(value, bool) or value is UNDEFINED:
        return value
    if isinstance(value, int | float):
        return value != 0
    return ERROR


def _special(*values: Value) -> Special | None:
    """ERROR if any value is ERROR, else UNDEFINED if any is UNDEFINED, else None."""
    if ERROR in values:
        return ERROR
    return UNDEFINED if UNDEFINED in values else None


def _number(value: Value) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float) else None


def _wrap(number: int) -> int:
    """Wrap to a signed 64-bit integer, as ClassAd arithmetic does."""
    return (number - _INT_MIN) % (1 << 64) + _INT_MIN


def _int_div(x: int, y: int) -> int:
    quotient = abs(x) // abs(y)
    return quotient if (x < 0) == (y < 0) else -quotient


def _int_mod(x: int, y: int) -> int:
    return x - y * _int_div(x, y)


def _comparison(compare: Callable[[Any, Any], bool]) -> Binary:
    def apply(left: Value, right: Value) -> Value:
        special = _special(left, right)
        if special is not None:
            return special
        if isinstance(left, str) and isinstance(right, str):
            return compare(left.lower(), right.lower())
        x, y = _number(left), _number(right)
        return ERROR if x is None or y is None else compare(x, y)
    return apply


def _arithmetic(int_op: Callable[[int, int], int], real_op: Callable[[float, float], float],
                *, divides: bool = False) -> Binary:
    def apply(left: Value, right: Value) -> Value:
        special = _special(left, right)
        if special is not None:
            return special
        x, y = _number(left), _number(right)
        if x is None or y is None or (divides and y == 0):
            return ERROR
        if isinstance(x, int) and isinstance(y, int):
            return _wrap(int_op(x, y))
        try:
            return real_op(float(x), float(y))
        except (ValueError, OverflowError):
            return ERROR
    return apply


def _bitwise(int_op: Callable[[int, int], int]) -> Binary:
    def apply(left: Value, right: Value) -> Value:
        special = _special(left, right)
        if special is not None:
            return special
        x, y = _number(left), _number(right)
        if isinstance(x, int) and isinstance(y, int):
            return int_op(x, y)
        return ERROR
    return apply


def _identical(left: Value, right: Value) -> Value:
    """Meta-equality (``=?=``, ``is``): same type and same value, strings case-sensitive."""
    return type(left) is type(right) and left == right


def _not_identical(left: Value, right: Value) -> Value:
    return not _identical(left, right)


BINARY_OPERATORS: dict[str, Binary] = {
    "|": _bitwise(operator.or_), "^": _bitwise(operator.xor), "&": _bitwise(operator.and_),
    "==": _comparison(operator.eq), "!=": _comparison(operator.ne),
    "=?=": _identical, "is": _identical, "=!=": _not_identical, "isnt": _not_identical,
    "<": _comparison(operator.lt), "<=": _comparison(operator.le),
    ">": _comparison(operator.gt), ">=": _comparison(operator.ge),
    "+": _arithmetic(operator.add, operator.add), "-": _arithmetic(operator.sub, operator.sub),
    "*": _arithmetic(operator.mul, operator.mul),
    "/": _arithmetic(_int_div, operator.truediv, divides=True),
    "%": _arithmetic(_int_mod, math.fmod, divides=True),
}


def _negate(value: Value) -> Value:
    number = _number(value)
    if number is None:
        return value if value is UNDEFINED else ERROR
    return _wrap(-number) if isinstance(number, int) else -number


def _plus(value: Value) -> Value:
    number = _number(value)
    if number is None:
        return value if value is UNDEFINED else ERROR
    return number


def _not(value: Value) -> Value:
    meaning = truth(value)
    return not meaning if isinstance(meaning, bool) else meaning


UNARY_OPERATORS: dict[str, Unary] = {"-": _negate, "+": _plus, "!": _not}

# ---------------------------------------------------------------------------- functions

_INT_TEXT = re.compile(r"\s*[+-]?[0-9]+\s*", re.ASCII)
_REAL_TEXT = re.compile(r"\s*[+-]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?\s*", re.ASCII)
_REGEX_FLAGS = {"i": re.IGNORECASE, "m": re.MULTILINE, "s": re.DOTALL, "x": re.VERBOSE}


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
    return int(number) if math.isfinite(number) and _INT_MIN <= number <= _INT_MAX else ERROR


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
        special = _special(*args)
        if special is not None:
            return special
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
    special = _special(*args)
    if special is not None:
        return special
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
    special = _special(*args)
    if special is not None:
        return special
    pattern, target, options = args[0], args[1], args[2] if len(args) > 2 else ""
    if not (isinstance(pattern, str) and isinstance(target, str) and isinstance(options, str)):
        return ERROR
    compiled = _compile(pattern, options)
    if compiled is None or len(target) > MAX_TARGET_CHARS:
        return ERROR
    return compiled.search(target) is not None


def _compile(pattern: str, options: str) -> re.Pattern[str] | None:
    """Compile a regexp() pattern, or None when it is too long, malformed or has bad options."""
    flags = re.NOFLAG
    for letter in options.lower():
        if letter not in _REGEX_FLAGS:
            return None
        flags |= _REGEX_FLAGS[letter]
    if len(pattern) > MAX_PATTERN_CHARS:
        return None
    try:
        return re.compile(pattern, flags)
    except (re.error, OverflowError, RecursionError):
        return None


def _string_list_member(fold: bool) -> Callable[[Sequence[Value]], Value]:
    def apply(args: Sequence[Value]) -> Value:
        special = _special(*args)
        if special is not None:
            return special
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
