"""The tokenizer and parser that turn ``Requirements`` text into a ClassAd tree.

A hand-written tokenizer and a recursive-descent, precedence-climbing parser build
:mod:`dispatch.classad.tree` nodes; nothing is ever handed to ``eval``. The text is
bounded (4096 characters, 1024 tokens, nesting 64 deep) so that parsing and
evaluating a hostile expression stays cheap.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import NamedTuple

from dispatch.classad.functions import FUNCTIONS
from dispatch.classad.tree import (
    Attribute,
    Call,
    Chain,
    Conditional,
    ListLiteral,
    Literal,
    Logical,
    Node,
    UnaryOperation,
)
from dispatch.classad.values import BINARY_OPERATORS, ERROR, UNARY_OPERATORS, UNDEFINED, Value
from dispatch.errors import InvalidRequirementsError

__all__ = ["MAX_CHARS", "MAX_DEPTH", "MAX_TOKENS", "parse_tree"]

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

    def parse(self) -> Node:
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

    def _nested(self, parse_level: Callable[[], Node]) -> Node:
        """Parse one level deeper, refusing to go past MAX_DEPTH."""
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _error(self._text, f"nested deeper than {MAX_DEPTH} levels", self._peek().pos)
            return parse_level()
        finally:
            self._depth -= 1

    def _expression(self) -> Node:
        condition = self._binary(1)
        if not self._accept("?"):
            return condition
        then = self._nested(self._expression)
        self._expect(":")
        return Conditional(condition, then, self._nested(self._expression))

    def _precedence(self) -> int | None:
        token = self._peek()
        return _PRECEDENCE.get(token.text) if token.kind == "op" else None

    def _binary(self, min_precedence: int) -> Node:
        start = self._peek().pos
        node = self._unary()
        while (precedence := self._precedence()) is not None and precedence >= min_precedence:
            node = self._chain(node, (start, self._last_end), precedence)
        return node

    def _chain(self, first: Node, span: tuple[int, int], precedence: int) -> Node:
        """Operands joined by operators of one precedence; higher ones bind inside them."""
        operators: list[str] = []
        terms, spans = [first], [span]
        while self._precedence() == precedence:
            operators.append(self._advance().text)
            start = self._peek().pos
            terms.append(self._nested(lambda: self._binary(precedence + 1)))
            spans.append((start, self._last_end))
        if operators[0] in ("&&", "||"):
            return Logical(operators[0] == "||", tuple(terms), tuple(spans))
        applies = [BINARY_OPERATORS[op] for op in operators]
        return Chain(first, tuple(zip(applies, terms[1:], strict=True)))

    def _unary(self) -> Node:
        token = self._peek()
        if token.kind == "op" and token.text in UNARY_OPERATORS:
            self._advance()
            return UnaryOperation(UNARY_OPERATORS[token.text], self._nested(self._unary))
        return self._primary()

    def _primary(self) -> Node:
        token = self._advance()
        if token.kind in ("int", "real", "str"):
            return Literal(token.value)
        if token.kind == "name":
            return self._name(token)
        if token.kind == "op" and token.text == "(":
            node = self._nested(self._expression)
            self._expect(")")
            return node
        raise self._unexpected(token)

    def _name(self, token: _Token) -> Node:
        word = token.text
        if word.lower() in _KEYWORDS:
            return Literal(_KEYWORDS[word.lower()])
        if self._peek().text == "(" and self._peek().kind == "op":
            return self._call(token)
        for scope in _SCOPES:
            if word.lower().startswith(scope):
                word = word[len(scope):]
                break
        if not word or not (word[0].isalpha() or word[0] == "_") or word.endswith("."):
            raise _error(self._text, f"bad attribute reference {token.text!r}", token.pos)
        self.names.add(word)
        return Attribute(word, word.lower())

    def _call(self, token: _Token) -> Node:
        function = FUNCTIONS.get(token.text.lower())
        if function is None:
            raise _error(self._text, f"unknown function {token.text!r}", token.pos)
        self._advance()  # the "("
        args: list[Node] = []
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
        return Call(function.apply, tuple(args))

    def _argument(self) -> Node:
        """A function argument: an expression, or a list literal ``{a, b, c}``."""
        if not self._accept("{"):
            return self._expression()
        items: list[Node] = []
        if not self._accept("}"):
            items.append(self._nested(self._expression))
            while self._accept(","):
                items.append(self._nested(self._expression))
            self._expect("}")
        return ListLiteral(tuple(items))


def _shown(token: _Token) -> str:
    if token.kind == "end":
        return token.text
    return repr(token.text if len(token.text) <= 40 else token.text[:37] + "...")


def parse_tree(text: str) -> tuple[Node, frozenset[str]]:
    """The tree for ``text`` and the attribute names it refers to; blank text means TRUE.

    Raises :class:`~dispatch.errors.InvalidRequirementsError` (``field="Requirements"``)
    with a one-line message giving the character position of the problem.
    """
    if len(text) > MAX_CHARS:
        raise _error(text, f"expression is {len(text)} characters, more than {MAX_CHARS}", 0)
    if not text.strip():
        return Literal(True), frozenset()
    parser = _Parser(text)
    try:
        root = parser.parse()
    except RecursionError:  # only reachable when called from an already deep stack
        raise _error(text, "expression nested too deeply", 0) from None
    return root, frozenset(parser.names)
