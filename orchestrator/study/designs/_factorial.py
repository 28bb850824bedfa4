"""The factorial family: full and constrained factorial, randomized block, repeated measures.

Conditions hash ``{factors, blocks}``; level metadata adds comparison labels and baselines.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from orchestrator.contracts.canonical import canonical_json, hash_identifier
from orchestrator.contracts.conditions import Condition
from orchestrator.study.design_spec import DesignKind
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._common import block_assignments, counterbalance, seeded_rng
from orchestrator.study.factors import Factor
from orchestrator.study.model import Study


def factorial_conditions(study: Study, checker: ConstraintChecker) -> list[Condition]:
    """Every combination of levels and blocks, then the kind's counterbalance and shuffle."""
    spec, kind = study.design_spec, study.design_spec.kind
    conditions = _factorial(study, checker)
    if spec.counterbalance or kind == DesignKind.REPEATED_MEASURES:
        conditions = counterbalance(conditions)
    if spec.randomize or kind == DesignKind.RANDOMIZED_BLOCK:
        seeded_rng(study.seed_policy.base_seed).shuffle(conditions)
    if kind == DesignKind.REPEATED_MEASURES:
        for index, condition in enumerate(conditions):
            condition.metadata["within_subject_order"] = index
            condition.metadata["design_kind"] = kind.value
    return conditions


def _comparison_metadata(
    factors: Sequence[Factor], assignment: Mapping[str, Any]
) -> dict[str, Any]:
    """Labels and baseline flags from level metadata (``is_baseline`` / ``role``)."""
    axes: dict[str, dict[str, Any]] = {}
    for factor in factors:
        if factor.name not in assignment:
            continue
        value = assignment[factor.name]
        for level in factor.levels:
            if level.value != value:
                continue
            if "is_baseline" in level.metadata or "role" in level.metadata:
                is_baseline = bool(
                    level.metadata.get(
                        "is_baseline", str(level.metadata.get("role", "")) == "baseline"
                    )
                )
                axes[factor.name] = {
                    "value": value,
                    "level_name": level.name,
                    "label": level.label or level.name,
                    "role": str(
                        level.metadata.get("role", "baseline" if is_baseline else "treatment")
                    ),
                    "is_baseline": is_baseline,
                }
            break
    if not axes:
        return {}
    baseline_axes = [name for name, axis in axes.items() if axis["is_baseline"]]
    return {
        "condition_label": " | ".join(str(axis["label"]) for axis in axes.values()),
        "comparison_axes": axes,
        "comparison_baseline": {
            "is_baseline_condition": len(baseline_axes) == len(axes),
            "axes": baseline_axes,
        },
    }


def _factorial(study: Study, checker: ConstraintChecker) -> list[Condition]:
    names = [factor.name for factor in study.factors]
    blocks = block_assignments(study)
    conditions = []
    for combination in itertools.product(*(factor.values() for factor in study.factors)):
        factors = dict(zip(names, combination, strict=True))
        for block in blocks:
            admissible, messages = checker.check(factors, block)
            payload = {"factors": factors, "blocks": block}
            metadata: dict[str, Any] = {"fingerprint": canonical_json(payload)}
            metadata.update(_comparison_metadata(study.factors, factors))
            conditions.append(
                Condition(
                    condition_id=hash_identifier("cond", payload),
                    factor_assignments=dict(factors),
                    block_assignments=dict(block),
                    metadata=metadata,
                    admissible=admissible,
                    constraint_messages=messages,
                )
            )
    return conditions
