"""A run's attempt, from claim to its end: the transitions a worker (or the embedded
executor) makes, each a guarded ``UPDATE`` that says whether it won.

Each function takes an open :class:`~sqlalchemy.engine.Connection` inside a transaction (the
caller, :class:`~orchestrator.store.store.ResultStore`, owns it). Dependent rows (attempt
history, evaluations, events) are written only after the ``UPDATE`` won, in the same
transaction.

Fencing (:data:`~orchestrator.store.predicates.FENCE`). A running row is owned by
``(attempt, lease_owner)``. ``heartbeat``, ``finish`` and ``release`` only match a row that is
still ``running`` at the claim's attempt for the claim's worker, and ``attempt`` only ever
grows, so once a lease expired and the run was re-claimed, nothing the old worker sends can
match again.

Clock. Leases are computed in SQL with the database clock (:mod:`.sqltypes`); the times in a
``RunResult`` are the worker's and are only recorded, never compared.

Speed. These run prebuilt statements with bound parameters: building an ORM-aware
``UPDATE`` costs ~0.5 ms of Python per call, more than the statement takes on SQLite. On
PostgreSQL, a claim and a result are each **one statement** (:func:`claim_pg`,
:func:`finish_pg`: data-modifying CTEs, so the run's ``UPDATE`` and the rows that depend on it
go together), which the store runs in autocommit on a driver cursor
(``engine.AutocommitLane``): one round trip per claim and per result instead of six and
seven, which was most of a worker's cost per run (docs/benchmarks.md). They do exactly what
the portable :func:`claim` and :func:`finish` do on SQLite; the store tests run both.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from datetime import UTC
from typing import Any

from sqlalchemy import bindparam, case, exists, insert, select, update
from sqlalchemy.engine import Connection

from orchestrator.contracts.canonical import to_jsonable
from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import ErrorKind, RunResult, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store.engine import json_dumps
from orchestrator.store.models import (
    SPEC_COLUMNS,
    AttemptOutcome,
    AttemptRow,
    EvaluationRow,
    EventRow,
    RunRow,
    StudyRow,
)
from orchestrator.store.predicates import FENCE, FINISH_FENCE, fence_params, in_chunks
from orchestrator.store.records import Claim, spec_from_row
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = [
    "EVALUATION_COLUMNS",
    "EVENT_COLUMNS",
    "MAX_MESSAGE_CHARS",
    "MAX_TRACEBACK_CHARS",
    "RELEASED_VALUES",
    "Execute",
    "Verify",
    "attempt_end",
    "claim",
    "claim_pg",
    "close_attempts",
    "cursor_executor",
    "finish",
    "finish_pg",
    "heartbeat",
    "queue_next",
    "queue_runs",
    "release",
]

MAX_TRACEBACK_CHARS = 8_192
"""Tracebacks keep their last 8 KB: the frames nearest the error are the useful ones, and a
recursion error's 100 KB traceback should not bloat a million-row table."""

MAX_MESSAGE_CHARS = 4_096
"""Error messages keep their first 4 KB (the start says what went wrong)."""

EVALUATION_COLUMNS = (
    "evaluator_id",
    "metric_name",
    "metric_value",
    "metric_unit",
    "aggregation_level",
    "notes_json",
)
"""evaluations.csv columns stored as columns (``run_id`` comes from the run); other keys of
an evaluation row go to ``extra``."""

EVENT_COLUMNS = ("timestamp", "record_id", "text", "session_id", "actor_id", "event_type")
"""events.csv columns stored as text columns; ``meta_json`` is stored as JSON and other keys
go to ``extra``."""


def queue_runs(
    connection: Connection, study_id: str, indices: Sequence[int]
) -> list[tuple[int, int]]:
    """``planned -> queued`` for the given runs; returns ``(index, attempt)`` for each run this
    call moved, in plan order (``attempt`` is the claims so far: the publisher names the
    message after it, so every delivery of a run has its own task id)."""
    moved: list[tuple[int, int]] = []
    for chunk in in_chunks(indices):
        moved.extend(
            (row.plan_index, row.attempt)
            for row in connection.execute(
                update(RunRow)
                .where(
                    RunRow.study_id == study_id,
                    RunRow.plan_index.in_(chunk),
                    RunRow.status == RunStatus.PLANNED.value,
                )
                .values(status=RunStatus.QUEUED.value, queued_at=db_now())
                .returning(RunRow.plan_index, RunRow.attempt)
            )
        )
    moved.sort()
    return moved


def queue_next(connection: Connection, study_id: str, batch: int) -> list[tuple[RunSpec, int]]:
    """``planned -> queued`` for the next ``batch`` planned runs in plan order, in one
    statement; returns the specs of the runs this call moved with their attempt counts, in
    plan order. An empty list means no planned run is left.

    On PostgreSQL the page skips rows another coordinator is moving at this moment (``FOR
    UPDATE SKIP LOCKED``), so two coordinators on one study take disjoint pages instead of
    waiting for each other; SQLite has one writer at a time.
    """
    page = (
        select(RunRow.plan_index)
        .where(RunRow.study_id == study_id, RunRow.status == RunStatus.PLANNED.value)
        .order_by(RunRow.plan_index)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    rows = sorted(
        connection.execute(
            update(RunRow)
            .where(
                RunRow.study_id == study_id,
                RunRow.status == RunStatus.PLANNED.value,
                RunRow.plan_index.in_(page),
            )
            .values(status=RunStatus.QUEUED.value, queued_at=db_now())
            .returning(*SPEC_COLUMNS, RunRow.attempt)
        ),
        key=lambda row: row.plan_index,
    )
    return [(spec_from_row(study_id, row), row.attempt) for row in rows]


def _check_claim(worker: str, lease_s: float) -> None:
    if not worker:
        raise StoreError("A worker name is required to claim a run.")
    if lease_s <= 0:
        raise StoreError(f"lease_s must be > 0, got {lease_s}.")


_CLAIM = (
    update(RunRow)
    .where(
        RunRow.study_id == bindparam("c_study"),
        RunRow.plan_index.in_(bindparam("c_indices", expanding=True)),
        RunRow.status.in_(bindparam("c_statuses", expanding=True)),
        RunRow.attempts_used < RunRow.max_attempts,
        ~exists().where(
            StudyRow.study_id == bindparam("c_study"), StudyRow.cancelled_at.is_not(None)
        ),
    )
    .values(
        status=RunStatus.RUNNING.value,
        attempt=RunRow.attempt + 1,
        attempts_used=RunRow.attempts_used + 1,
        lease_owner=bindparam("c_worker"),
        lease_expires_at=db_now_plus(0.0, name="seconds"),
        started_at=db_now(),
    )
    .returning(
        RunRow.plan_index,
        RunRow.run_id,
        RunRow.attempt,
        RunRow.lease_expires_at,
        RunRow.started_at,
    )
)

Verify = Mapping[int, tuple[str, int]]
"""What delivered messages say of the runs they name: plan index -> (the message's
``spec_digest``, the attempt it was published for). A verified claim wins a run only when
the stored ``runs.spec_digest`` equals the message's and the message's attempt is not ahead
of the run's claims so far; anything else claims, and changes, nothing. The digest covers the
study id and the plan index, so matching ``spec_digest IN (digests)`` pairs each row with its
own message."""


def _statuses(allow_planned: bool) -> list[str]:
    statuses = [RunStatus.QUEUED.value]
    if allow_planned:
        statuses.append(RunStatus.PLANNED.value)
    return statuses


def claim(
    connection: Connection,
    study_id: str,
    indices: Sequence[int],
    *,
    worker: str,
    lease_s: float,
    allow_planned: bool,
    verify: Verify | None = None,
) -> list[Claim]:
    """``queued -> running`` (also from ``planned`` when ``allow_planned``) for each run that
    is still claimable and has attempts left (and, with ``verify``, whose stored spec the
    message carries: :data:`Verify`); returns the claims won, in plan order.

    A run that is running (even with an expired lease), terminal, or out of attempts is not
    claimable: expired leases are the reconcile loop's to judge, so a redelivered message can
    never start a second copy of a run that may still be executing.
    """
    _check_claim(worker, lease_s)
    statuses = _statuses(allow_planned)
    statement = _CLAIM
    if verify is not None:
        indices = list(verify)
        digests = {digest: attempt for digest, attempt in verify.values()}
        statement = _CLAIM.where(
            RunRow.spec_digest.in_(list(digests)),
            RunRow.attempt >= case(digests, value=RunRow.spec_digest, else_=RunRow.attempt + 1),
        )
    won: list[Any] = []  # Row[...] is typed per column list; the fields are read by name
    for chunk in in_chunks(indices):
        won.extend(
            connection.execute(
                statement,
                {
                    "c_study": study_id,
                    "c_indices": list(chunk),
                    "c_statuses": statuses,
                    "c_worker": worker,
                    "seconds": float(lease_s),
                },
            ).all()
        )
    if not won:
        return []
    won.sort(key=lambda row: row.plan_index)
    connection.execute(
        insert(AttemptRow),
        [
            {
                "study_id": study_id,
                "plan_index": row.plan_index,
                "attempt": row.attempt,
                "run_id": row.run_id,
                "worker": worker,
                "started_at": row.started_at,
                "outcome": AttemptOutcome.RUNNING,
            }
            for row in won
        ],
    )
    return [
        Claim(study_id, row.plan_index, row.run_id, row.attempt, worker, row.lease_expires_at)
        for row in won
    ]


_CLAIM_PG = """
WITH claimed AS (
    UPDATE runs SET status = '{running}', attempt = attempt + 1,
        attempts_used = attempts_used + 1, lease_owner = %(worker)s,
        lease_expires_at = now() + make_interval(secs => CAST(%(seconds)s AS double precision)),
        started_at = now()
    WHERE study_id = %(study_id)s AND plan_index = ANY(%(indices)s)
        AND status = ANY(%(statuses)s) AND attempts_used < max_attempts{verify}
        AND NOT EXISTS (SELECT 1 FROM studies
                        WHERE study_id = %(study_id)s AND cancelled_at IS NOT NULL)
        AND set_config('synchronous_commit', %(commit)s, true) = %(commit)s
    RETURNING plan_index, run_id, attempt, lease_expires_at, started_at
), history AS (
    INSERT INTO run_attempts (study_id, plan_index, attempt, run_id, worker, started_at, outcome)
    SELECT %(study_id)s, plan_index, attempt, run_id, %(worker)s, started_at,
        '{attempt_running}'
    FROM claimed
)
SELECT plan_index, run_id, attempt, lease_expires_at FROM claimed ORDER BY plan_index
"""
"""The claim on PostgreSQL: one statement. ``set_config`` sets this transaction's commit
mode: ``off`` (asynchronous, see ``ResultStore._fast_commit``) unless the claim must be
durable before the agent runs (``at_most_once``); it is evaluated only for rows that pass the
other conditions, so a claim that wins nothing writes nothing."""

_VERIFY_PG = """
        AND spec_digest = ANY(%(digests)s)
        AND attempt >= (%(attempts)s::integer[])[array_position(%(digests)s, spec_digest)]"""

_CLAIM_PG_PLAIN = _CLAIM_PG.format(
    running=RunStatus.RUNNING.value, attempt_running=AttemptOutcome.RUNNING, verify=""
)
_CLAIM_PG_VERIFIED = _CLAIM_PG.format(
    running=RunStatus.RUNNING.value, attempt_running=AttemptOutcome.RUNNING, verify=_VERIFY_PG
)


Execute = Callable[[str, dict[str, Any]], list[Any]]
"""Runs one statement with driver (``%(name)s``) parameters and returns its rows."""


def cursor_executor(cursor: Any) -> Execute:
    """:data:`Execute` on a driver cursor (``AutocommitLane.cursor``)."""

    def execute(sql: str, params: dict[str, Any]) -> list[Any]:
        cursor.execute(sql, params)
        return list(cursor.fetchall())

    return execute


def claim_pg(
    execute: Execute,
    study_id: str,
    indices: Sequence[int],
    *,
    worker: str,
    lease_s: float,
    allow_planned: bool = False,
    verify: Verify | None = None,
    durable: bool = False,
) -> list[Claim]:
    """:func:`claim` on PostgreSQL, one statement per chunk of ``indices``; ``durable``
    commits synchronously (the claim survives a database crash once this returns)."""
    _check_claim(worker, lease_s)
    params: dict[str, Any] = {
        "study_id": study_id,
        "statuses": _statuses(allow_planned),
        "worker": worker,
        "seconds": float(lease_s),
        "commit": "on" if durable else "off",
    }
    statement = _CLAIM_PG_PLAIN
    if verify is not None:
        indices = list(verify)
        statement = _CLAIM_PG_VERIFIED
        params["digests"] = [digest for digest, _ in verify.values()]
        params["attempts"] = [attempt for _, attempt in verify.values()]
    claims: list[Claim] = []
    for chunk in in_chunks(indices):
        rows = execute(statement, {**params, "indices": list(chunk)})
        claims.extend(
            Claim(study_id, index, run_id, attempt, worker, expires.astimezone(UTC))
            for index, run_id, attempt, expires in rows
        )
    return claims


def heartbeat(connection: Connection, claim: Claim, lease_s: float) -> bool:
    """Extend the lease to ``now + lease_s`` (database clock) while the claim still holds."""
    if lease_s <= 0:
        raise StoreError(f"lease_s must be > 0, got {lease_s}.")
    result = connection.execute(_HEARTBEAT, {**fence_params(claim), "seconds": float(lease_s)})
    return result.rowcount == 1


_HEARTBEAT = update(RunRow).where(FENCE).values(lease_expires_at=db_now_plus(0.0, name="seconds"))


# -- ending an attempt -----------------------------------------------------------------------


def _text(value: Any) -> str | None:
    """Text for a text column: PostgreSQL rejects NUL, which agent output can contain, so it
    becomes U+FFFD on both backends (as in JSON values, see ``engine._json_safe``)."""
    if value is None:
        return None
    text = str(value)
    return text.replace("\x00", "\ufffd") if "\x00" in text else text


def _bounded_head(text: str | None, limit: int) -> str | None:
    text = _text(text)
    if text is None or len(text) <= limit:
        return text
    return text[:limit] + f"... [{len(text) - limit} more characters]"


def _bounded_tail(text: str | None, limit: int) -> str | None:
    text = _text(text)
    if text is None or len(text) <= limit:
        return text
    return f"[{len(text) - limit} earlier characters dropped] ..." + text[-limit:]


def _number(value: Any, kind: type[float] | type[int]) -> Any:
    if value is None or isinstance(value, bool):
        return None
    try:
        return kind(value)
    except (TypeError, ValueError, OverflowError):
        return None


def _result_values(result: RunResult) -> dict[str, Any]:
    if result.status not in (RunStatus.SUCCESS, RunStatus.FAILED):
        raise StoreError(f"A finished run must be success or failed, not {result.status.value!r}.")
    metrics = to_jsonable(dict(result.metrics))
    latency = _number(metrics.get("latency_s"), float)
    failed = result.status is RunStatus.FAILED
    kind = result.error_kind or (ErrorKind.ERROR if failed else None)
    return {
        "status": result.status.value,
        "started_at": result.started_at,
        "ended_at": result.ended_at,
        "outputs": to_jsonable(dict(result.outputs)),
        "metrics": metrics,
        "latency_s": result.latency_s if latency is None else latency,
        "cost_usd": _number(metrics.get("cost_usd"), float),
        "input_tokens": _number(metrics.get("input_tokens"), int),
        "output_tokens": _number(metrics.get("output_tokens"), int),
        "primary_outcome": metrics.get("primary_outcome"),
        "trace_refs": [str(ref) for ref in result.trace_refs],
        "provenance": to_jsonable(dict(result.provenance)),
        "error_kind": kind.value if kind is not None else None,
        "error_type": _bounded_head(result.error_type, MAX_MESSAGE_CHARS),
        "error_message": _bounded_head(result.error_message, MAX_MESSAGE_CHARS),
        "traceback": _bounded_tail(result.traceback, MAX_TRACEBACK_CHARS),
    }


def _evaluation_rows(claim: Claim, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for seq, raw in enumerate(rows):
        row = to_jsonable(dict(raw))
        out.append(
            {
                "study_id": claim.study_id,
                "plan_index": claim.index,
                "seq": seq,
                "run_id": claim.run_id,
                "attempt": claim.attempt,
                "evaluator_id": _text(row.get("evaluator_id")),
                "metric_name": _text(row.get("metric_name")),
                "metric_value": row.get("metric_value"),
                "metric_unit": _text(row.get("metric_unit")),
                "aggregation_level": _text(row.get("aggregation_level")),
                "notes_json": row.get("notes_json"),
                "extra": {
                    k: v for k, v in row.items() if k not in EVALUATION_COLUMNS and k != "run_id"
                },
            }
        )
    return out


def _event_rows(claim: Claim, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for seq, raw in enumerate(rows):
        row = to_jsonable(dict(raw))
        values = {name: _text(row.get(name)) for name in EVENT_COLUMNS}
        out.append(
            {
                "study_id": claim.study_id,
                "plan_index": claim.index,
                "seq": seq,
                "run_id": claim.run_id,
                "attempt": claim.attempt,
                **values,
                "meta_json": row.get("meta_json"),
                "extra": {
                    k: v for k, v in row.items() if k not in EVENT_COLUMNS and k != "meta_json"
                },
            }
        )
    return out


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


_RESULT_COLUMNS = (
    "status",
    "started_at",
    "ended_at",
    "outputs",
    "metrics",
    "latency_s",
    "cost_usd",
    "input_tokens",
    "output_tokens",
    "primary_outcome",
    "trace_refs",
    "provenance",
    "error_kind",
    "error_type",
    "error_message",
    "traceback",
)
_FINISH = (
    update(RunRow)
    .where(FINISH_FENCE)
    .values(
        lease_expires_at=None,
        **{
            name: bindparam(f"r_{name}", type_=RunRow.__table__.c[name].type)
            for name in _RESULT_COLUMNS
        },
    )
)


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
        values = _result_values(result)
        params = {**fence_params(item_claim), **{f"r_{k}": v for k, v in values.items()}}
        if single:
            if connection.execute(_FINISH, params).rowcount != 1:
                won.append(False)
                continue
        else:
            updates.append(params)
        won.append(True)
        evaluations.extend(_evaluation_rows(item_claim, result.evaluations))
        events.extend(_event_rows(item_claim, result.events))
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


_JSON_RESULT_COLUMNS = frozenset(
    ("outputs", "metrics", "primary_outcome", "trace_refs", "provenance")
)
_EVALUATION_FIELDS = ("seq", *EVALUATION_COLUMNS, "extra")
_EVENT_FIELDS = ("seq", *EVENT_COLUMNS, "meta_json", "extra")


def _pg_value(name: str, value: Any) -> Any:
    return json_dumps(value) if name in _JSON_RESULT_COLUMNS and value is not None else value


def _quoted(names: Sequence[str]) -> str:
    return ", ".join(f'"{name}"' for name in names)


_FINISH_PG = f"""
WITH finished AS (
    UPDATE runs SET lease_expires_at = NULL, {
    ", ".join(
        f'"{name}" = CAST(%(r_{name})s AS jsonb)'
        if name in _JSON_RESULT_COLUMNS
        else f'"{name}" = %(r_{name})s'
        for name in _RESULT_COLUMNS
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
    FROM finished, json_to_recordset(CAST(%(evaluations)s AS json)) AS e(
        seq integer, evaluator_id text, metric_name text, metric_value jsonb, metric_unit text,
        aggregation_level text, notes_json jsonb, extra json)
), events_written AS (
    INSERT INTO events (study_id, plan_index, run_id, attempt, {_quoted(_EVENT_FIELDS)})
    SELECT %(study_id)s, finished.plan_index, %(run_id)s, %(attempt)s, {
    ", ".join(f'e."{name}"' for name in _EVENT_FIELDS)
}
    FROM finished, json_to_recordset(CAST(%(events)s AS json)) AS e(
        seq integer, "timestamp" text, record_id text, "text" text, session_id text,
        actor_id text, event_type text, meta_json jsonb, extra json)
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
    values = _result_values(result)
    evaluations = [
        {name: row[name] for name in _EVALUATION_FIELDS}
        for row in _evaluation_rows(claim, result.evaluations)
    ]
    events = [
        {name: row[name] for name in _EVENT_FIELDS} for row in _event_rows(claim, result.events)
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


RELEASED_VALUES: dict[str, Any] = {
    "status": RunStatus.QUEUED.value,
    "attempts_used": RunRow.attempts_used - 1,
    "lease_owner": None,
    "lease_expires_at": None,
    "started_at": None,
    "queued_at": db_now(),
}
"""What a running row becomes when its claim is handed back uncharged: a warm shutdown's
:func:`release`, and the take-back of a dead coordinator's claim that never started."""

_RELEASE = update(RunRow).where(FENCE).values(RELEASED_VALUES)


def release(connection: Connection, claim: Claim) -> bool:
    """``running -> queued`` for a warm shutdown, refunding the attempt.

    ``attempts_used`` goes back down, so the hand-back does not count against
    ``max_attempts``; ``attempt`` (the fencing token) stays, so the next claim gets a new,
    higher attempt number and this worker can no longer finish the run.
    """
    released = connection.execute(_RELEASE, fence_params(claim)).rowcount
    if released != 1:
        return False
    close_attempts(
        connection,
        claim.study_id,
        [attempt_end(claim.index, claim.attempt, AttemptOutcome.RELEASED)],
    )
    return True
