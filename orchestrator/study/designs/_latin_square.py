"""The latin square: row x column, treatments shifted one place per row."""

from __future__ import annotations

from orchestrator.contracts.conditions import Condition
from orchestrator.study.design_spec import DesignKind
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._common import fail, row_condition
from orchestrator.study.model import Study


def latin_square_conditions(study: Study, checker: ConstraintChecker) -> list[Condition]:
    options = study.design_spec.options
    keys = ("row_factor", "column_factor", "treatment_factor")
    names = [str(options.get(key, "")) for key in keys]
    if not all(names):
        first_missing = keys[names.index("")]
        raise fail(
            f"design_spec.options.{first_missing}",
            "Latin-square design requires options row_factor, column_factor, and treatment_factor.",
            "set design_spec.options.row_factor, .column_factor and .treatment_factor to "
            "factor names.",
        )
    by_name = {factor.name: factor for factor in study.factors}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise fail(
            "design_spec.options",
            f"Latin-square factors are missing from the study: {', '.join(missing)}.",
            f"name declared factors ({', '.join(by_name) or 'none declared'}).",
        )
    rows, columns, treatments = (by_name[name].values() for name in names)
    n = len(treatments)
    if len(rows) != n or len(columns) != n:
        raise fail(
            "design_spec.options",
            "Latin-square requires equal cardinality for row, column, and treatment factors "
            f"(they have {len(rows)}, {len(columns)} and {n} levels).",
            "give the three factors the same number of levels.",
        )
    conditions = []
    for r, row_value in enumerate(rows):
        for c, column_value in enumerate(columns):
            factors = {
                names[0]: row_value,
                names[1]: column_value,
                names[2]: treatments[(r + c) % n],
            }
            metadata = {
                "design_kind": DesignKind.LATIN_SQUARE.value,
                "latin_square_row": r,
                "latin_square_col": c,
            }
            conditions.append(row_condition(factors, {}, metadata, checker))
    return conditions
