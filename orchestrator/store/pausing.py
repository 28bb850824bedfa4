"""A study's paused dispatch: budgets spent, a tripped failure breaker (issue 12, items 3-4).

A pause is one ``study_pauses`` row. While it exists no run of the study is claimed (the
claim statements of :mod:`.attempts` test for it, one primary-key probe per claim): a
delivery of its runs is acknowledged without executing anything, and the runs stay
``queued`` or ``planned``. Runs already executing finish and are recorded. Resuming
(:func:`unpause`) deletes the row; the caller then publishes the study's queued runs again
(their messages were acknowledged while it was paused).

Who trips it. The worker, right after it recorded results of a study that declares a budget
or a breaker (``workers.budget_gate``), and the embedded ``studyq run`` the same way:

* budget: :func:`spent` (one aggregate over the study's finished runs) against the limits
  (``studies.budget_*`` set by ``studyq budget``, else the study file's
  ``execution.max_cost_usd`` / ``max_tokens``);
* breaker: after a failed result, the latest ``window`` finished runs (the
  ``runs (study_id, ended_at)`` index, v0005), ended since the last resume; more than
  ``max_failure_rate`` of them failed trips it.

Each function takes a :class:`~sqlalchemy.engine.Connection` inside the caller's
transaction. Inserting a pause is idempotent (two workers tripping it at once keep the
first).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from orchestrator.contracts.extensions import ExecutionPolicy
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store.models import SPEC_COLUMNS, PauseRow, RunRow, StudyRow
from orchestrator.store.predicates import where_status
from orchestrator.store.records import publishable
from orchestrator.store.sqltypes import db_now

__all__ = [
    "BREAKER",
    "BUDGET",
    "BudgetLimits",
    "Pause",
    "Spent",
    "breaker_window",
    "budget_overrides",
    "check_study",
    "exceeded",
    "limits_of",
    "mark_resumed",
    "pause",
    "pause_of",
    "queued_to_publish",
    "set_budget_overrides",
    "spent",
    "unpause",
    "watches",
]

BUDGET = "budget"
BREAKER = "breaker"

_RESULT = RunRow.__table__.c
_FINISHED = (RunStatus.SUCCESS.value, RunStatus.FAILED.value)
_EPSILON = 1e-9
"""Cost sums are floats: 100 x 0.01 may add up to 0.99999999; that has spent 1.00."""


@dataclass(frozen=True, slots=True)
class Pause:
    """A paused study: why, since when, and what tripped it."""

    study_id: str
    reason: str
    paused_at: datetime
    detail: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Spent:
    """What a study's finished runs (success and failed) recorded so far."""

    cost_usd: float
    tokens: int
    runs: int
    first_started_at: datetime | None
    last_ended_at: datetime | None

    @property
    def burn_usd_per_h(self) -> float | None:
        """Cost per hour from the first finished run's start to the last one's end."""
        if self.first_started_at is None or self.last_ended_at is None:
            return None
        hours = (self.last_ended_at - self.first_started_at).total_seconds() / 3600.0
        return self.cost_usd / hours if hours > 0 else None


@dataclass(frozen=True, slots=True)
class BudgetLimits:
    """A study's effective budget: ``studyq budget``'s values over the study file's."""

    max_cost_usd: float | None
    max_tokens: int | None

    @property
    def declared(self) -> bool:
        return self.max_cost_usd is not None or self.max_tokens is not None


def exceeded(spent: Spent, limits: BudgetLimits) -> list[str]:
    """The limits ``spent`` reached (``max_cost_usd``, ``max_tokens``); empty: none."""
    out = []
    if limits.max_cost_usd is not None and spent.cost_usd >= limits.max_cost_usd - _EPSILON:
        out.append("max_cost_usd")
    if limits.max_tokens is not None and spent.tokens >= limits.max_tokens:
        out.append("max_tokens")
    return out


def spent(connection: Connection, study_id: str) -> Spent:
    """Sum of ``cost_usd`` and tokens (input + output) of the study's finished runs."""
    row = connection.execute(
        select(
            func.coalesce(func.sum(_RESULT.cost_usd), 0.0),
            func.coalesce(func.sum(_RESULT.input_tokens), 0),
            func.coalesce(func.sum(_RESULT.output_tokens), 0),
            func.count(),
            func.min(RunRow.started_at),
            func.max(RunRow.ended_at),
        ).where(RunRow.study_id == study_id, RunRow.status.in_(_FINISHED))
    ).one()
    cost, input_tokens, output_tokens, runs, first, last = row
    return Spent(float(cost), int(input_tokens) + int(output_tokens), int(runs), first, last)


def budget_overrides(connection: Connection, study_id: str) -> tuple[float | None, int | None]:
    """``(budget_max_cost_usd, budget_max_tokens)`` of the study (None: not overridden)."""
    row = connection.execute(
        select(StudyRow.budget_max_cost_usd, StudyRow.budget_max_tokens).where(
            StudyRow.study_id == study_id
        )
    ).one_or_none()
    if row is None:
        return None, None
    return row[0], row[1]


def set_budget_overrides(
    connection: Connection, study_id: str, *, max_cost_usd: float | None, max_tokens: int | None
) -> None:
    """Record ``studyq budget``'s limits (a None argument leaves that limit as it is)."""
    values: dict[str, Any] = {}
    if max_cost_usd is not None:
        values["budget_max_cost_usd"] = float(max_cost_usd)
    if max_tokens is not None:
        values["budget_max_tokens"] = int(max_tokens)
    if values:
        connection.execute(update(StudyRow).where(StudyRow.study_id == study_id).values(values))


def pause_of(connection: Connection, study_id: str) -> Pause | None:
    row = connection.execute(
        select(PauseRow.reason, PauseRow.paused_at, PauseRow.detail).where(
            PauseRow.study_id == study_id
        )
    ).one_or_none()
    if row is None:
        return None
    return Pause(study_id, row.reason, row.paused_at, dict(row.detail or {}))


def pause(connection: Connection, study_id: str, reason: str, detail: dict[str, Any]) -> bool:
    """Pause the study's dispatch unless it already is; returns whether this call paused it."""
    values = {"study_id": study_id, "reason": reason, "paused_at": db_now(), "detail": detail}
    if connection.dialect.name == "postgresql":
        statement: Any = postgresql.insert(PauseRow).values(values).on_conflict_do_nothing()
    elif connection.dialect.name == "sqlite":
        statement = sqlite.insert(PauseRow).values(values).on_conflict_do_nothing()
    else:  # pragma: no cover - the store supports these two
        if pause_of(connection, study_id) is not None:
            return False
        statement = insert(PauseRow).values(values)
    # RETURNING rather than rowcount: psycopg reports -1 for an INSERT ... ON CONFLICT here.
    return connection.execute(statement.returning(PauseRow.study_id)).first() is not None


def unpause(connection: Connection, study_id: str) -> Pause | None:
    """Delete the study's pause; returns the pause it was (None: it was not paused)."""
    current = pause_of(connection, study_id)
    if current is not None:
        connection.execute(delete(PauseRow).where(PauseRow.study_id == study_id))
    return current


def mark_resumed(connection: Connection, study_id: str) -> None:
    """Start the breaker's window afresh: it looks only at runs that end from now on."""
    connection.execute(
        update(StudyRow).where(StudyRow.study_id == study_id).values(resumed_at=db_now())
    )


def queued_to_publish(connection: Connection, study_id: str) -> list[tuple[RunSpec, int]]:
    """Every ``queued`` run of the study, ``(spec, attempt)`` in plan order, their
    ``queued_at`` refreshed (so reconcile does not count them stale at once): what a resume
    publishes again, since deliveries of a paused study were acknowledged unexecuted."""
    rows = connection.execute(
        update(RunRow)
        .where(RunRow.study_id == study_id, where_status(RunStatus.QUEUED))
        .values(queued_at=db_now())
        .returning(*SPEC_COLUMNS, RunRow.attempt)
    ).all()
    return publishable(study_id, rows)


@dataclass(frozen=True, slots=True)
class BreakerWindow:
    """The latest finished runs of a study, as the breaker sees them."""

    finished: int
    failed: int
    top_error_type: str | None
    top_error_message: str | None
    top_error_count: int


def breaker_window(connection: Connection, study_id: str, window: int) -> BreakerWindow:
    """The latest ``window`` finished runs of the study that ended since its last resume:
    how many failed, and their most frequent error class with its latest message."""
    resumed_at = connection.execute(
        select(StudyRow.resumed_at).where(StudyRow.study_id == study_id)
    ).scalar_one_or_none()
    query = select(RunRow.status, _RESULT.error_type, _RESULT.error_message).where(
        RunRow.study_id == study_id,
        RunRow.ended_at.is_not(None),
        RunRow.status.in_(_FINISHED),
    )
    if resumed_at is not None:
        query = query.where(RunRow.ended_at > resumed_at)
    rows = connection.execute(query.order_by(RunRow.ended_at.desc()).limit(window)).all()
    failures = [row for row in rows if row.status == RunStatus.FAILED.value]
    classes = Counter(row.error_type or "error" for row in failures)
    top_type, top_count = classes.most_common(1)[0] if classes else (None, 0)
    message = next(
        (row.error_message for row in failures if (row.error_type or "error") == top_type), None
    )
    return BreakerWindow(len(rows), len(failures), top_type, message, top_count)


def limits_of(connection: Connection, study_id: str, execution: ExecutionPolicy) -> BudgetLimits:
    """The study's effective budget: ``studyq budget``'s values, else the study file's."""
    cost, tokens = budget_overrides(connection, study_id)
    return BudgetLimits(
        execution.max_cost_usd if cost is None else cost,
        execution.max_tokens if tokens is None else tokens,
    )


def watches(execution: ExecutionPolicy) -> bool:
    """Whether results of a study with this policy are checked at all (a budget or a
    breaker declared): the check costs nothing for any other study."""
    return (
        execution.max_cost_usd is not None
        or execution.max_tokens is not None
        or execution.breaker is not None
    )


def check_study(
    connection: Connection, study_id: str, execution: ExecutionPolicy, *, failed: bool
) -> Pause | None:
    """After results of the study were recorded: pause it when its budget is spent, or
    (``failed``: one of them failed) when its breaker trips. Returns the pause this call
    made, None when it made none (also when the study was paused already).

    A budget raised with ``studyq budget`` counts even when the study file declares none.
    """
    if pause_of(connection, study_id) is not None:
        return None
    limits = limits_of(connection, study_id, execution)
    if limits.declared:
        used = spent(connection, study_id)
        reached = exceeded(used, limits)
        if reached:
            detail = {
                "reached": reached,
                "spent_usd": used.cost_usd,
                "spent_tokens": used.tokens,
                "max_cost_usd": limits.max_cost_usd,
                "max_tokens": limits.max_tokens,
                "runs": used.runs,
            }
            if pause(connection, study_id, BUDGET, detail):
                return pause_of(connection, study_id)
            return None
    breaker = execution.breaker
    if breaker is None or not failed:
        return None
    seen = breaker_window(connection, study_id, breaker.window)
    if seen.finished < breaker.window or seen.failed <= breaker.max_failure_rate * seen.finished:
        return None
    detail = {
        "failed": seen.failed,
        "window": seen.finished,
        "max_failure_rate": breaker.max_failure_rate,
        "error_type": seen.top_error_type,
        "error_message": seen.top_error_message,
        "error_count": seen.top_error_count,
    }
    if pause(connection, study_id, BREAKER, detail):
        return pause_of(connection, study_id)
    return None
