"""A run's attempt, from claim to its end: the transitions a worker (or the embedded
executor) makes, each a guarded ``UPDATE`` that says whether it won.

This module is the claim side (queue, claim, heartbeat, release); the end of an attempt (a
result recorded, the attempt history closed) is :mod:`.endings`, re-exported here so this stays
the one module callers use for a run's attempt.

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

from collections.abc import Mapping, Sequence
from datetime import UTC
from typing import Any

from sqlalchemy import bindparam, case, exists, insert, select, update
from sqlalchemy.engine import Connection

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store.columns import MAX_MESSAGE_CHARS, MAX_TRACEBACK_CHARS
from orchestrator.store.endings import attempt_end, close_attempts, finish, finish_pg
from orchestrator.store.engine import Execute, cursor_executor
from orchestrator.store.models import (
    SPEC_COLUMNS,
    AttemptOutcome,
    AttemptRow,
    PauseRow,
    RunRow,
    StudyRow,
)
from orchestrator.store.predicates import FENCE, fence_params, in_chunks, index_in, where_status
from orchestrator.store.records import Claim, spec_from_row
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = [
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
                    index_in(chunk),
                    RunRow.status == RunStatus.PLANNED.value,
                )
                .values(status=RunStatus.QUEUED.value, queued_at=db_now())
                .returning(RunRow.plan_index, RunRow.attempt)
            )
        )
    moved.sort()
    return moved


def queue_next(
    connection: Connection, study_id: str, batch: int, after: int = -1
) -> list[tuple[RunSpec, int]]:
    """``planned -> queued`` for the next ``batch`` planned runs in plan order past the
    index ``after``, in one statement; returns the specs of the runs this call moved with
    their attempt counts, in plan order. An empty list means no planned run is left past it.

    A caller paging through a study passes the last index it got: every page then starts
    where the last one ended, instead of stepping over the index entries the earlier pages
    left behind (the old versions of the rows they moved stay in the index until a vacuum),
    which made marking a 1,000,000-run study queued slow down page after page.

    On PostgreSQL the page skips rows another coordinator is moving at this moment (``FOR
    UPDATE SKIP LOCKED``), so two coordinators on one study take disjoint pages instead of
    waiting for each other; SQLite has one writer at a time.
    """
    page = (
        select(RunRow.plan_index)
        .where(
            RunRow.study_id == study_id,
            where_status(RunStatus.PLANNED),
            RunRow.plan_index > after,
        )
        .order_by(RunRow.plan_index)
        .limit(batch)
        .with_for_update(skip_locked=True)
    )
    rows = sorted(
        connection.execute(
            update(RunRow)
            .where(
                RunRow.study_id == study_id,
                where_status(RunStatus.PLANNED),
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
        ~exists().where(PauseRow.study_id == bindparam("c_study")),  # budget, breaker
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
        AND NOT EXISTS (SELECT 1 FROM study_pauses WHERE study_id = %(study_id)s)
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
