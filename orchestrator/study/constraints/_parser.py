"""Parsing and the safety pass: text to a tree, refusing what no study needs (runs nothing)."""

from __future__ import annotations

import ast

from orchestrator.study.constraints._limits import (
    MAX_EXPRESSION_CHARS,
    MAX_LITERAL_BITS,
    MAX_NESTING,
    Problem,
)


def text_problem(expression: object) -> Problem | None:
    """Refuse non-text and over-long text before the parser sees it."""
    if not isinstance(expression, str):
        kind = type(expression).__name__
        return f"constraint expression must be a string, not {kind}", "quote the expression"
    if not expression.strip():
        return "constraint expression is empty", "write one expression, e.g. mode == 'fast'"
    if len(expression) > MAX_EXPRESSION_CHARS:
        return (
            f"constraint expression is {len(expression):,} characters long, which is too long "
            f"(the limit is {MAX_EXPRESSION_CHARS:,})",
            "split it into several constraints",
        )
    return None


def parse(expression: str) -> ast.Expression | Problem:
    """Parse and run the safety pass."""
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError as exc:
        return (
            f"constraint expression is not valid Python syntax ({exc.msg} at line "
            f"{exc.lineno}, column {exc.offset})",
            "write one expression, e.g. mode == 'fast' and n <= 3; a line break needs "
            "parentheses around the whole expression",
        )
    except (ValueError, RecursionError, MemoryError) as exc:  # null bytes, parser limits
        return f"constraint expression cannot be parsed ({exc})", "write one plain expression"
    problem = _safety_problem(tree.body)
    return tree if problem is None else problem


def _safety_problem(root: ast.expr) -> Problem | None:
    """Nesting depth, ``_`` attributes and huge literals; the first one in source order."""
    found: list[tuple[tuple[int, int], Problem]] = []
    stack: list[tuple[ast.AST, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            return (
                f"constraint expression nests more than {MAX_NESTING} levels deep, which is "
                "too deep",
                "split it into several constraints",
            )
        problem = None
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            problem = (
                f"attribute '{node.attr}' is not allowed in constraint expressions",
                "use factor names and literals only; names starting with '_' are never looked "
                "up (read such a key with a subscript, e.g. factors['_key'])",
            )
        elif isinstance(node, ast.Constant):
            problem = _literal_problem(node.value)
        if problem is not None and isinstance(node, ast.expr):
            found.append(((node.end_lineno or 0, node.end_col_offset or 0), problem))
        for child in ast.iter_child_nodes(node):
            stack.append((child, depth + isinstance(child, ast.expr)))
    return min(found)[1] if found else None


def _literal_problem(value: object) -> Problem | None:
    """Refuse integer literals no study needs; they only serve to grow products quickly."""
    if isinstance(value, int) and value.bit_length() > MAX_LITERAL_BITS:
        return (
            f"integer literal of {value.bit_length():,} bits is too large for a constraint "
            f"expression (the limit is {MAX_LITERAL_BITS:,} bits, about 300 digits)",
            "compare with a smaller number",
        )
    return None
