"""IP family order for outbound connections, optionally chosen per retry by a tiny safe expression.

`network.ip_strategy` is either a name (`ipv4_only`, `ipv6_only`,
`ipv4_then_ipv6`, `ipv6_then_ipv4`) or a list of rules evaluated in order for
each connection attempt::

    [{if: "retry_num == 0", then: ipv6_only}, {else: ipv4_only}]

The condition language is deliberately tiny and is never handed to `eval`:
integers, known variable names (`retry_num`), the comparisons
`== != < <= > >=`, `and`, `or`, `not` and parentheses. A tokenizer and a
recursive-descent parser turn the text into a small tree of frozen dataclasses,
which `evaluate` walks. Anything else is an `ExpressionError` at start-up.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Union

IPV4, IPV6 = 4, 6
FAMILY_ORDERS: dict[str, tuple[int, ...]] = {
    "ipv4_only": (IPV4,),
    "ipv6_only": (IPV6,),
    "ipv4_then_ipv6": (IPV4, IPV6),
    "ipv6_then_ipv4": (IPV6, IPV4),
}
VARIABLES = frozenset({"retry_num"})
MAX_EXPRESSION = 256
MAX_DEPTH = 16
MAX_INT_DIGITS = 9
COMPARISONS = ("==", "!=", "<=", ">=", "<", ">")


class ExpressionError(ValueError):
    """A condition that is not in the tiny language; the message says where."""


# Tokens -------------------------------------------------------------------

_TOKEN = re.compile(r"(?P<int>[0-9]+)|(?P<name>[A-Za-z_][A-Za-z0-9_]*)"
                    r"|(?P<op>==|!=|<=|>=|<|>)|(?P<paren>[()])", re.ASCII)
_SPACE = " \t\r\n"


@dataclass(frozen=True)
class Token:
    kind: str  # int | name | op | paren | keyword | end
    text: str
    pos: int


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens; anything unrecognised is an ExpressionError."""
    if not isinstance(text, str):
        raise ExpressionError("a condition must be a string")
    if len(text) > MAX_EXPRESSION:
        raise ExpressionError(f"a condition is limited to {MAX_EXPRESSION} characters")
    tokens: list[Token] = []
    pos = 0
    while True:
        while pos < len(text) and text[pos] in _SPACE:
            pos += 1
        if pos >= len(text):
            break
        match = _TOKEN.match(text, pos)
        if match is None:
            raise ExpressionError(f"unexpected character {text[pos]!r} at position {pos}")
        kind = match.lastgroup or ""
        value = match.group()
        if kind == "int" and len(value) > MAX_INT_DIGITS:
            raise ExpressionError(f"number too large at position {pos}")
        if kind == "name" and value in ("and", "or", "not"):
            kind = "keyword"
        tokens.append(Token(kind, value, pos))
        pos = match.end()
    tokens.append(Token("end", "", len(text)))
    return tokens


# Tree ---------------------------------------------------------------------

@dataclass(frozen=True)
class Num:
    value: int


@dataclass(frozen=True)
class Var:
    name: str


@dataclass(frozen=True)
class Compare:
    op: str
    left: Union[Num, Var]
    right: Union[Num, Var]


@dataclass(frozen=True)
class Not:
    operand: "Node"


@dataclass(frozen=True)
class BoolOp:
    op: str  # "and" | "or"
    left: "Node"
    right: "Node"


Node = Union[Compare, Not, BoolOp]


class _Parser:
    """expr := and ('or' and)* ; and := unary ('and' unary)* ;
    unary := 'not' unary | '(' expr ')' | term OP term ; term := INT | NAME"""

    def __init__(self, tokens: list[Token], variables: frozenset[str]) -> None:
        self.tokens = tokens
        self.i = 0
        self.variables = variables
        self.depth = 0

    def peek(self) -> Token:
        return self.tokens[self.i]

    def take(self) -> Token:
        token = self.tokens[self.i]
        if token.kind != "end":
            self.i += 1
        return token

    def parse(self) -> Node:
        node = self.expr()
        token = self.peek()
        if token.kind != "end":
            raise ExpressionError(f"unexpected {token.text!r} at position {token.pos}")
        return node

    def _deeper(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise ExpressionError(f"a condition is limited to {MAX_DEPTH} levels of nesting")

    def expr(self) -> Node:
        node = self.conjunction()
        while self.peek().kind == "keyword" and self.peek().text == "or":
            self.take()
            node = BoolOp("or", node, self.conjunction())
        return node

    def conjunction(self) -> Node:
        node = self.unary()
        while self.peek().kind == "keyword" and self.peek().text == "and":
            self.take()
            node = BoolOp("and", node, self.unary())
        return node

    def unary(self) -> Node:
        token = self.peek()
        if token.kind == "keyword" and token.text == "not":
            self.take()
            self._deeper()
            node: Node = Not(self.unary())
            self.depth -= 1
            return node
        if token.kind == "paren" and token.text == "(":
            self.take()
            self._deeper()
            node = self.expr()
            self.depth -= 1
            close = self.take()
            if close.kind != "paren" or close.text != ")":
                raise ExpressionError(f"expected ')' at position {close.pos}")
            return node
        left = self.term()
        op = self.take()
        if op.kind != "op":
            raise ExpressionError(f"expected a comparison (== != < <= > >=) at position {op.pos}")
        return Compare(op.text, left, self.term())

    def term(self) -> Union[Num, Var]:
        token = self.take()
        if token.kind == "int":
            return Num(int(token.text))
        if token.kind == "name":
            if token.text not in self.variables:
                known = ", ".join(sorted(self.variables))
                raise ExpressionError(f"unknown name {token.text!r} at position {token.pos} (known: {known})")
            return Var(token.text)
        what = "end of condition" if token.kind == "end" else repr(token.text)
        raise ExpressionError(f"expected a number or {', '.join(sorted(self.variables))}, "
                              f"got {what} at position {token.pos}")


def parse_expression(text: str, variables: frozenset[str] = VARIABLES) -> Node:
    """Parse a condition into a tree; ExpressionError for anything outside the language."""
    return _Parser(tokenize(text), variables).parse()


def _value(term: Union[Num, Var], env: Mapping[str, int]) -> int:
    return term.value if isinstance(term, Num) else int(env[term.name])


def evaluate(node: Node, env: Mapping[str, int]) -> bool:
    """Walk the tree with the variables in ``env``."""
    if isinstance(node, Compare):
        a, b = _value(node.left, env), _value(node.right, env)
        return {"==": a == b, "!=": a != b, "<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b}[node.op]
    if isinstance(node, Not):
        return not evaluate(node.operand, env)
    if node.op == "and":
        return evaluate(node.left, env) and evaluate(node.right, env)
    return evaluate(node.left, env) or evaluate(node.right, env)


# Strategies ---------------------------------------------------------------

@dataclass(frozen=True)
class Rule:
    condition: Node | None  # None: the final `else`
    strategy: str


@dataclass(frozen=True)
class IPStrategy:
    """A parsed `network.ip_strategy`: a fixed order, or rules chosen by retry number."""

    rules: tuple[Rule, ...]
    text: str

    def name_for(self, retry_num: int) -> str:
        """The strategy name that applies to attempt ``retry_num`` (0 for the first)."""
        env = {"retry_num": retry_num}
        for rule in self.rules:
            if rule.condition is None or evaluate(rule.condition, env):
                return rule.strategy
        return self.rules[-1].strategy

    def families(self, retry_num: int) -> tuple[int, ...]:
        """The address families to try, in order, for attempt ``retry_num``."""
        return FAMILY_ORDERS[self.name_for(retry_num)]


def _strategy_name(value: Any, where: str) -> str:
    if value not in FAMILY_ORDERS:
        raise ExpressionError(f"{where}: expected one of {', '.join(FAMILY_ORDERS)}")
    return str(value)


def parse_strategy(value: Any) -> IPStrategy:
    """Validate `network.ip_strategy` (a name or a rule list); ExpressionError says what is wrong."""
    if isinstance(value, str):
        return IPStrategy((Rule(None, _strategy_name(value, "strategy")),), value)
    if not isinstance(value, list) or not value:
        raise ExpressionError("expected a strategy name or a non-empty list of {if, then} rules "
                              "ending in {else}")
    rules: list[Rule] = []
    for index, item in enumerate(value):
        where = f"rule {index + 1}"
        if not isinstance(item, Mapping):
            raise ExpressionError(f"{where}: expected a mapping like {{if: \"retry_num == 0\", then: ipv6_only}}")
        keys = set(item)
        if keys == {"else"}:
            if index != len(value) - 1:
                raise ExpressionError(f"{where}: else must be the last rule")
            rules.append(Rule(None, _strategy_name(item["else"], f"{where} else")))
        elif keys == {"if", "then"}:
            try:
                condition = parse_expression(item["if"])
            except ExpressionError as e:
                raise ExpressionError(f"{where} if: {e}") from None
            rules.append(Rule(condition, _strategy_name(item["then"], f"{where} then")))
        else:
            raise ExpressionError(f"{where}: expected keys if and then, or else alone (got "
                                  + ", ".join(sorted(map(str, keys))) + ")")
    if rules[-1].condition is not None:
        raise ExpressionError("the last rule must be {else: STRATEGY}")
    return IPStrategy(tuple(rules), repr(value))
