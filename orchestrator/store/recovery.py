"""Coordinator-side transitions: lost workers, lost messages, cancel and resubmit.

This module holds the first two (:func:`reconcile`, :func:`take_back_orphans`); cancel and
resubmit are :mod:`.cancellation`, and the lock discipline below is :mod:`.locking`, both
re-exported here.

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

from collections.abc import Callable, Collection, Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, or_, select, update
from sqlalchemy.engine import Connection, Row

from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.store.attempts import RELEASED_VALUES
from orchestrator.store.cancellation import (
    CANCELLED_WAITING_MESSAGE,
    CancelReport,
    cancel,
    cancel_study,
    cancel_where,
    is_cancelled,
    requeue_for_resubmit,
)
from orchestrator.store.endings import attempt_end, close_attempts
from orchestrator.store.locking import RECONCILE_LOCK_TIMEOUT_MS, bound_lock_waits, where_unlocked
from orchestrator.store.models import SPEC_COLUMNS, AttemptOutcome, RunRow
from orchestrator.store.predicates import in_chunks, where_lease_expired, where_status
from orchestrator.store.records import ReconcileReport, TakeBackReport, publishable
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

LOST_TYPE = "LeaseExpired"
LOST_RUN_MESSAGE = (
    "The lease expired on the last allowed attempt: the worker vanished or stopped "
    "heartbeating every time (run_attempts lists the workers). Resubmit to try again."
)
LOST_ATTEMPT_MESSAGE = (
    "The lease expired: the worker vanished or stopped heartbeating before it finished."
)


def _expire(
    connection: Connection, study_id: str, lost_holder: ColumnElement[bool]
) -> tuple[list[Row[Any]], int]:
    """Running rows matching ``lost_holder`` lost their worker: back to ``queued`` while they
    have attempts left, else ``failed`` (kind ``lost``); their attempts end as ``lost``.
    Rows another transaction holds locked are skipped (see :func:`~.locking.where_unlocked`).
    Returns the requeued rows (spec columns and attempt) and how many failed."""
    requeued = connection.execute(
        update(RunRow)
        .where(
            where_unlocked(
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
            where_unlocked(
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
    bound_lock_waits(connection, RECONCILE_LOCK_TIMEOUT_MS)
    requeued, failed_lost = _expire(connection, study_id, where_lease_expired(study_id))
    if is_cancelled(connection, study_id):
        # A run a cancel left running came back (its worker died, or handed it back): it is
        # cancelled now instead of published again.
        cancel_where(connection, study_id, (RunStatus.QUEUED,), CANCELLED_WAITING_MESSAGE)
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
                where_unlocked(
                    connection,
                    study_id,
                    and_(
                        where_status(RunStatus.QUEUED),
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
        to_publish=publishable(study_id, [*requeued, *stale]),
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
    bound_lock_waits(connection, RECONCILE_LOCK_TIMEOUT_MS)
    owners = connection.execute(
        select(RunRow.lease_owner)
        .where(RunRow.study_id == study_id, where_status(RunStatus.RUNNING))
        .distinct()
    ).scalars()
    dead = sorted(owner for owner in owners if owner is not None and is_dead(owner))
    released: list[Row[Any]] = []
    requeued: list[Row[Any]] = []
    failed_lost = 0
    for owner in dead:
        held = and_(where_status(RunStatus.RUNNING), RunRow.lease_owner == owner)
        started = started_by(owner)
        if started is not None:
            rows = connection.execute(
                select(RunRow.plan_index, RunRow.attempt).where(
                    where_unlocked(connection, study_id, held)
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
        to_publish=publishable(study_id, [*released, *requeued]),
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
