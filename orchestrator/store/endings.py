"""The end of an attempt: a run's result recorded (:func:`finish`, :func:`finish_pg`) and how
each attempt ended stamped in its history (:func:`close_attempts`).

A result is written only if the claim's fence (:data:`~orchestrator.store.predicates.FINISH_FENCE`)
still matches, in the same transaction as its evaluations, events and attempt history; which
columns it writes, and how a ``RunResult`` and its evaluation and event rows become their
values, is declared in :mod:`.columns`. On PostgreSQL the whole result is **one statement**
(:data:`_FINISH_PG`, data-modifying CTEs) run on a driver cursor; it does exactly what the
portable :func:`finish` does on SQLite, and the store tests run both.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, insert, select, update
from sqlalchemy.engine import Connection

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.store.columns import (
    EVALUATION_COLUMNS,
    EVENT_COLUMNS,
    FINISH_COLUMNS,
    RESULT_COLUMNS,
    ChildColumns,
    result_values,
)
from orchestrator.store.engine import Execute, json_dumps
from orchestrator.store.models import AttemptRow, EvaluationRow, EventRow, RunRow
from orchestrator.store.predicates import FINISH_FENCE, fence_params
from orchestrator.store.records import Claim
from orchestrator.store.sqltypes import db_now

__all__ = ["attempt_end", "close_attempts", "finish", "finish_pg"]


def close_attempts(connection: Connection, study_id: str, ends: list[dict[str, Any]]) -> None:
    """Stamp how attempts ended (database clock), one executemany for all of them; ``ends``
    come from :func:`attempt_end`."""
    if not ends:
        return
    connection.execute(
        update(AttemptRow)
        .where(
            AttemptRow.study_id == study_id,
            AttemptRow.plan_index == bindparam("b_index"),
            AttemptRow.attempt == bindparam("b_attempt"),
        )
        .values(
            ended_at=db_now(),
            outcome=bindparam("b_outcome"),
            error_kind=bindparam("b_error_kind"),
            error_type=bindparam("b_error_type"),
            error_message=bindparam("b_error_message"),
        ),
        ends,
    )


def attempt_end(
    index: int,
    attempt: int,
    outcome: str,
    error_kind: str | None = None,
    error_type: str | None = None,
    error_message: str | None = None,
) -> dict[str, Any]:
    """How one attempt ended, as parameters for :func:`close_attempts`."""
    return {
        "b_index": index,
        "b_attempt": attempt,
        "b_outcome": outcome,
        "b_error_kind": error_kind,
        "b_error_type": error_type,
        "b_error_message": error_message,
    }


_FINISH = (
    update(RunRow)
    .where(FINISH_FENCE)
    .values(
        lease_expires_at=None,
        **{
            name: bindparam(f"r_{name}", type_=RunRow.__table__.c[name].type)
            for name in FINISH_COLUMNS
        },
    )
)


def _child_rows(claim: Claim, columns: ChildColumns, rows: Sequence[Any]) -> list[Any]:
    key = {
        "study_id": claim.study_id,
        "plan_index": claim.index,
        "run_id": claim.run_id,
        "attempt": claim.attempt,
    }
    return columns.rows(key, rows)


def finish(connection: Connection, items: Sequence[tuple[Claim, RunResult]]) -> list[bool]:
    """``running -> success | failed`` for each claim that still holds, with its evaluations,
    events and attempt history written in the caller's transaction; a claim that lost (stale
    attempt, reclaimed, cancelled, already finished) writes nothing. Returns one bool per item.
    """
    won: list[bool] = []
    evaluations: list[dict[str, Any]] = []
    events: list[dict[str, Any]] = []
    ended: dict[str, list[dict[str, Any]]] = {}
    single = len(items) == 1  # a worker's finish: one fenced UPDATE, its rowcount decides
    holding = set() if single else _still_holding(connection, [claim for claim, _ in items])
    updates: list[dict[str, Any]] = []
    for item_claim, result in items:
        _check_result(item_claim, result)
        if not single and item_claim not in holding:
            won.append(False)
            continue
        values = result_values(result)
        params = {**fence_params(item_claim), **{f"r_{k}": v for k, v in values.items()}}
        if single:
            if connection.execute(_FINISH, params).rowcount != 1:
                won.append(False)
                continue
        else:
            updates.append(params)
        won.append(True)
        evaluations.extend(_child_rows(item_claim, EVALUATION_COLUMNS, result.evaluations))
        events.extend(_child_rows(item_claim, EVENT_COLUMNS, result.events))
        ended.setdefault(item_claim.study_id, []).append(
            attempt_end(
                item_claim.index,
                item_claim.attempt,
                values["status"],
                values["error_kind"],
                values["error_type"],
                values["error_message"],
            )
        )
    if updates:
        # One executemany for the whole batch. The rows were locked by _still_holding (FOR
        # UPDATE on PostgreSQL; SQLite writers hold the database lock), so every fenced UPDATE
        # matches; anything else means the fence broke and the transaction must not commit.
        updated = connection.execute(_FINISH, updates).rowcount
        if updated not in (len(updates), -1):
            raise StoreError(
                f"finish matched {updated} of {len(updates)} runs it held; rolled back."
            )
    if evaluations:
        connection.execute(insert(EvaluationRow), evaluations)
    if events:
        connection.execute(insert(EventRow), events)
    for study_id, rows in ended.items():
        close_attempts(connection, study_id, rows)
    return won


def _check_result(claim: Claim, result: RunResult) -> None:
    if result.run_id != claim.run_id:
        raise StoreError(
            f"Result for run {result.run_id} handed in with the claim of "
            f"{claim.run_id} (study {claim.study_id}, index {claim.index})."
        )


_JSON_CASTS = {spec.name: spec.pg_cast for spec in RESULT_COLUMNS if spec.json}
"""Result columns sent as JSON text and cast in SQL (``jsonb``)."""


def _pg_value(name: str, value: Any) -> Any:
    return json_dumps(value) if name in _JSON_CASTS and value is not None else value


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _recordset(columns: ChildColumns) -> tuple[tuple[str, ...], str]:
    """The fields a child row is sent with (``seq``, the declared columns, ``extra``), and the
    ``json_to_recordset`` column list that types them."""
    names = ("seq", *columns.names, "extra")
    types = [
        "integer",
        *(spec.pg_cast if spec.json else "text" for spec in columns.columns),
        "json",
    ]
    return names, ", ".join(f'"{name}" {kind}' for name, kind in zip(names, types, strict=True))


_EVALUATION_FIELDS, _EVALUATION_RECORD = _recordset(EVALUATION_COLUMNS)
_EVENT_FIELDS, _EVENT_RECORD = _recordset(EVENT_COLUMNS)

_FINISH_PG = f"""
WITH finished AS (
    UPDATE runs SET lease_expires_at = NULL, {
    ", ".join(
        f'"{name}" = CAST(%(r_{name})s AS {_JSON_CASTS[name]})'
        if name in _JSON_CASTS
        else f'"{name}" = %(r_{name})s'
        for name in FINISH_COLUMNS
    )
}
    WHERE study_id = %(study_id)s AND plan_index = %(plan_index)s AND attempt = %(attempt)s
        AND ((status = '{RunStatus.RUNNING.value}' AND lease_owner = %(worker)s)
             OR (status = '{RunStatus.QUEUED.value}' AND lease_owner IS NULL))
    RETURNING plan_index
), evaluations_written AS (
    INSERT INTO evaluations (study_id, plan_index, run_id, attempt, {_quoted(_EVALUATION_FIELDS)})
    SELECT %(study_id)s, finished.plan_index, %(run_id)s, %(attempt)s, {
    ", ".join(f'e."{name}"' for name in _EVALUATION_FIELDS)
}
    FROM finished, json_to_recordset(CAST(%(evaluations)s AS json)) AS e({_EVALUATION_RECORD})
), events_written AS (
    INSERT INTO events (study_id, plan_index, run_id, attempt, {_quoted(_EVENT_FIELDS)})
    SELECT %(study_id)s, finished.plan_index, %(run_id)s, %(attempt)s, {
    ", ".join(f'e."{name}"' for name in _EVENT_FIELDS)
}
    FROM finished, json_to_recordset(CAST(%(events)s AS json)) AS e({_EVENT_RECORD})
), attempt_closed AS (
    UPDATE run_attempts SET ended_at = now(), outcome = %(r_status)s,
        error_kind = %(r_error_kind)s, error_type = %(r_error_type)s,
        error_message = %(r_error_message)s
    WHERE study_id = %(study_id)s AND plan_index = %(plan_index)s AND attempt = %(attempt)s
        AND EXISTS (SELECT FROM finished)
)
SELECT count(*) FROM finished
"""
"""A result on PostgreSQL: the fenced ``UPDATE`` (:data:`FINISH_FENCE`) and, only if it
matched, the evaluations, events and attempt history, in one statement."""


def finish_pg(execute: Execute, claim: Claim, result: RunResult) -> bool:
    """:func:`finish` of one result on PostgreSQL: one statement."""
    _check_result(claim, result)
    values = result_values(result)
    evaluations = [
        {name: row[name] for name in _EVALUATION_FIELDS}
        for row in _child_rows(claim, EVALUATION_COLUMNS, result.evaluations)
    ]
    events = [
        {name: row[name] for name in _EVENT_FIELDS}
        for row in _child_rows(claim, EVENT_COLUMNS, result.events)
    ]
    params = {f"r_{name}": _pg_value(name, value) for name, value in values.items()}
    params.update(
        study_id=claim.study_id,
        plan_index=claim.index,
        attempt=claim.attempt,
        worker=claim.worker,
        run_id=claim.run_id,
        evaluations=json_dumps(evaluations),
        events=json_dumps(events),
    )
    [(count,)] = execute(_FINISH_PG, params)
    return bool(count)


def _still_holding(connection: Connection, claims: Sequence[Claim]) -> set[Claim]:
    """The claims whose run is still ``running`` at that attempt for that worker, locked
    until the transaction ends, so the batch UPDATE that follows cannot lose a race."""
    held: set[Claim] = set()
    by_study: dict[str, dict[int, Claim]] = {}
    for item in claims:
        by_study.setdefault(item.study_id, {})[item.index] = item
    for study_id, wanted in by_study.items():
        indices = list(wanted)
        for start in range(0, len(indices), 500):
            rows = connection.execute(
                select(RunRow.plan_index, RunRow.attempt, RunRow.lease_owner, RunRow.status)
                .where(
                    RunRow.study_id == study_id,
                    RunRow.plan_index.in_(indices[start : start + 500]),
                    RunRow.status.in_([RunStatus.RUNNING.value, RunStatus.QUEUED.value]),
                )
                .with_for_update()
            ).all()
            for row in rows:
                item = wanted[row.plan_index]
                if row.attempt == item.attempt and (
                    (row.status == RunStatus.RUNNING.value and row.lease_owner == item.worker)
                    or (row.status == RunStatus.QUEUED.value and row.lease_owner is None)
                ):
                    held.add(item)
    return held
