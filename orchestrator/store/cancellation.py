"""What a user asks of a study's runs: cancel them (:func:`cancel_study`) or resubmit the
finished ones (:func:`requeue_for_resubmit`).

Each takes a :class:`~sqlalchemy.engine.Connection` inside the caller's transaction and
reports what it changed; revoking or publishing is the caller's job, after the commit. A
cancel never waits on a row another session holds locked (:mod:`.locking`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import ColumnElement, delete, func, or_, select, update
from sqlalchemy.engine import Connection, Row

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store.columns import RESULT_COLUMNS
from orchestrator.store.endings import attempt_end, close_attempts
from orchestrator.store.locking import bound_lock_waits, where_unlocked
from orchestrator.store.models import (
    SPEC_COLUMNS,
    AttemptOutcome,
    EvaluationRow,
    EventRow,
    RunRow,
    StudyRow,
)
from orchestrator.store.predicates import in_chunks, where_filters, where_status
from orchestrator.store.records import publishable
from orchestrator.store.sqltypes import db_now

__all__ = [
    "CANCELLED_RUNNING_MESSAGE",
    "CANCELLED_WAITING_MESSAGE",
    "CancelReport",
    "cancel",
    "cancel_study",
    "cancel_where",
    "is_cancelled",
    "requeue_for_resubmit",
]

_RESULT = RunRow.__table__.c

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


def cancel_where(
    connection: Connection, study_id: str, statuses: Sequence[RunStatus], message: str
) -> list[Row[Any]]:
    """Unlocked runs of the study in ``statuses`` -> ``cancelled``; returns their spec
    columns and attempt."""
    return list(
        connection.execute(
            update(RunRow)
            .where(where_unlocked(connection, study_id, where_status(*statuses)))
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


def is_cancelled(connection: Connection, study_id: str) -> bool:
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
    bound_lock_waits(connection)
    _mark_cancelled(connection, study_id, True)
    waiting = (RunStatus.PLANNED, RunStatus.QUEUED)
    cancelled = cancel_where(connection, study_id, waiting, CANCELLED_WAITING_MESSAGE)
    terminated: list[Row[Any]] = []
    if terminate:
        terminated = cancel_where(
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
                where_status(RunStatus.RUNNING, *waiting),
            )
            .group_by(RunRow.status)
        ).all()
    )
    running = left.pop(RunStatus.RUNNING.value, 0)
    return CancelReport(
        study_id=study_id,
        cancelled=len(cancelled) + len(terminated),
        terminated=publishable(study_id, terminated),
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
        where_status(*wanted),
        *where_filters(where),
    ]
    if error_contains:
        needle = f"%{error_contains.lower()}%"
        clauses.append(
            or_(
                func.lower(func.coalesce(_RESULT.error_kind, "")).like(needle),
                func.lower(func.coalesce(_RESULT.error_type, "")).like(needle),
                func.lower(func.coalesce(_RESULT.error_message, "")).like(needle),
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
                **{spec.name: None for spec in RESULT_COLUMNS},
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
