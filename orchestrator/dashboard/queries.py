"""The dashboard's own aggregates, beside :mod:`orchestrator.insight.aggregates`: every study
at once for the studies page, a study's cost per time bucket, and a bounded listing of the
failed runs of one error group.

Each is one ``GROUP BY`` or one ``ORDER BY ... LIMIT`` statement: no run rows are loaded
into Python beyond a listing's limit.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import BigInteger, Integer, case, cast, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import RunRow, StudyRow
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = [
    "RATE_WINDOW_S",
    "CostBurn",
    "FailedRun",
    "StudyLine",
    "cost_over_time",
    "failed_runs",
    "study_rows",
]

_RESULT = RunRow.__table__.c
_FINISHED = (RunStatus.SUCCESS.value, RunStatus.FAILED.value)
_LEFT = (RunStatus.PLANNED.value, RunStatus.QUEUED.value, RunStatus.RUNNING.value)

RATE_WINDOW_S = 300.0
"""A running study's rate is its runs finished over the last this many seconds."""


@dataclass(slots=True)
class StudyLine:
    """One line of the studies page."""

    study_id: str
    title: str
    submitted_at: datetime | None
    submitted_by: str
    counts: dict[str, int] = field(default_factory=dict)
    cost_usd: float = 0.0
    last_activity: datetime | None = None
    rate_per_s: float | None = None
    eta_s: float | None = None

    @property
    def runs(self) -> int:
        return sum(self.counts.values())

    @property
    def remaining(self) -> int:
        return sum(self.counts.get(s, 0) for s in _LEFT)

    @property
    def finished(self) -> int:
        return sum(self.counts.get(s, 0) for s in _FINISHED)


def study_rows(connection: Connection) -> list[StudyLine]:
    """Every study, newest first, with runs by status, cost, last activity (the latest run
    start or end), rate (finished per second over the last :data:`RATE_WINDOW_S`, or over
    the whole span once nothing is left to run) and ETA: one statement over ``studies`` and
    one ``GROUP BY study_id, status`` over ``runs``."""
    studies = connection.execute(
        select(
            StudyRow.study_id,
            StudyRow.definition,
            StudyRow.submitted_at,
            StudyRow.submitted_by,
        ).order_by(StudyRow.submitted_at.desc(), StudyRow.study_id)
    ).all()
    since = db_now_plus(-RATE_WINDOW_S)
    recent = case((RunRow.ended_at >= since, 1), else_=None)
    now: datetime = connection.execute(select(db_now())).scalar_one()
    rows = connection.execute(
        select(
            RunRow.study_id,
            RunRow.status,
            func.count(),
            func.coalesce(func.sum(_RESULT.cost_usd), 0.0),
            func.min(RunRow.started_at),
            func.max(RunRow.started_at),
            func.max(RunRow.ended_at),
            func.count(recent),
        ).group_by(RunRow.study_id, RunRow.status)
    )
    figures: dict[str, dict[str, Any]] = {}
    for study_id, status, count, cost, first, last_start, last_end, in_window in rows:
        f = figures.setdefault(
            study_id, {"counts": {}, "cost": 0.0, "first": None, "last": None, "end": None,
                       "recent": 0},
        )  # fmt: skip
        f["counts"][status] = int(count)
        f["cost"] += float(cost or 0.0)
        f["first"] = _earliest(f["first"], first)
        f["last"] = _latest(f["last"], _latest(last_start, last_end))
        if status in _FINISHED:
            f["end"] = _latest(f["end"], last_end)
            f["recent"] += int(in_window)
    out = []
    for study_id, definition, submitted_at, submitted_by in studies:
        f = figures.get(study_id, {})
        row = StudyLine(
            study_id=study_id,
            title=str((definition or {}).get("title", "")),
            submitted_at=submitted_at,
            submitted_by=submitted_by,
            counts={s.value: f.get("counts", {}).get(s.value, 0) for s in RunStatus},
            cost_usd=float(f.get("cost", 0.0)),
            last_activity=f.get("last"),
        )
        first, end = f.get("first"), f.get("end")
        if row.remaining and first is not None:
            window = max(0.0, min(RATE_WINDOW_S, (now - first).total_seconds()))
            row.rate_per_s = f["recent"] / window if window and f["recent"] else None
        elif row.finished and first is not None and end is not None:
            span = (end - first).total_seconds()
            row.rate_per_s = row.finished / span if span > 0 else None
        if row.rate_per_s and row.remaining:
            row.eta_s = row.remaining / row.rate_per_s
        out.append(row)
    return out


def _earliest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else min(a, b)


def _latest(a: datetime | None, b: datetime | None) -> datetime | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(frozen=True, slots=True)
class CostBurn:
    """Cost of runs finished per time bucket (``bucket_s`` seconds), as a running total."""

    bucket_s: int
    points: list[tuple[datetime, float]]
    """(bucket start, cumulative cost up to the end of that bucket)."""


def _epoch(connection: Connection, column: Any) -> ColumnElement[Any]:
    if connection.dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", column)), BigInteger)
    return cast(func.strftime("%s", column), Integer)


def cost_over_time(connection: Connection, study_id: str, bucket_s: int) -> CostBurn:
    """The study's cost summed per ``bucket_s`` bucket of run end time (the throughput
    plot's buckets), accumulated; empty when no finished run has a cost."""
    epoch = _epoch(connection, RunRow.ended_at)
    bucket = (epoch / bucket_s).label("bucket")
    rows = connection.execute(
        select(bucket, func.sum(_RESULT.cost_usd))
        .where(
            RunRow.study_id == study_id,
            RunRow.ended_at.is_not(None),
            _RESULT.cost_usd.is_not(None),
        )
        .group_by(bucket)
        .order_by(bucket)
    ).all()
    if not rows:
        return CostBurn(bucket_s, [])
    by_bucket = {int(b): float(c or 0.0) for b, c in rows}
    total = 0.0
    points = []
    for b in range(min(by_bucket), max(by_bucket) + 1):
        total += by_bucket.get(b, 0.0)
        points.append((datetime.fromtimestamp(b * bucket_s, UTC), total))
    return CostBurn(bucket_s, points)


@dataclass(frozen=True, slots=True)
class FailedRun:
    """One failed run of a listing."""

    run_id: str
    condition_id: str
    agent_key: str
    problem_key: str
    replicate: int
    ended_at: datetime | None
    error_message: str | None


def failed_runs(
    connection: Connection,
    study_id: str,
    *,
    error_kind: str | None,
    error_type: str | None,
    error_message: str | None,
    limit: int = 100,
) -> list[FailedRun]:
    """Up to ``limit`` failed runs of one error group (kind, type and message; None matches
    a missing value), in plan order over the ``(study_id, status, plan_index)`` index."""
    where = [RunRow.study_id == study_id, RunRow.status == RunStatus.FAILED.value]
    for column, value in (
        (_RESULT.error_kind, error_kind),
        (_RESULT.error_type, error_type),
        (_RESULT.error_message, error_message),
    ):
        where.append(column.is_(None) if value is None else column == value)
    rows = connection.execute(
        select(
            RunRow.run_id,
            RunRow.condition_id,
            RunRow.agent_key,
            RunRow.problem_key,
            RunRow.replicate,
            RunRow.ended_at,
            _RESULT.error_message,
        )
        .where(*where)
        .order_by(RunRow.plan_index)
        .limit(limit)
    )
    return [FailedRun(*row) for row in rows]
