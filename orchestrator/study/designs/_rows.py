"""What the sampled designs (latin hypercube, fractional factorial) do with their rows:
replicate them, append center points, shuffle (within blocks), then make conditions."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from orchestrator.contracts.conditions import Condition
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._common import (
    block_assignments,
    counterbalance,
    fail,
    is_numeric,
    row_condition,
    seeded_rng,
)
from orchestrator.study.model import Study


def row_conditions(
    study: Study, rows: list[dict[str, Any]], checker: ConstraintChecker
) -> list[Condition]:
    """The conditions of a sampled design's rows, in the upstream's order of steps."""
    spec = study.design_spec
    rows = [dict(row) for _ in range(spec.replicates) for row in rows]
    rows = _center_points(rows, spec.center_points)
    if spec.randomize:
        rows = _randomize_rows(rows, study.seed_policy.base_seed, spec.block_randomization_key)
    conditions = _conditions_from_rows(study, rows, spec.kind.value, checker)
    if spec.counterbalance:
        conditions = counterbalance(conditions)
    return conditions


def _center_points(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    if count <= 0:
        return rows
    if not rows:
        raise fail(
            "design_spec.center_points",
            "Cannot append center points to an empty design.",
            "set center_points to 0.",
        )
    columns: list[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(key)
    center: dict[str, Any] = {}
    for column in columns:
        values = [row[column] for row in rows if column in row]
        if not values:
            continue
        if all(is_numeric(value) for value in values):
            numbers = [float(value) for value in values]
            center[column] = (min(numbers) + max(numbers)) / 2.0
            continue
        try:
            counts = Counter(values)
        except TypeError:
            raise fail(
                "design_spec.center_points",
                f"cannot compute a center point for '{column}': its values are lists or "
                "mappings, which have no most frequent value.",
                "use scalar level values, or set center_points to 0.",
            ) from None
        top = max(counts.values())
        center[column] = next(value for value in values if counts[value] == top)
    return rows + [dict(center) for _ in range(count)]


def _randomize_rows(rows: list[dict[str, Any]], seed: Any, key: Any) -> list[dict[str, Any]]:
    copied = [dict(row) for row in rows]
    if len(copied) < 2:
        return copied
    if key is None:
        seeded_rng(seed).shuffle(copied)
        return copied
    if any(key not in row for row in copied):
        raise fail(
            "design_spec.block_randomization_key",
            f"Block column '{key}' not present in all design rows.",
            "name a factor that every design row has.",
        )
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in copied:
        groups.setdefault(row[key], []).append(row)
    shuffled: list[dict[str, Any]] = []
    for group in groups.values():
        seeded_rng(seed).shuffle(group)
        shuffled.extend(group)
    return shuffled


def _conditions_from_rows(
    study: Study, rows: Sequence[dict[str, Any]], design_kind: str, checker: ConstraintChecker
) -> list[Condition]:
    blocks = block_assignments(study)
    conditions = []
    for index, row in enumerate(rows):
        for block in blocks:
            metadata = {"design_kind": design_kind, "row_index": index}
            conditions.append(row_condition(dict(row), block, metadata, checker))
    return conditions
