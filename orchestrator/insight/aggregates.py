"""What a study's runs add up to, computed by the database: the read model of the report
(``studyq report``), and of a dashboard and ``studyq status --watch`` to come.

Every function takes an open :class:`~sqlalchemy.engine.Connection` (a read-only
:func:`~orchestrator.store.engine.transaction` over ``ResultStore.engine``) and a study id,
and runs a few ``GROUP BY`` statements in SQLAlchemy Core over the store's tables: no
function loads a study's runs into Python, so each costs about the same for 100 runs and for
1,000,000 and works on SQLite and PostgreSQL alike. The only per-run values that leave the
database are :func:`outcome_samples`, capped per group.

:func:`read_insight` gathers them all in one transaction (one consistent snapshot) for the
report; a live view calls the few it needs.

Outcomes. A study's primary outcome is the outcome its file marks ``primary: true`` (else
the ``primary_outcome`` column); :func:`primary_outcome` says where its number lives (a
numeric column of ``runs``, a key of the ``metrics`` cell, or evaluation rows) and which way
is better, from the study's hypotheses, by the rule ``studyq runs --best`` uses. Values are
numbers inside JSON cells where they live in JSON; a cell holding no number counts as
missing. Only successful runs contribute outcome values.

Means and spreads come from ``COUNT``, ``SUM`` and ``SUM`` of squares
(:func:`orchestrator.insight.stats.summarize` turns them into a mean, a standard deviation
and a 95 % interval).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import BigInteger, Float, Integer, case, cast, func, select
from sqlalchemy.engine import Connection
from sqlalchemy.sql.elements import ColumnElement

from orchestrator.contracts.results import RunStatus
from orchestrator.insight.stats import Summary, summarize
from orchestrator.store.inspection import (
    NUMERIC_RUN_COLUMNS,
    FinishedSpan,
    MetricRef,
    _metric_value,
    condition_labels,
    finished_span,
)
from orchestrator.store.models import AttemptRow, ConditionRow, RunRow
from orchestrator.store.queries import count_by, count_by_status, find_study

__all__ = [
    "FailureGroup",
    "GroupBy",
    "GroupSummary",
    "Histogram",
    "Insight",
    "OutcomeRef",
    "Throughput",
    "Totals",
    "WorkerActivity",
    "failures",
    "finished_over_time",
    "group_summaries",
    "latency_histogram",
    "outcome_samples",
    "primary_outcome",
    "read_insight",
    "totals",
    "workers",
]

GroupBy = Literal["condition", "agent", "problem"]
"""What runs can be grouped by."""

_RESULT = RunRow.__table__.c
_GROUP_COLUMNS: dict[str, Any] = {
    "condition": RunRow.condition_id,
    "agent": RunRow.agent_key,
    "problem": RunRow.problem_key,
}
_FINISHED = (RunStatus.SUCCESS.value, RunStatus.FAILED.value)

SAMPLE_PER_GROUP = 200
"""Outcome values :func:`outcome_samples` returns per group at most (for strip plots)."""

SAMPLE_BUDGET = 20_000
"""Outcome values :func:`read_insight` samples in all: with many conditions each gets fewer
(never under 20), so the report's strip plot stays a few hundred kilobytes."""

_BUCKET_WIDTHS_S = (60, 120, 300, 600, 900, 1800, 3600, 7200, 21600, 43200, 86400, 604800)


# -- the primary outcome -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OutcomeRef:
    """A study's outcome: its ``name`` in the study file, where its number lives, and which
    way is better (``lower_is_better`` None when the study does not say; ``why`` says how
    it was decided)."""

    name: str
    metric: MetricRef
    lower_is_better: bool | None
    why: str
    description: str = ""

    @property
    def direction(self) -> str:
        """``lower is better``, ``higher is better`` or ``direction not declared``."""
        if self.lower_is_better is None:
            return "direction not declared"
        return "lower is better" if self.lower_is_better else "higher is better"


def study_outcomes(definition: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    """The study definition's ``outcomes`` entries."""
    return [o for o in definition.get("outcomes") or [] if isinstance(o, Mapping)]


def outcome_metric(outcome: Mapping[str, Any]) -> MetricRef:
    """Where an outcome's values live: an evaluation metric, a numeric runs column, or a
    key of the runs' ``metrics``."""
    column = str(outcome.get("column") or outcome.get("name"))
    if str(outcome.get("source_table", "runs")) == "evaluations":
        return MetricRef("evaluation", str(outcome.get("name")))
    if column in NUMERIC_RUN_COLUMNS:
        return MetricRef("column", column)
    return MetricRef("metrics", column)


def metric_direction(
    definition: Mapping[str, Any], metric: MetricRef, name: str
) -> tuple[bool | None, str]:
    """Whether lower is better for ``metric`` (named ``name``), and why: lower when the
    hypotheses naming it (or an outcome measuring it) as a dependent variable all say
    ``direction: less``, higher when they all say ``greater``, else None (undeclared)."""
    names = {name} | {
        str(o.get("name")) for o in study_outcomes(definition) if outcome_metric(o) == metric
    }
    votes: dict[bool, str] = {}
    for hypothesis in definition.get("hypotheses") or []:
        if not isinstance(hypothesis, Mapping):
            continue
        direction = str(hypothesis.get("direction", ""))
        dependent = {str(v) for v in hypothesis.get("dependent_vars") or []}
        if direction in ("less", "greater") and names & dependent:
            votes.setdefault(direction == "less", str(hypothesis.get("hypothesis_id", "")))
    if len(votes) == 1:
        ((low, hypothesis_id),) = votes.items()
        return low, f"hypothesis {hypothesis_id} has direction: {'less' if low else 'greater'}"
    return None, (
        "the study's hypotheses disagree on its direction"
        if votes
        else "the study declares no direction for it"
    )


def primary_outcome(definition: Mapping[str, Any]) -> OutcomeRef:
    """The study's primary outcome (``primary: true``, else the ``primary_outcome`` column)
    and its direction (:func:`metric_direction`)."""
    primary = next((o for o in study_outcomes(definition) if o.get("primary")), None)
    if primary is None:
        name, metric, description = "primary_outcome", MetricRef("column", "primary_outcome"), ""
    else:
        name, metric = str(primary.get("name")), outcome_metric(primary)
        description = str(primary.get("description") or "")
    low, why = metric_direction(definition, metric, name)
    return OutcomeRef(name, metric, low, why, description)


def _value(connection: Connection, metric: MetricRef, best_low: bool) -> ColumnElement[Any]:
    """The metric of each run as a float expression over ``runs`` (NULL when missing); a
    run's evaluation rows fold to their lowest value when ``best_low``, else their highest."""
    return cast(_metric_value(connection, metric, best_low=best_low), Float)


# -- per group -----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class GroupSummary:
    """One condition, agent or problem: its runs by status, its outcome over successful runs,
    their mean latency and the cost of all its runs."""

    key: str
    """The condition id, agent key or problem key."""
    label: str
    """How ``studyq status`` names it (a condition's label; the key otherwise)."""
    counts: dict[str, int]
    outcome: Summary
    mean_latency_s: float | None
    cost_usd: float
    position: int = 0
    """Design order (conditions), else alphabetical order."""

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def finished(self) -> int:
        return self.counts.get(RunStatus.SUCCESS.value, 0) + self.counts.get(
            RunStatus.FAILED.value, 0
        )


def _condition_positions(connection: Connection, study_id: str) -> dict[str, int]:
    rows = connection.execute(
        select(ConditionRow.condition_id, func.min(ConditionRow.position))
        .where(ConditionRow.study_id == study_id)
        .group_by(ConditionRow.condition_id)
    )
    return {condition_id: int(position) for condition_id, position in rows}


def group_summaries(
    connection: Connection,
    study_id: str,
    by: GroupBy,
    outcome: MetricRef,
    *,
    best_low: bool = True,
) -> list[GroupSummary]:
    """Every condition (in design order), agent or problem (in key order) that has runs, with
    :class:`GroupSummary`'s figures: two ``GROUP BY`` statements. ``best_low`` folds an
    evaluation outcome's rows to each run's lowest (else highest) value."""
    column = _GROUP_COLUMNS[by]
    counts = count_by(connection, study_id, by)
    success = RunRow.status == RunStatus.SUCCESS.value
    value = case((success, _value(connection, outcome, best_low)), else_=None)
    rows = connection.execute(
        select(
            column,
            func.count(value),
            func.sum(value),
            func.sum(value * value),
            func.min(value),
            func.max(value),
            func.avg(_RESULT.latency_s),
            func.coalesce(func.sum(_RESULT.cost_usd), 0.0),
        )
        .where(RunRow.study_id == study_id)
        .group_by(column)
    )
    figures = {row[0]: row[1:] for row in rows}
    if by == "condition":
        positions = _condition_positions(connection, study_id)
        labels = condition_labels(connection, study_id, counts)
    else:
        positions = {key: i for i, key in enumerate(sorted(counts))}
        labels = {key: key for key in counts}
    groups = []
    for key, by_status in counts.items():
        n, total, squares, low, high, latency, cost = figures.get(
            key, (0, None, None, None, None, None, 0.0)
        )
        groups.append(
            GroupSummary(
                key=key,
                label=labels.get(key, key),
                counts={status.value: by_status.get(status.value, 0) for status in RunStatus},
                outcome=summarize(
                    int(n or 0),
                    _float(total),
                    _float(squares),
                    minimum=_float(low),
                    maximum=_float(high),
                ),
                mean_latency_s=_float(latency),
                cost_usd=float(cost or 0.0),
                position=positions.get(key, len(positions)),
            )
        )
    return sorted(groups, key=lambda g: (g.position, g.key))


def _float(value: Any) -> float | None:
    return None if value is None else float(value)


def outcome_samples(
    connection: Connection,
    study_id: str,
    outcome: MetricRef,
    *,
    by: GroupBy = "condition",
    per_group: int = SAMPLE_PER_GROUP,
    best_low: bool = True,
) -> dict[str, list[float]]:
    """Up to ``per_group`` outcome values of successful runs per group, for strip plots.

    The sample is the same on every call: the runs of each group ordered by ``spec_digest``
    (a hash of the run's spec, so unrelated to condition, replicate or time) and the first
    ``per_group`` taken, with ``ROW_NUMBER() OVER (PARTITION BY ...)`` in SQL."""
    column = _GROUP_COLUMNS[by]
    value = _value(connection, outcome, best_low)
    ranked = (
        select(
            column.label("key"),
            value.label("value"),
            func.row_number()
            .over(partition_by=column, order_by=(RunRow.spec_digest, RunRow.plan_index))
            .label("rank"),
        )
        .where(
            RunRow.study_id == study_id,
            RunRow.status == RunStatus.SUCCESS.value,
            value.is_not(None),
        )
        .subquery()
    )
    rows = connection.execute(
        select(ranked.c.key, ranked.c.value)
        .where(ranked.c.rank <= per_group)
        .order_by(ranked.c.key, ranked.c.rank)
    )
    samples: dict[str, list[float]] = {}
    for key, number in rows:
        samples.setdefault(key, []).append(float(number))
    return samples


# -- failures, totals, workers ---------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FailureGroup:
    """Failed runs with the same error kind, type and message, and one of their run ids."""

    error_kind: str | None
    error_type: str | None
    error_message: str | None
    count: int
    example_run_id: str


def failures(connection: Connection, study_id: str, *, limit: int = 20) -> list[FailureGroup]:
    """The ``limit`` largest groups of failed runs by error kind, type and message."""
    kind, kind_type, message = _RESULT.error_kind, _RESULT.error_type, _RESULT.error_message
    rows = connection.execute(
        select(kind, kind_type, message, func.count(), func.min(RunRow.run_id))
        .where(RunRow.study_id == study_id, RunRow.status == RunStatus.FAILED.value)
        .group_by(kind, kind_type, message)
        .order_by(func.count().desc(), kind, kind_type, message)
        .limit(limit)
    )
    return [FailureGroup(k, t, m, int(n), str(run_id)) for k, t, m, n, run_id in rows]


@dataclass(frozen=True, slots=True)
class Totals:
    """The study's runs by status, and what they cost."""

    counts: dict[str, int]
    cost_usd: float
    input_tokens: int
    output_tokens: int
    latency_s: float
    """Seconds of agent time, summed over finished runs."""

    @property
    def runs(self) -> int:
        return sum(self.counts.values())


def totals(connection: Connection, study_id: str) -> Totals:
    """Counts by status, total cost, tokens and agent time (one ``SUM`` statement)."""
    cost, tokens_in, tokens_out, latency = connection.execute(
        select(
            func.coalesce(func.sum(_RESULT.cost_usd), 0.0),
            func.coalesce(func.sum(_RESULT.input_tokens), 0),
            func.coalesce(func.sum(_RESULT.output_tokens), 0),
            func.coalesce(func.sum(_RESULT.latency_s), 0.0),
        ).where(RunRow.study_id == study_id)
    ).one()
    return Totals(
        count_by_status(connection, study_id),
        float(cost),
        int(tokens_in),
        int(tokens_out),
        float(latency),
    )


@dataclass(frozen=True, slots=True)
class WorkerActivity:
    """One worker (``host:pid`` style name) that claimed runs of the study."""

    worker: str
    attempts: int
    first_started_at: datetime | None
    last_ended_at: datetime | None


def workers(
    connection: Connection, study_id: str, *, limit: int = 50
) -> tuple[list[WorkerActivity], int]:
    """The ``limit`` busiest workers that ran attempts of the study, and how many there were."""
    attempts = func.count()
    rows = connection.execute(
        select(
            AttemptRow.worker,
            attempts,
            func.min(AttemptRow.started_at),
            func.max(AttemptRow.ended_at),
        )
        .where(AttemptRow.study_id == study_id)
        .group_by(AttemptRow.worker)
        .order_by(attempts.desc(), AttemptRow.worker)
        .limit(limit)
    )
    listed = [WorkerActivity(w, int(n), first, last) for w, n, first, last in rows]
    total = connection.execute(
        select(func.count(func.distinct(AttemptRow.worker))).where(AttemptRow.study_id == study_id)
    ).scalar_one()
    return listed, int(total)


# -- time series and distributions ---------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Throughput:
    """Runs finished per time bucket of ``bucket_s`` seconds (a minute unless the study's span
    needs wider buckets to stay under the requested number of points); empty buckets are 0."""

    bucket_s: int
    points: list[tuple[datetime, int]] = field(default_factory=list)

    def per_minute(self, count: int) -> float:
        """A bucket's count as runs finished per minute."""
        return count * 60.0 / self.bucket_s


def _epoch(connection: Connection, column: Any) -> ColumnElement[Any]:
    if connection.dialect.name == "postgresql":
        return cast(func.floor(func.extract("epoch", column)), BigInteger)
    return cast(func.strftime("%s", column), Integer)


def finished_over_time(
    connection: Connection, study_id: str, *, max_points: int = 240
) -> Throughput:
    """Finished runs (success or failed) per bucket of their end time (database clock), the
    bucket the smallest of a minute, 2, 5, 10, 15, 30 minutes, 1, 2, 6, 12 hours, a day or a
    week that keeps the series within ``max_points``."""
    where = (
        RunRow.study_id == study_id,
        RunRow.status.in_(_FINISHED),
        RunRow.ended_at.is_not(None),
    )
    epoch = _epoch(connection, RunRow.ended_at)
    first, last = connection.execute(select(func.min(epoch), func.max(epoch)).where(*where)).one()
    if first is None or last is None:
        return Throughput(60)
    span = int(last) - int(first)
    width = next((w for w in _BUCKET_WIDTHS_S if span // w < max_points), _BUCKET_WIDTHS_S[-1])
    bucket = (epoch // width).label("bucket")
    rows = connection.execute(
        select(bucket, func.count()).where(*where).group_by(bucket).order_by(bucket)
    )
    counts = {int(b): int(n) for b, n in rows}
    start, end = int(first) // width, int(last) // width
    points = [
        (datetime.fromtimestamp(b * width, UTC), counts.get(b, 0)) for b in range(start, end + 1)
    ]
    return Throughput(width, points)


@dataclass(frozen=True, slots=True)
class Histogram:
    """Counts of values in ``len(counts)`` equal bins from ``low`` to ``high`` (the last bin
    includes ``high``)."""

    low: float
    high: float
    counts: list[int]

    @property
    def edges(self) -> list[float]:
        """The ``len(counts) + 1`` bin edges."""
        width = (self.high - self.low) / max(1, len(self.counts))
        return [self.low + i * width for i in range(len(self.counts) + 1)]


def latency_histogram(connection: Connection, study_id: str, *, bins: int = 20) -> Histogram | None:
    """Finished runs' latency in ``bins`` equal bins between its minimum and maximum, the bin
    of each run computed in SQL; None when no finished run has a latency."""
    latency = _RESULT.latency_s
    where = (RunRow.study_id == study_id, RunRow.status.in_(_FINISHED), latency.is_not(None))
    low, high = connection.execute(select(func.min(latency), func.max(latency)).where(*where)).one()
    if low is None or high is None:
        return None
    low, high = float(low), float(high)
    if high <= low:
        total = connection.execute(select(func.count()).where(*where)).scalar_one()
        return Histogram(low, high, [int(total)])
    scaled = (latency - low) * (bins / (high - low))
    if connection.dialect.name == "postgresql":
        index: ColumnElement[Any] = cast(func.floor(scaled), Integer)
    else:  # values are >= 0, so CAST's truncation is floor
        index = cast(scaled, Integer)
    clamped = case((index >= bins, bins - 1), else_=index).label("bin")
    rows = connection.execute(select(clamped, func.count()).where(*where).group_by(clamped))
    counts = [0] * bins
    for bin_index, count in rows:
        counts[int(bin_index)] += int(count)
    return Histogram(low, high, counts)


# -- everything, at once ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Insight:
    """Everything the report shows about one study, read in one transaction."""

    study_id: str
    definition: dict[str, Any]
    submitted_at: datetime
    submitted_by: str
    run_count: int
    outcome: OutcomeRef
    conditions: list[GroupSummary]
    agents: list[GroupSummary]
    problems: list[GroupSummary]
    samples: dict[str, list[float]]
    """Outcome values per condition id (at most :data:`SAMPLE_PER_GROUP` each, fewer when
    :data:`SAMPLE_BUDGET` is shared by many conditions)."""
    failures: list[FailureGroup]
    totals: Totals
    throughput: Throughput
    latency: Histogram | None
    workers: list[WorkerActivity]
    worker_count: int
    span: FinishedSpan


def read_insight(connection: Connection, study_id: str) -> Insight | None:
    """Every aggregate of the study (None when the store does not hold it)."""
    info = find_study(connection, study_id)
    if info is None:
        return None
    outcome = primary_outcome(info.definition)
    listed, worker_count = workers(connection, study_id)
    low = outcome.lower_is_better is not False
    conditions = group_summaries(connection, study_id, "condition", outcome.metric, best_low=low)
    per_group = max(20, min(SAMPLE_PER_GROUP, SAMPLE_BUDGET // max(1, len(conditions))))
    return Insight(
        study_id=study_id,
        definition=dict(info.definition),
        submitted_at=info.submitted_at,
        submitted_by=info.submitted_by,
        run_count=info.run_count,
        outcome=outcome,
        conditions=conditions,
        agents=group_summaries(connection, study_id, "agent", outcome.metric, best_low=low),
        problems=group_summaries(connection, study_id, "problem", outcome.metric, best_low=low),
        samples=outcome_samples(
            connection, study_id, outcome.metric, per_group=per_group, best_low=low
        ),
        failures=failures(connection, study_id),
        totals=totals(connection, study_id),
        throughput=finished_over_time(connection, study_id),
        latency=latency_histogram(connection, study_id),
        workers=listed,
        worker_count=worker_count,
        span=finished_span(connection, study_id),
    )
