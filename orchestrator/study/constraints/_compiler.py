"""The compiler: a checked tree to a tree of closures with upstream's semantics.

Unsupported nodes compile to closures that raise upstream's message when upstream would, after
evaluating what upstream evaluates first.
"""

from __future__ import annotations

import ast
import operator
from collections.abc import Callable, Mapping
from functools import lru_cache
from typing import Any, Final

from orchestrator.study.constraints._limits import ConstraintExpressionError, Problem
from orchestrator.study.constraints._operations import BINARY_OPERATIONS, CALLS, Budget, attribute
from orchestrator.study.constraints._parser import parse

Eval = Callable[[Mapping[str, Any], Budget], Any]


@lru_cache(maxsize=1024)
def program(expression: str) -> Eval | Problem:
    """The compiled closure tree for ``expression``, or the safety problem that refuses it.

    Cached because a design evaluates the same few expressions once per condition; problems are
    cached as text so each raise gets a fresh exception.
    """
    parsed = parse(expression)
    return compile_node(parsed.body) if isinstance(parsed, ast.Expression) else parsed


def compile_node(node: ast.expr) -> Eval:
    """Compile one node; unsupported nodes become closures raising upstream's message."""
    compile_kind = _COMPILERS.get(type(node))
    if compile_kind is None:
        return _raiser(f"Unsupported expression node: {type(node).__name__}")
    return compile_kind(node)


def _raiser(message: str, *before: Eval) -> Eval:
    """A closure that evaluates ``before`` (upstream's evaluation order), then raises."""

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        for step in before:
            step(ctx, budget)
        raise ConstraintExpressionError(message)

    return run


def _constant(value: Any) -> Eval:
    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return value

    return run


def _compile_name(name: str) -> Eval:
    message = f"Unknown variable '{name}' in constraint expression."

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        if name not in ctx:
            raise ConstraintExpressionError(message)
        return ctx[name]

    return run


def _compile_sequence(node: ast.List | ast.Tuple) -> Eval:
    """List and tuple displays; all-literal ones are built once (nothing can mutate them)."""
    is_list = isinstance(node, ast.List)
    if all(isinstance(e, ast.Constant) for e in node.elts):
        template = tuple(e.value for e in node.elts if isinstance(e, ast.Constant))
        if not is_list:
            return _constant(template)

        def run_literal(ctx: Mapping[str, Any], budget: Budget) -> Any:
            return list(template)

        return run_literal
    steps = tuple(compile_node(e) for e in node.elts)

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        items = [step(ctx, budget) for step in steps]
        return items if is_list else tuple(items)

    return run


def _compile_dict(node: ast.Dict) -> Eval:
    """Keys in order (upstream stops at the first ``**``), then values."""
    keys: list[Eval] = []
    for key in node.keys:
        if key is None:
            return _raiser("Dictionary unpacking is not allowed in constraints.", *keys)
        keys.append(compile_node(key))
    values = tuple(compile_node(v) for v in node.values)

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        evaluated = [key(ctx, budget) for key in keys]
        return dict(zip(evaluated, [value(ctx, budget) for value in values], strict=True))

    return run


def _compile_attribute(node: ast.Attribute) -> Eval:
    base, attr = compile_node(node.value), node.attr

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return attribute(base(ctx, budget), attr)

    return run


def _compile_subscript(node: ast.Subscript) -> Eval:
    target, index = compile_node(node.value), compile_node(node.slice)

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return target(ctx, budget)[index(ctx, budget)]

    return run


def _compile_boolop(node: ast.BoolOp) -> Eval:
    """Upstream evaluates every operand, then returns ``all``/``any`` of their truth."""
    steps = tuple(compile_node(v) for v in node.values)
    combine = all if isinstance(node.op, ast.And) else any

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return combine([step(ctx, budget) for step in steps])

    return run


def _compile_unaryop(node: ast.UnaryOp) -> Eval:
    operand = compile_node(node.operand)
    operators: dict[type[ast.unaryop], Callable[[Any], Any]] = {
        ast.Not: operator.not_, ast.UAdd: operator.pos, ast.USub: operator.neg,
    }  # fmt: skip
    apply = operators.get(type(node.op))
    if apply is None:
        return _raiser("Unsupported expression node: UnaryOp", operand)

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return apply(operand(ctx, budget))

    return run


def _compile_binop(node: ast.BinOp) -> Eval:
    left, right = compile_node(node.left), compile_node(node.right)
    apply = BINARY_OPERATIONS.get(type(node.op))
    if apply is None:
        return _raiser("Unsupported expression node: BinOp", left, right)

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return apply(left(ctx, budget), right(ctx, budget), budget)

    return run


def _contains(left: Any, right: Any) -> bool:
    return left in right


def _not_contains(left: Any, right: Any) -> bool:
    return left not in right


_COMPARISONS: Final[dict[type[ast.cmpop], Callable[[Any, Any], Any]]] = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
    ast.Gt: operator.gt, ast.GtE: operator.ge, ast.In: _contains, ast.NotIn: _not_contains,
}  # fmt: skip


def _compile_compare(node: ast.Compare) -> Eval:
    """Left to right; each right side is evaluated only when reached, then its operator."""
    first = compile_node(node.left)
    links = tuple(
        (_COMPARISONS.get(type(op)), type(op).__name__, compile_node(right))
        for op, right in zip(node.ops, node.comparators, strict=True)
    )

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        left = first(ctx, budget)
        for compare, name, step in links:
            right = step(ctx, budget)
            if compare is None:
                raise ConstraintExpressionError(f"Unsupported comparison operator: {name}")
            if not compare(left, right):
                return False
            left = right
        return True

    return run


def _compile_call(node: ast.Call) -> Eval:
    """Upstream order: function form, function name, positional args, then keywords."""
    if not isinstance(node.func, ast.Name):
        return _raiser("Only direct function names are allowed in constraints.")
    function = CALLS.get(node.func.id)
    if function is None:
        return _raiser(f"Function '{node.func.id}' is not allowed in constraints.")
    args = tuple(compile_node(arg) for arg in node.args)
    if node.keywords:
        return _raiser("Keyword arguments are not allowed in constraint function calls.", *args)

    def run(ctx: Mapping[str, Any], budget: Budget) -> Any:
        return function([arg(ctx, budget) for arg in args], budget)

    return run


_COMPILERS: Final[dict[type[ast.expr], Callable[[Any], Eval]]] = {
    ast.Constant: lambda node: _constant(node.value),
    ast.Name: lambda node: _compile_name(node.id),
    ast.List: _compile_sequence,
    ast.Tuple: _compile_sequence,
    ast.Dict: _compile_dict,
    ast.Attribute: _compile_attribute,
    ast.Subscript: _compile_subscript,
    ast.BoolOp: _compile_boolop,
    ast.UnaryOp: _compile_unaryop,
    ast.BinOp: _compile_binop,
    ast.Compare: _compile_compare,
    ast.Call: _compile_call,
}
