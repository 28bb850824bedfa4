"""Budgets and the failure breaker, coordinator side (issue 12, items 3 and 4).

What stops a study (the store's side is :mod:`orchestrator.store.pausing`): a worker that
records results of a study with ``execution.max_cost_usd`` / ``max_tokens`` / ``breaker``
checks, right after the write (:mod:`orchestrator.store.budget_gate`), whether the budget is
spent or the breaker trips, and if so pauses the study: no run of it is claimed any more,
deliveries of its runs are acknowledged unexecuted, and its other runs stay ``queued`` or
``planned``. Runs in flight finish and are recorded.

What continues it, from here:

* :func:`set_budget` (``studyq budget STUDY --max-cost-usd 40``) records a higher limit; a
  study the budget stopped continues when no limit is spent any more.
* :func:`resume` (``studyq resume STUDY``) clears any pause, and starts the breaker's window
  afresh (it looks only at runs that end from then on). A budget pause whose budget is still
  spent is refused: raise the budget instead.

Either publishes the study's ``queued`` runs again (their deliveries were acknowledged while
it was paused) and its ``planned`` ones, through the study's broker; without a broker (an
embedded study) the next ``studyq run`` continues it. Nothing runs twice: a publication of a
run that is running or finished claims nothing.

:func:`forecast` (``studyq plan STUDY --forecast``) estimates what a study will cost and how
long its runs take from earlier successful runs of the same agent and problem in the store.
"""

from __future__ import annotations

import contextlib
import math
import statistics
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import Connection, select

from orchestrator.contracts.errors import StudyError
from orchestrator.contracts.extensions import BreakerPolicy, ExecutionPolicy
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.settings import Settings, load_settings
from orchestrator.executors.transport import Publication, Transport, open_transport
from orchestrator.reconcile import enqueue_planned
from orchestrator.store import ResultStore
from orchestrator.store.budget_gate import describe
from orchestrator.store.engine import transaction
from orchestrator.store.lookup import open_existing, require_study
from orchestrator.store.models import RunRow
from orchestrator.store.pausing import (
    BUDGET,
    BudgetLimits,
    Pause,
    Spent,
    exceeded,
    limits_of,
    mark_resumed,
    pause_of,
    queued_to_publish,
    set_budget_overrides,
    spent,
    unpause,
)
from orchestrator.store.records import StudyInfo
from orchestrator.study.designs import condition_label
from orchestrator.study.model import Study
from orchestrator.study.plan import prepare

__all__ = [
    "BudgetReport",
    "BudgetState",
    "Estimate",
    "Forecast",
    "budget_state",
    "forecast",
    "resume",
    "set_budget",
    "state_of",
    "state_on",
]


@dataclass(frozen=True, slots=True)
class BudgetState:
    """A study's budget, spending and pause, for ``studyq status`` and a dashboard."""

    study_id: str
    limits: BudgetLimits
    spent: Spent
    pause: Pause | None
    breaker: BreakerPolicy | None

    @property
    def line(self) -> str | None:
        """The status line: why dispatch is stopped (with spent / limit / burn rate for a
        budget), or the budget so far when it runs; None without a budget or a pause."""
        burn = self.spent.burn_usd_per_h
        burn_text = f", burn ${burn:.2f}/h" if burn is not None else ""
        if self.pause is not None and self.pause.reason == BUDGET:
            return f"stopped: budget ({self._spent_text()}{burn_text})"
        if self.pause is not None:
            return describe(self.pause).split("; `studyq", 1)[0]
        if self.limits.declared:
            return f"budget: {self._spent_text()}{burn_text}"
        return None

    def _spent_text(self) -> str:
        parts = []
        if self.limits.max_cost_usd is not None:
            parts.append(f"spent ${self.spent.cost_usd:.2f} of ${self.limits.max_cost_usd:.2f}")
        if self.limits.max_tokens is not None:
            parts.append(f"{self.spent.tokens:,} of {self.limits.max_tokens:,} tokens")
        return ", ".join(parts)

    @property
    def fix(self) -> str | None:
        """What continues a paused study (one command), or None."""
        if self.pause is None:
            return None
        if self.pause.reason == BUDGET:
            return f"studyq budget {self.study_id} --max-cost-usd N (or --max-tokens N)"
        return f"studyq resume {self.study_id}"


def _execution(info: StudyInfo) -> ExecutionPolicy:
    try:
        return ExecutionPolicy.model_validate(info.definition.get("execution") or {})
    except ValueError:
        return ExecutionPolicy()


def state_of(store: ResultStore, info: StudyInfo) -> BudgetState:
    """:class:`BudgetState` of a registered study on an open store."""
    with transaction(store.engine, readonly=True) as connection:
        return state_on(connection, info)


def state_on(connection: Connection, info: StudyInfo) -> BudgetState:
    """:class:`BudgetState` of a registered study, read on ``connection``: the effective
    budget (``studyq budget``'s over the study file's), what its finished runs spent, and its
    pause (budget, breaker)."""
    execution = _execution(info)
    limits = limits_of(connection, info.study_id, execution)
    pause = pause_of(connection, info.study_id)
    # The aggregate only for a study with a budget (or a pause): status lists every study.
    used = (
        spent(connection, info.study_id)
        if limits.declared or pause is not None
        else Spent(0.0, 0, 0, None, None)
    )
    return BudgetState(info.study_id, limits, used, pause, execution.breaker)


def budget_state(
    study_id: str, *, db: str | None = None, settings: Settings | None = None
) -> BudgetState:
    """:class:`BudgetState` of ``study_id`` in the store at ``db``."""
    settings = settings or load_settings()
    with open_existing(db or settings.database_url, command="budget") as store:
        return state_of(store, require_study(store, study_id, command="budget"))


@dataclass(slots=True)
class BudgetReport:
    """What :func:`set_budget` or :func:`resume` did."""

    study_id: str
    limits: BudgetLimits
    spent: Spent
    resumed: Pause | None = None
    """The pause this call cleared (None: the study was not paused, or stays paused)."""
    still_paused: Pause | None = None
    """The pause left in place (a breaker pause is not cleared by a budget)."""
    published: int | None = None
    """Runs published again (only when this call cleared a pause); None when it cleared none
    or no broker is configured (``studyq run`` continues an embedded study)."""


def _check_limits(
    used: Spent, max_cost_usd: float | None, max_tokens: int | None, study_id: str
) -> None:
    """Raise StudyError (exit 2) for a limit that is not a positive number above what the
    study already spent."""
    if max_cost_usd is None and max_tokens is None:
        raise StudyError(
            f"studyq budget {study_id}: nothing to set. Fix: pass --max-cost-usd N and/or "
            "--max-tokens N."
        )
    if max_cost_usd is not None and not (math.isfinite(max_cost_usd) and max_cost_usd > 0):
        raise StudyError(
            f"--max-cost-usd: {max_cost_usd} is not a positive amount. Fix: pass a number "
            f"above the ${used.cost_usd:.2f} already spent."
        )
    if max_cost_usd is not None and max_cost_usd <= used.cost_usd:
        raise StudyError(
            f"--max-cost-usd: {max_cost_usd:g} is not above the ${used.cost_usd:.2f} study "
            f"'{study_id}' has already spent. Fix: pass more than {used.cost_usd:.2f}."
        )
    if max_tokens is not None and max_tokens <= 0:
        raise StudyError(
            f"--max-tokens: {max_tokens} is not a positive number of tokens. Fix: pass a "
            f"number above the {used.tokens} tokens already spent."
        )
    if max_tokens is not None and max_tokens <= used.tokens:
        raise StudyError(
            f"--max-tokens: {max_tokens} is not above the {used.tokens} tokens study "
            f"'{study_id}' has already spent. Fix: pass more than {used.tokens}."
        )


def set_budget(
    study_id: str,
    *,
    max_cost_usd: float | None = None,
    max_tokens: int | None = None,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
) -> BudgetReport:
    """Set the study's budget (over the study file's), and continue it when the budget had
    stopped it and no limit is spent any more; its waiting runs are published again.

    A limit not passed stays as it is. Nothing is written when a limit is not above what the
    study already spent.

    Raises:
        StudyError: the study is unknown, nothing is passed, or a limit is not above what is
            spent (exit 2, nothing written).
        BrokerUnavailableError: the broker is unreachable (nothing written).
    """

    def change(connection: Any, info: StudyInfo, used: Spent) -> tuple[BudgetLimits, Pause | None]:
        _check_limits(used, max_cost_usd, max_tokens, study_id)
        set_budget_overrides(connection, study_id, max_cost_usd=max_cost_usd, max_tokens=max_tokens)
        limits = limits_of(connection, study_id, _execution(info))
        current = pause_of(connection, study_id)
        if current is not None and current.reason == BUDGET and not exceeded(used, limits):
            unpause(connection, study_id)
            return limits, current
        return limits, None

    return _continue(study_id, change, db=db, broker=broker, settings=settings, command="budget")


def resume(
    study_id: str,
    *,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
) -> BudgetReport:
    """Continue a paused study (a breaker, or a budget no longer spent): its waiting runs
    are published again; the breaker looks only at runs that end from now on.

    Raises:
        StudyError: the study is unknown, or its budget is still spent (exit 2, nothing
            written: raise it with :func:`set_budget`).
        BrokerUnavailableError: the broker is unreachable (nothing written).
    """

    def change(connection: Any, info: StudyInfo, used: Spent) -> tuple[BudgetLimits, Pause | None]:
        limits = limits_of(connection, study_id, _execution(info))
        reached = exceeded(used, limits)
        if reached:
            field_name = reached[0]
            flag = "--max-cost-usd" if field_name == "max_cost_usd" else "--max-tokens"
            raise StudyError(
                f"studyq resume {study_id}: execution.{field_name} is spent "
                f"(${used.cost_usd:.2f}, {used.tokens} tokens). Fix: raise it with "
                f"`studyq budget {study_id} {flag} N`."
            )
        current = unpause(connection, study_id)
        mark_resumed(connection, study_id)
        return limits, current

    return _continue(study_id, change, db=db, broker=broker, settings=settings, command="resume")


_Change = Callable[[Any, StudyInfo, Spent], tuple[BudgetLimits, Pause | None]]
"""What a command changes, inside its transaction: returns the limits and the pause cleared."""


def _continue(
    study_id: str,
    change: _Change,
    *,
    db: str | None,
    broker: str | None,
    settings: Settings | None,
    command: str,
) -> BudgetReport:
    settings = settings or load_settings()
    broker_url = broker or settings.broker_url or None
    with contextlib.ExitStack() as stack:
        store = stack.enter_context(open_existing(db or settings.database_url, command=command))
        info = require_study(store, study_id, command=command)
        # The broker before any write (as submit does): an unreachable broker changes nothing.
        transport = (
            stack.enter_context(open_transport(settings, broker_url)) if broker_url else None
        )
        with transaction(store.engine) as connection:
            used = spent(connection, study_id)
            limits, resumed = change(connection, info, used)
            still = pause_of(connection, study_id)
        report = BudgetReport(study_id, limits, used, resumed, still)
        if transport is not None and still is None and resumed is not None:
            report.published = _publish_waiting(store, transport, info, settings)
        return report


def _publish_waiting(
    store: ResultStore, transport: Transport, info: StudyInfo, settings: Settings
) -> int:
    """Publish the study's queued runs again, then its planned ones."""
    study_id = info.study_id
    execution = _execution(info)
    labels = {c.condition_id: condition_label(c) for c in store.iter_conditions(study_id)}
    with transaction(store.engine) as connection:
        queued = queued_to_publish(connection, study_id)
    published = 0
    batch = settings.publish_batch
    for start in range(0, len(queued), batch):
        published += transport.publish(
            [
                Publication(spec, attempt, labels.get(spec.condition_id, ""))
                for spec, attempt in queued[start : start + batch]
            ],
            queue=execution.queue,
            timeout_s=execution.timeout_s,
        )
    published += enqueue_planned(
        store,
        transport,
        study_id,
        labels=labels,
        queue=execution.queue,
        timeout_s=execution.timeout_s,
        batch=batch,
    )
    return published


# -- forecast ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Estimate:
    """A study total: the sum over its runs of each run's median / 90th percentile."""

    median: float
    p90: float


@dataclass(slots=True)
class Forecast:
    """What a study is likely to cost and take, from earlier successful runs in the store."""

    study_id: str
    planned: int
    cost_usd: Estimate | None
    """None: no earlier run of its agents and problems recorded a cost."""
    run_seconds: Estimate | None
    """The runs' summed execution time (divide by the worker slots for wall time)."""
    history_runs: int
    """How many earlier successful runs the estimate rests on."""
    covered: int
    """Planned runs whose agent and problem have history (the others use the agent's)."""
    uncovered: int
    """Planned runs with no history for their agent at all (left out of the totals)."""
    max_cost_usd: float | None = None
    by_pair: dict[tuple[str, str], int] = field(default_factory=dict)

    def wall_seconds(self, slots: int) -> Estimate | None:
        if self.run_seconds is None:
            return None
        return Estimate(self.run_seconds.median / slots, self.run_seconds.p90 / slots)


def _p90(values: Sequence[float]) -> float:
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.9 * len(ordered)) - 1)]


def _seconds(row: Any) -> float | None:
    if row.latency_s is not None:
        return float(row.latency_s)
    if row.started_at is not None and row.ended_at is not None:
        return float((row.ended_at - row.started_at).total_seconds())
    return None


def forecast(
    study: Study | str | Path, *, db: str | None = None, settings: Settings | None = None
) -> Forecast:
    """Estimate ``study``'s cost and run time from the successful runs of the same agent and
    problem (any study) in the store at ``db``: per planned run the median and the 90th
    percentile of its pair's history (its agent's, over all problems, when the pair has none),
    summed over the runs.

    Raises:
        StudyError: the study file is invalid, or the store does not exist.
    """
    settings = settings or load_settings()
    prepared = prepare(study, runnable=False, max_bytes=settings.max_study_bytes)
    pairs = Counter((spec.agent_key, spec.problem_key) for spec in prepared.run_specs())
    agents = sorted({agent for agent, _ in pairs})
    cost_by: dict[tuple[str, str], list[float]] = defaultdict(list)
    time_by: dict[tuple[str, str], list[float]] = defaultdict(list)
    history = 0
    c = RunRow.__table__.c
    store = open_existing(db or settings.database_url, command="plan --forecast")
    with store, transaction(store.engine, readonly=True) as connection:
        rows = connection.execute(
            select(
                RunRow.agent_key,
                RunRow.problem_key,
                c.cost_usd,
                c.latency_s,
                RunRow.started_at,
                RunRow.ended_at,
            ).where(RunRow.status == RunStatus.SUCCESS.value, RunRow.agent_key.in_(agents))
        )
        for row in rows:
            history += 1
            for key in ((row.agent_key, row.problem_key), (row.agent_key, "*")):
                if row.cost_usd is not None:
                    cost_by[key].append(float(row.cost_usd))
                seconds = _seconds(row)
                if seconds is not None:
                    time_by[key].append(seconds)
    covered = uncovered = 0
    totals: dict[str, list[float]] = {"cost": [0.0, 0.0], "time": [0.0, 0.0]}
    seen = {"cost": False, "time": False}
    for (agent, problem), count in pairs.items():
        if (agent, problem) in time_by or (agent, problem) in cost_by:
            covered += count
        elif (agent, "*") not in time_by and (agent, "*") not in cost_by:
            uncovered += count
            continue
        for name, table in (("cost", cost_by), ("time", time_by)):
            values = table.get((agent, problem)) or table.get((agent, "*"))
            if values:
                seen[name] = True
                totals[name][0] += count * statistics.median(values)
                totals[name][1] += count * _p90(values)
    execution = prepared.study.execution
    return Forecast(
        prepared.study.study_id,
        prepared.summary.planned,
        Estimate(*totals["cost"]) if seen["cost"] else None,
        Estimate(*totals["time"]) if seen["time"] else None,
        history,
        covered,
        uncovered,
        execution.max_cost_usd,
        dict(pairs),
    )
