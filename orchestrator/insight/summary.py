"""The short answer ``studyq run`` and ``studyq wait`` end with: the primary outcome by
condition (n, mean, 95 % CI), the best condition marked, and the commands that show more.

The best condition is the one with the lowest mean when the study's hypotheses say lower is
better for its primary outcome (``direction: less``), the highest when they say greater;
when the study declares no direction none is marked, and the table says so.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TextIO

from orchestrator.insight.aggregates import (
    GroupSummary,
    OutcomeRef,
    group_summaries,
    primary_outcome,
)
from orchestrator.insight.plots import format_number
from orchestrator.store.queries import find_study

__all__ = ["best_group", "best_note", "outcome_table", "overlapping", "print_outcome_table"]

MAX_ROWS = 12
"""Conditions the table shows; the rest are counted on a ``... N more`` line."""


def best_group(groups: Sequence[GroupSummary], outcome: OutcomeRef) -> GroupSummary | None:
    """The group with the best mean by the outcome's declared direction (None when the
    study declares none or no group has a value)."""
    scored = [g for g in groups if g.outcome.mean is not None]
    if outcome.lower_is_better is None or not scored:
        return None
    pick = min if outcome.lower_is_better else max
    return pick(scored, key=lambda g: g.outcome.mean or 0.0)


def overlapping(groups: Sequence[GroupSummary], best: GroupSummary) -> int:
    """How many other groups' 95 % intervals overlap ``best``'s (a difference the data do not
    separate at that level; 0 when ``best`` has no interval)."""
    low, high = best.outcome.ci_low, best.outcome.ci_high
    if low is None or high is None:
        return 0
    return sum(
        1
        for g in groups
        if g.key != best.key
        and g.outcome.ci_low is not None
        and g.outcome.ci_high is not None
        and g.outcome.ci_low <= high
        and low <= g.outcome.ci_high
    )


def best_note(groups: Sequence[GroupSummary], best: GroupSummary) -> str:
    """``its 95 % CI overlaps N other conditions'`` or ``its 95 % CI overlaps no other``."""
    n = overlapping(groups, best)
    if best.outcome.ci_low is None:
        return "no interval (fewer than 2 values)"
    if not n:
        return "its 95 % CI overlaps no other condition's"
    return f"its 95 % CI overlaps {n} other condition{'s' if n > 1 else ''}'"


def _ci(group: GroupSummary) -> str:
    s = group.outcome
    if s.ci_low is None or s.ci_high is None:
        return "-"
    return f"[{format_number(s.ci_low)}, {format_number(s.ci_high)}]"


def outcome_table(
    groups: Sequence[GroupSummary], outcome: OutcomeRef, *, max_rows: int = MAX_ROWS
) -> list[str]:
    """The table's lines: a heading naming the outcome and its direction, one row per
    condition (``*`` marks the best), and ``... N more`` past ``max_rows``."""
    best = best_group(groups, outcome)
    lines = [
        f"{outcome.name} by condition ({outcome.direction}; successful runs, mean with 95 % CI):"
    ]
    shown = list(groups[:max_rows])
    width = min(48, max([len("condition"), *(len(g.label) for g in shown)]))
    lines.append(f"    {'condition':<{width}} {'n':>7} {'mean':>10}  95 % CI")
    for group in shown:
        mark = "*" if best is not None and group.key == best.key else " "
        label = group.label if len(group.label) <= width else group.label[: width - 1] + "…"
        lines.append(
            f"  {mark} {label:<{width}} {group.outcome.n:>7,} "
            f"{format_number(group.outcome.mean):>10}  {_ci(group)}"
        )
    if len(groups) > max_rows:
        lines.append(f"    ... {len(groups) - max_rows} more conditions (the report lists all)")
    if best is not None:
        way = "lowest" if outcome.lower_is_better else "highest"
        lines.append(
            f"  * best: {best.label} ({way} mean; {outcome.why}); {best_note(groups, best)}"
        )
    elif outcome.lower_is_better is not None:
        lines.append("  no condition marked best: no successful run has a value yet")
    else:
        lines.append(f"  no condition marked best: {outcome.why}")
    return lines


def _has_dashboard() -> bool:
    from orchestrator.cli import build_parser

    parser = build_parser()
    commands = next(
        (a.choices for a in parser._actions if getattr(a, "choices", None) is not None), None
    )
    return isinstance(commands, dict) and "dashboard" in commands


def print_outcome_table(study_id: str, *, db: str | None = None, out: TextIO | None = None) -> None:
    """Print :func:`outcome_table` for the study in the store at ``db`` (default: the
    settings' URL), then the ``studyq report`` command (and ``studyq dashboard`` once that
    command exists). Prints nothing when the store does not hold the study."""
    from orchestrator.contracts.settings import load_settings
    from orchestrator.store import ResultStore, mask_url
    from orchestrator.store.engine import transaction

    stream = out or sys.stdout
    with (
        ResultStore.open(db or load_settings().database_url) as store,
        transaction(store.engine, readonly=True) as connection,
    ):
        info = find_study(connection, study_id)
        if info is None:
            return
        outcome = primary_outcome(info.definition)
        groups = group_summaries(
            connection,
            study_id,
            "condition",
            outcome.metric,
            best_low=outcome.lower_is_better is not False,
        )
        where = f" --db {mask_url(db)}" if db else ""
    for line in outcome_table(groups, outcome):
        print(line, file=stream)
    print(f"report:    studyq report {study_id}{where} --out report.html", file=stream)
    if _has_dashboard():
        print(f"dashboard: studyq dashboard {study_id}{where}", file=stream)
