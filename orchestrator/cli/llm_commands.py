"""Commands of LLM-scale sweeps: ``studyq budget`` and ``studyq resume`` (issue 12).

``studyq plan STUDY --forecast`` (the cost and duration estimate) is an option of ``plan``
(:mod:`orchestrator.cli.study_commands`), printed by :func:`print_forecast` here.
"""

from __future__ import annotations

import argparse
from typing import Any

from orchestrator.cli import EXIT_OK, add_command, positive_int

__all__ = ["print_forecast", "register"]

_DB_HELP = "result store URL (default: $STUDYQ_DATABASE_URL)"
_BROKER_HELP = (
    "Celery broker URL (default: $STUDYQ_BROKER_URL); the study's waiting runs are published "
    "again on it. Without one (an embedded study) the next `studyq run` continues it"
)


def _positive_amount(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an amount in USD, got {text!r}") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected an amount above 0, got {text}")
    return value


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "budget",
        help="Set a study's budget (over the study file's execution.max_cost_usd / "
        "max_tokens). A study its budget stopped continues, without resubmitting, once no "
        "limit is spent; a limit must be above what the study already spent.",
        example="studyq budget my-study --max-cost-usd 40 --db postgresql://studyq@db/studyq",
        handler=_budget,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument(
        "--max-cost-usd", type=_positive_amount, default=None, metavar="N", help="USD limit"
    )
    parser.add_argument(
        "--max-tokens",
        type=positive_int,
        default=None,
        metavar="N",
        help="token limit (input + output)",
    )
    parser.add_argument("--db", default=None, help=_DB_HELP)
    parser.add_argument("--broker", default=None, help=_BROKER_HELP)

    parser = add_command(
        subparsers,
        "resume",
        help="Continue a study its failure breaker paused: its waiting runs are published "
        "again and the breaker looks only at runs that end from now on. (A study its budget "
        "stopped continues with `studyq budget`.)",
        example="studyq resume my-study --db postgresql://studyq@db/studyq",
        handler=_resume,
    )
    parser.add_argument("study_id", help="the study's study_id")
    parser.add_argument("--db", default=None, help=_DB_HELP)
    parser.add_argument("--broker", default=None, help=_BROKER_HELP)


def _print_report(report: Any, verb: str) -> None:
    limits, used = report.limits, report.spent
    parts = [f"spent ${used.cost_usd:.2f}"]
    if limits.max_cost_usd is not None:
        parts[-1] += f" of ${limits.max_cost_usd:.2f}"
    if limits.max_tokens is not None:
        parts.append(f"{used.tokens:,} of {limits.max_tokens:,} tokens")
    print(f"{report.study_id}: {', '.join(parts)}")
    if report.still_paused is not None:
        from orchestrator.store.budget_gate import describe

        print(f"{report.study_id}: still {describe(report.still_paused)}")
        return
    if report.resumed is None:
        return
    print(f"{report.study_id}: {verb} (was paused: {report.resumed.reason})")
    if report.published is None:
        print(f"{report.study_id}: no broker; `studyq run` continues an embedded study")
    else:
        print(f"{report.study_id}: {report.published:,} waiting runs published")


def _budget(args: argparse.Namespace) -> int:
    from orchestrator.budget import set_budget

    report = set_budget(
        args.study_id,
        max_cost_usd=args.max_cost_usd,
        max_tokens=args.max_tokens,
        db=args.db,
        broker=args.broker,
    )
    _print_report(report, "continues")
    return EXIT_OK


def _resume(args: argparse.Namespace) -> int:
    from orchestrator.budget import resume

    report = resume(args.study_id, db=args.db, broker=args.broker)
    if report.resumed is None and report.still_paused is None:
        print(f"{report.study_id}: was not paused")
    _print_report(report, "resumed")
    return EXIT_OK


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def print_forecast(forecast: Any, *, slots: int) -> None:
    """The ``plan --forecast`` lines: cost and duration (median, 90th percentile) and what
    they rest on."""
    print(f"forecast {forecast.study_id}: {forecast.planned:,} runs")
    if forecast.cost_usd is None:
        print("  cost       unknown (no earlier run of its agents recorded cost_usd)")
    else:
        budget = forecast.max_cost_usd
        note = f"; execution.max_cost_usd {budget:.2f}" if budget is not None else ""
        print(
            f"  cost       ${forecast.cost_usd.median:,.2f} median, "
            f"${forecast.cost_usd.p90:,.2f} at the 90th percentile{note}"
        )
    wall = forecast.wall_seconds(slots)
    if wall is None:
        print("  duration   unknown (no earlier successful run of its agents)")
    else:
        print(
            f"  duration   {_duration(wall.median)} median, {_duration(wall.p90)} at the 90th "
            f"percentile on {slots} worker slot{'s' if slots != 1 else ''}"
        )
    print(
        f"  rests on   {forecast.history_runs:,} earlier successful runs; "
        f"{forecast.covered:,} of {forecast.planned:,} planned runs have history for their "
        f"agent and problem, {forecast.uncovered:,} none for their agent (left out)"
    )
