"""Constraint expressions: upstream's mini-language, evaluated without ever executing user text.

A study's constraints are evaluated for every condition of every design (UPSTREAM.md section 4),
so this module must give design-research-experiments 0.4.0's answers *and* be safe to point at a
hostile study file. It does both by never handing user text to ``eval``/``exec``/``compile``:

1. :func:`ast.parse` turns the text into a tree (parsing runs nothing);
2. a safety pass rejects what no study needs and what could reach interpreter internals or
   exhaust the machine: texts over 2,000 characters, trees nested over 50 levels, attribute
   names starting with ``_``, integer literals over 1,000 bits (about 300 digits);
3. the tree is compiled once into a tree of closures (cached per expression text, since the same
   expression runs for every condition) that interprets upstream's subset with upstream's
   semantics: ``and``/``or`` evaluate every operand and return a ``bool``, chained comparisons
   stop at the first false link, a mapping's attribute is ``.get(attr)``, only ``len int float
   str bool`` can be called, and everything else raises upstream's message at the moment upstream
   would (so ``unknown ** 2`` reports the unknown name first, and ``1 > 2 < (lambda: 0)`` is
   ``False``, exactly as upstream).

Size caps (studyq's additions), checked *before* each operation so nothing is allocated first:

* one built value (``seq * n``, ``seq + seq``, ``str(x)``, ``'%s' % x``) holds at most 100,000
  items or characters, counted through nesting: ``[[0] * 1000] * 1000`` counts 1,001,000
  although it holds 1,000 references, because comparing or printing it walks them all;
* one evaluation builds at most 1,000,000 such items in total;
* an integer product has at most 13,288 bits (4,000 digits, below CPython's 4,300-digit
  ``int``/``str`` conversion limit), and ``int(text)`` reads at most 4,000 characters;
* ``%`` formatting widths and precisions are counted into the output size.

Attribute policy: a mapping's attribute is ``.get(attr)`` as upstream (``factors.tag``,
``blocks.arm``, the only form the study corpus uses). On anything else an attribute is read only
from plain data (``None``, ``bool``, ``int``, ``float``, ``complex``, ``str``, ``bytes``,
``list``, ``tuple`` and the ``datetime`` types YAML produces) and only when it is not callable:
``n.real`` or ``day.year`` work, ``tag.upper`` is a method and is refused (upstream would return
the bound method, which no constraint can use because only named functions can be called).
Attributes of any other object are refused; names starting with ``_`` are refused everywhere.

Deliberate differences from upstream, all on inputs no valid study contains:

* syntax errors and all the refusals above raise :class:`ConstraintExpressionError` rather than
  ``SyntaxError`` or silently succeeding (upstream returns ``None`` for ``factors.__class__``);
* Python errors raised while evaluating (``TypeError`` on ``'a' > 1``, ``ZeroDivisionError``,
  a ``KeyError`` from a subscript) are wrapped in :class:`ConstraintExpressionError`, with the
  original as ``__cause__``, so a bad study never shows a traceback;
* :func:`check_expression` is stricter than evaluation: it reports unsupported constructs and
  failing constant parts even where upstream would never reach them (an unreached link of a
  chained comparison, or a study whose design has no conditions).
"""

from __future__ import annotations

import ast
import datetime
import operator
from collections.abc import Callable, Mapping
from functools import lru_cache
from itertools import compress, repeat
from typing import Any, Final

from orchestrator.contracts.errors import StudyError

__all__ = [
    "ConstraintExpressionError",
    "build_context",
    "check_expression",
    "evaluate_expression",
]

_MAX_EXPRESSION_CHARS: Final = 2_000
_MAX_NESTING: Final = 50
_MAX_VALUE_SIZE: Final = 100_000
_MAX_TOTAL_SIZE: Final = 1_000_000
_MAX_INT_DIGITS: Final = 4_000
_MAX_INT_BITS: Final = 13_288  # 4,000 decimal digits
_MAX_LITERAL_BITS: Final = 1_000  # about 300 decimal digits

_SEQUENCES: Final = (str, bytes, bytearray, list, tuple)
_TEXTS: Final = (str, bytes, bytearray)
_CONTAINERS: Final = (list, tuple, set, frozenset, dict)
_NESTED: Final = (*_TEXTS, *_CONTAINERS)
_PLAIN_TYPES: Final = frozenset(
    {
        type(None), bool, int, float, complex, str, bytes, list, tuple,
        datetime.date, datetime.datetime, datetime.time, datetime.timedelta,
    }
)  # fmt: skip
# Python errors a constraint can raise on bad data; wrapped so a bad study never shows a traceback.
_WRAPPED: Final = (ArithmeticError, AttributeError, LookupError, TypeError, ValueError,
                   RecursionError)  # fmt: skip


class ConstraintExpressionError(StudyError):
    """A constraint expression is invalid, refused for safety, or failed on a condition.

    ``str(error)`` says what is wrong (upstream's exact text where upstream has one); ``fix``
    says what to change, or is empty when the message says it already.
    """

    def __init__(self, message: str, fix: str = "") -> None:
        super().__init__(message)
        self.fix = fix


def build_context(factors: Mapping[str, Any], blocks: Mapping[str, Any]) -> dict[str, Any]:
    """The names an expression sees, built in upstream's order so shadowing matches.

    ``factors`` and ``blocks`` come first, then every factor, then every block, so a factor
    named ``factors`` or a block named like a factor overwrites the earlier entry.
    """
    return {"factors": dict(factors), "blocks": dict(blocks), **factors, **blocks}


def check_expression(expression: str) -> str | None:
    """Find the first problem in ``expression`` without running any of it.

    Meant for study validation, before any design is built: returns ``None`` when the text is
    inside the supported subset, else one line ``<what is wrong>. Fix: <what to do>.``, where
    the first part starts with upstream's message when upstream has one for the case. Parts made
    only of literals are evaluated under the same caps, so ``'x' * 100000000000`` is reported
    here already. Unknown names are not reported: they depend on the study's factors.
    """
    problem = _text_problem(expression)
    if problem is None:
        parsed = _parse(expression)
        if isinstance(parsed, ast.Expression):
            problem = (
                _subset_problem(parsed.body)
                or _result_problem(parsed.body)
                or _constant_problem(parsed.body)
            )
        else:
            problem = parsed
    if problem is None:
        return None
    return " Fix: ".join(_sentence(part) for part in problem if part)


def evaluate_expression(expression: str, context: Mapping[str, Any]) -> bool:
    """Evaluate ``expression`` over ``context`` exactly as upstream does, within the caps.

    Raises:
        ConstraintExpressionError: with upstream's message for upstream's errors, studyq's
            message and a ``fix`` for safety refusals, and ``"<ErrorType> while evaluating
            constraint expression: <text>"`` for Python errors on the data (the original
            error is the ``__cause__``).
    """
    problem = _text_problem(expression)
    program = _program(expression) if problem is None else problem
    if isinstance(program, tuple):
        raise ConstraintExpressionError(*program)
    try:
        result = program(context, _Budget())
    except _WRAPPED as exc:
        raise ConstraintExpressionError(
            f"{type(exc).__name__} while evaluating constraint expression: {exc}"
        ) from exc
    if not isinstance(result, bool):
        raise ConstraintExpressionError("Constraint expression must evaluate to a boolean value.")
    return result


# --- parsing and the safety pass -----------------------------------------------------------

_Eval = Callable[[Mapping[str, Any], "_Budget"], Any]
_Problem = tuple[str, str]  # (what is wrong, how to fix it)


def _text_problem(expression: object) -> _Problem | None:
    """Refuse non-text and over-long text before the parser sees it."""
    if not isinstance(expression, str):
        kind = type(expression).__name__
        return f"constraint expression must be a string, not {kind}", "quote the expression"
    if not expression.strip():
        return "constraint expression is empty", "write one expression, e.g. mode == 'fast'"
    if len(expression) > _MAX_EXPRESSION_CHARS:
        return (
            f"constraint expression is {len(expression):,} characters long, which is too long "
            f"(the limit is {_MAX_EXPRESSION_CHARS:,})",
            "split it into several constraints",
        )
    return None


@lru_cache(maxsize=1024)
def _program(expression: str) -> _Eval | _Problem:
    """The compiled closure tree for ``expression``, or the safety problem that refuses it.

    Cached because a design evaluates the same few expressions once per condition; problems are
    cached as text so each raise gets a fresh exception.
    """
    parsed = _parse(expression)
    return _compile(parsed.body) if isinstance(parsed, ast.Expression) else parsed


def _parse(expression: str) -> ast.Expression | _Problem:
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


def _safety_problem(root: ast.expr) -> _Problem | None:
    """Nesting depth, ``_`` attributes and huge literals; the first one in source order."""
    found: list[tuple[tuple[int, int], _Problem]] = []
    stack: list[tuple[ast.AST, int]] = [(root, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > _MAX_NESTING:
            return (
                f"constraint expression nests more than {_MAX_NESTING} levels deep, which is "
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


def _literal_problem(value: object) -> _Problem | None:
    """Refuse integer literals no study needs; they only serve to grow products quickly."""
    if isinstance(value, int) and value.bit_length() > _MAX_LITERAL_BITS:
        return (
            f"integer literal of {value.bit_length():,} bits is too large for a constraint "
            f"expression (the limit is {_MAX_LITERAL_BITS:,} bits, about 300 digits)",
            "compare with a smaller number",
        )
    return None


# --- the static subset check (check_expression only) ---------------------------------------

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


def _sentence(text: str) -> str:
    return text if text.endswith(".") else f"{text}."


def _explain(upstream: str, detail: str, fix: str) -> _Problem:
    """Upstream's message for the case verbatim, then studyq's detail as a sentence."""
    return f"{_sentence(upstream)} {detail[0].upper()}{detail[1:]}.", fix


def _subset_problem(root: ast.expr) -> _Problem | None:
    """The first construct outside upstream's subset, in pre-order."""
    stack: list[ast.expr] = [root]
    while stack:
        node = stack.pop()
        problem = _node_problem(node)
        if problem is not None:
            return problem
        stack.extend(reversed([c for c in ast.iter_child_nodes(node) if isinstance(c, ast.expr)]))
    return None


def _node_problem(node: ast.expr) -> _Problem | None:
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


def _call_problem(node: ast.Call) -> _Problem | None:
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
    if node.func.id not in _CALLS:
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


def _result_problem(root: ast.expr) -> _Problem | None:
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


def _constant_problem(root: ast.expr) -> _Problem | None:
    """Evaluate every literal-only part (under the caps) and report the first failure.

    The parts share one budget, as they would in one evaluation of the whole expression.
    """
    budget = _Budget()
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
            value = _compile(node)({}, budget)
        except ConstraintExpressionError as exc:
            return str(exc), exc.fix
        except _WRAPPED as exc:
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


# --- the compiler: AST -> closures with upstream's semantics ------------------------------


def _compile(node: ast.expr) -> _Eval:
    """Compile one node; unsupported nodes become closures raising upstream's message."""
    if isinstance(node, ast.Constant):
        return _constant(node.value)
    if isinstance(node, ast.Name):
        return _compile_name(node.id)
    if isinstance(node, ast.List | ast.Tuple):
        return _compile_sequence(node)
    if isinstance(node, ast.Dict):
        return _compile_dict(node)
    if isinstance(node, ast.Attribute):
        return _compile_attribute(node)
    if isinstance(node, ast.Subscript):
        return _compile_subscript(node)
    if isinstance(node, ast.BoolOp):
        return _compile_boolop(node)
    if isinstance(node, ast.UnaryOp):
        return _compile_unaryop(node)
    if isinstance(node, ast.BinOp):
        return _compile_binop(node)
    if isinstance(node, ast.Compare):
        return _compile_compare(node)
    if isinstance(node, ast.Call):
        return _compile_call(node)
    return _raiser(f"Unsupported expression node: {type(node).__name__}")


def _raiser(message: str, *before: _Eval) -> _Eval:
    """A closure that evaluates ``before`` (upstream's evaluation order), then raises."""

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        for step in before:
            step(ctx, budget)
        raise ConstraintExpressionError(message)

    return run


def _constant(value: Any) -> _Eval:
    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        return value

    return run


def _compile_name(name: str) -> _Eval:
    message = f"Unknown variable '{name}' in constraint expression."

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        if name not in ctx:
            raise ConstraintExpressionError(message)
        return ctx[name]

    return run


def _compile_sequence(node: ast.List | ast.Tuple) -> _Eval:
    """List and tuple displays; all-literal ones are built once (nothing can mutate them)."""
    is_list = isinstance(node, ast.List)
    if all(isinstance(e, ast.Constant) for e in node.elts):
        template = tuple(e.value for e in node.elts if isinstance(e, ast.Constant))
        if not is_list:
            return _constant(template)

        def run_literal(ctx: Mapping[str, Any], budget: _Budget) -> Any:
            return list(template)

        return run_literal
    steps = tuple(_compile(e) for e in node.elts)

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        items = [step(ctx, budget) for step in steps]
        return items if is_list else tuple(items)

    return run


def _compile_dict(node: ast.Dict) -> _Eval:
    """Keys in order (upstream stops at the first ``**``), then values."""
    keys: list[_Eval] = []
    for key in node.keys:
        if key is None:
            return _raiser("Dictionary unpacking is not allowed in constraints.", *keys)
        keys.append(_compile(key))
    values = tuple(_compile(v) for v in node.values)

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        evaluated = [key(ctx, budget) for key in keys]
        return dict(zip(evaluated, [value(ctx, budget) for value in values], strict=True))

    return run


def _compile_attribute(node: ast.Attribute) -> _Eval:
    base, attr = _compile(node.value), node.attr

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        return _attribute(base(ctx, budget), attr)

    return run


def _compile_subscript(node: ast.Subscript) -> _Eval:
    target, index = _compile(node.value), _compile(node.slice)

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        return target(ctx, budget)[index(ctx, budget)]

    return run


def _compile_boolop(node: ast.BoolOp) -> _Eval:
    """Upstream evaluates every operand, then returns ``all``/``any`` of their truth."""
    steps = tuple(_compile(v) for v in node.values)
    combine = all if isinstance(node.op, ast.And) else any

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        return combine([step(ctx, budget) for step in steps])

    return run


def _compile_unaryop(node: ast.UnaryOp) -> _Eval:
    operand = _compile(node.operand)
    operators: dict[type[ast.unaryop], Callable[[Any], Any]] = {
        ast.Not: operator.not_, ast.UAdd: operator.pos, ast.USub: operator.neg,
    }  # fmt: skip
    apply = operators.get(type(node.op))
    if apply is None:
        return _raiser("Unsupported expression node: UnaryOp", operand)

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        return apply(operand(ctx, budget))

    return run


def _compile_binop(node: ast.BinOp) -> _Eval:
    left, right = _compile(node.left), _compile(node.right)
    apply: Callable[[Any, Any, _Budget], Any] | None = {
        ast.Add: _add, ast.Sub: _sub, ast.Mult: _mul, ast.Div: _div, ast.Mod: _mod,
    }.get(type(node.op))  # fmt: skip
    if apply is None:
        return _raiser("Unsupported expression node: BinOp", left, right)

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
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


def _compile_compare(node: ast.Compare) -> _Eval:
    """Left to right; each right side is evaluated only when reached, then its operator."""
    first = _compile(node.left)
    links = tuple(
        (_COMPARISONS.get(type(op)), type(op).__name__, _compile(right))
        for op, right in zip(node.ops, node.comparators, strict=True)
    )

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
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


def _compile_call(node: ast.Call) -> _Eval:
    """Upstream order: function form, function name, positional args, then keywords."""
    if not isinstance(node.func, ast.Name):
        return _raiser("Only direct function names are allowed in constraints.")
    function = _CALLS.get(node.func.id)
    if function is None:
        return _raiser(f"Function '{node.func.id}' is not allowed in constraints.")
    args = tuple(_compile(arg) for arg in node.args)
    if node.keywords:
        return _raiser("Keyword arguments are not allowed in constraint function calls.", *args)

    def run(ctx: Mapping[str, Any], budget: _Budget) -> Any:
        return function([arg(ctx, budget) for arg in args], budget)

    return run


# --- bounded operations ---------------------------------------------------------------------


_SMALLER: Final = "compare lengths or counts instead of building large values"


class _Budget:
    """Items one evaluation may still build; shared by every operation of that evaluation."""

    __slots__ = ("remaining",)

    def __init__(self) -> None:
        self.remaining = _MAX_TOTAL_SIZE

    def charge(self, size: int, what: str) -> None:
        """Refuse a value over the per-value cap, or one that exhausts the evaluation's total."""
        if size > _MAX_VALUE_SIZE:
            raise ConstraintExpressionError(
                f"{what} would build a value of at least {size:,} items or characters, which "
                f"is too large for a constraint expression (the limit is {_MAX_VALUE_SIZE:,})",
                _SMALLER,
            )
        self.remaining -= size
        if self.remaining < 0:
            raise ConstraintExpressionError(
                f"constraint expression builds more than {_MAX_TOTAL_SIZE:,} items in total, "
                "which is too large",
                _SMALLER,
            )


def _too_large_int(what: str, bits: int) -> ConstraintExpressionError:
    return ConstraintExpressionError(
        f"{what} would give an integer of about {bits:,} bits, which is too large for a "
        f"constraint expression (the limit is {_MAX_INT_BITS:,} bits, {_MAX_INT_DIGITS:,} digits)",
        "compare smaller numbers",
    )


def _add(left: Any, right: Any, budget: _Budget) -> Any:
    if isinstance(left, _SEQUENCES) and isinstance(right, _SEQUENCES):
        size = _weight(left, _MAX_VALUE_SIZE) + _weight(right, _MAX_VALUE_SIZE)
        budget.charge(size, f"{type(left).__name__} + {type(right).__name__}")
    return left + right


def _sub(left: Any, right: Any, budget: _Budget) -> Any:
    return left - right


def _div(left: Any, right: Any, budget: _Budget) -> Any:
    return left / right


def _mul(left: Any, right: Any, budget: _Budget) -> Any:
    """Products are sized before they are computed: repeats by item count, ints by bits."""
    if isinstance(left, int) and isinstance(right, int):
        bits = left.bit_length() + right.bit_length()
        if bits > _MAX_INT_BITS:
            raise _too_large_int("int * int", bits)
    elif isinstance(left, _SEQUENCES):
        _charge_repeat(left, right, budget)
    elif isinstance(right, _SEQUENCES):
        _charge_repeat(right, left, budget)
    return left * right


def _charge_repeat(sequence: Any, count: Any, budget: _Budget) -> None:
    try:
        times = operator.index(count)
    except TypeError:
        return  # not a repeat; Python raises its own TypeError
    if times > 0:
        size = _weight(sequence, _MAX_VALUE_SIZE) * times
        budget.charge(size, f"{type(sequence).__name__} * {times}")


def _mod(left: Any, right: Any, budget: _Budget) -> Any:
    if isinstance(left, _TEXTS):
        budget.charge(_format_size(left, right), f"'%' formatting of a {type(left).__name__}")
    return left % right


def _call_len(args: list[Any], budget: _Budget) -> Any:
    return len(*args)


def _call_bool(args: list[Any], budget: _Budget) -> Any:
    return bool(*args)


def _call_float(args: list[Any], budget: _Budget) -> Any:
    return float(*args)


def _call_int(args: list[Any], budget: _Budget) -> Any:
    """``int(text)`` is quadratic in the text's length, so the text is capped first."""
    if args and isinstance(args[0], _TEXTS) and len(args[0]) > _MAX_INT_DIGITS:
        raise ConstraintExpressionError(
            f"int() of a {len(args[0]):,}-character text is too large for a constraint "
            f"expression (the limit is {_MAX_INT_DIGITS:,} characters)",
            "compare the text itself, or convert a shorter one",
        )
    result = int(*args)
    if isinstance(result, int) and result.bit_length() > _MAX_INT_BITS:
        raise _too_large_int("int()", result.bit_length())
    return result


def _call_str(args: list[Any], budget: _Budget) -> Any:
    if len(args) == 1:
        budget.charge(_str_size(args[0]), "str()")
    elif args and isinstance(args[0], _TEXTS):  # decoding: at most 4 characters a byte
        budget.charge(4 * len(args[0]), "str()")
    return str(*args)


_CALLS: Final[dict[str, Callable[[list[Any], _Budget], Any]]] = {
    "len": _call_len, "int": _call_int, "float": _call_float, "str": _call_str,
    "bool": _call_bool,
}  # fmt: skip


def _attribute(base: Any, attr: str) -> Any:
    """Mappings answer ``.get(attr)`` (upstream); plain data only non-callable attributes."""
    if isinstance(base, Mapping):
        return base.get(attr)
    kind = type(base).__name__
    if type(base) not in _PLAIN_TYPES:
        raise ConstraintExpressionError(
            f"attribute '{attr}' of a value of type {kind} is not allowed in constraint "
            "expressions",
            "read attributes of mappings (factors.x, blocks.x), numbers and dates only",
        )
    value = getattr(base, attr)
    if callable(value):
        raise ConstraintExpressionError(
            f"attribute '{attr}' of a value of type {kind} is a method, and constraint "
            "expressions cannot call methods",
            "compare the value itself, or use len, int, float, str or bool",
        )
    return value


# --- size estimates (upper bounds, computed without building the value) -------------------


def _weight(value: Any, limit: int) -> int:
    """Items and characters reachable from ``value``, counted through nesting, up to ``limit``.

    A repeat or concatenation costs (and later comparisons walk) this many items, so
    ``[[0] * 1000] * 1000`` weighs 1,001,000 although the outer list holds 1,000 references.
    Only nested members are pushed, selected at C speed, so a flat list costs one ``len``.
    """
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        if isinstance(item, _TEXTS):
            total += len(item)
        elif isinstance(item, _CONTAINERS):
            total += len(item)
            if total <= limit:
                for members in (item.keys(), item.values()) if isinstance(item, dict) else (item,):
                    stack.extend(compress(members, map(isinstance, members, repeat(_NESTED))))
    return total


def _str_size(value: Any) -> int:
    """Upper bound of ``len(str(value))``."""
    return len(value) if isinstance(value, str) else _repr_size(value, _MAX_VALUE_SIZE)


def _repr_size(value: Any, limit: int) -> int:
    """Upper bound of ``len(repr(value))`` for plain data, stopping once over ``limit``."""
    total, stack = 0, [value]
    while stack and total <= limit:
        item = stack.pop()
        kind = type(item)
        if kind in (str, bytes, bytearray):
            total += len(repr(item)) if len(item) <= limit else len(item)
        elif kind is bool or item is None:
            total += 5
        elif kind is int:
            total += item.bit_length() * 30103 // 100000 + 1 + (item < 0)  # digits, sign
        elif kind is float:
            total += 32
        elif kind in (list, tuple, set, frozenset):
            total += 12 + 2 * len(item)
            if total <= limit:
                stack.extend(item)
        elif kind is dict:
            total += 2 + 4 * len(item)
            if total <= limit:
                stack.extend(item.keys())
                stack.extend(item.values())
        else:  # dates and other objects: ask them (their repr is theirs, not the expression's)
            total += len(repr(item))
    return total


def _format_size(template: str | bytes | bytearray, args: Any) -> int:
    """Upper bound of the length of ``template % args``, parsed the way CPython parses it.

    Widths and precisions (including ``*`` ones taken from ``args``) count in full, since
    ``'%0100000000d' % 1`` is a 100 MB string from a 14-character template.
    """
    text = template if isinstance(template, str) else bytes(template).decode("latin-1")
    positional = list(args) if isinstance(args, tuple) else [args]
    total, index, n = len(text), 0, len(text)
    i = text.find("%")
    while i != -1 and total <= _MAX_VALUE_SIZE:
        i += 1
        key: str | None = None
        if i < n and text[i] == "(":
            depth, start = 1, i + 1
            while i + 1 < n and depth:
                i += 1
                depth += {"(": 1, ")": -1}.get(text[i], 0)
            key, i = text[start:i], i + 1
        while i < n and text[i] in "-+ #0":
            i += 1
        width, i, index = _format_number(text, i, positional, index)
        precision = 0
        if i < n and text[i] == ".":
            precision, i, index = _format_number(text, i + 1, positional, index)
        while i < n and text[i] in "hlL":
            i += 1
        if i >= n:
            break  # Python raises "incomplete format"
        conversion, i = text[i], i + 1
        if conversion == "%":
            total += width + 1
        else:
            try:
                if key is None:
                    arg = positional[index]
                    index += 1
                else:
                    arg = args[key if isinstance(template, str) else key.encode("latin-1")]
            except (LookupError, TypeError):
                break  # Python raises its own error for the missing argument
            total += width + precision + _conversion_size(conversion, arg)
        i = text.find("%", i)
    return total


def _format_number(text: str, i: int, positional: list[Any], index: int) -> tuple[int, int, int]:
    """A width or precision at ``text[i]``: digits, or ``*`` taking the next argument."""
    if i < len(text) and text[i] == "*":
        star = positional[index] if index < len(positional) else 0
        return (abs(star) if isinstance(star, int) else 0), i + 1, index + 1
    end = i
    while end < len(text) and "0" <= text[end] <= "9":
        end += 1
    return int(text[i:end] or 0) if end - i <= 18 else 10**18, end, index


def _conversion_size(conversion: str, arg: Any) -> int:
    """Upper bound of one converted argument before padding."""
    if conversion in "sb" and isinstance(arg, _TEXTS):
        return len(arg)
    if conversion in "srb":
        return _repr_size(arg, _MAX_VALUE_SIZE)
    if conversion == "a":
        return 10 * _repr_size(arg, _MAX_VALUE_SIZE)  # \U0001f600 escapes: 10 per character
    if conversion in "diouxX" and isinstance(arg, int):
        return arg.bit_length() // 3 + 4  # octal is the longest base; sign and 0o prefix
    if conversion in "diouxXeEfFgG":
        return 400  # a float: 309 integer digits at most (1.8e308), plus sign and point
    return 1  # %c, or a bad conversion Python refuses
