"""HTCondor ClassAd ``Requirements`` expressions, parsed and evaluated safely.

A job says where it may run with an expression such as
``Memory >= 2048 && stringListMember("gpu", Groups)``; an execute node evaluates it
against its own machine attributes (:meth:`workers.machine.Machine.attributes`).
:func:`parse` turns the text into an immutable :class:`Expression`; nothing is ever
handed to ``eval``. Empty text means ``TRUE``.

The pieces, each importing only those before it:

- :mod:`dispatch.classad.values`: the values, ``UNDEFINED`` and ``ERROR``, and operators;
- :mod:`dispatch.classad.functions`: the built-in functions, ``regexp()`` among them;
- :mod:`dispatch.classad.tree`: the nodes a parsed expression is made of;
- :mod:`dispatch.classad.parser`: the tokenizer and parser, with the size limits
  (4096 characters, 1024 tokens, nesting 64 deep) that keep a hostile expression cheap.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from dispatch.classad.parser import parse_tree
from dispatch.classad.tree import Logical, Node, Scope
from dispatch.classad.values import ERROR, UNDEFINED, Value, truth

__all__ = ["ERROR", "UNDEFINED", "Expression", "parse"]


@dataclass(frozen=True)
class Expression:
    """A parsed ``Requirements`` expression: immutable, and cheap to evaluate many times.

    Build one with :func:`parse`. Two expressions are equal when their text is.
    """

    text: str
    _root: Node = field(repr=False, compare=False)
    _names: frozenset[str] = field(repr=False, compare=False)

    def value(self, attrs: Mapping[str, object]) -> object:
        """The raw ClassAd value against machine ``attrs``.

        One of ``bool``, ``int``, ``float``, ``str``, ``UNDEFINED`` or ``ERROR``
        (or a ``tuple`` when the expression is a list-valued attribute).
        """
        return _value_of(self._root, Scope(attrs))

    def evaluate(self, attrs: Mapping[str, object]) -> bool:
        """Whether a machine with ``attrs`` satisfies the expression.

        True only when the value is TRUE (or, as in ClassAds, a nonzero number);
        UNDEFINED, ERROR, FALSE and strings all mean the machine does not match.
        """
        return truth(_value_of(self._root, Scope(attrs))) is True

    def attribute_names(self) -> frozenset[str]:
        """The attributes the expression refers to, as written, without ``MY.``/``TARGET.``."""
        return self._names

    def failing_terms(self, attrs: Mapping[str, object]) -> list[str]:
        """The source text of each top-level ``&&`` term that is not TRUE for ``attrs``.

        Explains a rejection, e.g. ``["Memory >= 4096"]``. An expression that is not an
        ``&&`` chain is one term. Empty when :meth:`evaluate` is true.
        """
        scope = Scope(attrs)
        root = self._root
        if isinstance(root, Logical) and not root.stop:
            spans = zip(root.terms, root.spans, strict=True)
            return [self.text[start:end] for term, (start, end) in spans
                    if truth(_value_of(term, scope)) is not True]
        return [] if self.evaluate(attrs) else [self.text.strip()]


def _value_of(node: Node, scope: Scope) -> Value:
    try:
        return node.compute(scope)
    except RecursionError:  # only reachable when called from an already deep stack
        return ERROR


def parse(text: str) -> Expression:
    """Parse a ``Requirements`` expression; empty or blank text means TRUE.

    Raises :class:`~dispatch.errors.InvalidRequirementsError` (``field="Requirements"``)
    with a one-line message giving the character position of the problem.
    """
    root, names = parse_tree(text)
    return Expression(text, root, names)
