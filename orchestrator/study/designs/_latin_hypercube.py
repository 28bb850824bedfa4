"""The latin hypercube: stratified samples within each factor's bounds (stdlib backend)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from orchestrator.contracts.conditions import Condition
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._common import fail, is_numeric, seeded_rng
from orchestrator.study.designs._rows import row_conditions
from orchestrator.study.model import Study


def latin_hypercube_conditions(study: Study, checker: ConstraintChecker) -> list[Condition]:
    return row_conditions(study, _latin_hypercube_rows(study), checker)


def _latin_hypercube_rows(study: Study) -> list[dict[str, Any]]:
    spec = study.design_spec
    options = spec.options
    n_samples = spec.n_samples or _int_or_zero(options.get("n_samples", 0))
    if n_samples < 1:
        raise fail(
            "design_spec.n_samples",
            "Latin-hypercube designs require DesignSpec.n_samples or options['n_samples'].",
            "set design_spec.n_samples to the number of samples.",
        )
    bounds: dict[str, tuple[float, float]] = {}
    explicit = options.get("bounds")
    if explicit is not None:
        if not isinstance(explicit, Mapping):
            raise fail(
                "design_spec.options.bounds",
                "options['bounds'] must be a mapping of factor to [low, high].",
                "write `bounds: {factor: [low, high]}`.",
            )
        for name, value in explicit.items():
            if not (
                isinstance(value, list | tuple)
                and len(value) == 2
                and is_numeric(value[0])
                and is_numeric(value[1])
            ):
                raise fail(
                    f"design_spec.options.bounds.{name}",
                    "Latin-hypercube factor definitions must be [low, high] numeric bounds. "
                    f"Factor '{name}' is invalid.",
                    "write two numbers, e.g. [0.0, 1.0].",
                )
            bounds[str(name)] = (float(value[0]), float(value[1]))
    else:
        for index, factor in enumerate(study.factors):
            values = factor.values()
            if len(values) < 2 or not all(is_numeric(value) for value in values):
                raise fail(
                    f"factors[{index}].levels",
                    "Latin-hypercube study factors must be numeric and provide at least two "
                    "levels, or set design_spec.options['bounds']. Problem factor: "
                    f"'{factor.name}'.",
                    "give the factor two or more numeric levels, or set "
                    "design_spec.options.bounds.",
                )
            numbers = [float(value) for value in values]
            bounds[factor.name] = (min(numbers), max(numbers))
    if not bounds:
        return []
    backend = str(options.get("backend", "stdlib")).strip().lower()
    if backend not in {"stdlib", "scipy", "qmc"}:
        raise fail(
            "design_spec.options.backend",
            "latin_hypercube backend must be one of: stdlib, scipy, qmc.",
            "use `backend: stdlib`.",
        )
    if backend != "stdlib":
        raise fail(
            "design_spec.options.backend",
            f"the '{backend}' latin-hypercube backend is not supported by studyq.",
            "use `backend: stdlib` (the default).",
        )
    rng = seeded_rng(study.seed_policy.base_seed)
    columns: dict[str, list[float]] = {}
    for name, (low, high) in bounds.items():
        if not high > low:
            raise fail(
                f"design_spec.options.bounds.{name}" if explicit is not None else "factors",
                f"Factor '{name}' bounds must satisfy high > low.",
                "put the lower bound first and make the bounds differ.",
            )
        points = []
        for index in range(n_samples):
            start, end = index / n_samples, (index + 1) / n_samples
            points.append(low + (start + rng.random() * (end - start)) * (high - low))
        rng.shuffle(points)
        columns[name] = points
    return [{name: columns[name][row] for name in columns} for row in range(n_samples)]


def _int_or_zero(value: Any) -> int:
    try:
        return int(value)
    except (TypeError, ValueError):
        return 0
