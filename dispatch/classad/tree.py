"""The tree a parsed ClassAd expression becomes, and how it computes its value.

:mod:`dispatch.classad.parser` builds these immutable nodes; each one computes a
:mod:`dispatch.classad.values` value against a :class:`Scope` of machine attributes,
applying the operators and functions the parser chose for it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from dispatch.classad.values import ERROR, UNDEFINED, Binary, Special, Unary, Value, to_value, truth

__all__ = [
    "Attribute", "Call", "Chain", "Conditional", "ListLiteral", "Literal", "Logical", "Node",
    "Scope", "UnaryOperation",
]


class Scope:
    """Machine attributes looked up by name, case-insensitively."""

    __slots__ = ("_attrs", "_folded")

    def __init__(self, attrs: Mapping[str, object]) -> None:
        self._attrs = attrs
        self._folded: dict[str, object] | None = None

    def lookup(self, name: str, folded: str) -> Value:
        """The value of attribute ``name`` (``folded`` is its lower case); UNDEFINED if absent."""
        if name in self._attrs:
            return to_value(self._attrs[name])
        if self._folded is None:
            self._folded = {str(key).lower(): raw for key, raw in self._attrs.items()}
        return to_value(self._folded.get(folded))


class Node(Protocol):
    """A node of the tree: anything that computes a value in a scope."""

    def compute(self, scope: Scope) -> Value:
        """The node's value against the machine attributes in ``scope``."""


@dataclass(frozen=True, slots=True)
class Literal:
    """A constant: a number, a string, or a keyword such as ``TRUE``."""

    value: Value

    def compute(self, scope: Scope) -> Value:
        """The constant."""
        return self.value


@dataclass(frozen=True, slots=True)
class Attribute:
    """A reference to a machine attribute, without its ``MY.``/``TARGET.`` prefix."""

    name: str
    folded: str

    def compute(self, scope: Scope) -> Value:
        """The attribute's value, UNDEFINED when the machine does not have it."""
        return scope.lookup(self.name, self.folded)


@dataclass(frozen=True, slots=True)
class UnaryOperation:
    """A prefix operator: ``-x``, ``+x`` or ``!x``."""

    apply: Unary
    operand: Node

    def compute(self, scope: Scope) -> Value:
        """The operator applied to the operand's value."""
        return self.apply(self.operand.compute(scope))


@dataclass(frozen=True, slots=True)
class Chain:
    """Operators of one precedence level, applied left to right: ``a + b - c``."""

    first: Node
    rest: tuple[tuple[Binary, Node], ...]

    def compute(self, scope: Scope) -> Value:
        """Each operator applied to the value so far and the next operand."""
        value = self.first.compute(scope)
        for apply, operand in self.rest:
            value = apply(value, operand.compute(scope))
        return value


@dataclass(frozen=True, slots=True)
class Logical:
    """An ``&&`` (``stop`` FALSE) or ``||`` (``stop`` TRUE) chain, three-valued, short-circuit.

    ``spans`` are the ``(start, end)`` positions of each term in the source text.
    """

    stop: bool
    terms: tuple[Node, ...]
    spans: tuple[tuple[int, int], ...]

    def compute(self, scope: Scope) -> Value:
        """The first ``stop`` or ERROR term, else UNDEFINED if any term was, else not ``stop``."""
        result: bool | Special = not self.stop
        for term in self.terms:
            meaning = truth(term.compute(scope))
            if meaning is self.stop or meaning is ERROR:
                return meaning
            if meaning is UNDEFINED:
                result = UNDEFINED
        return result


@dataclass(frozen=True, slots=True)
class Conditional:
    """``condition ? then : otherwise``."""

    condition: Node
    then: Node
    otherwise: Node

    def compute(self, scope: Scope) -> Value:
        """The chosen branch's value; UNDEFINED or ERROR when the condition is."""
        meaning = truth(self.condition.compute(scope))
        if isinstance(meaning, Special):
            return meaning
        return (self.then if meaning else self.otherwise).compute(scope)


@dataclass(frozen=True, slots=True)
class Call:
    """A built-in function call; every argument is computed first."""

    apply: Callable[[Sequence[Value]], Value]
    args: tuple[Node, ...]

    def compute(self, scope: Scope) -> Value:
        """The function applied to the arguments' values."""
        return self.apply([arg.compute(scope) for arg in self.args])


@dataclass(frozen=True, slots=True)
class ListLiteral:
    """A list ``{a, b, c}``, allowed only as a function argument."""

    items: tuple[Node, ...]

    def compute(self, scope: Scope) -> Value:
        """The items' values, as a tuple."""
        return tuple(item.compute(scope) for item in self.items)
