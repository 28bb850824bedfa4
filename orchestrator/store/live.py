"""Aggregates for the live view (``studyq status STUDY --watch``): who is working and what
failed last.

Each is a SQL aggregate over a study's rows (a ``GROUP BY``, or a window over its failed
runs) returning a row per worker or error class, never per run. Times come from the
database clock, as the leases do.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, or_, select
from sqlalchemy.engine import Connection

from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import AttemptRow, RunRow
from orchestrator.store.predicates import where_status
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = ["FailureClass", "WorkerSeen", "database_now", "failure_classes", "workers_seen"]

_RESULT = RunRow.__table__.c


@dataclass(frozen=True, slots=True)
class FailureClass:
    """Failed runs of one error kind and type, with the message of the one that ended last."""

    error_kind: str | None
    error_type: str | None
    count: int
    latest_message: str | None
    latest_run_id: str | None
    latest_at: datetime | None


@dataclass(frozen=True, slots=True)
class WorkerSeen:
    """A worker that claimed, finished or heartbeat a run of the study recently."""

    worker: str
    running: int
    """Runs of the study it holds now (live lease)."""
    last_seen: datetime
    """Its latest claim, attempt end or heartbeat (database clock)."""


def database_now(connection: Connection) -> datetime:
    """The database's clock (aware UTC), the one leases and attempts are stamped with."""
    now: datetime = connection.execute(select(db_now())).scalar_one()
    return now


def failure_classes(
    connection: Connection, study_id: str, *, limit: int = 10
) -> list[FailureClass]:
    """Failed runs grouped by error kind and type, largest group first, each with the
    message and run id of its latest failure (by ``ended_at``)."""
    kind, kind_type = _RESULT.error_kind, _RESULT.error_type
    partition = (kind, kind_type)
    ranked = (
        select(
            kind.label("kind"),
            kind_type.label("type"),
            _RESULT.error_message.label("message"),
            RunRow.run_id.label("run_id"),
            RunRow.ended_at.label("ended_at"),
            func.count().over(partition_by=partition).label("n"),
            func.row_number()
            .over(
                partition_by=partition,
                order_by=(RunRow.ended_at.desc(), RunRow.plan_index.desc()),
            )
            .label("rank"),
        )
        .where(RunRow.study_id == study_id, where_status(RunStatus.FAILED))
        .subquery()
    )
    rows = connection.execute(
        select(
            ranked.c.kind,
            ranked.c.type,
            ranked.c.n,
            ranked.c.message,
            ranked.c.run_id,
            ranked.c.ended_at,
        )
        .where(ranked.c.rank == 1)
        .order_by(ranked.c.n.desc(), ranked.c.kind, ranked.c.type)
        .limit(limit)
    )
    return [
        FailureClass(kind_, type_, int(n), message, run_id, ended)
        for kind_, type_, n, message, run_id, ended in rows
    ]


def workers_seen(
    connection: Connection, study_id: str, *, lease_s: float, within_s: float = 60.0
) -> list[WorkerSeen]:
    """Workers seen in the last ``within_s`` seconds, most recently seen first: an attempt of
    theirs started or ended then, or they hold a running run whose lease a claim or heartbeat
    set then (a heartbeat sets ``lease_expires_at`` to its time plus ``lease_s``, so a lease
    that ends after ``now + lease_s - within_s`` was set within the window)."""
    now = database_now(connection)
    since = db_now_plus(-within_s)
    seen: dict[str, datetime] = {}
    attempts = connection.execute(
        select(
            AttemptRow.worker,
            func.max(func.coalesce(AttemptRow.ended_at, AttemptRow.started_at)),
            func.max(AttemptRow.started_at),
        )
        .where(
            AttemptRow.study_id == study_id,
            or_(AttemptRow.started_at >= since, AttemptRow.ended_at >= since),
        )
        .group_by(AttemptRow.worker)
    )
    for worker, ended, started in attempts:
        times: list[datetime] = [when for when in (ended, started) if when is not None]
        if times:
            seen[str(worker)] = max(times)
    running: dict[str, int] = {}
    leases = connection.execute(
        select(RunRow.lease_owner, func.count(), func.max(RunRow.lease_expires_at))
        .where(
            RunRow.study_id == study_id,
            where_status(RunStatus.RUNNING),
            RunRow.lease_owner.is_not(None),
            RunRow.lease_expires_at > db_now(),
        )
        .group_by(RunRow.lease_owner)
    )
    for owner, count, expires in leases:
        name = str(owner)
        running[name] = int(count)
        if expires is None:
            continue
        beat = min(now, expires - timedelta(seconds=lease_s))
        if now - beat <= timedelta(seconds=within_s):
            seen[name] = max(seen.get(name, beat), beat)
    return sorted(
        (WorkerSeen(worker, running.get(worker, 0), when) for worker, when in seen.items()),
        key=lambda seen_: (-seen_.last_seen.timestamp(), seen_.worker),
    )
