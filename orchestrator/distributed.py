"""Distributed sweeps, coordinator side: submit, wait (with reconcile), resubmit, cancel, status.

The coordinator never runs a run and never holds results: it registers the plan, marks runs
queued in the store *before* publishing them (so a message always names a run a worker may
claim, and a crash between the two leaves queued rows that reconcile re-publishes), publishes
through the study's broker (:mod:`orchestrator.executors.transport`) in batches over one
connection, and then watches the store (:mod:`orchestrator.reconcile`). Every
state change is a guarded transition in the store, so two coordinators on one study never
publish a run twice: only the one whose ``planned -> queued`` update won publishes it.

A queued run nobody claimed for ``queued_timeout_s`` is published again only when the broker
holds fewer messages for the study's queue than the study has queued runs (see
:func:`orchestrator.reconcile.stale_queued_timeout`): a run waiting behind a long backlog
has not lost its message.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from orchestrator.contracts.broker import supported_broker_url
from orchestrator.contracts.errors import StoreUnavailableError, StudyError
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings, load_settings
from orchestrator.embedded import register
from orchestrator.executors.transport import open_transport
from orchestrator.progress import Progress
from orchestrator.reconcile import Reconciler, done_count, enqueue_planned
from orchestrator.store import ResultStore
from orchestrator.store.budget_gate import describe
from orchestrator.store.engine import transaction
from orchestrator.store.lookup import open_existing, require_study
from orchestrator.store.recovery import CancelReport, cancel_study
from orchestrator.study.designs import condition_label
from orchestrator.study.model import Study
from orchestrator.study.plan import PreparedStudy, prepare

__all__ = [
    "CANCEL_RETRY_S",
    "CancelReport",
    "StudyStatus",
    "SubmitReport",
    "WaitReport",
    "cancel",
    "resubmit",
    "study_status",
    "submit_study",
    "wait_study",
]


def _broker(settings: Settings, broker: str | None) -> str:
    url = broker or settings.broker_url
    if not url:
        raise StudyError(
            "no broker: pass --broker redis://HOST:6379/0 or set STUDYQ_BROKER_URL "
            "(or use `studyq run` without a broker to run on this machine)."
        )
    return supported_broker_url(url, source="--broker" if broker else "STUDYQ_BROKER_URL")


@dataclass(slots=True)
class SubmitReport:
    """What ``submit`` did: ``published`` runs are new messages; the rest were already queued
    or finished (submitting twice publishes nothing twice)."""

    study_id: str
    created: bool
    planned: int
    published: int
    seconds: float


def _labels(conditions: Iterable[Any]) -> dict[str, str]:
    return {condition.condition_id: condition_label(condition) for condition in conditions}


def _dispatch_specs(
    prepared: PreparedStudy, dispatch: str, *, created: bool
) -> Iterator[RunSpec] | None:
    """The specs to mark queued and publish, in dispatch order; None: the store's planned runs
    in plan order (:meth:`ResultStore.queue_next`).

    A study this call has just registered has every run planned, and its plan is what was
    registered: marking pages of it by plan index reads back only ``(index, attempt)`` per
    run instead of each run's spec decoded from its JSON columns, on the thread that
    competes with the publisher for the GIL (at 100,000 runs: 13% less coordinator CPU and
    a faster publish part, docs/benchmarks.md). A study registered before may have few
    planned runs left; the store finds those without walking the whole plan."""
    if dispatch == "balanced":
        return prepared.run_specs(order="balanced")
    return prepared.run_specs() if created else None


def submit_study(
    study: Study | str | Path,
    *,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
    show_progress: bool | None = None,
    order: str | None = None,
) -> SubmitReport:
    """Register ``study`` and publish every run that still needs running, idempotently.

    ``order`` (default: the study's ``execution.order``) is the dispatch order: ``plan``,
    or ``balanced`` (replicate by replicate, shuffled with the study's seed inside each, as
    ``studyq run`` runs them): workers take runs in the order they were published, so a
    study stopped at any point (cancel, budget, breaker) holds a balanced partial design.
    """
    settings = settings or load_settings()
    broker_url = _broker(settings, broker)
    prepared = prepare(study, max_bytes=settings.max_study_bytes)
    study = prepared.study
    started = time.perf_counter()
    # The broker is checked before anything is registered: an unreachable broker changes
    # nothing in the store.
    with (
        open_transport(settings, broker_url) as transport,
        ResultStore.open(db or settings.database_url) as store,
    ):
        report = register(store, prepared)
        labels = _labels(prepared.conditions)
        dispatch = order or study.execution.order
        with Progress(prepared.summary.planned, desc="publish", show=show_progress) as progress:
            published = enqueue_planned(
                store,
                transport,
                study.study_id,
                labels=labels,
                queue=study.execution.queue,
                timeout_s=study.execution.timeout_s,
                batch=settings.publish_batch,
                progress=progress,
                order=_dispatch_specs(prepared, dispatch, created=report.created),
            )
    return SubmitReport(
        study.study_id, report.created, prepared.summary.planned, published,
        time.perf_counter() - started,
    )  # fmt: skip


@dataclass(slots=True)
class WaitReport:
    """How a wait ended; ``complete`` when no run is left to run."""

    study_id: str
    counts: dict[str, int]
    requeued: int = 0
    failed_lost: int = 0
    republished: int = 0
    timed_out: bool = False
    paused: str | None = None
    """Why the study stopped before the end (a spent budget, a tripped breaker) and what
    continues it, one line; the wait ends once its runs in flight have finished."""

    @property
    def complete(self) -> bool:
        open_statuses = (RunStatus.PLANNED, RunStatus.QUEUED, RunStatus.RUNNING)
        return not any(self.counts.get(status.value, 0) for status in open_statuses)

    @property
    def failed(self) -> int:
        return self.counts.get(RunStatus.FAILED.value, 0)


def wait_study(
    study_id: str,
    *,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
    show_progress: bool | None = None,
    timeout_s: float | None = None,
) -> WaitReport:
    """Watch the store until every run is terminal, reconciling as it goes
    (:class:`orchestrator.reconcile.Reconciler`: planned runs published, expired leases
    requeued or failed as lost, runs whose message was lost re-published, progress redrawn).

    A database restart does not end the wait: workers retry their writes, and the next pass
    picks up where this one stopped. Killing the coordinator loses nothing: the next
    ``wait`` picks up from the store.
    """
    settings = settings or load_settings()
    broker_url = _broker(settings, broker)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with open_existing(db or settings.database_url, command="wait") as store:
        info = require_study(store, study_id, command="wait")
        execution: Mapping[str, Any] = info.definition.get("execution") or {}
        counts = store.count_by_status(study_id)
        with (
            open_transport(settings, broker_url) as transport,
            Progress(
                info.run_count, desc=study_id, show=show_progress, initial=done_count(counts)
            ) as progress,
        ):
            reconciler = Reconciler(
                store,
                transport,
                study_id,
                queue=str(execution.get("queue", "studyq")),
                run_timeout_s=execution.get("timeout_s"),
                labels=_labels(store.iter_conditions(study_id)),
                settings=settings,
                progress=progress,
            )
            while True:
                try:
                    reconciler.tick()
                except StoreUnavailableError as exc:
                    progress.write(f"store unavailable, retrying: {exc}")
                    time.sleep(settings.reconcile_interval_s)
                    continue
                ticks = reconciler.report
                report = WaitReport(
                    study_id, ticks.counts, ticks.requeued, ticks.failed_lost, ticks.republished
                )
                if report.complete:
                    return report
                if ticks.paused is not None and not ticks.counts.get(RunStatus.RUNNING.value):
                    report.paused = describe(ticks.paused)  # in-flight runs finished
                    return report
                if deadline is not None and time.monotonic() >= deadline:
                    report.timed_out = True
                    return report
                time.sleep(settings.reconcile_interval_s)


def resubmit(
    study_id: str,
    *,
    statuses: Iterable[str] = (RunStatus.FAILED.value,),
    error_contains: str | None = None,
    where: Mapping[str, Any] | None = None,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
    error_class: str | None = None,
) -> SubmitReport:
    """Put matching finished runs back with a fresh attempt budget, and publish them.

    ``error_class`` keeps the runs whose recorded error class (``error_type``, e.g.
    ``RateLimited``) is exactly that name."""
    if error_class is not None:
        where = {**(where or {}), "error_type": error_class}
    settings = settings or load_settings()
    broker_url = _broker(settings, broker)
    started = time.perf_counter()
    with open_existing(db or settings.database_url, command="resubmit") as store:
        info = require_study(store, study_id, command="resubmit")
        moved = store.requeue_for_resubmit(
            study_id, statuses=list(statuses), error_contains=error_contains, where=where
        )
        execution = info.definition.get("execution") or {}
        labels = _labels(store.iter_conditions(study_id))
        published = 0
        if moved:
            with open_transport(settings, broker_url) as transport:
                published = enqueue_planned(
                    store,
                    transport,
                    study_id,
                    labels=labels,
                    queue=str(execution.get("queue", "studyq")),
                    timeout_s=execution.get("timeout_s"),
                    batch=settings.publish_batch,
                )
    return SubmitReport(study_id, False, moved, published, time.perf_counter() - started)


CANCEL_RETRY_S = 5.0
"""How long :func:`cancel` keeps trying runs whose row a worker holds locked. A claim or a
result holds it for milliseconds; a frozen worker (SIGSTOP, a paused VM) for hours, so
cancel gives up after this and says how many runs it could not cancel yet."""

_CANCEL_PAUSE_S = 0.5


def cancel(
    study_id: str,
    *,
    terminate: bool = False,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
    retry_s: float | None = None,
) -> CancelReport:
    """Cancel a study: planned and queued runs never start (a delivery finds nothing to
    claim); running ones finish and their results are recorded. With ``terminate`` running
    runs are cancelled too: the worker's next heartbeat is refused, so it stops the agent,
    their tasks are revoked on the broker (when one is configured: without, as for an
    embedded study, the heartbeat alone stops them), and a result that still arrives is
    refused.

    Runs whose row another session holds locked are tried again for ``retry_s`` seconds
    (default :data:`CANCEL_RETRY_S`); ``locked`` in the report counts the ones still not
    cancelled (cancel again later).

    Raises:
        StudyError: the study is not in the store.
        BrokerUnavailableError: (``terminate``) the configured broker is unreachable;
            nothing changed.
    """
    settings = settings or load_settings()
    with contextlib.ExitStack() as stack:
        # The broker first, as submit does: an unreachable broker changes nothing.
        transport = (
            stack.enter_context(open_transport(settings, _broker(settings, broker)))
            if terminate and (broker or settings.broker_url)
            else None
        )
        store = stack.enter_context(open_existing(db or settings.database_url, command="cancel"))
        require_study(store, study_id, command="cancel")
        report = _cancel_until_unlocked(
            store,
            study_id,
            terminate=terminate,
            retry_s=CANCEL_RETRY_S if retry_s is None else retry_s,
        )
        if transport is not None and report.terminated:
            transport.revoke(report.terminated)
    return report


def _cancel_until_unlocked(
    store: ResultStore, study_id: str, *, terminate: bool, retry_s: float
) -> CancelReport:
    """:func:`~orchestrator.store.recovery.cancel_study` in one transaction per pass, until
    no run it would cancel is locked or ``retry_s`` is over; the passes' counts added up."""
    deadline = time.monotonic() + retry_s
    cancelled = 0
    terminated: list[tuple[RunSpec, int]] = []
    while True:
        try:
            with transaction(store.engine) as connection:
                report = cancel_study(connection, study_id, terminate=terminate)
        except StoreUnavailableError:  # a lock wait beyond lock_timeout, a restart
            if time.monotonic() >= deadline:
                raise
            time.sleep(_CANCEL_PAUSE_S)
            continue
        cancelled += report.cancelled
        terminated.extend(report.terminated)
        if not report.locked or time.monotonic() >= deadline:
            return CancelReport(
                study_id, cancelled, sorted(terminated, key=lambda item: item[0].index),
                report.running, report.locked,
            )  # fmt: skip
        time.sleep(_CANCEL_PAUSE_S)


@dataclass(slots=True)
class StudyStatus:
    """One study's progress, for ``studyq status`` and notebooks."""

    study_id: str
    title: str
    submitted_by: str
    submitted_at: Any
    run_count: int
    counts: dict[str, int]
    rate_per_s: float | None
    eta_s: float | None
    cost_usd: float
    by: dict[str, dict[str, dict[str, int]]] = field(default_factory=dict)
    top_errors: list[Any] = field(default_factory=list)
    queue: str = "studyq"
    """The study's ``execution.queue`` (its dead letters are kept per queue)."""
    dispatch: str | None = None
    """'stopped: budget (spent $X of $Y, burn $Z/h)', 'paused: breaker (...)' or the budget
    so far (``orchestrator.budget.BudgetState.line``); None without a budget or a pause."""
    dispatch_fix: str | None = None
    """The command that continues a paused study, or None."""


def study_status(
    study_id: str | None = None,
    *,
    db: str | None = None,
    settings: Settings | None = None,
    detail: bool | None = None,
) -> list[StudyStatus]:
    """Every study in the store (or one), with counts, rate, ETA and cost so far; with
    ``detail`` (default for one study) also per condition, agent and problem, and the top
    error classes."""
    from orchestrator.budget import state_of

    settings = settings or load_settings()
    detail = (study_id is not None) if detail is None else detail
    with open_existing(db or settings.database_url, command="status") as store:
        infos = (
            store.list_studies()
            if study_id is None
            else [require_study(store, study_id, command="status")]
        )
        out = []
        for info in infos:
            counts = store.count_by_status(info.study_id)
            stats = store.progress_stats(info.study_id)
            remaining = sum(
                counts.get(s.value, 0)
                for s in (RunStatus.PLANNED, RunStatus.QUEUED, RunStatus.RUNNING)
            )
            rate = stats.recent_rate_per_s
            if not remaining:  # ended: the rate over its span, which later wall time keeps
                rate = _ended_rate(store, info.study_id, counts)
            status = StudyStatus(
                study_id=info.study_id,
                title=str(info.definition.get("title", "")),
                submitted_by=info.submitted_by,
                submitted_at=info.submitted_at,
                run_count=info.run_count,
                counts=counts,
                rate_per_s=rate,
                eta_s=(remaining / rate) if rate and remaining else None,
                cost_usd=stats.cost_usd,
                queue=str((info.definition.get("execution") or {}).get("queue", "studyq")),
            )
            budget = state_of(store, info)
            status.dispatch, status.dispatch_fix = budget.line, budget.fix
            if detail:
                status.by = store.count_by_each(info.study_id)
                status.by["condition"] = _by_label(
                    status.by["condition"], _labels(store.iter_conditions(info.study_id))
                )
                status.top_errors = store.top_errors(info.study_id)
            out.append(status)
        return out


def _ended_rate(store: ResultStore, study_id: str, counts: Mapping[str, int]) -> float | None:
    """Finished runs per second from the first start to the last finish of a study with
    nothing left to run; None before anything finished."""
    from orchestrator.store.inspection import finished_span

    with transaction(store.engine, readonly=True) as connection:
        seconds = finished_span(connection, study_id).seconds
    finished = counts.get(RunStatus.SUCCESS.value, 0) + counts.get(RunStatus.FAILED.value, 0)
    return finished / seconds if finished and seconds else None


def _by_label(
    grouped: Mapping[str, dict[str, int]], labels: Mapping[str, str]
) -> dict[str, dict[str, int]]:
    """Counts per condition keyed by the condition's label (its id kept when two conditions
    share a label, or when the store has no label for it)."""
    from collections import Counter

    named = [labels.get(condition_id, condition_id) for condition_id in grouped]
    uses = Counter(named)
    out: dict[str, dict[str, int]] = {}
    for (condition_id, counts), label in zip(grouped.items(), named, strict=True):
        out[label if uses[label] == 1 else f"{label} ({condition_id})"] = counts
    return out
