"""What each dashboard page shows, read from the store in one read-only transaction.

Every function takes an open :class:`~sqlalchemy.engine.Connection` and returns the
template's context (a dict), or None when the study or run is not in the store. Numbers come
from SQL aggregates (:mod:`orchestrator.insight.aggregates`, :mod:`.queries`); plots are
inline SVG strings (:mod:`orchestrator.insight.plots`, :mod:`.charts`) marked safe for the
templates.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from markupsafe import Markup
from sqlalchemy.engine import Connection

from orchestrator.budget import BudgetState
from orchestrator.contracts.extensions import ExecutionPolicy
from orchestrator.contracts.results import RunStatus
from orchestrator.dashboard.charts import cost_line
from orchestrator.dashboard.queries import cost_over_time, failed_runs, study_rows
from orchestrator.insight.aggregates import (
    SAMPLE_BUDGET,
    SAMPLE_PER_GROUP,
    failures,
    finished_over_time,
    group_summaries,
    latency_histogram,
    outcome_samples,
    primary_outcome,
    totals,
)
from orchestrator.insight.plots import (
    StripGroup,
    completion_bars,
    format_number,
    histogram,
    strip_plot,
    throughput_line,
)
from orchestrator.store.inspection import (
    MetricRef,
    condition_labels,
    finished_span,
    metric_names,
    run_attempts,
    run_evaluations,
    run_events,
)
from orchestrator.store.pausing import Spent, limits_of, pause_of, spent
from orchestrator.store.queries import find_runs_by_id, find_study, progress_stats
from orchestrator.store.records import StudyInfo

__all__ = ["MetricChoice", "failed_runs_view", "run_view", "studies_view", "study_view"]

_LEFT = (RunStatus.PLANNED.value, RunStatus.QUEUED.value, RunStatus.RUNNING.value)


@dataclass(frozen=True, slots=True)
class MetricChoice:
    """One option of the outcome select: ``value`` is ``source:name``."""

    value: str
    label: str
    metric: MetricRef


def parse_metric(text: str | None) -> MetricRef | None:
    """``column:NAME``, ``metrics:KEY`` or ``evaluation:NAME`` as a MetricRef (None: not one)."""
    if not text:
        return None
    source, _, name = text.partition(":")
    if source not in ("column", "metrics", "evaluation") or not name:
        return None
    return MetricRef(source, name)  # type: ignore[arg-type]


def _choices(connection: Connection, study_id: str, primary: MetricRef) -> list[MetricChoice]:
    names = metric_names(connection, study_id)
    refs = [primary]
    for source in ("column", "metrics", "evaluation"):
        for name in names.get(source, []):
            ref = MetricRef(source, name)
            if ref not in refs and name not in ("latency_s", "cost_usd"):
                refs.append(ref)
    where = {"column": "", "metrics": "metrics.", "evaluation": "evaluation "}
    return [MetricChoice(f"{r.source}:{r.name}", f"{where[r.source]}{r.name}", r) for r in refs]


def budget_of(connection: Connection, info: StudyInfo) -> BudgetState:
    """The study's effective budget (``studyq budget``'s over the study file's), what its
    finished runs spent, and its pause (budget, breaker), as ``studyq status`` shows them."""
    try:
        execution = ExecutionPolicy.model_validate(info.definition.get("execution") or {})
    except ValueError:
        execution = ExecutionPolicy()
    limits = limits_of(connection, info.study_id, execution)
    pause = pause_of(connection, info.study_id)
    used = (
        spent(connection, info.study_id)
        if limits.declared or pause is not None
        else Spent(0.0, 0, 0, None, None)
    )
    return BudgetState(info.study_id, limits, used, pause, execution.breaker)


def studies_view(connection: Connection) -> dict[str, Any]:
    """The studies page: every study's counts, rate, ETA, cost and last activity."""
    return {"studies": study_rows(connection)}


def study_view(
    connection: Connection, study_id: str, metric_text: str | None = None
) -> dict[str, Any] | None:
    """The study page: status, plots, per-agent and per-problem tables, failures."""
    info = find_study(connection, study_id)
    if info is None:
        return None
    outcome = primary_outcome(info.definition)
    total = totals(connection, study_id)
    stats = progress_stats(connection, study_id)
    remaining = sum(total.counts.get(s, 0) for s in _LEFT)
    rate = stats.recent_rate_per_s if remaining else None
    conditions = group_summaries(connection, study_id, "condition", outcome.metric)
    choices = _choices(connection, study_id, outcome.metric)
    wanted = parse_metric(metric_text)
    notice = ""
    chosen = next((c for c in choices if c.metric == wanted), None)
    if metric_text and chosen is None:
        notice = f"no metric {metric_text!r} in this study; showing the primary outcome"
    chosen = chosen or choices[0]
    metric_groups = (
        conditions
        if chosen.metric == outcome.metric
        else group_summaries(connection, study_id, "condition", chosen.metric)
    )
    per_group = max(20, min(SAMPLE_PER_GROUP, SAMPLE_BUDGET // max(1, len(metric_groups))))
    samples = outcome_samples(connection, study_id, chosen.metric, per_group=per_group)
    best = _best(metric_groups, outcome.lower_is_better if chosen == choices[0] else None)
    strip = strip_plot(
        [
            StripGroup(g.label, samples.get(g.key, []), g.outcome, best=g.key == best)
            for g in metric_groups
        ],
        caption=f"{chosen.label} by condition (dots: runs, bar: mean, whisker: 95 % CI)",
    )
    throughput = finished_over_time(connection, study_id)
    return {
        "info": info,
        "title": str(info.definition.get("title", "")),
        "outcome": outcome,
        "totals": total,
        "remaining": remaining,
        "rate_per_s": rate,
        "eta_s": remaining / rate if rate and remaining else None,
        "last_activity": finished_span(connection, study_id).last_finished_at,
        "choices": choices,
        "chosen": chosen,
        "notice": notice,
        "conditions": conditions,
        "agents": group_summaries(connection, study_id, "agent", outcome.metric),
        "problems": group_summaries(connection, study_id, "problem", outcome.metric),
        "failures": failures(connection, study_id),
        "budget": budget_of(connection, info),
        "plots": {
            "throughput": Markup(throughput_line(throughput)),
            "completion": Markup(completion_bars([(g.label, g.counts) for g in conditions])),
            "outcome": Markup(strip),
            "latency": Markup(
                histogram(latency_histogram(connection, study_id), caption="latency (s)")
            ),
            "cost": Markup(cost_line(cost_over_time(connection, study_id, throughput.bucket_s))),
        },
        "fmt": format_number,
    }


def _best(groups: list[Any], lower_is_better: bool | None) -> str | None:
    if lower_is_better is None:
        return None
    ranked = [g for g in groups if g.outcome.mean is not None]
    if len(ranked) < 2:
        return None
    pick = min if lower_is_better else max
    return str(pick(ranked, key=lambda g: g.outcome.mean).key)


def run_view(connection: Connection, study_id: str, run_id: str) -> dict[str, Any] | None:
    """The run page: each run with this id in the study (one unless the design repeats
    levels), its attempts, evaluations and first events."""
    info = find_study(connection, study_id)
    if info is None:
        return None
    runs = find_runs_by_id(connection, study_id, run_id)
    if not runs:
        return None
    labels = condition_labels(connection, study_id, [r.condition_id for r in runs])
    shown = []
    for run in runs:
        events, event_count = run_events(connection, study_id, run.index, limit=50)
        shown.append(
            {
                "run": run,
                "label": labels.get(run.condition_id, run.condition_id),
                "attempts": run_attempts(connection, study_id, run.index),
                "evaluations": run_evaluations(connection, study_id, run.index),
                "events": events,
                "event_count": event_count,
            }
        )
    return {"info": info, "run_id": run_id, "runs": shown}


def failed_runs_view(
    connection: Connection,
    study_id: str,
    *,
    error_kind: str | None,
    error_type: str | None,
    error_message: str | None,
) -> dict[str, Any] | None:
    """The failed runs of one error group (the first 100)."""
    info = find_study(connection, study_id)
    if info is None:
        return None
    runs = failed_runs(
        connection,
        study_id,
        error_kind=error_kind,
        error_type=error_type,
        error_message=error_message,
    )
    labels = condition_labels(connection, study_id, [r.condition_id for r in runs])
    return {
        "info": info,
        "runs": runs,
        "labels": labels,
        "error": {"kind": error_kind, "type": error_type, "message": error_message},
    }
