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
from orchestrator.contracts.results import RunStatus
from orchestrator.dashboard.charts import cost_line, latency_bars
from orchestrator.dashboard.queries import (
    LATENCY_EDGES_S,
    RATE_WINDOW_S,
    CellSums,
    CostBurn,
    StudyFigures,
    condition_positions,
    error_classes,
    failed_runs,
    metric_keys,
    outcome_sample,
    rebucket,
    study_figures,
    study_rows,
)
from orchestrator.insight.aggregates import (
    GroupSummary,
    Throughput,
    Totals,
    failures,
    primary_outcome,
)
from orchestrator.insight.plots import (
    StripGroup,
    completion_bars,
    format_number,
    strip_plot,
    throughput_line,
)
from orchestrator.insight.stats import summarize
from orchestrator.store.inspection import (
    MetricRef,
    condition_labels,
    run_attempts,
    run_evaluations,
    run_events,
)
from orchestrator.store.queries import find_runs_by_id, find_study
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


_COLUMNS = ("input_tokens", "output_tokens")
"""Result columns the select offers when some run has them (latency and cost have plots)."""


def _choices(
    connection: Connection, study_id: str, primary: MetricRef, figures: StudyFigures
) -> list[MetricChoice]:
    """The outcome select: the primary outcome, the token columns some run filled, the
    numeric ``metrics`` keys and the evaluation metrics."""
    keys, evaluations = metric_keys(connection, study_id)
    refs = [primary]
    candidates = [MetricRef("column", c) for c in _COLUMNS if figures.columns.get(c)]
    candidates += [MetricRef("metrics", k) for k in keys if k not in _COLUMNS]
    candidates += [MetricRef("evaluation", name) for name in evaluations]
    refs += [ref for ref in candidates if ref != primary]
    where = {"column": "", "metrics": "metrics.", "evaluation": "evaluation "}
    return [MetricChoice(f"{r.source}:{r.name}", f"{where[r.source]}{r.name}", r) for r in refs]


def budget_of(connection: Connection, info: StudyInfo) -> BudgetState:
    """The study's effective budget, what its finished runs spent, and its pause, as
    ``studyq status`` shows them (:func:`orchestrator.budget.state_on`)."""
    from orchestrator.budget import state_on

    return state_on(connection, info)


def studies_view(connection: Connection) -> dict[str, Any]:
    """The studies page: every study's counts, rate, ETA, cost and last activity."""
    return {"studies": study_rows(connection)}


def _summaries(
    figures: StudyFigures, by: str, labels: dict[str, str], positions: dict[str, int]
) -> list[GroupSummary]:
    groups = []
    for key, cells in figures.by(by).items():
        total = CellSums()
        for cell in cells.values():
            total.add(cell)
        groups.append(
            GroupSummary(
                key=key,
                label=labels.get(key, key),
                counts={s.value: cells[s.value].count if s.value in cells else 0
                        for s in RunStatus},
                outcome=summarize(total.n, total.total if total.n else None, total.squares),
                mean_latency_s=total.latency / total.latency_n if total.latency_n else None,
                cost_usd=total.cost,
                position=positions.get(key, len(positions)),
            )
        )  # fmt: skip
    return sorted(groups, key=lambda g: (g.position, g.key))


def study_view(
    connection: Connection, study_id: str, metric_text: str | None = None
) -> dict[str, Any] | None:
    """The study page: status, plots, per-condition, agent and problem tables, failures.

    Its numbers come from :func:`~orchestrator.dashboard.queries.study_figures` (two scans
    of the study's runs) for the chosen metric (the primary outcome unless the select picked
    another): the strip plot and the tables' outcome columns show that metric."""
    info = find_study(connection, study_id)
    if info is None:
        return None
    outcome = primary_outcome(info.definition)
    wanted = parse_metric(metric_text) or outcome.metric
    figures = study_figures(connection, study_id, wanted)
    choices = _choices(connection, study_id, outcome.metric, figures)
    notice = ""
    chosen = next((c for c in choices if c.metric == wanted), None)
    if chosen is None:  # not a metric of this study: the primary outcome instead
        notice = f"no metric {metric_text!r} in this study; showing the primary outcome"
        chosen = choices[0]
        figures = study_figures(connection, study_id, chosen.metric)
    positions = condition_positions(connection, study_id)
    condition_ids = {key[0] for key in figures.groups}
    labels = condition_labels(connection, study_id, condition_ids)
    conditions = _summaries(figures, "condition", labels, positions)
    agents = _summaries(figures, "agent", {}, {})
    problems = _summaries(figures, "problem", {}, {})
    for groups in (agents, problems):  # key order, as the insight aggregates list them
        groups.sort(key=lambda g: g.key)
    counts = figures.counts
    remaining = sum(counts.get(s, 0) for s in _LEFT)
    rate = None
    first, last = figures.first_started_at, figures.last_ended_at
    if remaining and first is not None:  # running: over the last RATE_WINDOW_S
        window = min(RATE_WINDOW_S, (figures.now - first).total_seconds())
        rate = figures.finished_recently / window if window > 0 else None
    elif first is not None and last is not None and last > first:  # ended: over its span
        done = sum(counts.get(s, 0) for s in (RunStatus.SUCCESS.value, RunStatus.FAILED.value))
        rate = done / (last - first).total_seconds()
    samples = outcome_sample(
        connection, study_id, chosen.metric, run_count=info.run_count, groups=len(conditions)
    )
    primary = chosen == choices[0]
    best = _best(conditions, outcome.lower_is_better if primary else None)
    strip = strip_plot(
        [
            StripGroup(g.label, samples.get(g.key, []), g.outcome, best=g.key == best)
            for g in conditions
        ],
        caption=f"{chosen.label} by condition (dots: runs, bar: mean, whisker: 95 % CI)",
    )
    width, series, burn = rebucket(figures.minutes)
    failed = failures(connection, study_id)
    total = Totals(dict(counts), figures.cost_usd, figures.input_tokens, figures.output_tokens, 0.0)
    return {
        "info": info,
        "title": str(info.definition.get("title", "")),
        "outcome": outcome,
        "totals": total,
        "remaining": remaining,
        "rate_per_s": rate or None,
        "eta_s": remaining / rate if rate and remaining else None,
        "last_activity": figures.last_ended_at,
        "choices": choices,
        "chosen": chosen,
        "primary": primary,
        "notice": notice,
        "conditions": conditions,
        "agents": agents,
        "problems": problems,
        "failures": failed,
        "error_classes": error_classes(connection, study_id),
        "budget": budget_of(connection, info),
        "plots": {
            "throughput": Markup(throughput_line(Throughput(width, series))),
            "completion": Markup(completion_bars([(g.label, g.counts) for g in conditions])),
            "outcome": Markup(strip),
            "latency": Markup(latency_bars(figures.latency_bins, LATENCY_EDGES_S)),
            "cost": Markup(cost_line(CostBurn(width, burn if figures.cost_usd else []))),
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
