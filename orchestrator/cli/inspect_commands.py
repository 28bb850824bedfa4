"""Inspection commands: ``studyq runs`` lists a study's runs, ``studyq show`` prints one run.

Both only read the store (:mod:`orchestrator.store.inspection`), on SQLite or PostgreSQL,
and print tables or ``key: value`` lines and JSON, never a record's repr.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from difflib import get_close_matches
from typing import Any, Literal

from sqlalchemy.engine import Connection

from orchestrator.cli import EXIT_OK, EXIT_USAGE, add_command, positive_int
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.settings import load_settings
from orchestrator.insight.aggregates import metric_direction, outcome_metric, study_outcomes
from orchestrator.store import ResultStore, RunRecord, StudyInfo, mask_url
from orchestrator.store.engine import transaction
from orchestrator.store.inspection import (
    NUMERIC_RUN_COLUMNS,
    MetricRef,
    condition_labels,
    find_runs_anywhere,
    has_metric,
    list_runs,
    metric_names,
    run_attempts,
    run_evaluations,
    run_events,
    similar_run_ids,
)
from orchestrator.store.lookup import open_existing, require_study

__all__ = ["register"]

_DB_HELP = "result store URL (default: $STUDYQ_DATABASE_URL, else sqlite:///studyq.db)"
_STATUSES = tuple(status.value for status in RunStatus)


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "runs",
        help="List a study's runs: id, condition, agent, problem, replicate, status, seconds, "
        "a metric and the error, in plan order, the slowest first (--slowest N) or the best "
        "first by a metric (--best N, default the primary outcome; the study's hypotheses "
        "say whether lower or higher is better).",
        example="studyq runs my-study --status failed --limit 20",
        handler=_runs,
    )
    parser.add_argument("study_id", metavar="STUDY", help="the study's study_id")
    parser.add_argument(
        "--status",
        action="append",
        choices=_STATUSES,
        default=None,
        help="only runs in this status (repeatable)",
    )
    order = parser.add_mutually_exclusive_group()
    order.add_argument(
        "--slowest", type=positive_int, default=None, metavar="N", help="the N slowest runs"
    )
    order.add_argument(
        "--best", type=positive_int, default=None, metavar="N", help="the N best runs by --metric"
    )
    parser.add_argument(
        "--metric",
        default=None,
        metavar="M",
        help="the metric shown and ranked by --best: an outcome of the study, primary_outcome, "
        "latency_s, cost_usd, a key of the runs' metrics or an evaluation metric_name "
        "(default: the primary outcome)",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=50, help="show at most this many (default: 50)"
    )
    parser.add_argument("--db", default=None, help=_DB_HELP)

    parser = add_command(
        subparsers,
        "show",
        help="Print one run: its spec (study, condition, factor levels, agent, problem, "
        "replicate, seed), status and times, every attempt, the error with its traceback, "
        "outputs, metrics, evaluations and events.",
        example="studyq show run-3f2a9c1d0b7e",
        handler=_show,
    )
    parser.add_argument("run_id", metavar="RUN_ID", help="the run's run_id (from `studyq runs`)")
    parser.add_argument("--db", default=None, help=_DB_HELP)


def _usage(command: str, message: str) -> int:
    print(f"studyq {command}: {message}", file=sys.stderr)
    return EXIT_USAGE


@contextmanager
def _reading(command: str, flag: str | None) -> Iterator[tuple[ResultStore, Connection]]:
    """The store and a read-only connection (a SQLite file that does not exist is refused,
    not created: :func:`~orchestrator.store.lookup.open_existing`)."""

    url = flag or load_settings().database_url
    with (
        open_existing(url, command=command) as store,
        transaction(store.engine, readonly=True) as connection,
    ):
        yield store, connection


# -- runs ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Metric:
    """A resolved ``--metric``: where it lives, how it is named, and which way is better."""

    ref: MetricRef
    name: str
    """As the study or the flag names it (the table's column)."""
    label: str
    best_low: bool | None
    """True when the study says lower is better, False when higher, None when it is silent."""
    why: str


def _resolve_metric(connection: Connection, info: StudyInfo, name: str | None) -> _Metric | str:
    """``--metric`` (or the primary outcome) as a metric the runs have, or the error line."""
    outcomes = study_outcomes(info.definition)
    if name is None:
        primary = next((o for o in outcomes if o.get("primary")), None)
        label = str(primary["name"]) if primary else "primary_outcome"
        ref = outcome_metric(primary) if primary else MetricRef("column", "primary_outcome")
        if not has_metric(connection, info.study_id, ref):
            return _no_such_metric(connection, info.study_id, label)
    else:
        label = name
        outcome = next((o for o in outcomes if str(o.get("name")) == name), None)
        candidates = (
            [outcome_metric(outcome)]
            if outcome
            else [MetricRef("column", name)]
            if name in NUMERIC_RUN_COLUMNS
            else [MetricRef("metrics", name), MetricRef("evaluation", name)]
        )
        found = [ref for ref in candidates if has_metric(connection, info.study_id, ref)]
        if not found:
            return _no_such_metric(connection, info.study_id, name)
        ref = found[0]
    low, why = metric_direction(info.definition, ref, label)
    return _Metric(ref, label, label if ref.name == label else f"{label} ({ref.name})", low, why)


def _no_such_metric(connection: Connection, study_id: str, name: str) -> str:
    names = metric_names(connection, study_id)
    known = [*names["column"], *names["metrics"], *names["evaluation"]]
    if not known:
        return f"--metric {name}: no run of study '{study_id}' has a numeric metric yet."
    close = get_close_matches(name, known, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    parts = [
        f"{where}: {', '.join(found)}"
        for where, found in (
            ("run columns", names["column"]),
            ("metrics", names["metrics"]),
            ("evaluations", names["evaluation"]),
        )
        if found
    ]
    return (
        f"--metric {name}: no run of study '{study_id}' has it. Fix: {hint}use one that "
        f"exists ({'; '.join(parts)})."
    )


def _runs(args: argparse.Namespace) -> int:
    with _reading("runs", args.db) as (store, connection):
        info = require_study(store, args.study_id, command="runs")
        resolved = _resolve_metric(connection, info, args.metric)
        if isinstance(resolved, str) and (args.best is not None or args.metric is not None):
            return _usage("runs", resolved)
        metric = None if isinstance(resolved, str) else resolved  # no primary outcome: no column
        best_low = bool(metric and metric.best_low)
        order: Literal["plan", "slowest", "best"] = (
            "best" if args.best else "slowest" if args.slowest else "plan"
        )
        limit = args.best or args.slowest or args.limit
        rows = list_runs(
            connection,
            info.study_id,
            statuses=args.status,
            order=order,
            metric=None if metric is None else metric.ref,
            best_low=best_low,
            limit=limit,
        )
        labels = condition_labels(connection, info.study_id, (run.condition_id for run, _ in rows))
        counts = store.count_by_status(info.study_id)
    matching = sum(counts[s] for s in (args.status or _STATUSES))
    which = f" {'/'.join(args.status)}" if args.status else ""
    if order == "best" and metric is not None:
        way = "lowest" if best_low else "highest"
        print(f"best {len(rows)}{which} runs by {metric.label}, {way} first ({metric.why})")
    elif order == "slowest":
        print(f"slowest {len(rows)}{which} runs")
    if not rows:
        print(f"no{which} runs in study '{info.study_id}'")
        return EXIT_OK
    _print_table(rows, labels, "metric" if metric is None else metric.name)
    if order == "plan" and matching > len(rows):
        print(f"\n{len(rows):,} of {matching:,}{which} runs shown; --limit N shows more.")
    print("\n`studyq show RUN_ID` prints one run (spec, attempts, error, outputs, metrics).")
    return EXIT_OK


def _cut(text: str, width: int) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def _seconds(run: RunRecord) -> float | None:
    if run.latency_s is not None:
        return float(run.latency_s)
    if run.started_at and run.ended_at:
        return (run.ended_at - run.started_at).total_seconds()
    return None


def _fmt_seconds(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds:.3f}" if seconds >= 0.01 else f"{seconds:.1e}"


def _print_table(
    rows: Sequence[tuple[RunRecord, float | None]], labels: Mapping[str, str], metric: str
) -> None:
    width = max(len(run.run_id) for run, _ in rows)
    metric_head = _cut(metric, 16)
    print(
        f"{'run':<{width}}  {'condition':<28} {'agent':<14} {'problem':<14} {'rep':>3} "
        f"{'status':<9} {'seconds':>8} {metric_head:>16}  error"
    )
    for run, value in rows:
        seconds = _seconds(run)
        error = f"{run.error_type or run.error_kind}: {run.error_message or ''}"
        label = _cut(labels.get(run.condition_id, run.condition_id), 28)
        print(
            f"{run.run_id:<{width}}  {label:<28} "
            f"{_cut(run.agent_key, 14):<14} {_cut(run.problem_key, 14):<14} {run.replicate:>3} "
            f"{run.status:<9} {_fmt_seconds(seconds):>8} "
            f"{'-' if value is None else f'{value:.6g}':>16}  "
            f"{_cut(error, 70) if run.error_kind or run.error_type else ''}"
        )


# -- show ----------------------------------------------------------------------------------


def _show(args: argparse.Namespace) -> int:
    with _reading("show", args.db) as (store, connection):
        runs = find_runs_anywhere(connection, args.run_id)
        if not runs:
            near = similar_run_ids(connection, args.run_id)
            close = get_close_matches(args.run_id, near, n=1, cutoff=0.6)
            prefixed = [run_id for run_id in near if run_id.startswith(args.run_id)]
            guess = close or prefixed[:1]
            hint = f"did you mean {guess[0]}? " if guess else ""
            studies = [info.study_id for info in store.list_studies()]
            listed = f" (studies: {', '.join(studies[:5])}{', ...' if len(studies) > 5 else ''})"
            return _usage(
                "show",
                f"no run '{args.run_id}' in {mask_url(store.url)}. Fix: {hint}`studyq runs "
                f"STUDY` lists a study's run ids{listed if studies else ''}.",
            )
        for number, run in enumerate(runs):
            if number:
                print("\n" + "-" * 72 + "\n")
            _print_run(connection, run)
    return EXIT_OK


def _json(value: Any) -> str:
    return json.dumps(value, default=str, ensure_ascii=False)


def _when(value: datetime | None) -> str:
    return "-" if value is None else value.strftime("%Y-%m-%d %H:%M:%S.%f")[:-3] + " UTC"


def _pairs(mapping: Mapping[str, Any] | None) -> str:
    if not mapping:
        return "-"
    return ", ".join(
        f"{k}={v if isinstance(v, str | int | float) else _json(v)}" for k, v in mapping.items()
    )


def _print_run(connection: Connection, run: RunRecord) -> None:
    label = condition_labels(connection, run.study_id, [run.condition_id])[run.condition_id]
    seconds = _seconds(run)
    print(f"run {run.run_id}")
    for key, value in (
        ("study", run.study_id),
        ("plan index", run.index),
        ("condition", f"{run.condition_id} ({label})"),
        ("factors", _pairs(run.factor_assignments)),
        ("blocks", _pairs(run.block_assignments)),
        ("agent", run.agent_key),
        ("problem", run.problem_key),
        ("replicate", run.replicate),
        ("seed", run.seed),
        ("status", run.status),
        ("attempts", f"{run.attempts_used} of at most {run.max_attempts} used"),
        ("queued", _when(run.queued_at)),
        ("started", _when(run.started_at)),
        ("ended", _when(run.ended_at)),
        ("seconds", _fmt_seconds(seconds)),
        ("cost $", "-" if run.cost_usd is None else f"{run.cost_usd:.4f}"),
    ):
        print(f"  {key + ':':<12} {value}")
    if run.status == RunStatus.RUNNING.value:
        print(f"  {'lease:':<12} {run.lease_owner or '-'} until {_when(run.lease_expires_at)}")

    attempts = run_attempts(connection, run.study_id, run.index)
    print(f"\nattempts ({len(attempts)})")
    for attempt in attempts:
        took = (
            f" ({(attempt.ended_at - attempt.started_at).total_seconds():.3f} s)"
            if attempt.ended_at
            else ""
        )
        why = (
            f": {attempt.error_type or attempt.error_kind}: "
            f"{_cut(attempt.error_message or '', 100)}"
            if attempt.error_kind or attempt.error_type
            else ""
        )
        print(
            f"  {attempt.attempt}. {attempt.outcome} on worker {attempt.worker}, "
            f"{_when(attempt.started_at)} -> {_when(attempt.ended_at)}{took}{why}"
        )

    if run.error_kind or run.error_type or run.traceback:
        print("\nerror")
        print(f"  kind:    {run.error_kind or '-'}")
        print(f"  type:    {run.error_type or '-'}")
        print(f"  message: {run.error_message or '-'}")
        if run.traceback:
            print("  traceback:")
            for line in run.traceback.rstrip().splitlines():
                print(f"    {line}")
        else:
            print("  traceback: - (none recorded: the run did not raise in Python)")

    print("\noutputs")
    print(_indented(json.dumps(run.outputs, indent=2, default=str, ensure_ascii=False))
          if run.outputs else "  -")  # fmt: skip
    print("\nmetrics")
    if run.metrics:
        for key, value in run.metrics.items():
            print(f"  {key}: {value if isinstance(value, str | int | float) else _json(value)}")
    else:
        print("  -")
    if run.primary_outcome is not None and "primary_outcome" not in (run.metrics or {}):
        print(f"  (primary outcome: {_json(run.primary_outcome)})")

    evaluations = run_evaluations(connection, run.study_id, run.index)
    print(f"\nevaluations ({len(evaluations)})")
    for row in evaluations:
        unit = f" {row.metric_unit}" if row.metric_unit else ""
        extra = {k: v for k, v in row.extra.items() if v is not None}
        notes = (
            "" if row.notes_json in (None, {}, "", "{}") else f"  notes: {_json(row.notes_json)}"
        )
        print(
            f"  {row.metric_name}: {_json(row.metric_value)}{unit}"
            f"  (evaluator {row.evaluator_id or '-'}, level {row.aggregation_level or '-'})"
            f"{notes}{'  ' + _json(extra) if extra else ''}"
        )

    events, total = run_events(connection, run.study_id, run.index)
    shown = f", the first {len(events)} shown" if total > len(events) else ""
    print(f"\nevents ({total}{shown})")
    for event in events:
        print(f"  {event.event_type or '-'}: {_cut(event.text or '', 100)}")
    if run.trace_refs:
        print("\ntraces")
        for ref in run.trace_refs:
            print(f"  {ref}")


def _indented(text: str) -> str:
    return "\n".join(f"  {line}" for line in text.splitlines())
