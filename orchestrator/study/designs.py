"""Conditions from a study's design: the eight design kinds, in the upstream's exact order.

Ported from design-research-experiments 0.4.0 (MIT), ``designs.py`` and ``conditions.py``
(UPSTREAM.md sections 4-5). Order and ids are the contract: factorial kinds hash
``{factors, blocks}``, row kinds also hash their row metadata; shuffles use
``random.Random(base_seed)`` exactly where the upstream does. Errors become
:class:`StudyValidationError` problems with the field that caused them.
"""

from __future__ import annotations

import csv
import itertools
import json
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from importlib import import_module
from pathlib import Path
from typing import Any, TypeGuard

from orchestrator.contracts.canonical import canonical_json, hash_identifier
from orchestrator.contracts.conditions import Condition, condition_label
from orchestrator.contracts.errors import Problem, StudyValidationError
from orchestrator.study.model import Constraint, DesignKind, Factor, Study

__all__ = ["Condition", "build_conditions", "condition_label"]

_ROW_KINDS = {
    DesignKind.LATIN_SQUARE,
    DesignKind.CUSTOM_MATRIX,
    DesignKind.LATIN_HYPERCUBE,
    DesignKind.FRACTIONAL_FACTORIAL_2LEVEL,
}


def _rng(seed: Any) -> random.Random:
    """``random.Random(base_seed)``, as the upstream shuffles; unusable seeds are a problem."""
    try:
        return random.Random(seed)
    except TypeError:
        raise _fail(
            "seed_policy.base_seed",
            f"base_seed {seed!r} ({type(seed).__name__}) cannot seed a shuffle.",
            "use an integer (or a string) base_seed.",
        ) from None


def _fail(field_name: str, message: str, fix: str = "") -> StudyValidationError:
    return StudyValidationError([Problem(field_name, message, fix)])


class _ConstraintChecker:
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
                raise _fail(
                    f"constraints[{index}].callable_ref",
                    "Callable reference must use the format 'module.submodule:callable_name'.",
                    "write it as 'package.module:function'.",
                )
            module_name, attribute = reference.split(":", 1)
            try:
                target = getattr(import_module(module_name), attribute)
            except (ImportError, AttributeError) as exc:
                raise _fail(
                    f"constraints[{index}].callable_ref",
                    f"cannot import '{reference}': {exc}.",
                    "check the module path and that the package is installed.",
                ) from None
            if not callable(target):
                raise _fail(
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
                    raise _fail(
                        f"constraints[{index}].expression",
                        str(exc),
                        exc.fix
                        or "make the expression valid for every combination of levels, using "
                        "factor and block names, literals, comparisons and and/or/not.",
                    ) from None
                except Exception as exc:  # TypeError on "a" > 1, KeyError, ...
                    raise _fail(
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


def build_conditions(study: Study) -> list[Condition]:
    """Every condition of the study's design, admissible or not, in design order."""
    spec = study.design_spec
    checker = _ConstraintChecker(study.constraints)
    seed = study.seed_policy.base_seed
    kind = spec.kind
    if kind in {
        DesignKind.FULL_FACTORIAL,
        DesignKind.CONSTRAINED_FACTORIAL,
        DesignKind.RANDOMIZED_BLOCK,
        DesignKind.REPEATED_MEASURES,
    }:
        conditions = _factorial(study, checker)
        if spec.counterbalance or kind == DesignKind.REPEATED_MEASURES:
            conditions = counterbalance(conditions)
        if spec.randomize or kind == DesignKind.RANDOMIZED_BLOCK:
            _rng(seed).shuffle(conditions)
        if kind == DesignKind.REPEATED_MEASURES:
            for index, condition in enumerate(conditions):
                condition.metadata["within_subject_order"] = index
                condition.metadata["design_kind"] = kind.value
        return conditions
    if kind == DesignKind.LATIN_SQUARE:
        return _latin_square(study, checker)
    if kind == DesignKind.CUSTOM_MATRIX:
        return _custom_matrix(study, checker)
    if kind == DesignKind.LATIN_HYPERCUBE:
        rows: list[dict[str, Any]] = _latin_hypercube_rows(study)
    else:
        rows = _fractional_rows(study)
    rows = [dict(row) for _ in range(spec.replicates) for row in rows]
    rows = _center_points(rows, spec.center_points)
    if spec.randomize:
        rows = _randomize_rows(rows, seed, spec.block_randomization_key)
    conditions = _conditions_from_rows(study, rows, kind.value, checker)
    if spec.counterbalance:
        conditions = counterbalance(conditions)
    return conditions


def counterbalance(conditions: Sequence[Condition]) -> list[Condition]:
    """Even positions, then odd positions reversed (``[a,b,c,d,e]`` -> ``[a,c,e,d,b]``)."""
    ordered = list(conditions)
    if len(ordered) < 3:
        return ordered
    return ordered[::2] + ordered[1::2][::-1]


def _block_assignments(study: Study) -> list[dict[str, Any]]:
    if not study.blocks:
        return [{}]
    names = [block.name for block in study.blocks]
    return [
        dict(zip(names, combination, strict=True))
        for combination in itertools.product(*(block.levels for block in study.blocks))
    ]


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


def _factorial(study: Study, checker: _ConstraintChecker) -> list[Condition]:
    names = [factor.name for factor in study.factors]
    blocks = _block_assignments(study)
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


def _row_condition(
    factors: dict[str, Any],
    blocks: dict[str, Any],
    row_metadata: dict[str, Any],
    checker: _ConstraintChecker,
) -> Condition:
    admissible, messages = checker.check(factors, blocks)
    return Condition(
        condition_id=hash_identifier(
            "cond", {"factors": factors, "blocks": blocks, "metadata": row_metadata}
        ),
        factor_assignments=dict(factors),
        block_assignments=dict(blocks),
        metadata={
            **row_metadata,
            "fingerprint": canonical_json({"factors": factors, "blocks": blocks}),
        },
        admissible=admissible,
        constraint_messages=messages,
    )


def _latin_square(study: Study, checker: _ConstraintChecker) -> list[Condition]:
    options = study.design_spec.options
    keys = ("row_factor", "column_factor", "treatment_factor")
    names = [str(options.get(key, "")) for key in keys]
    if not all(names):
        first_missing = keys[names.index("")]
        raise _fail(
            f"design_spec.options.{first_missing}",
            "Latin-square design requires options row_factor, column_factor, and treatment_factor.",
            "set design_spec.options.row_factor, .column_factor and .treatment_factor to "
            "factor names.",
        )
    by_name = {factor.name: factor for factor in study.factors}
    missing = [name for name in names if name not in by_name]
    if missing:
        raise _fail(
            "design_spec.options",
            f"Latin-square factors are missing from the study: {', '.join(missing)}.",
            f"name declared factors ({', '.join(by_name) or 'none declared'}).",
        )
    rows, columns, treatments = (by_name[name].values() for name in names)
    n = len(treatments)
    if len(rows) != n or len(columns) != n:
        raise _fail(
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
            conditions.append(_row_condition(factors, {}, metadata, checker))
    return conditions


def _custom_matrix(study: Study, checker: _ConstraintChecker) -> list[Condition]:
    spec = study.design_spec
    raw_path = spec.matrix_path or str(spec.options.get("matrix_path", ""))
    if not raw_path:
        raise _fail(
            "design_spec.matrix_path",
            "Custom design matrix requires `matrix_path`.",
            "set design_spec.matrix_path to a .csv or .json file.",
        )
    path = Path(raw_path)
    if not path.exists():
        raise _fail(
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
            raise _fail("design_spec.matrix_path", f"{path} is not valid JSON: {exc}.") from None
        if not isinstance(payload, list) or not all(isinstance(row, dict) for row in payload):
            raise _fail(
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
            raise _fail("design_spec.matrix_path", f"{path} is not UTF-8: {exc}.") from None
    else:
        raise _fail(
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
        conditions.append(_row_condition(factors, blocks, metadata, checker))
    return conditions


def _is_numeric(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _latin_hypercube_rows(study: Study) -> list[dict[str, Any]]:
    spec = study.design_spec
    options = spec.options
    n_samples = spec.n_samples or _int_or_zero(options.get("n_samples", 0))
    if n_samples < 1:
        raise _fail(
            "design_spec.n_samples",
            "Latin-hypercube designs require DesignSpec.n_samples or options['n_samples'].",
            "set design_spec.n_samples to the number of samples.",
        )
    bounds: dict[str, tuple[float, float]] = {}
    explicit = options.get("bounds")
    if explicit is not None:
        if not isinstance(explicit, Mapping):
            raise _fail(
                "design_spec.options.bounds",
                "options['bounds'] must be a mapping of factor to [low, high].",
                "write `bounds: {factor: [low, high]}`.",
            )
        for name, value in explicit.items():
            if not (
                isinstance(value, list | tuple)
                and len(value) == 2
                and _is_numeric(value[0])
                and _is_numeric(value[1])
            ):
                raise _fail(
                    f"design_spec.options.bounds.{name}",
                    "Latin-hypercube factor definitions must be [low, high] numeric bounds. "
                    f"Factor '{name}' is invalid.",
                    "write two numbers, e.g. [0.0, 1.0].",
                )
            bounds[str(name)] = (float(value[0]), float(value[1]))
    else:
        for index, factor in enumerate(study.factors):
            values = factor.values()
            if len(values) < 2 or not all(_is_numeric(value) for value in values):
                raise _fail(
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
        raise _fail(
            "design_spec.options.backend",
            "latin_hypercube backend must be one of: stdlib, scipy, qmc.",
            "use `backend: stdlib`.",
        )
    if backend != "stdlib":
        raise _fail(
            "design_spec.options.backend",
            f"the '{backend}' latin-hypercube backend is not supported by studyq.",
            "use `backend: stdlib` (the default).",
        )
    rng = _rng(study.seed_policy.base_seed)
    columns: dict[str, list[float]] = {}
    for name, (low, high) in bounds.items():
        if not high > low:
            raise _fail(
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


def _fractional_rows(study: Study) -> list[dict[str, Any]]:
    options = study.design_spec.options
    names = [factor.name for factor in study.factors]
    if str(options.get("resolution", "III")) != "III":
        raise _fail(
            "design_spec.options.resolution",
            "Only resolution 'III' is currently supported.",
            "remove `resolution` or set it to III.",
        )
    if len(names) < 2:
        raise _fail(
            "factors",
            "At least two factors are required for a factorial design.",
            "declare two to six two-level factors.",
        )
    backend = str(options.get("backend", "stdlib")).strip().lower()
    if backend != "stdlib":
        raise _fail(
            "design_spec.options.backend",
            "fractional_factorial_2level backend must be one of: stdlib, pydoe3, pydoe "
            "(studyq supports stdlib).",
            "use `backend: stdlib` (the default).",
        )
    coded: list[list[float]]
    if len(names) <= 3:
        coded = [list(row) for row in itertools.product((-1.0, 1.0), repeat=len(names))]
    elif len(names) > 6:
        raise _fail(
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
                raise _fail(
                    f"factors[{index}].levels",
                    "Fractional 2-level study designs require exactly two levels per factor. "
                    f"Factor '{factor.name}' has {len(factor.levels)} levels.",
                    "give every factor exactly two levels.",
                )
            row[factor.name] = factor.levels[0].value if value < 0 else factor.levels[1].value
        rows.append(row)
    return rows


def _center_points(rows: list[dict[str, Any]], count: int) -> list[dict[str, Any]]:
    if count <= 0:
        return rows
    if not rows:
        raise _fail(
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
        if all(_is_numeric(value) for value in values):
            numbers = [float(value) for value in values]
            center[column] = (min(numbers) + max(numbers)) / 2.0
            continue
        try:
            counts = Counter(values)
        except TypeError:
            raise _fail(
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
        _rng(seed).shuffle(copied)
        return copied
    if any(key not in row for row in copied):
        raise _fail(
            "design_spec.block_randomization_key",
            f"Block column '{key}' not present in all design rows.",
            "name a factor that every design row has.",
        )
    groups: dict[Any, list[dict[str, Any]]] = {}
    for row in copied:
        groups.setdefault(row[key], []).append(row)
    shuffled: list[dict[str, Any]] = []
    for group in groups.values():
        _rng(seed).shuffle(group)
        shuffled.extend(group)
    return shuffled


def _conditions_from_rows(
    study: Study, rows: Sequence[dict[str, Any]], design_kind: str, checker: _ConstraintChecker
) -> list[Condition]:
    blocks = _block_assignments(study)
    conditions = []
    for index, row in enumerate(rows):
        for block in blocks:
            metadata = {"design_kind": design_kind, "row_index": index}
            conditions.append(_row_condition(dict(row), block, metadata, checker))
    return conditions
