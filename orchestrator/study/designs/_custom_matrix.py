"""The custom matrix: design rows read from a .csv or .json file."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

from orchestrator.contracts.conditions import Condition
from orchestrator.study.design_spec import DesignKind
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._common import fail, row_condition
from orchestrator.study.model import Study


def custom_matrix_conditions(study: Study, checker: ConstraintChecker) -> list[Condition]:
    spec = study.design_spec
    raw_path = spec.matrix_path or str(spec.options.get("matrix_path", ""))
    if not raw_path:
        raise fail(
            "design_spec.matrix_path",
            "Custom design matrix requires `matrix_path`.",
            "set design_spec.matrix_path to a .csv or .json file.",
        )
    path = Path(raw_path)
    if not path.exists():
        raise fail(
            "design_spec.matrix_path",
            f"Custom design matrix file not found: {path} (resolved against the working "
            f"directory {Path.cwd()}, as design-research-experiments does).",
            "run from the folder the path is relative to, or use an absolute path.",
        )
    suffix = path.suffix.lower()
    rows: list[dict[Any, Any]]
    if suffix == ".json":
        try:
            payload = json.loads(path.read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as exc:
            raise fail("design_spec.matrix_path", f"{path} is not valid JSON: {exc}.") from None
        if not isinstance(payload, list) or not all(isinstance(row, dict) for row in payload):
            raise fail(
                "design_spec.matrix_path",
                "Custom matrix JSON must contain a list of row objects.",
                "write a JSON array of objects, one per row.",
            )
        rows = [dict(row) for row in payload]
    elif suffix == ".csv":
        try:
            with path.open("r", encoding="utf-8", newline="") as handle:
                rows = [dict(row) for row in csv.DictReader(handle)]
        except UnicodeDecodeError as exc:
            raise fail("design_spec.matrix_path", f"{path} is not UTF-8: {exc}.") from None
    else:
        raise fail(
            "design_spec.matrix_path",
            "Custom matrix format must be .json or .csv.",
            "convert the matrix to .csv or .json.",
        )
    factor_names = {factor.name for factor in study.factors}
    block_names = {block.name for block in study.blocks}
    conditions = []
    for index, row in enumerate(rows):
        factors = {key: value for key, value in row.items() if key in factor_names}
        blocks = {key: value for key, value in row.items() if key in block_names}
        metadata = {"design_kind": DesignKind.CUSTOM_MATRIX.value, "matrix_row": index}
        conditions.append(row_condition(factors, blocks, metadata, checker))
    return conditions
