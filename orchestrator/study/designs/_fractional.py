"""The two-level fractional factorial: resolution III templates for two to six factors."""

from __future__ import annotations

import itertools
from typing import Any

from orchestrator.contracts.conditions import Condition
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._common import fail
from orchestrator.study.designs._rows import row_conditions
from orchestrator.study.model import Study


def fractional_conditions(study: Study, checker: ConstraintChecker) -> list[Condition]:
    return row_conditions(study, _fractional_rows(study), checker)


def _fractional_rows(study: Study) -> list[dict[str, Any]]:
    options = study.design_spec.options
    names = [factor.name for factor in study.factors]
    if str(options.get("resolution", "III")) != "III":
        raise fail(
            "design_spec.options.resolution",
            "Only resolution 'III' is currently supported.",
            "remove `resolution` or set it to III.",
        )
    if len(names) < 2:
        raise fail(
            "factors",
            "At least two factors are required for a factorial design.",
            "declare two to six two-level factors.",
        )
    backend = str(options.get("backend", "stdlib")).strip().lower()
    if backend != "stdlib":
        raise fail(
            "design_spec.options.backend",
            "fractional_factorial_2level backend must be one of: stdlib, pydoe3, pydoe "
            "(studyq supports stdlib).",
            "use `backend: stdlib` (the default).",
        )
    coded: list[list[float]]
    if len(names) <= 3:
        coded = [list(row) for row in itertools.product((-1.0, 1.0), repeat=len(names))]
    elif len(names) > 6:
        raise fail(
            "factors",
            "Resolution-III fractional templates currently support between 2 and 6 factors "
            f"(the study has {len(names)}).",
            "use at most six factors, or another design kind.",
        )
    else:
        coded = []
        for a, b, c in itertools.product((-1.0, 1.0), repeat=3):
            coded.append([a, b, c, a * b * c, a * c, b * c][: len(names)])
    rows = []
    for coded_row in coded:
        row: dict[str, Any] = {}
        for index, (factor, value) in enumerate(zip(study.factors, coded_row, strict=True)):
            if len(factor.levels) != 2:
                raise fail(
                    f"factors[{index}].levels",
                    "Fractional 2-level study designs require exactly two levels per factor. "
                    f"Factor '{factor.name}' has {len(factor.levels)} levels.",
                    "give every factor exactly two levels.",
                )
            row[factor.name] = factor.levels[0].value if value < 0 else factor.levels[1].value
        rows.append(row)
    return rows
