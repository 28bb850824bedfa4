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
from collections.abc import Mapping
from typing import Any

from orchestrator.study.constraints._checker import sentence, static_problem
from orchestrator.study.constraints._compiler import program
from orchestrator.study.constraints._limits import WRAPPED, ConstraintExpressionError
from orchestrator.study.constraints._operations import Budget
from orchestrator.study.constraints._parser import parse, text_problem

__all__ = [
    "ConstraintExpressionError",
    "build_context",
    "check_expression",
    "evaluate_expression",
]


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
    problem = text_problem(expression)
    if problem is None:
        parsed = parse(expression)
        problem = static_problem(parsed.body) if isinstance(parsed, ast.Expression) else parsed
    if problem is None:
        return None
    return " Fix: ".join(sentence(part) for part in problem if part)


def evaluate_expression(expression: str, context: Mapping[str, Any]) -> bool:
    """Evaluate ``expression`` over ``context`` exactly as upstream does, within the caps.

    Raises:
        ConstraintExpressionError: with upstream's message for upstream's errors, studyq's
            message and a ``fix`` for safety refusals, and ``"<ErrorType> while evaluating
            constraint expression: <text>"`` for Python errors on the data (the original
            error is the ``__cause__``).
    """
    problem = text_problem(expression)
    compiled = program(expression) if problem is None else problem
    if isinstance(compiled, tuple):
        raise ConstraintExpressionError(*compiled)
    try:
        result = compiled(context, Budget())
    except WRAPPED as exc:
        raise ConstraintExpressionError(
            f"{type(exc).__name__} while evaluating constraint expression: {exc}"
        ) from exc
    if not isinstance(result, bool):
        raise ConstraintExpressionError("Constraint expression must evaluate to a boolean value.")
    return result
