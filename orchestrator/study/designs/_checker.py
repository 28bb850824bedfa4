"""Admissibility: a study's constraints evaluated for one assignment."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from importlib import import_module
from typing import Any

from orchestrator.study.designs._common import fail
from orchestrator.study.factors import Constraint


class ConstraintChecker:
    """Evaluates the study's constraints for one assignment, importing callables once."""

    def __init__(self, constraints: Sequence[Constraint]) -> None:
        from orchestrator.study.constraints import build_context, evaluate_expression

        self._evaluate = evaluate_expression
        self._context = build_context
        self._constraints = list(constraints)
        self._callables: dict[str, Callable[..., Any]] = {}

    def _callable(self, index: int, reference: str) -> Callable[..., Any]:
        if reference not in self._callables:
            if ":" not in reference:
                raise fail(
                    f"constraints[{index}].callable_ref",
                    "Callable reference must use the format 'module.submodule:callable_name'.",
                    "write it as 'package.module:function'.",
                )
            module_name, attribute = reference.split(":", 1)
            try:
                target = getattr(import_module(module_name), attribute)
            except (ImportError, AttributeError) as exc:
                raise fail(
                    f"constraints[{index}].callable_ref",
                    f"cannot import '{reference}': {exc}.",
                    "check the module path and that the package is installed.",
                ) from None
            if not callable(target):
                raise fail(
                    f"constraints[{index}].callable_ref",
                    f"Reference '{reference}' does not resolve to a callable.",
                )
            self._callables[reference] = target
        return self._callables[reference]

    def check(self, factors: dict[str, Any], blocks: dict[str, Any]) -> tuple[bool, list[str]]:
        from orchestrator.study.constraints import ConstraintExpressionError

        admissible = True
        messages: list[str] = []
        for index, constraint in enumerate(self._constraints):
            passed = True
            if constraint.expression is not None:
                try:
                    passed = self._evaluate(constraint.expression, self._context(factors, blocks))
                except ConstraintExpressionError as exc:
                    raise fail(
                        f"constraints[{index}].expression",
                        str(exc),
                        exc.fix
                        or "make the expression valid for every combination of levels, using "
                        "factor and block names, literals, comparisons and and/or/not.",
                    ) from None
                except Exception as exc:  # TypeError on "a" > 1, KeyError, ...
                    raise fail(
                        f"constraints[{index}].expression",
                        f"evaluating the expression for {factors} failed: "
                        f"{type(exc).__name__}: {exc}.",
                        "make the expression valid for every combination of levels.",
                    ) from None
            if constraint.callable_ref is not None:
                predicate = self._callable(index, constraint.callable_ref)
                passed = bool(predicate(dict(factors), dict(blocks))) and passed
            if not passed:
                messages.append(f"{constraint.constraint_id}: {constraint.description}")
                if constraint.is_error:
                    admissible = False
        return admissible, messages
