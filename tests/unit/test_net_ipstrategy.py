"""The ip_strategy rules and their tiny condition language: never eval, anything else refused."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.net import ipstrategy
from gateway.net.ipstrategy import (
    FAMILY_ORDERS,
    IPV4,
    IPV6,
    MAX_DEPTH,
    ExpressionError,
    evaluate,
    parse_expression,
    parse_strategy,
)

_REAL_COMPILE = builtins.compile  # for the test's own oracle, captured before no_eval patches it


_FORBIDDEN = ("eval", "exec", "compile", "__import__", "getattr", "globals", "locals", "vars")


@pytest.fixture(autouse=True)
def no_eval(monkeypatch):
    """Within the evaluator's module, eval & co. raise (names resolve there before builtins)."""
    def refuse(*args, **kwargs):
        raise AssertionError("eval/exec/compile called by the expression evaluator")
    for name in _FORBIDDEN:
        monkeypatch.setattr(ipstrategy, name, refuse, raising=False)


def test_the_evaluator_module_names_no_eval_exec_compile_or_getattr():
    """Static check of the source: none of the dynamic-code built-ins is even mentioned."""
    import ast

    tree = _REAL_COMPILE(Path(ipstrategy.__file__).read_text(), ipstrategy.__file__, "exec",
                         ast.PyCF_ONLY_AST)
    names = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    names |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)
              and not (node.attr == "compile" and isinstance(node.value, ast.Name) and node.value.id == "re")}
    assert not names & set(_FORBIDDEN)


def test_named_strategies_give_their_family_order_on_every_attempt():
    for name, order in FAMILY_ORDERS.items():
        strategy = parse_strategy(name)
        assert [strategy.families(n) for n in range(3)] == [order] * 3
    assert FAMILY_ORDERS["ipv4_then_ipv6"] == (IPV4, IPV6)


def test_the_design_example_picks_ipv6_first_then_ipv4():
    strategy = parse_strategy([{"if": "retry_num == 0", "then": "ipv6_only"}, {"else": "ipv4_only"}])
    assert strategy.families(0) == (IPV6,)
    assert strategy.families(1) == (IPV4,) and strategy.families(7) == (IPV4,)


def test_rules_are_tried_in_order():
    strategy = parse_strategy([
        {"if": "retry_num >= 2 and retry_num < 4", "then": "ipv6_then_ipv4"},
        {"if": "not (retry_num != 1)", "then": "ipv6_only"},
        {"else": "ipv4_only"},
    ])
    assert [strategy.name_for(n) for n in range(6)] == [
        "ipv4_only", "ipv6_only", "ipv6_then_ipv4", "ipv6_then_ipv4", "ipv4_only", "ipv4_only"]


@pytest.mark.parametrize("rules, message", [
    ("ipv5_only", "expected one of"),
    ([], "non-empty list"),
    ({"if": "retry_num == 0"}, "non-empty list"),
    ([{"if": "retry_num == 0", "then": "ipv6_only"}], "last rule must be {else"),
    ([{"else": "ipv4_only"}, {"if": "retry_num == 0", "then": "ipv6_only"}], "else must be the last"),
    ([{"if": "retry_num == 0", "then": "ipv7"}, {"else": "ipv4_only"}], "rule 1 then"),
    ([{"if": "retry_num = 0", "then": "ipv6_only"}, {"else": "ipv4_only"}], "rule 1 if: unexpected"),
    ([{"if": "retry_num == 0", "then": "ipv6_only", "x": 1}, {"else": "ipv4_only"}], "expected keys"),
    (["ipv4_only"], "expected a mapping"),
    ([{"if": 3, "then": "ipv6_only"}, {"else": "ipv4_only"}], "must be a string"),
])
def test_bad_rules_are_refused_with_a_reason(rules, message):
    with pytest.raises(ExpressionError, match=message.replace("{", r"\{").replace("(", r"\(")):
        parse_strategy(rules)


@pytest.mark.parametrize("text", [
    "__import__('os').system('true')", "retry_num.__class__", "retry_num + 1 == 2", "retry_num",
    "1", "retry_num == -1", "retry_num == 0x1", "retry_num == 1.0", "retry_num ==", "== 1",
    "retry_num == 0 and", "(retry_num == 0", "retry_num == 0)", "retry_num in [1]", "lambda: 1",
    "retry_num == 1 if 1 else 0", "retry_num is 0", "open == 1", "retry_num < 1 < 2", "not", "",
    "retry_num == 1; 1", "retry_num == '1'", "retry_num == 1234567890", "retry_num\x00== 1",
    "retry_num == ９",
])
def test_anything_outside_the_language_is_refused(text):
    with pytest.raises(ExpressionError):
        parse_expression(text)


def test_nesting_and_length_are_bounded():
    deep = "(" * (MAX_DEPTH + 1) + "retry_num == 0" + ")" * (MAX_DEPTH + 1)
    with pytest.raises(ExpressionError, match="nesting"):
        parse_expression(deep)
    with pytest.raises(ExpressionError, match="nesting"):
        parse_expression("not " * (MAX_DEPTH + 1) + "retry_num == 0")
    with pytest.raises(ExpressionError, match="limited"):
        parse_expression("retry_num == 0 or " * 20 + "retry_num == 0")
    parse_expression("(" * MAX_DEPTH + "retry_num == 0" + ")" * MAX_DEPTH)


@given(st.text(max_size=80))
@settings(max_examples=400, deadline=None)
def test_arbitrary_text_parses_or_raises_expression_error_only(text):
    try:
        node = parse_expression(text)
    except ExpressionError:
        return
    assert evaluate(node, {"retry_num": 0}) in (True, False)


@given(st.text(alphabet="retry_num=!<>andotr ()0123456789", max_size=40))
@settings(max_examples=400, deadline=None)
def test_near_miss_text_parses_or_raises_expression_error_only(text):
    try:
        parse_expression(text)
    except ExpressionError:
        pass


_TERMS = st.one_of(st.integers(min_value=0, max_value=99).map(str), st.just("retry_num"))
_COMPARISONS = st.builds(lambda a, op, b: f"{a} {op} {b}", _TERMS,
                         st.sampled_from(["==", "!=", "<", "<=", ">", ">="]), _TERMS)
_EXPRESSIONS = st.recursive(
    _COMPARISONS,
    lambda inner: st.one_of(
        st.builds(lambda a, b: f"({a}) and ({b})", inner, inner),
        st.builds(lambda a, b: f"({a}) or ({b})", inner, inner),
        st.builds(lambda a: f"not ({a})", inner),
    ),
    max_leaves=6,
)


@given(_EXPRESSIONS, st.integers(min_value=0, max_value=20))
@settings(max_examples=300, deadline=None)
def test_valid_expressions_mean_what_python_would_say(text, retry_num):
    """The same text in Python's grammar is the oracle (evaluated here, in the test only)."""
    node = parse_expression(text)
    oracle = _python_value(text, retry_num)
    assert evaluate(node, {"retry_num": retry_num}) is oracle


def _python_value(text: str, retry_num: int) -> bool:
    import ast
    import operator

    ops = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
           ast.Gt: operator.gt, ast.GtE: operator.ge}

    def walk(node: ast.AST) -> object:
        if isinstance(node, ast.Expression):
            return walk(node.body)
        if isinstance(node, ast.BoolOp):
            values = [walk(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else any(values)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not walk(node.operand)
        if isinstance(node, ast.Compare):
            return ops[type(node.ops[0])](walk(node.left), walk(node.comparators[0]))
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return retry_num
        raise AssertionError(ast.dump(node))

    return bool(walk(_REAL_COMPILE(text, "<oracle>", "eval", ast.PyCF_ONLY_AST)))
