"""ClassAd values and the operators that combine them.

The value model behind :mod:`dispatch.requirements`: booleans, 64-bit integers,
reals, strings, lists (tuples), and the two special values ``UNDEFINED`` (an
attribute is missing) and ``ERROR`` (an operation makes no sense, like ``"a" < 1``).
Every operator here is total: it returns a value and never raises.
"""

from __future__ import annotations

import enum
import math
import operator
from collections.abc import Callable
from typing import Any, TypeAlias

__all__ = [
    "BINARY_OPERATORS", "ERROR", "INT_MAX", "INT_MIN", "UNARY_OPERATORS", "UNDEFINED",
    "Binary", "Special", "Unary", "Value", "special", "to_value", "truth",
]

INT_MIN, INT_MAX = -(1 << 63), (1 << 63) - 1


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
        return raw if INT_MIN <= raw <= INT_MAX else ERROR
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


def special(*values: Value) -> Special | None:
    """ERROR if any value is ERROR, else UNDEFINED if any is UNDEFINED, else None."""
    if ERROR in values:
        return ERROR
    return UNDEFINED if UNDEFINED in values else None


# ---------------------------------------------------------------------------- operators

def _number(value: Value) -> int | float | None:
    if isinstance(value, bool):
        return int(value)
    return value if isinstance(value, int | float) else None


def _wrap(number: int) -> int:
    """Wrap to a signed 64-bit integer, as ClassAd arithmetic does."""
    return (number - INT_MIN) % (1 << 64) + INT_MIN


def _int_div(x: int, y: int) -> int:
    quotient = abs(x) // abs(y)
    return quotient if (x < 0) == (y < 0) else -quotient


def _int_mod(x: int, y: int) -> int:
    return x - y * _int_div(x, y)


def _comparison(compare: Callable[[Any, Any], bool]) -> Binary:
    def apply(left: Value, right: Value) -> Value:
        missing = special(left, right)
        if missing is not None:
            return missing
        if isinstance(left, str) and isinstance(right, str):
            return compare(left.lower(), right.lower())
        x, y = _number(left), _number(right)
        return ERROR if x is None or y is None else compare(x, y)
    return apply


def _arithmetic(int_op: Callable[[int, int], int], real_op: Callable[[float, float], float],
                *, divides: bool = False) -> Binary:
    def apply(left: Value, right: Value) -> Value:
        missing = special(left, right)
        if missing is not None:
            return missing
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
        missing = special(left, right)
        if missing is not None:
            return missing
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
