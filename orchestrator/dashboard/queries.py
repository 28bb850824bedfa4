"""The dashboard's own aggregates, beside :mod:`orchestrator.insight.aggregates`: every study
at once for the studies page; the study page's figures in two scans of the study's runs
(:func:`study_figures`: counts, outcome sums, latency and cost per condition, agent, problem,
status and latency bin (fixed edges), then runs finished and cost per minute), where
calling the insight aggregates one by one scans the runs about ten times (a 100,000-run
study then takes over a second on the benchmark machine);
a strip-plot sample looked up by primary key; a bounded listing of the failed runs of one
error group.

Each is one ``GROUP BY``, one ``ORDER BY ... LIMIT`` or one primary-key lookup: no run rows
are loaded into Python beyond a listing's limit or a sample's size.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Float,
    Integer,
    and_,
    any_,
    bindparam,
    case,
    cast,
    func,
    select,
    tuple_,
)
from sqlalchemy.dialects import postgresql
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.contracts.results import RunStatus
from orchestrator.store.models import RunRow, StudyRow
from orchestrator.store.sqltypes import db_now, db_now_plus

__all__ = [
    "LATENCY_EDGES_S",
    "RATE_WINDOW_S",
    "SAMPLE_PER_GROUP",
    "CostBurn",
    "FailedRun",
    "StudyFigures",
    "StudyLine",
    "condition_positions",
    "error_classes",
    "failed_runs",
    "metric_keys",
    "outcome_sample",
    "rebucket",
    "study_figures",
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
    """Whole seconds since 1970 of a timestamp column (``date_part``: a double, where
    ``EXTRACT`` returns a numeric that costs a third more per run on PostgreSQL 14+)."""
    if connection.dialect.name == "postgresql":
        return cast(func.floor(func.date_part("epoch", column)), BigInteger)
    return cast(func.strftime("%s", column), Integer)


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


# -- the study page in a few scans -------------------------------------------------------------

SAMPLE_PER_GROUP = 100
"""Outcome values the study page's strip plot draws per condition at most."""

_BUCKET_WIDTHS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 604800)
"""The throughput plot's bucket widths, as :func:`orchestrator.insight.aggregates
.finished_over_time` chooses them (the smallest that keeps the series within 240 points)."""
_MAX_POINTS = 240


@dataclass(slots=True)
class CellSums:
    """Runs of one (condition, agent, problem, status) cell, and their sums."""

    count: int = 0
    n: int = 0
    total: float = 0.0
    squares: float = 0.0
    latency: float = 0.0
    latency_n: int = 0
    cost: float = 0.0

    def add(self, other: CellSums) -> None:
        self.count += other.count
        self.n += other.n
        self.total += other.total
        self.squares += other.squares
        self.latency += other.latency
        self.latency_n += other.latency_n
        self.cost += other.cost


def _least(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def _most(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else max(a, b)


@dataclass(slots=True)
class StudyFigures:
    """What the study page shows, from two scans of the study's runs: counts and sums per
    condition, agent, problem and status; runs finished and cost per minute; finished runs
    per latency bin."""

    groups: dict[tuple[str, str, str, str], CellSums]
    counts: dict[str, int]
    cost_usd: float
    input_tokens: int
    output_tokens: int
    first_started_at: datetime | None
    last_ended_at: datetime | None
    finished_recently: int
    now: datetime
    minutes: dict[int, tuple[int, float]]
    """Minute (epoch // 60) -> (runs finished, their cost)."""
    latency_bins: dict[int, int]
    """Latency bin (:data:`LATENCY_EDGES_S`) -> finished runs with a latency in it."""
    columns: dict[str, int] = field(default_factory=dict)
    """Runs with a value in each token column (which metrics the select offers)."""

    def by(self, what: str) -> dict[str, dict[str, CellSums]]:
        """Sums per key of ``condition``, ``agent`` or ``problem``, then per status."""
        position = {"condition": 0, "agent": 1, "problem": 2}[what]
        out: dict[str, dict[str, CellSums]] = {}
        for key, sums in self.groups.items():
            cell = out.setdefault(key[position], {}).setdefault(key[3], CellSums())
            cell.add(sums)
        return out


def _evaluation_values(connection: Connection, study_id: str, name: str) -> Any:
    """One number per run for evaluation metric ``name`` (the lowest of its rows), as a
    subquery keyed by ``plan_index``: joined, not correlated, so it is one scan."""
    from orchestrator.store.inspection import _json_number
    from orchestrator.store.models import EvaluationRow

    table = EvaluationRow.__table__.c
    number = _json_number(connection, table.metric_value, None)
    return (
        select(EvaluationRow.plan_index.label("plan_index"), func.min(number).label("value"))
        .where(EvaluationRow.study_id == study_id, table.metric_name == name)
        .group_by(EvaluationRow.plan_index)
        .subquery()
    )


def _metric(connection: Connection, study_id: str, metric: Any) -> tuple[Any, Any]:
    """(the metric as a float expression over ``runs``, the FROM clause it needs)."""
    from orchestrator.store.inspection import _metric_value

    runs = RunRow.__table__
    if metric.source == "evaluation":
        values = _evaluation_values(connection, study_id, metric.name)
        joined = runs.outerjoin(values, values.c.plan_index == RunRow.plan_index)
        return cast(values.c.value, Float), joined
    return cast(_metric_value(connection, metric, best_low=True), Float), runs


LATENCY_EDGES_S: tuple[float, ...] = tuple(m * 10.0**e for e in range(-3, 6) for m in (1, 2, 5))
"""The latency histogram's bin edges, 1-2-5 steps from 1 ms to 500,000 s (a log axis:
agent latencies span milliseconds to hours). Bin 0 is below 1 ms, bin ``i`` from edge
``i - 1`` to edge ``i``, the last bin from the last edge up. Fixed edges let the histogram
come out of the same scan as the sums."""


def _latency_bin(latency: Any) -> ColumnElement[Any]:
    """The bin of ``latency`` (see :data:`LATENCY_EDGES_S`) as a CASE ladder: portable, and
    it stops at the first edge above the value."""
    whens = [(latency < edge, i) for i, edge in enumerate(LATENCY_EDGES_S)]
    return case(*whens, else_=len(LATENCY_EDGES_S))


def study_figures(connection: Connection, study_id: str, metric: Any) -> StudyFigures:
    """:class:`StudyFigures` of the study, the outcome figures for ``metric`` (a
    :class:`~orchestrator.store.inspection.MetricRef`) over successful runs.

    The per-run values (the metric out of its JSON cell, latency and its bin, end minute,
    whether it finished within the rate window) are computed once per run in a derived
    table, then summed per cell and latency bin, and per minute: two ``GROUP BY``
    statements, each one (parallel, on PostgreSQL) scan of the study's runs."""
    value, source = _metric(connection, study_id, metric)
    success = RunRow.status == RunStatus.SUCCESS.value
    finished = RunRow.status.in_(_FINISHED)
    recent = and_(finished, RunRow.ended_at >= db_now_plus(-RATE_WINDOW_S))
    latency = case((finished, _RESULT.latency_s), else_=None)
    keys = (RunRow.condition_id, RunRow.agent_key, RunRow.problem_key, RunRow.status)
    per_run = (
        select(
            *keys,
            case((success, value), else_=None).label("v"),
            latency.label("lat"),
            case((finished, _latency_bin(_RESULT.latency_s)), else_=None).label("lbin"),
            case((finished, _epoch(connection, RunRow.ended_at) // 60), else_=None).label("minute"),
            _RESULT.cost_usd.label("cost"),
            _RESULT.input_tokens.label("tin"),
            _RESULT.output_tokens.label("tout"),
            RunRow.started_at.label("started"),
            RunRow.ended_at.label("ended"),
            case((recent, 1), else_=None).label("recent"),
        )
        .select_from(source)
        .where(RunRow.study_id == study_id)
        .subquery()
    )
    c = per_run.c
    cell = (c.condition_id, c.agent_key, c.problem_key, c.status)
    sums = (
        func.count(),
        func.count(c.v),
        func.sum(c.v),
        func.sum(c.v * c.v),
        func.sum(c.lat),
        func.count(c.lat),
        func.coalesce(func.sum(c.cost), 0.0),
        func.coalesce(func.sum(cast(c.tin, Float)), 0.0),  # float sums: bigint's are numeric
        func.coalesce(func.sum(cast(c.tout, Float)), 0.0),
        func.min(c.started),
        func.max(c.ended),
        func.count(c.recent),
        func.count(c.tin),
        func.count(c.tout),
    )
    now: datetime = connection.execute(select(db_now())).scalar_one()
    figures = StudyFigures(
        groups={}, counts={s.value: 0 for s in RunStatus}, cost_usd=0.0, input_tokens=0,
        output_tokens=0, first_started_at=None, last_ended_at=None, finished_recently=0,
        now=now, minutes={}, latency_bins={},
    )  # fmt: skip
    if connection.dialect.name == "postgresql":
        # The planner cannot tell that minutes and bins are few, and at the default work_mem
        # it sorts 100,000 rows for them; with room to hash all three sets it does not.
        connection.exec_driver_sql("SET LOCAL work_mem = '64MB'")
        rows = connection.execute(
            select(
                *cell, c.minute, c.lbin, func.grouping(c.minute), func.grouping(c.lbin), *sums
            ).group_by(func.grouping_sets(tuple_(*cell), c.minute, c.lbin))
        )
        for row in rows:
            by_minute, by_bin = not row[6], not row[7]
            if by_minute:
                if row[4] is not None:
                    figures.minutes[int(row[4])] = (int(row[8]), float(row[14] or 0.0))
            elif by_bin:
                if row[5] is not None:
                    figures.latency_bins[int(row[5])] = int(row[8])
            else:
                _add_cell(figures, row[:4], row[8:])
    else:
        for row in connection.execute(select(*cell, *sums).group_by(*cell)):
            _add_cell(figures, row[:4], row[4:])
        for minute, count, cost in connection.execute(
            select(c.minute, func.count(), func.coalesce(func.sum(c.cost), 0.0))
            .where(c.minute.is_not(None))
            .group_by(c.minute)
        ):
            figures.minutes[int(minute)] = (int(count), float(cost or 0.0))
        for bin_index, count in connection.execute(
            select(c.lbin, func.count()).where(c.lat.is_not(None)).group_by(c.lbin)
        ):
            figures.latency_bins[int(bin_index)] = int(count)
    return figures


def _add_cell(figures: StudyFigures, key: Any, sums: Any) -> None:
    condition, agent, problem, status = key
    (count, n, total, squares, lat, lat_n, cost, tokens_in, tokens_out, first, last,
     in_window, with_tokens_in, with_tokens_out) = sums  # fmt: skip
    for column, present in (("input_tokens", with_tokens_in), ("output_tokens", with_tokens_out)):
        figures.columns[column] = figures.columns.get(column, 0) + int(present or 0)
    figures.groups.setdefault((condition, agent, problem, status), CellSums()).add(
        CellSums(
            int(count),
            int(n),
            float(total or 0.0),
            float(squares or 0.0),
            float(lat or 0.0),
            int(lat_n),
            float(cost or 0.0),
        )
    )
    figures.counts[status] = figures.counts.get(status, 0) + int(count)
    figures.cost_usd += float(cost or 0.0)
    figures.input_tokens += int(tokens_in or 0)
    figures.output_tokens += int(tokens_out or 0)
    figures.first_started_at = _earliest(figures.first_started_at, first)
    figures.last_ended_at = _latest(figures.last_ended_at, last)
    figures.finished_recently += int(in_window or 0)


def rebucket(
    minutes: dict[int, tuple[int, float]],
) -> tuple[int, list[tuple[datetime, int]], list[tuple[datetime, float]]]:
    """Per-minute (count, cost) as the throughput series and the cumulative cost series, in
    the smallest bucket width that keeps them within 240 points: (width, throughput, cost)."""
    if not minutes:
        return 60, [], []
    first, last = min(minutes), max(minutes)
    span = (last - first) * 60
    width = next((w for w in _BUCKET_WIDTHS_S if span // w < _MAX_POINTS), _BUCKET_WIDTHS_S[-1])
    per = width // 60
    counts: dict[int, int] = {}
    costs: dict[int, float] = {}
    for minute, (count, cost) in minutes.items():
        bucket = minute // per
        counts[bucket] = counts.get(bucket, 0) + count
        costs[bucket] = costs.get(bucket, 0.0) + cost
    start, end = first // per, last // per
    throughput, burn, total = [], [], 0.0
    for bucket in range(start, end + 1):
        moment = datetime.fromtimestamp(bucket * width, UTC)
        throughput.append((moment, counts.get(bucket, 0)))
        total += costs.get(bucket, 0.0)
        burn.append((moment, total))
    return width, throughput, burn


def outcome_sample(
    connection: Connection,
    study_id: str,
    metric: Any,
    *,
    run_count: int,
    groups: int,
    per_group: int = SAMPLE_PER_GROUP,
) -> dict[str, list[float]]:
    """Up to ``per_group`` values of ``metric`` of successful runs per condition, for the
    strip plot: the runs at a fixed pseudo-random set of plan indexes (seeded by the study
    id, so every refresh draws the same runs), looked up by the primary key; every run when
    the study is small."""
    import random

    value, source = _metric(connection, study_id, metric)
    wanted = int(per_group * max(1, groups) * 1.5)
    query = (
        select(RunRow.condition_id, value)
        .select_from(source)
        .where(
            RunRow.study_id == study_id,
            RunRow.status == RunStatus.SUCCESS.value,
            value.is_not(None),
        )
        .order_by(RunRow.plan_index)
    )
    if run_count > wanted:
        indexes = sorted(random.Random(study_id).sample(range(run_count), wanted))
        if connection.dialect.name == "postgresql":  # one array parameter, not thousands
            wanted_rows = bindparam("sample_indexes", indexes, type_=postgresql.ARRAY(Integer))
            query = query.where(RunRow.plan_index == any_(wanted_rows))
        else:
            query = query.where(RunRow.plan_index.in_(indexes))
    samples: dict[str, list[float]] = {}
    for condition_id, number in connection.execute(query):
        kept = samples.setdefault(condition_id, [])
        if len(kept) < per_group:
            kept.append(float(number))
    return samples


def condition_positions(connection: Connection, study_id: str) -> dict[str, int]:
    """Each condition's place in the design (the small ``conditions`` table)."""
    from orchestrator.store.models import ConditionRow

    rows = connection.execute(
        select(ConditionRow.condition_id, func.min(ConditionRow.position))
        .where(ConditionRow.study_id == study_id)
        .group_by(ConditionRow.condition_id)
    )
    return {condition_id: int(position) for condition_id, position in rows}


def error_classes(
    connection: Connection, study_id: str, *, limit: int = 50
) -> list[tuple[str, int]]:
    """The error classes (``error_type``) of the study's failed runs, largest first, for the
    resubmit form: one ``GROUP BY`` over the ``(study_id, status, ...)`` index's rows."""
    rows = connection.execute(
        select(_RESULT.error_type, func.count())
        .where(
            RunRow.study_id == study_id,
            RunRow.status == RunStatus.FAILED.value,
            _RESULT.error_type.is_not(None),
        )
        .group_by(_RESULT.error_type)
        .order_by(func.count().desc(), _RESULT.error_type)
        .limit(limit)
    )
    return [(str(name), int(count)) for name, count in rows]


_METRIC_SAMPLE = 200


def metric_keys(connection: Connection, study_id: str) -> tuple[list[str], list[str]]:
    """The numeric ``metrics`` keys of a sample of the study's finished runs (``LIMIT``),
    and its evaluation metric names (at most 100): the select's other choices. Unlike
    :func:`orchestrator.store.inspection.metric_names` this checks no result column, which
    costs a scan of the study per column nobody filled (the page's scan counts them)."""
    from orchestrator.store.models import EvaluationRow

    keys: set[str] = set()
    sample = (
        select(_RESULT.metrics)
        .where(RunRow.study_id == study_id, _RESULT.metrics.is_not(None))
        .limit(_METRIC_SAMPLE)
    )
    for (metrics,) in connection.execute(sample):
        keys.update(
            k
            for k, v in (metrics or {}).items()
            if isinstance(v, int | float) and not isinstance(v, bool)
        )
    table = EvaluationRow.__table__.c
    names = connection.execute(
        select(table.metric_name)
        .where(EvaluationRow.study_id == study_id, table.metric_name.is_not(None))
        .distinct()
        .order_by(table.metric_name)
        .limit(100)
    ).scalars()
    return sorted(keys), [str(name) for name in names if name]
