"""Registering a study: its definition, conditions and run specs, in one transaction.

A study is registered once per ``study_id``. The studies row is inserted first with
``ON CONFLICT DO NOTHING``; the coordinator that inserted it goes on to stream the conditions
and runs in batches, and a concurrent coordinator waits on that row (PostgreSQL) or on the
write lock (SQLite), then finds it and reports ``created=False``. Because it is one
transaction, nobody ever sees a half-registered study, and a crash mid-way leaves nothing.

Specs are consumed from an iterator in batches of :data:`BATCH_SIZE` rows, so a
1,000,000-run plan never sits in memory; on PostgreSQL the batches are streamed through one
``COPY`` per table in the same transaction (:mod:`orchestrator.store.bulk`).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from itertools import islice
from typing import Any, TypeVar

from sqlalchemy import Table, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from orchestrator.contracts.canonical import to_jsonable
from orchestrator.contracts.errors import StoreError, StudyConflictError
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec, SpecTexts
from orchestrator.store.bulk import BulkWriter
from orchestrator.store.models import Base, ConditionRow, RunRow, StudyRow
from orchestrator.store.records import RegisterReport
from orchestrator.store.sqltypes import db_now

__all__ = ["BATCH_SIZE", "describe_difference", "register_study"]

BATCH_SIZE = 5_000
"""Rows per ``COPY`` (PostgreSQL) or executemany (SQLite): large enough to amortize round
trips, small enough to bound memory."""

_CONDITION_COLUMNS = (
    "study_id",
    "position",
    "condition_id",
    "admissible",
    "constraint_messages",
    "factor_assignments",
    "block_assignments",
    "metadata",
)
_CONDITION_JSON = ("constraint_messages", "factor_assignments", "block_assignments", "metadata")

_RUN_COLUMNS = (
    "study_id",
    "plan_index",
    "run_id",
    "condition_id",
    "replicate",
    "seed",
    "agent_id",
    "problem_id",
    "agent_key",
    "problem_key",
    "factor_assignments",
    "block_assignments",
    "condition_fingerprint",
    "spec_digest",
    "status",
    "attempt",
    "attempts_used",
    "max_attempts",
)
"""The columns a registered run has; every other column of ``runs`` starts ``NULL``."""
_RUN_JSON = ("agent_id", "problem_id", "factor_assignments", "block_assignments")

_PLANNED = RunStatus.PLANNED.value

_T = TypeVar("_T")


def _table(model: type[Base]) -> Table:
    return model.metadata.tables[model.__tablename__]


def _batched(items: Iterable[_T], size: int) -> Iterator[list[_T]]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def register_study(
    connection: Connection,
    *,
    study_id: str,
    definition: Mapping[str, Any],
    definition_hash: str,
    plan_fingerprint: str,
    conditions: Iterable[Mapping[str, Any]],
    run_specs: Iterable[RunSpec],
    submitted_by: str,
    max_attempts: int,
    allowed_references: Iterable[str],
    batch_size: int = BATCH_SIZE,
) -> RegisterReport:
    """Insert a study and its plan, or confirm the identical study is already there.

    Raises:
        StudyConflictError: ``study_id`` is registered with a different ``definition_hash``.
        StoreError: a spec belongs to another study or is out of plan order.
    """
    if max_attempts < 1:
        raise StoreError(f"max_attempts must be >= 1, got {max_attempts}.")
    values = {
        "study_id": study_id,
        "definition": to_jsonable(dict(definition)),
        "definition_hash": definition_hash,
        "plan_fingerprint": plan_fingerprint,
        "run_count": 0,
        "condition_count": 0,
        "max_attempts": max_attempts,
        "submitted_by": submitted_by,
        "submitted_at": db_now(),
        "allowed_references": sorted(set(allowed_references)),
    }
    dialect = postgresql if connection.dialect.name == "postgresql" else sqlite
    inserted = connection.execute(
        dialect.insert(StudyRow)
        .values(values)
        .on_conflict_do_nothing(index_elements=["study_id"])
        .returning(StudyRow.study_id)
    ).first()
    if inserted is None:
        return _existing(connection, study_id, definition, definition_hash, plan_fingerprint)

    condition_rows = (
        _condition_row(study_id, position, condition)
        for position, condition in enumerate(conditions)
    )
    condition_count = BulkWriter(
        connection, _table(ConditionRow), _CONDITION_COLUMNS, json_columns=_CONDITION_JSON
    ).write(_batched(condition_rows, batch_size))
    jsonable, texts = _Jsonable(), SpecTexts()
    run_rows = (
        _run_row(study_id, position, spec, max_attempts, jsonable, texts)
        for position, spec in enumerate(run_specs)
    )
    run_count = BulkWriter(connection, _table(RunRow), _RUN_COLUMNS, json_columns=_RUN_JSON).write(
        _batched(run_rows, batch_size)
    )
    connection.execute(
        update(StudyRow)
        .where(StudyRow.study_id == study_id)
        .values(run_count=run_count, condition_count=condition_count)
    )
    return RegisterReport(study_id, True, definition_hash, run_count, condition_count)


def _existing(
    connection: Connection,
    study_id: str,
    definition: Mapping[str, Any],
    definition_hash: str,
    plan_fingerprint: str,
) -> RegisterReport:
    row = connection.execute(
        select(
            StudyRow.definition,
            StudyRow.definition_hash,
            StudyRow.plan_fingerprint,
            StudyRow.run_count,
            StudyRow.condition_count,
        ).where(StudyRow.study_id == study_id)
    ).one()
    if row.definition_hash != definition_hash:
        differences = describe_difference(row.definition, to_jsonable(dict(definition)))
        where = ", ".join(differences) if differences else "(no field differs; only the hash does)"
        raise StudyConflictError(
            f"Study {study_id!r} is already registered with a different definition "
            f"(registered hash {row.definition_hash[:12]}, this one {definition_hash[:12]}). "
            f"They differ at: {where}. A study_id names one fixed plan so that its results "
            f"stay comparable. Fix: give the changed study a new study_id (e.g. "
            f"'{study_id}-v2'), or delete the registered study and its results first."
        )
    if row.plan_fingerprint != plan_fingerprint:
        raise StudyConflictError(
            f"Study {study_id!r} is registered with this definition, but its plan has changed "
            f"since (registered plan {row.plan_fingerprint[:12]} with {row.condition_count} "
            f"conditions and {row.run_count} runs, this one {plan_fingerprint[:12]}): an input "
            f"outside the study file that the design reads has changed{_plan_inputs(definition)}"
            f". A study_id names one fixed plan. Fix: restore the input, or give the changed "
            f"study a new study_id (e.g. '{study_id}-v2')."
        )
    return RegisterReport(study_id, False, definition_hash, row.run_count, row.condition_count)


def _plan_inputs(definition: Mapping[str, Any]) -> str:
    """The inputs a plan depends on beyond the definition, named for a conflict message."""
    named = []
    design = definition.get("design_spec")
    design = design if isinstance(design, Mapping) else {}
    options = design.get("options")
    options = options if isinstance(options, Mapping) else {}
    matrix = design.get("matrix_path") or options.get("matrix_path")
    if matrix:
        named.append(f"the custom matrix file design_spec.matrix_path ({matrix})")
    constraints = definition.get("constraints") or []
    if any(isinstance(c, Mapping) and c.get("callable_ref") for c in constraints):
        named.append("a callable constraint (constraints[].callable_ref)")
    return ": " + " or ".join(named) if named else ""


def describe_difference(old: Any, new: Any, *, limit: int = 8) -> list[str]:
    """Dotted paths (``run_budget.replicates``, ``factors[1].levels``) where two JSON values
    differ, at most ``limit`` of them, so a conflict message can say what changed."""
    found: list[str] = []

    def walk(a: Any, b: Any, path: str) -> None:
        if len(found) >= limit or a == b:
            return
        if isinstance(a, dict) and isinstance(b, dict):
            for key in sorted(set(a) | set(b)):
                child = f"{path}.{key}" if path else str(key)
                if key not in a:
                    found.append(f"{child} (added)")
                elif key not in b:
                    found.append(f"{child} (removed)")
                else:
                    walk(a[key], b[key], child)
                if len(found) >= limit:
                    return
        elif isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
            for position, (x, y) in enumerate(zip(a, b, strict=True)):
                walk(x, y, f"{path}[{position}]")
        elif isinstance(a, list) and isinstance(b, list):
            found.append(f"{path or '<root>'} ({len(a)} items -> {len(b)} items)")
        else:
            found.append(path or "<root>")

    walk(old, new, "")
    return found


def _condition_row(study_id: str, position: int, condition: Mapping[str, Any]) -> tuple[Any, ...]:
    """One ``conditions`` row, in :data:`_CONDITION_COLUMNS` order."""
    if "condition_id" not in condition:
        raise StoreError(f"Condition at position {position} has no condition_id.")
    return (
        study_id,
        position,
        str(condition["condition_id"]),
        bool(condition.get("admissible", True)),
        to_jsonable(list(condition.get("constraint_messages") or [])),
        to_jsonable(dict(condition.get("factor_assignments") or {})),
        to_jsonable(dict(condition.get("block_assignments") or {})),
        to_jsonable(dict(condition.get("metadata") or {})),
    )


class _Jsonable:
    """``to_jsonable`` of the assignments every run of a condition shares (the same dict
    object in each of its specs), converted once per condition: the converted object is
    the same too, so the writer encodes it once (:class:`~orchestrator.store.bulk.BulkWriter`)."""

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, Any]] = {}

    def of(self, value: Any) -> Any:
        known = self._known.get(id(value))
        if known is not None and known[0] is value:
            return known[1]
        if len(self._known) >= BATCH_SIZE:
            self._known.clear()
        converted = to_jsonable(value)
        self._known[id(value)] = (value, converted)  # holding it keeps its id unique
        return converted


def _run_row(
    study_id: str,
    position: int,
    spec: RunSpec,
    max_attempts: int,
    jsonable: _Jsonable,
    texts: SpecTexts,
) -> tuple[Any, ...]:
    """One ``runs`` row, in :data:`_RUN_COLUMNS` order."""
    if spec.study_id != study_id:
        raise StoreError(
            f"Run spec {spec.run_id} belongs to study {spec.study_id!r}, not {study_id!r}."
        )
    if spec.index != position:
        raise StoreError(
            f"Run spec {spec.run_id} has index {spec.index} but is number {position} in plan "
            "order; the store keys runs by plan index, so specs must be passed in plan order "
            "with index 0, 1, 2, ..."
        )
    return (
        study_id,
        position,
        spec.run_id,
        spec.condition_id,
        spec.replicate,
        spec.seed,
        jsonable.of(spec.agent_id),
        jsonable.of(spec.problem_id),
        spec.agent_key,
        spec.problem_key,
        jsonable.of(spec.factor_assignments),
        jsonable.of(spec.block_assignments),
        spec.condition_fingerprint,
        texts.digest(spec),
        _PLANNED,
        0,
        0,
        max_attempts,
    )
