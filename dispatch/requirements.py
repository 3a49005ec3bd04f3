"""HTCondor ClassAd ``Requirements`` expressions, parsed and evaluated safely.

A job says where it may run with an expression such as
``Memory >= 2048 && stringListMember("gpu", Groups)``; an execute node evaluates it
against its own machine attributes (:meth:`workers.machine.Machine.attributes`).
:func:`parse` turns the text into an immutable :class:`Expression` with a hand-written
tokenizer and precedence-climbing parser; nothing is ever handed to ``eval``.
Values, operators and built-in functions live in :mod:`dispatch.classad_functions`.

The text is bounded (4096 characters, 1024 tokens, nesting 64 deep) so that parsing
and evaluating a hostile expression stays cheap. Empty text means ``TRUE``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

from dispatch.classad_functions import (
    BINARY_OPERATORS,
    ERROR,
    FUNCTIONS,
    UNARY_OPERATORS,
    UNDEFINED,
    Special,
    Value,
    to_value,
    truth,
)
from dispatch.errors import InvalidRequirementsError

__all__ = ["ERROR", "UNDEFINED", "Expression", "parse"]

MAX_CHARS = 4096
MAX_TOKENS = 1024
MAX_DEPTH = 64
FIELD = "Requirements"

_KEYWORDS: dict[str, Value] = {"true": True, "false": False, "undefined": UNDEFINED, "error": ERROR}
_WORD_OPERATORS = frozenset({"is", "isnt"})
_SCOPES = ("my.", "target.")
_PRECEDENCE = {
    "||": 1, "&&": 2, "|": 3, "^": 4, "&": 5,
    "==": 6, "!=": 6, "=?=": 6, "=!=": 6, "is": 6, "isnt": 6,
    "<": 7, "<=": 7, ">": 7, ">=": 7, "+": 8, "-": 8, "*": 9, "/": 9, "%": 9,
}
_TOKEN = re.compile(
    r"(?P<space>\s+)"
    r"|(?P<real>(?:[0-9]+\.[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|[0-9]+[eE][+-]?[0-9]+)"
    r"|(?P<int>[0-9]+)"
    r"|(?P<name>[A-Za-z_][A-Za-z0-9_.]*)"
    r"|(?P<op>=\?=|=!=|==|!=|<=|>=|&&|\|\||[-+*/%<>!?:(),{}|^&])",
    re.ASCII,
)
_ESCAPES = {'"': '"', "\\": "\\", "n": "\n", "t": "\t"}
_HINTS = {"=": " (use == to compare)", "'": " (strings use double quotes)"}


def _error(text: str, message: str, pos: int, hint: str = "") -> InvalidRequirementsError:
    """A one-line error saying what is wrong, where, and in (a window of) which text."""
    snippet = text
    if len(text) > 80:
        before, after = ("..." if pos > 30 else ""), ("..." if pos + 30 < len(text) else "")
        snippet = before + text[max(pos - 30, 0):pos + 30] + after
    snippet = "".join(char if char.isprintable() else repr(char)[1:-1] for char in snippet)
    message = f"{FIELD}: {message} at {pos} in '{snippet}'{hint}"
    return InvalidRequirementsError(message, field=FIELD)


# ---------------------------------------------------------------------------- tokens

class _Token(NamedTuple):
    kind: str  # "int", "real", "str", "name", "op" or "end"
    text: str  # as written; operators and keywords lower-cased
    pos: int
    end: int
    value: Value = UNDEFINED


def _tokenize(text: str) -> list[_Token]:
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        if text[pos] == '"':
            token = _string_token(text, pos)
        else:
            match = _TOKEN.match(text, pos)
            if match is None:
                message = f"unexpected character {text[pos]!r}"
                raise _error(text, message, pos, _HINTS.get(text[pos], ""))
            pos = match.end()
            if match.lastgroup == "space":
                continue
            token = _plain_token(text, match)
        tokens.append(token)
        pos = token.end
        if len(tokens) > MAX_TOKENS:
            raise _error(text, f"more than {MAX_TOKENS} tokens", token.pos)
    tokens.append(_Token("end", "end of input", len(text), len(text)))
    return tokens


def _plain_token(text: str, match: re.Match[str]) -> _Token:
    kind, word, pos = match.lastgroup or "op", match.group(), match.start()
    if kind == "int":
        number = int(word)
        if number > (1 << 63) - 1:
            raise _error(text, f"integer {word[:20]} is out of range", pos)
        return _Token(kind, word, pos, match.end(), number)
    if kind == "real":
        return _Token(kind, word, pos, match.end(), float(word))
    if kind == "name" and word.lower() in _WORD_OPERATORS:
        return _Token("op", word.lower(), pos, match.end())
    return _Token(kind, word, pos, match.end())


def _string_token(text: str, start: int) -> _Token:
    chars: list[str] = []
    pos = start + 1
    while pos < len(text) and text[pos] != '"':
        char = text[pos]
        if char == "\\" and pos + 1 < len(text):
            escape = text[pos + 1]
            if escape not in _ESCAPES:
                raise _error(text, f"unknown escape '\\{escape}' in string", pos)
            char = _ESCAPES[escape]
            pos += 1
        chars.append(char)
        pos += 1
    if pos >= len(text):
        raise _error(text, "unterminated string starting", start)
    return _Token("str", text[start:pos + 1], start, pos + 1, "".join(chars))


# ---------------------------------------------------------------------------- tree

class _Scope:
    """Machine attributes looked up by name, case-insensitively."""

    __slots__ = ("_attrs", "_folded")

    def __init__(self, attrs: Mapping[str, object]) -> None:
        self._attrs = attrs
        self._folded: dict[str, object] | None = None

    def lookup(self, name: str, folded: str) -> Value:
        if name in self._attrs:
            return to_value(self._attrs[name])
        if self._folded is None:
            self._folded = {str(key).lower(): raw for key, raw in self._attrs.items()}
        return to_value(self._folded.get(folded))


class _Node(Protocol):
    def compute(self, scope: _Scope) -> Value: ...


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Value

    def compute(self, scope: _Scope) -> Value:
        return self.value


@dataclass(frozen=True, slots=True)
class _Attribute:
    name: str
    folded: str

    def compute(self, scope: _Scope) -> Value:
        return scope.lookup(self.name, self.folded)


@dataclass(frozen=True, slots=True)
class _Unary:
    apply: Callable[[Value], Value]
    operand: _Node

    def compute(self, scope: _Scope) -> Value:
        return self.apply(self.operand.compute(scope))


@dataclass(frozen=True, slots=True)
class _Chain:
    """Operators of one precedence level, applied left to right: ``a + b - c``."""

    first: _Node
    rest: tuple[tuple[Callable[[Value, Value], Value], _Node], ...]

    def compute(self, scope: _Scope) -> Value:
        value = self.first.compute(scope)
        for apply, operand in self.rest:
            value = apply(value, operand.compute(scope))
        return value


@dataclass(frozen=True, slots=True)
class _Logical:
    """An ``&&`` (``stop`` FALSE) or ``||`` (``stop`` TRUE) chain, three-valued, short-circuit."""

    stop: bool
    terms: tuple[_Node, ...]
    spans: tuple[tuple[int, int], ...]

    def compute(self, scope: _Scope) -> Value:
        result: bool | Special = not self.stop
        for term in self.terms:
            meaning = truth(term.compute(scope))
            if meaning is self.stop or meaning is ERROR:
                return meaning
            if meaning is UNDEFINED:
                result = UNDEFINED
        return result


@dataclass(frozen=True, slots=True)
class _Conditional:
    condition: _Node
    then: _Node
    otherwise: _Node

    def compute(self, scope: _Scope) -> Value:
        meaning = truth(self.condition.compute(scope))
        if isinstance(meaning, Special):
            return meaning
        return (self.then if meaning else self.otherwise).compute(scope)


@dataclass(frozen=True, slots=True)
class _Call:
    apply: Callable[[Sequence[Value]], Value]
    args: tuple[_Node, ...]

    def compute(self, scope: _Scope) -> Value:
        return self.apply([arg.compute(scope) for arg in self.args])


@dataclass(frozen=True, slots=True)
class _List:
    items: tuple[_Node, ...]

    def compute(self, scope: _Scope) -> Value:
        return tuple(item.compute(scope) for item in self.items)


# ---------------------------------------------------------------------------- parser

class _Parser:
    """Recursive descent for primaries, precedence climbing for binary operators."""

    def __init__(self, text: str) -> None:
        self._text = text
        self._tokens = _tokenize(text)
        self._index = 0
        self._last_end = 0
        self._depth = 0
        self.names: set[str] = set()

    def parse(self) -> _Node:
        node = self._expression()
        if self._peek().kind != "end":
            raise self._unexpected(self._peek())
        return node

    def _peek(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind != "end":
            self._index += 1
            self._last_end = token.end
        return token

    def _accept(self, op: str) -> bool:
        token = self._peek()
        if token.kind == "op" and token.text == op:
            self._advance()
            return True
        return False

    def _expect(self, op: str) -> None:
        token = self._peek()
        if not self._accept(op):
            raise _error(self._text, f"expected {op!r} but found {_shown(token)}", token.pos)

    def _unexpected(self, token: _Token) -> InvalidRequirementsError:
        return _error(self._text, f"unexpected {_shown(token)}", token.pos)

    def _nested(self, parse_level: Callable[[], _Node]) -> _Node:
        """Parse one level deeper, refusing to go past MAX_DEPTH."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _error(self._text, f"nested deeper than {MAX_DEPTH} levels", self._peek().pos)
            return parse_level()
        finally:
            self._depth -= 1

    def _expression(self) -> _Node:
        condition = self._binary(1)
        if not self._accept("?"):
            return condition
        then = self._nested(self._expression)
        self._expect(":")
        return _Conditional(condition, then, self._nested(self._expression))

    def _precedence(self) -> int | None:
        token = self._peek()
        return _PRECEDENCE.get(token.text) if token.kind == "op" else None

    def _binary(self, min_precedence: int) -> _Node:
        start = self._peek().pos
        node = self._unary()
        while (precedence := self._precedence()) is not None and precedence >= min_precedence:
            node = self._chain(node, (start, self._last_end), precedence)
        return node

    def _chain(self, first: _Node, span: tuple[int, int], precedence: int) -> _Node:
        """Operands joined by operators of one precedence; higher ones bind inside them."""
        operators: list[str] = []
        terms, spans = [first], [span]
        while self._precedence() == precedence:
            operators.append(self._advance().text)
            start = self._peek().pos
            terms.append(self._nested(lambda: self._binary(precedence + 1)))
            spans.append((start, self._last_end))
        if operators[0] in ("&&", "||"):
            return _Logical(operators[0] == "||", tuple(terms), tuple(spans))
        applies = [BINARY_OPERATORS[op] for op in operators]
        return _Chain(first, tuple(zip(applies, terms[1:], strict=True)))

    def _unary(self) -> _Node:
        token = self._peek()
        if token.kind == "op" and token.text in UNARY_OPERATORS:
            self._advance()
            return _Unary(UNARY_OPERATORS[token.text], self._nested(self._unary))
        return self._primary()

    def _primary(self) -> _Node:
        token = self._advance()
        if token.kind in ("int", "real", "str"):
            return _Literal(token.value)
        if token.kind == "name":
            return self._name(token)
        if token.kind == "op" and token.text == "(":
            node = self._nested(self._expression)
            self._expect(")")
            return node
        raise self._unexpected(token)

    def _name(self, token: _Token) -> _Node:
        word = token.text
        if word.lower() in _KEYWORDS:
            return _Literal(_KEYWORDS[word.lower()])
        if self._peek().text == "(" and self._peek().kind == "op":
            return self._call(token)
        for scope in _SCOPES:
            if word.lower().startswith(scope):
                word = word[len(scope):]
                break
        if not word or not (word[0].isalpha() or word[0] == "_") or word.endswith("."):
            raise _error(self._text, f"bad attribute reference {token.text!r}", token.pos)
        self.names.add(word)
        return _Attribute(word, word.lower())

    def _call(self, token: _Token) -> _Node:
        function = FUNCTIONS.get(token.text.lower())
        if function is None:
            raise _error(self._text, f"unknown function {token.text!r}", token.pos)
        self._advance()  # the "("
        args: list[_Node] = []
        if not self._accept(")"):
            args.append(self._nested(self._argument))
            while self._accept(","):
                args.append(self._nested(self._argument))
            self._expect(")")
        low, high = function.min_args, function.max_args
        if len(args) < low or (high is not None and len(args) > high):
            wanted = str(low) if low == high else f"{low} to {high}"
            noun = "argument" if wanted == "1" else "arguments"
            message = f"{token.text}() takes {wanted} {noun}, not {len(args)}"
            raise _error(self._text, message, token.pos)
        return _Call(function.apply, tuple(args))

    def _argument(self) -> _Node:
        """A function argument: an expression, or a list literal ``{a, b, c}``."""
        if not self._accept("{"):
            return self._expression()
        items: list[_Node] = []
        if not self._accept("}"):
            items.append(self._nested(self._expression))
            while self._accept(","):
                items.append(self._nested(self._expression))
            self._expect("}")
        return _List(tuple(items))


def _shown(token: _Token) -> str:
    if token.kind == "end":
        return token.text
    return repr(token.text if len(token.text) <= 40 else token.text[:37] + "...")


# ---------------------------------------------------------------------------- public API

@dataclass(frozen=True)
class Expression:
    """A parsed ``Requirements`` expression: immutable, and cheap to evaluate many times.

    Build one with :func:`parse`. Two expressions are equal when their text is.
    """

    text: str
    _root: _Node = field(repr=False, compare=False)
    _names: frozenset[str] = field(repr=False, compare=False)

    def value(self, attrs: Mapping[str, object]) -> object:
        """The raw ClassAd value against machine ``attrs``.

        One of ``bool``, ``int``, ``float``, ``str``, ``UNDEFINED`` or ``ERROR``
        (or a ``tuple`` when the expression is a list-valued attribute).
        """
        return _value_of(self._root, _Scope(attrs))

    def evaluate(self, attrs: Mapping[str, object]) -> bool:
        """Whether a machine with ``attrs`` satisfies the expression.

        True only when the value is TRUE (or, as in ClassAds, a nonzero number);
        UNDEFINED, ERROR, FALSE and strings all mean the machine does not match.
        """
        return truth(_value_of(self._root, _Scope(attrs))) is True

    def attribute_names(self) -> frozenset[str]:
        """The attributes the expression refers to, as written, without ``MY.``/``TARGET.``."""
        return self._names

    def failing_terms(self, attrs: Mapping[str, object]) -> list[str]:
        """The source text of each top-level ``&&`` term that is not TRUE for ``attrs``.

        Explains a rejection, e.g. ``["Memory >= 4096"]``. An expression that is not an
        ``&&`` chain is one term. Empty when :meth:`evaluate` is true.
        """
        scope = _Scope(attrs)
        root = self._root
        if isinstance(root, _Logical) and not root.stop:
            spans = zip(root.terms, root.spans, strict=True)
            return [self.text[start:end] for term, (start, end) in spans
                    if truth(_value_of(term, scope)) is not True]
        return [] if self.evaluate(attrs) else [self.text.strip()]


def _value_of(node: _Node, scope: _Scope) -> Value:
    try:
        return node.compute(scope)
    except RecursionError:  # only reachable when called from an already deep stack
        return ERROR


def parse(text: str) -> Expression:
    """Parse a ``Requirements`` expression; empty or blank text means TRUE.

    Raises :class:`~dispatch.errors.InvalidRequirementsError` (``field="Requirements"``)
    with a one-line message giving the character position of the problem.
    """
    if len(text) > MAX_CHARS:
        raise _error(text, f"expression is {len(text)} characters, more than {MAX_CHARS}", 0)
    if not text.strip():
        return Expression(text, _Literal(True), frozenset())
    parser = _Parser(text)
    try:
        root = parser.parse()
    except RecursionError:  # only reachable when called from an already deep stack
        raise _error(text, "expression nested too deeply", 0) from None
    return Expression(text, root, frozenset(parser.names))

