"""The static subset check of :func:`check_expression`: what upstream would refuse, found
without running anything but the expression's literal-only parts."""

from __future__ import annotations

import ast
from typing import Final

from orchestrator.study.constraints._compiler import compile_node
from orchestrator.study.constraints._limits import WRAPPED, ConstraintExpressionError, Problem
from orchestrator.study.constraints._operations import CALLS, Budget

_SUPPORTED_NODES: Final = (
    ast.Constant, ast.Name, ast.List, ast.Tuple, ast.Dict, ast.Attribute, ast.Subscript,
    ast.BoolOp, ast.UnaryOp, ast.BinOp, ast.Compare, ast.Call,
)  # fmt: skip
_LIST_THE_VALUES: Final = "list the values, e.g. x in ['a', 'b']"
_NODE_ADVICE: Final = {  # node kind -> (what it is, what to write instead)
    "Lambda": ("lambda expressions", "write the condition directly"),
    "ListComp": ("list comprehensions", _LIST_THE_VALUES),
    "SetComp": ("set comprehensions", _LIST_THE_VALUES),
    "DictComp": ("dict comprehensions", "write the dict out"),
    "GeneratorExp": ("generator expressions (comprehensions)", _LIST_THE_VALUES),
    "IfExp": ("conditional expressions (a if c else b)", "write (not c or a) and (c or b)"),
    "Set": ("set displays {...}", "use a list, e.g. x in ['a', 'b']"),
    "JoinedStr": ("f-strings", "use str(x) + '...' or '%s' % x"),
    "NamedExpr": ("assignment expressions (:=)", "repeat the sub-expression"),
    "Starred": ("'*' unpacking", "write the values out"),
    "Slice": ("slices (x[a:b])", "index single items, e.g. x[0]"),
}
_BINARY_SYMBOLS: Final = {
    "Pow": "**", "FloorDiv": "//", "MatMult": "@", "LShift": "<<", "RShift": ">>",
    "BitOr": "|", "BitXor": "^", "BitAnd": "&",
}  # fmt: skip


def static_problem(root: ast.expr) -> Problem | None:
    """The first problem of a parsed expression: outside the subset, never a bool, or a
    literal-only part that fails."""
    return _subset_problem(root) or _result_problem(root) or _constant_problem(root)


def sentence(text: str) -> str:
    return text if text.endswith(".") else f"{text}."


def _explain(upstream: str, detail: str, fix: str) -> Problem:
    """Upstream's message for the case verbatim, then studyq's detail as a sentence."""
    return f"{sentence(upstream)} {detail[0].upper()}{detail[1:]}.", fix


def _subset_problem(root: ast.expr) -> Problem | None:
    """The first construct outside upstream's subset, in pre-order."""
    stack: list[ast.expr] = [root]
    while stack:
        node = stack.pop()
        problem = _node_problem(node)
        if problem is not None:
            return problem
        stack.extend(reversed([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]))
    return None


def _node_problem(node: ast.expr) -> Problem | None:
    """What upstream would refuse about this one node, if anything."""
    kind = type(node).__name__
    if not isinstance(node, _SUPPORTED_NODES):
        what, fix = _NODE_ADVICE.get(kind, (f"{kind} expressions", _SUBSET))
        return _explain(f"Unsupported expression node: {kind}", f"{what} cannot be used", fix)
    if isinstance(node, ast.Call):
        return _call_problem(node)
    if isinstance(node, ast.BinOp) and type(node.op).__name__ in _BINARY_SYMBOLS:
        symbol = _BINARY_SYMBOLS[type(node.op).__name__]
        return _explain(
            "Unsupported expression node: BinOp",
            f"operator '{symbol}' cannot be used",
            "use + - * / % (write powers out, e.g. 1000000 instead of 10**6)",
        )
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Invert):
        return _explain(
            "Unsupported expression node: UnaryOp", "operator '~' cannot be used", "use not or -"
        )
    if isinstance(node, ast.Compare):
        for op in node.ops:
            if isinstance(op, ast.Is | ast.IsNot):
                return _explain(
                    f"Unsupported comparison operator: {type(op).__name__}",
                    "constraints have no 'is'",
                    "use == or != instead, e.g. x == None",
                )
    if isinstance(node, ast.Dict) and None in node.keys:
        return "Dictionary unpacking is not allowed in constraints.", "write the key: value pairs"
    return None


_SUBSET: Final = "use comparisons, and/or/not, + - * / %, and len/int/float/str/bool"


def _call_problem(node: ast.Call) -> Problem | None:
    """Calls must name one of the five functions and pass arguments by position."""
    if not isinstance(node.func, ast.Name):
        what = {
            ast.Lambda: "a lambda",
            ast.Attribute: "a method or attribute",
            ast.Call: "the result of a call",
            ast.Subscript: "an item",
        }.get(type(node.func), "an expression")
        return _explain(
            "Only direct function names are allowed in constraints.",
            f"`{_snippet(node.func)}` is {what}",
            "call len, int, float, str or bool by name, or compare values directly",
        )
    if node.func.id not in CALLS:
        return (
            f"Function '{node.func.id}' is not allowed in constraints.",
            "call only len, int, float, str or bool",
        )
    if node.keywords:
        name = node.keywords[0].arg
        return _explain(
            "Keyword arguments are not allowed in constraint function calls.",
            f"keyword argument '{name}' found" if name else "'**' argument found",
            "pass arguments by position, e.g. int(x, 16)",
        )
    return None


def _result_problem(root: ast.expr) -> Problem | None:
    """Top-level forms that can never be a bool (upstream finds out only when evaluating)."""
    what: str | None = None
    if isinstance(root, ast.List | ast.Tuple | ast.Dict):
        what = f"a {type(root).__name__.lower()}"
    elif isinstance(root, ast.Constant) and not isinstance(root.value, bool):
        what = f"the constant {_snippet(root)}"
    elif isinstance(root, ast.BinOp):
        what = "a number or a string"
    elif isinstance(root, ast.UnaryOp) and not isinstance(root.op, ast.Not):
        what = "a number"
    elif isinstance(root, ast.Call) and isinstance(root.func, ast.Name):
        what = {"len": "a number", "int": "a number", "float": "a number", "str": "a string"}.get(
            root.func.id
        )
    if what is None:
        return None
    return _explain(
        "Constraint expression must evaluate to a boolean value.",
        f"`{_snippet(root)}` yields {what}",
        "compare it, e.g. len(x) > 0 or x == 'a'",
    )


def _constant_problem(root: ast.expr) -> Problem | None:
    """Evaluate every literal-only part (under the caps) and report the first failure.

    The parts share one budget, as they would in one evaluation of the whole expression.
    """
    budget = Budget()
    stack: list[ast.expr] = [root]
    while stack:
        node = stack.pop()
        if _reads_names(node):
            children = [c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]
            if isinstance(node, ast.Call):
                children = list(node.args)
            stack.extend(reversed(children))
            continue
        if isinstance(node, ast.Constant) and node is not root:
            continue
        try:
            value = compile_node(node)({}, budget)
        except ConstraintExpressionError as exc:
            return str(exc), exc.fix
        except WRAPPED as exc:
            return (
                f"`{_snippet(node)}` raises {type(exc).__name__}: {exc}",
                "correct the constant part",
            )
        if node is root and not isinstance(value, bool):
            return _explain(
                "Constraint expression must evaluate to a boolean value.",
                "the expression is constant",
                "compare a factor, e.g. n > 2",
            )
    return None


def _reads_names(node: ast.AST) -> bool:
    """Whether evaluating ``node`` looks up a name (a called function's name is not a lookup)."""
    stack: list[ast.AST] = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Name):
            return True
        if isinstance(current, ast.Call):
            stack.extend(current.args)
        else:
            stack.extend(ast.iter_child_nodes(current))
    return False


def _snippet(node: ast.AST, limit: int = 60) -> str:
    """Source text of ``node`` for a message, shortened to one readable line."""
    text = ast.unparse(node)
    return text if len(text) <= limit else text[: limit - 3] + "..."
