"""Coordinator-side transitions: lost workers, lost messages, cancel and resubmit.

Each takes a :class:`~sqlalchemy.engine.Connection` inside the caller's transaction, changes
many runs with conditional ``UPDATE`` statements and reports what it did; publishing the
runs it hands back is the caller's job, after the commit (rq's registry cleanup, optuna's
stale-trial fail).

On PostgreSQL the coordinator's passes never wait on a row another session holds locked: a
worker frozen (SIGSTOP, a paused VM, a network partition) between its ``UPDATE`` and its
``COMMIT`` keeps its run's row lock for as long as the server keeps its session, hours with
default TCP keepalives. :func:`reconcile`, :func:`take_back_orphans` and :func:`cancel_study`
therefore select the rows they change with ``FOR UPDATE SKIP LOCKED`` and leave a locked run
to a later pass (cancel reports how many it left), and bound
every other lock wait of their transaction with ``lock_timeout``
(:data:`RECONCILE_LOCK_TIMEOUT_MS`). SQLite has no row locks and a single writer, so there
the statements stay plain ``UPDATE`` statements.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, and_, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Row

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store.attempts import RELEASED_VALUES, attempt_end, close_attempts
from orchestrator.store.models import (
    SPEC_COLUMNS,
    AttemptOutcome,
    EvaluationRow,
    EventRow,
    RunRow,
    StudyRow,
)
from orchestrator.store.predicates import in_chunks, where_filters, where_lease_expired
from orchestrator.store.records import ReconcileReport, TakeBackReport, spec_from_row
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = [
    "RECONCILE_LOCK_TIMEOUT_MS",
    "CancelReport",
    "cancel",
    "cancel_study",
    "reconcile",
    "requeue_for_resubmit",
    "take_back_orphans",
]

RECONCILE_LOCK_TIMEOUT_MS = 5_000
"""Longest a reconcile statement waits for a lock on PostgreSQL (``SET LOCAL lock_timeout``).

Row locks held by workers are skipped, not waited for, so only an unexpected lock (a schema
migration, a manual ``LOCK TABLE``) can reach this; the pass then fails with
:class:`~orchestrator.contracts.errors.StoreUnavailableError` and ``studyq wait`` retries it on the
next pass instead of hanging."""

LOST_TYPE = "LeaseExpired"
LOST_RUN_MESSAGE = (
    "The lease expired on the last allowed attempt: the worker vanished or stopped "
    "heartbeating every time (run_attempts lists the workers). Resubmit to try again."
)
LOST_ATTEMPT_MESSAGE = (
    "The lease expired: the worker vanished or stopped heartbeating before it finished."
)


def _bound_lock_waits(connection: Connection) -> None:
    """Make any lock wait of the rest of this transaction fail after
    :data:`RECONCILE_LOCK_TIMEOUT_MS` instead of blocking (PostgreSQL only)."""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql(f"SET LOCAL lock_timeout = {int(RECONCILE_LOCK_TIMEOUT_MS)}")


def _where_unlocked(
    connection: Connection, study_id: str, clause: ColumnElement[bool]
) -> ColumnElement[bool]:
    """``clause`` narrowed to the study's rows that no other transaction holds locked.

    On PostgreSQL the matching rows are locked with ``SELECT ... FOR UPDATE SKIP LOCKED`` in a
    subquery, so the ``UPDATE`` using this clause changes exactly those rows and never waits
    on a row a (possibly frozen) worker locked; a skipped row is judged again on a later pass.
    SQLite has no row locks (one writer holds the database), so there ``clause`` is returned
    as it is.
    """
    where = and_(RunRow.study_id == study_id, clause)
    if connection.dialect.name != "postgresql":
        return where
    free = select(RunRow.plan_index).where(where).correlate(None).with_for_update(skip_locked=True)
    return and_(where, RunRow.plan_index.in_(free))


def _expire(
    connection: Connection, study_id: str, lost_holder: ColumnElement[bool]
) -> tuple[list[Row[Any]], int]:
    """Running rows matching ``lost_holder`` lost their worker: back to ``queued`` while they
    have attempts left, else ``failed`` (kind ``lost``); their attempts end as ``lost``.
    Rows another transaction holds locked are skipped (see :func:`_where_unlocked`).
    Returns the requeued rows (spec columns and attempt) and how many failed."""
    requeued = connection.execute(
        update(RunRow)
        .where(
            _where_unlocked(
                connection, study_id, and_(lost_holder, RunRow.attempts_used < RunRow.max_attempts)
            )
        )
        .values(
            status=RunStatus.QUEUED.value,
            lease_owner=None,
            lease_expires_at=None,
            started_at=None,
            queued_at=db_now(),
        )
        .returning(*SPEC_COLUMNS, RunRow.attempt)
    ).all()
    lost = connection.execute(
        update(RunRow)
        .where(
            _where_unlocked(
                connection, study_id, and_(lost_holder, RunRow.attempts_used >= RunRow.max_attempts)
            )
        )
        .values(
            status=RunStatus.FAILED.value,
            lease_expires_at=None,
            ended_at=db_now(),
            error_kind=ErrorKind.LOST.value,
            error_type=LOST_TYPE,
            error_message=LOST_RUN_MESSAGE,
        )
        .returning(RunRow.plan_index, RunRow.attempt)
    ).all()
    close_attempts(
        connection,
        study_id,
        [
            attempt_end(
                row.plan_index,
                row.attempt,
                AttemptOutcome.LOST,
                ErrorKind.LOST.value,
                LOST_TYPE,
                LOST_ATTEMPT_MESSAGE,
            )
            for row in [*requeued, *lost]
        ],
    )
    return list(requeued), len(lost)


def _publishable(study_id: str, rows: Iterable[Row[Any]]) -> list[tuple[RunSpec, int]]:
    return sorted(
        ((spec_from_row(study_id, row), row.attempt) for row in rows), key=lambda p: p[0].index
    )


def reconcile(
    connection: Connection, study_id: str, *, queued_timeout_s: float | None = None
) -> ReconcileReport:
    """Send expired leases back to ``queued`` (or to ``failed``/lost when no attempts are
    left) and find queued runs nobody claimed for ``queued_timeout_s``; see
    :class:`ReconcileReport`. Stale queued rows get a fresh ``queued_at`` so one lost message
    is re-published once per timeout, not on every pass.

    ``queued_timeout_s=None`` skips the stale-queued search: the caller passes it when the
    broker still holds a message for every queued run (see
    :func:`orchestrator.distributed.wait_study`), so a backlog that merely waits is not
    published again.

    On PostgreSQL, rows another session holds locked are left for a later pass and no
    statement waits on a lock longer than :data:`RECONCILE_LOCK_TIMEOUT_MS` (this sets
    ``lock_timeout`` for the rest of the caller's transaction).
    """
    _bound_lock_waits(connection)
    requeued, failed_lost = _expire(connection, study_id, where_lease_expired(study_id))
    if _is_cancelled(connection, study_id):
        # A run a cancel left running came back (its worker died, or handed it back): it is
        # cancelled now instead of published again.
        _cancel_where(connection, study_id, (RunStatus.QUEUED,), CANCELLED_WAITING_MESSAGE)
        return ReconcileReport(
            study_id=study_id,
            requeued=0,
            failed_lost=failed_lost,
            stale_queued=0,
            to_publish=[],
        )
    stale: Sequence[Row[Any]] = []
    if queued_timeout_s is not None:
        stale = connection.execute(
            update(RunRow)
            .where(
                _where_unlocked(
                    connection,
                    study_id,
                    and_(
                        RunRow.status == RunStatus.QUEUED.value,
                        or_(
                            RunRow.queued_at.is_(None),
                            RunRow.queued_at < db_now_plus(-queued_timeout_s),
                        ),
                    ),
                )
            )
            .values(queued_at=db_now())
            .returning(*SPEC_COLUMNS, RunRow.attempt)
        ).all()
    return ReconcileReport(
        study_id=study_id,
        requeued=len(requeued),
        failed_lost=failed_lost,
        stale_queued=len(stale),
        to_publish=_publishable(study_id, [*requeued, *stale]),
    )


NOT_STARTED_MESSAGE = (
    "Not started: the coordinator holding the claim died before the run began; handed back "
    "without charging the attempt."
)


def take_back_orphans(
    connection: Connection,
    study_id: str,
    *,
    is_dead: Callable[[str], bool],
    started_by: Callable[[str], Collection[tuple[int, int]] | None],
) -> TakeBackReport:
    """Take back now, without waiting for their leases, the claims of running rows whose
    holder is known dead: ``is_dead(lease_owner)`` decides (the embedded coordinator checks
    whether the process named in the owner still exists on this host). Only the claims whose
    run had started are charged.

    ``started_by(owner)`` names the claims ``(plan_index, attempt)`` whose run the dead
    ``owner`` started (the embedded start journal), or returns None when nothing says: then
    every claim counts as started. A started claim lost its worker, as with an expired lease:
    requeued while attempts are left, else failed as ``lost``; its attempt ends ``lost``. A
    claim that never started is handed back as a warm shutdown's release is: ``queued``, its
    attempt refunded and ended ``released``. Rows another session holds locked are left for a
    later pass, as in :func:`reconcile`.
    """
    _bound_lock_waits(connection)
    owners = connection.execute(
        select(RunRow.lease_owner)
        .where(RunRow.study_id == study_id, RunRow.status == RunStatus.RUNNING.value)
        .distinct()
    ).scalars()
    dead = sorted(owner for owner in owners if owner is not None and is_dead(owner))
    released: list[Row[Any]] = []
    requeued: list[Row[Any]] = []
    failed_lost = 0
    for owner in dead:
        held = and_(RunRow.status == RunStatus.RUNNING.value, RunRow.lease_owner == owner)
        started = started_by(owner)
        if started is not None:
            rows = connection.execute(
                select(RunRow.plan_index, RunRow.attempt).where(
                    _where_unlocked(connection, study_id, held)
                )
            ).all()
            unstarted = [
                row.plan_index for row in rows if (row.plan_index, row.attempt) not in started
            ]
            released.extend(_refund(connection, study_id, owner, unstarted))
        # What the owner still holds started (or nothing says otherwise): charged.
        lost_rows, lost_failed = _expire(connection, study_id, held)
        requeued.extend(lost_rows)
        failed_lost += lost_failed
    return TakeBackReport(
        study_id=study_id,
        owners=tuple(dead),
        released=len(released),
        requeued=len(requeued),
        failed_lost=failed_lost,
        to_publish=_publishable(study_id, [*released, *requeued]),
    )


def _refund(
    connection: Connection, study_id: str, owner: str, indices: Sequence[int]
) -> list[Row[Any]]:
    """Running rows of ``owner`` at ``indices`` -> ``queued`` with the attempt refunded and
    ended ``released``; returns the rows moved (spec columns and attempt). The caller read
    and, on PostgreSQL, locked these rows in this transaction, so their attempt is the one it
    judged."""
    moved: list[Row[Any]] = []
    for chunk in in_chunks(indices):
        moved.extend(
            connection.execute(
                update(RunRow)
                .where(
                    RunRow.study_id == study_id,
                    RunRow.plan_index.in_(chunk),
                    RunRow.status == RunStatus.RUNNING.value,
                    RunRow.lease_owner == owner,
                )
                .values(RELEASED_VALUES)
                .returning(*SPEC_COLUMNS, RunRow.attempt)
            ).all()
        )
    close_attempts(
        connection,
        study_id,
        [
            attempt_end(
                row.plan_index,
                row.attempt,
                AttemptOutcome.RELEASED,
                error_message=NOT_STARTED_MESSAGE,
            )
            for row in moved
        ],
    )
    return moved


CANCELLED_WAITING_MESSAGE = "Cancelled by the user before it started."
CANCELLED_RUNNING_MESSAGE = "Cancelled by the user while it ran (studyq cancel --terminate)."


@dataclass(frozen=True, slots=True)
class CancelReport:
    """What :func:`cancel_study` changed, and what it left."""

    study_id: str
    cancelled: int = 0
    """Runs now ``cancelled``: planned and queued ones, and with ``terminate`` running ones."""
    terminated: list[tuple[RunSpec, int]] = field(default_factory=list)
    """``(spec, attempt)`` of the running runs cancelled (``terminate``): the caller revokes
    their tasks on the broker, after the commit."""
    running: int = 0
    """Runs still ``running``, left to finish (without ``terminate``)."""
    locked: int = 0
    """Runs it would have cancelled whose row another session holds locked (a worker in the
    middle of a claim or a result, or frozen there): not cancelled yet; cancel again."""


def _cancel_where(
    connection: Connection, study_id: str, statuses: Sequence[RunStatus], message: str
) -> list[Row[Any]]:
    """Unlocked runs of the study in ``statuses`` -> ``cancelled``; returns their spec
    columns and attempt."""
    return list(
        connection.execute(
            update(RunRow)
            .where(
                _where_unlocked(
                    connection, study_id, RunRow.status.in_([status.value for status in statuses])
                )
            )
            .values(
                status=RunStatus.CANCELLED.value,
                lease_expires_at=None,
                ended_at=db_now(),
                error_kind=ErrorKind.CANCELLED.value,
                error_message=message,
            )
            .returning(*SPEC_COLUMNS, RunRow.attempt)
        ).all()
    )


def _mark_cancelled(connection: Connection, study_id: str, cancelled: bool) -> None:
    """Set (cancel) or clear (resubmit) ``studies.cancelled_at``: while it is set no run of
    the study is claimed, and reconcile cancels the runs that come back to ``queued``."""
    connection.execute(
        update(StudyRow)
        .where(StudyRow.study_id == study_id)
        .values(cancelled_at=db_now() if cancelled else None)
    )


def _is_cancelled(connection: Connection, study_id: str) -> bool:
    return (
        connection.execute(
            select(StudyRow.cancelled_at).where(StudyRow.study_id == study_id)
        ).scalar_one_or_none()
        is not None
    )


def cancel_study(connection: Connection, study_id: str, *, terminate: bool) -> CancelReport:
    """Planned and queued runs -> ``cancelled``: they never start (a delivery finds nothing to
    claim). Running runs are left to finish and their results are recorded, unless
    ``terminate``: then they are ``cancelled`` too and their attempts end ``cancelled``, so
    the worker's next heartbeat is refused (it stops the agent) and a result that still
    arrives no longer matches the fence.

    Never waits on a row another session holds locked (PostgreSQL): such runs are counted in
    :attr:`CancelReport.locked` and left for the next call; any other lock wait of the
    transaction fails after :data:`RECONCILE_LOCK_TIMEOUT_MS`.
    """
    _bound_lock_waits(connection)
    _mark_cancelled(connection, study_id, True)
    waiting = (RunStatus.PLANNED, RunStatus.QUEUED)
    cancelled = _cancel_where(connection, study_id, waiting, CANCELLED_WAITING_MESSAGE)
    terminated: list[Row[Any]] = []
    if terminate:
        terminated = _cancel_where(
            connection, study_id, (RunStatus.RUNNING,), CANCELLED_RUNNING_MESSAGE
        )
        close_attempts(
            connection,
            study_id,
            [
                attempt_end(row.plan_index, row.attempt, AttemptOutcome.CANCELLED)
                for row in terminated
            ],
        )
    left = dict(
        connection.execute(
            select(RunRow.status, func.count())
            .where(
                RunRow.study_id == study_id,
                RunRow.status.in_([RunStatus.RUNNING.value, *(s.value for s in waiting)]),
            )
            .group_by(RunRow.status)
        ).all()
    )
    running = left.pop(RunStatus.RUNNING.value, 0)
    return CancelReport(
        study_id=study_id,
        cancelled=len(cancelled) + len(terminated),
        terminated=_publishable(study_id, terminated),
        running=0 if terminate else running,
        locked=sum(left.values()) + (running if terminate else 0),
    )


def cancel(connection: Connection, study_id: str) -> int:
    """:func:`cancel_study` with ``terminate``: every planned, queued or running run the
    transaction can lock -> ``cancelled``; returns how many."""
    return cancel_study(connection, study_id, terminate=True).cancelled


_RESUBMITTABLE = {RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.CANCELLED}


def requeue_for_resubmit(
    connection: Connection,
    study_id: str,
    *,
    statuses: Iterable[RunStatus | str],
    error_contains: str | None,
    where: Mapping[str, Any] | None,
) -> list[int]:
    """Terminal runs matching the filters -> ``planned`` with a fresh attempt budget, their
    previous result, evaluations and events removed (the attempt history stays); returns the
    plan indices moved. The caller enqueues them like any planned run.

    ``error_contains`` matches, case-insensitively, the error kind, type or message.
    """
    wanted = {RunStatus(status) for status in statuses}
    if not wanted or not wanted <= _RESUBMITTABLE:
        raise StoreError(
            "Only finished runs can be resubmitted (success, failed, cancelled); got "
            f"{sorted(status.value for status in wanted)}."
        )
    _mark_cancelled(connection, study_id, False)  # runs of the study may be claimed again
    clauses: list[ColumnElement[bool]] = [
        RunRow.study_id == study_id,
        RunRow.status.in_([status.value for status in wanted]),
        *where_filters(where),
    ]
    if error_contains:
        needle = f"%{error_contains.lower()}%"
        clauses.append(
            or_(
                func.lower(func.coalesce(RunRow.error_kind, "")).like(needle),
                func.lower(func.coalesce(RunRow.error_type, "")).like(needle),
                func.lower(func.coalesce(RunRow.error_message, "")).like(needle),
            )
        )
    moved = (
        connection.execute(
            update(RunRow)
            .where(*clauses)
            .values(
                status=RunStatus.PLANNED.value,
                attempts_used=0,
                lease_owner=None,
                lease_expires_at=None,
                queued_at=None,
                started_at=None,
                ended_at=None,
                outputs=None,
                metrics=None,
                latency_s=None,
                cost_usd=None,
                input_tokens=None,
                output_tokens=None,
                primary_outcome=None,
                trace_refs=None,
                provenance=None,
                error_kind=None,
                error_type=None,
                error_message=None,
                traceback=None,
            )
            .returning(RunRow.plan_index)
        )
        .scalars()
        .all()
    )
    indices = sorted(moved)
    for chunk in in_chunks(indices):
        for table in (EvaluationRow, EventRow):
            connection.execute(
                delete(table).where(table.study_id == study_id, table.plan_index.in_(chunk))
            )
    return indices
