"""Distributed sweeps, coordinator side: submit, wait (with reconcile), resubmit, cancel, status.

The coordinator never runs a run and never holds results: it registers the plan, marks runs
queued in the store *before* publishing them (so a message always names a run a worker may
claim, and a crash between the two leaves queued rows that reconcile re-publishes), publishes
through the Celery transport in batches over one connection, and then watches the store. Every
state change is a guarded transition in the store, so two coordinators on one study never
publish a run twice: only the one whose ``planned -> queued`` update won publishes it.

A queued run nobody claimed for ``queued_timeout_s`` is published again only when the broker
holds fewer messages for the study's queue than the study has queued runs (see
:func:`_stale_queued_timeout`): a run waiting behind a long backlog has not lost its message.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from orchestrator.contracts.errors import BrokerUnavailableError, StoreUnavailableError, StudyError
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings, load_settings, secure_broker_url
from orchestrator.embedded import register
from orchestrator.progress import Progress
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction
from orchestrator.store.recovery import CancelReport, cancel_study
from orchestrator.study.designs import condition_label
from orchestrator.study.model import Study
from orchestrator.study.plan import prepare

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
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise StudyError(
            f"broker URL must start with redis:// or rediss:// (got '{url.split('://')[0]}://'). "
            "Fix: e.g. --broker redis://127.0.0.1:6379/0"
        )
    return secure_broker_url(url)


@dataclass(slots=True)
class SubmitReport:
    """What ``submit`` did: ``published`` runs are new messages; the rest were already queued
    or finished (submitting twice publishes nothing twice)."""

    study_id: str
    created: bool
    planned: int
    published: int
    seconds: float


_Item = TypeVar("_Item")


def _labels(conditions: Iterable[Any]) -> dict[str, str]:
    return {condition.condition_id: condition_label(condition) for condition in conditions}


def _pages_ahead(next_page: Callable[[], list[_Item]]) -> Iterator[list[_Item]]:
    """The pages ``next_page`` returns until the first empty one, each fetched on a thread
    while the caller works on the one before: marking page n+1 queued (the database) waits
    while page n is published (the broker). An error of ``next_page`` is raised here, in the
    caller's thread; a caller that stops early (its publish failed) never waits for the
    fetcher, whatever it is doing."""
    ready: queue.Queue[tuple[list[_Item] | None, BaseException | None]] = queue.Queue(1)
    stop = threading.Event()

    def hand_over(item: tuple[list[_Item] | None, BaseException | None]) -> None:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return
            except queue.Full:
                continue

    def fetch() -> None:
        while not stop.is_set():
            try:
                page = next_page()
            except BaseException as error:  # handed to the caller, raised there
                hand_over((None, error))
                return
            hand_over((page, None))
            if not page:
                return

    fetcher = threading.Thread(target=fetch, name="studyq-queue-pages", daemon=True)
    fetcher.start()
    try:
        while True:
            page, error = ready.get()
            if error is not None:
                raise error
            if not page:
                return
            yield page
    finally:
        stop.set()
        fetcher.join()


def _enqueue_planned(
    store: ResultStore,
    transport: Any,
    study_id: str,
    *,
    labels: Mapping[str, str],
    queue: str,
    timeout_s: float | None,
    batch: int,
    progress: Progress | None = None,
) -> int:
    """Mark every ``planned`` run queued, page by page, and publish the ones this call won.

    Marking first means a message always names a claimable run; a crash between the two
    leaves queued runs without a message (at most two pages: the next page is marked while
    this one is published), which reconcile re-publishes after ``queued_timeout_s``. Only
    the coordinator whose update won a run publishes it.
    """
    published = 0
    for page in _pages_ahead(lambda: store.queue_next(study_id, batch=batch)):
        published += transport.publish(
            [(spec, attempt, labels.get(spec.condition_id, "")) for spec, attempt in page],
            queue=queue,
            timeout_s=timeout_s,
        )
        if progress is not None:
            progress.update(len(page))
    return published


def submit_study(
    study: Study | str | Path,
    *,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
    show_progress: bool | None = None,
) -> SubmitReport:
    """Register ``study`` and publish every run that still needs running, idempotently."""
    from orchestrator.executors.celery import CeleryTransport

    settings = settings or load_settings()
    broker_url = _broker(settings, broker)
    prepared = prepare(study, max_bytes=settings.max_study_bytes)
    study = prepared.study
    started = time.perf_counter()
    # The broker is checked before anything is registered: an unreachable broker changes
    # nothing in the store.
    with (
        CeleryTransport(settings, broker_url) as transport,
        ResultStore.open(db or settings.database_url) as store,
    ):
        report = register(store, prepared)
        labels = _labels(prepared.conditions)
        with Progress(prepared.summary.planned, desc="publish", show=show_progress) as progress:
            published = _enqueue_planned(
                store,
                transport,
                study.study_id,
                labels=labels,
                queue=study.execution.queue,
                timeout_s=study.execution.timeout_s,
                batch=settings.publish_batch,
                progress=progress,
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
    """Watch the store until every run is terminal, reconciling as it goes.

    Each pass sends expired leases back to the queue (or fails them as lost after
    ``max_attempts``), re-publishes queued runs nobody claimed for ``queued_timeout_s`` (their
    message was lost: a broker restarted without persistence), and redraws the progress bar.
    Stale queued runs are re-published only while the broker holds fewer messages for the
    queue (waiting plus delivered but unacknowledged) than the study has queued runs; a
    backlog that merely waits is left alone. When that count cannot be read, the pass says
    so once and re-publishes stale runs as if their messages were lost.
    Killing the coordinator loses nothing: the next ``wait`` picks up from the store.
    """
    from orchestrator.executors.celery import CeleryTransport

    settings = settings or load_settings()
    broker_url = _broker(settings, broker)
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    with ResultStore.open(db or settings.database_url) as store:
        info = store.find_study(study_id)
        if info is None:
            raise StudyError(
                f"study '{study_id}' is not in the store. Fix: `studyq submit STUDY` first; "
                "`studyq status` lists the studies there."
            )
        definition: Mapping[str, Any] = info.definition
        execution = definition.get("execution") or {}
        queue = str(execution.get("queue", "studyq"))
        run_timeout = execution.get("timeout_s")
        labels = _labels(store.iter_conditions(study_id))
        report = WaitReport(study_id, store.count_by_status(study_id))
        done = _done(report.counts)
        with (
            CeleryTransport(settings, broker_url) as transport,
            Progress(info.run_count, desc=study_id, show=show_progress, initial=done) as progress,
        ):
            backlog_unreadable = False
            while True:
                try:
                    if report.counts.get(RunStatus.PLANNED.value, 0):
                        # A submit that died half way, or a resubmit from another machine.
                        report.republished += _enqueue_planned(
                            store,
                            transport,
                            study_id,
                            labels=labels,
                            queue=queue,
                            timeout_s=run_timeout,
                            batch=settings.publish_batch,
                        )
                    try:
                        queued_timeout = _stale_queued_timeout(
                            store, transport, study_id, queue, settings.queued_timeout_s
                        )
                        backlog_unreadable = False
                    except BrokerUnavailableError as exc:
                        # Conservative: without the count, a stale run may have lost its
                        # message, so it is re-published as before (a duplicate is a no-op).
                        queued_timeout = settings.queued_timeout_s
                        if not backlog_unreadable:
                            progress.write(
                                f"broker backlog unknown, re-publishing runs queued longer than "
                                f"{settings.queued_timeout_s:g} s: {exc}"
                            )
                        backlog_unreadable = True
                    pass_report = store.reconcile(study_id, queued_timeout_s=queued_timeout)
                    report.requeued += pass_report.requeued
                    report.failed_lost += pass_report.failed_lost
                    if pass_report.to_publish:
                        report.republished += transport.publish(
                            [
                                (spec, attempt, labels.get(spec.condition_id, ""))
                                for spec, attempt in pass_report.to_publish
                            ],
                            queue=queue,
                            timeout_s=run_timeout,
                        )
                    if pass_report.changed:
                        progress.write(
                            f"reconcile: {pass_report.requeued} requeued (lease expired), "
                            f"{pass_report.failed_lost} failed as lost, "
                            f"{pass_report.stale_queued} re-published (never claimed)"
                        )
                    report.counts = store.count_by_status(study_id)
                    progress.set_counts(
                        _done(report.counts),
                        report.counts.get(RunStatus.SUCCESS.value, 0),
                        report.counts.get(RunStatus.FAILED.value, 0),
                    )
                except StoreUnavailableError as exc:
                    # A database restart must not end the wait: workers retry their
                    # writes, and the next pass picks up where this one stopped.
                    progress.write(f"store unavailable, retrying: {exc}")
                    time.sleep(settings.reconcile_interval_s)
                    continue
                if report.complete:
                    return report
                if deadline is not None and time.monotonic() >= deadline:
                    report.timed_out = True
                    return report
                time.sleep(settings.reconcile_interval_s)


def _stale_queued_timeout(
    store: ResultStore, transport: Any, study_id: str, queue: str, timeout_s: float
) -> float | None:
    """The ``queued_timeout_s`` for this reconcile pass: ``timeout_s`` when some queued run of
    the study may have lost its message, None (search no stale runs) when not.

    A message may be lost only when the broker holds fewer messages for ``queue`` than the
    study has queued runs (:meth:`CeleryTransport.queue_backlog`): the messages waiting in
    the queue, plus those delivered to a worker in the last ``timeout_s`` and not
    acknowledged yet. Otherwise every stale run is presumed to be waiting behind the others,
    and publishing it again would only add a duplicate to the backlog on every timeout.

    A delivery older than ``timeout_s`` that is still not acknowledged does not count: it is
    the message of a run executing for that long (which is not queued), or one that a worker
    killed or frozen since holds (it returns only after the broker's visibility timeout,
    hours later), so counting it could keep a queued run without a message waiting for hours.

    Otherwise the count errs towards "not lost": the broker is read before the store, so a
    message taken between the two reads counts while its run is no longer queued; messages of
    other studies sharing the queue, and of running runs, count too (a lost message is then
    re-published once the backlog has drained below the queued runs). A shortfall is checked
    with a second read, because a message being handed to a worker is, for a moment, in
    neither the queue nor the unacknowledged set.

    Raises:
        BrokerUnavailableError: the broker's count cannot be read.
    """

    def backlog() -> int:
        return int(transport.queue_backlog(queue, delivered_within_s=timeout_s))

    first = backlog()
    queued = store.count_by_status(study_id).get(RunStatus.QUEUED.value, 0)
    if first >= queued or backlog() >= queued:
        return None
    return timeout_s


def _done(counts: Mapping[str, int]) -> int:
    terminal = (RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.CANCELLED)
    return sum(counts.get(status.value, 0) for status in terminal)


def resubmit(
    study_id: str,
    *,
    statuses: Iterable[str] = (RunStatus.FAILED.value,),
    error_contains: str | None = None,
    where: Mapping[str, Any] | None = None,
    db: str | None = None,
    broker: str | None = None,
    settings: Settings | None = None,
) -> SubmitReport:
    """Put matching finished runs back with a fresh attempt budget, and publish them."""
    from orchestrator.executors.celery import CeleryTransport

    settings = settings or load_settings()
    broker_url = _broker(settings, broker)
    started = time.perf_counter()
    with ResultStore.open(db or settings.database_url) as store:
        info = store.find_study(study_id)
        if info is None:
            raise StudyError(f"study '{study_id}' is not in the store.")
        moved = store.requeue_for_resubmit(
            study_id, statuses=list(statuses), error_contains=error_contains, where=where
        )
        execution = info.definition.get("execution") or {}
        labels = _labels(store.iter_conditions(study_id))
        published = 0
        if moved:
            with CeleryTransport(settings, broker_url) as transport:
                published = _enqueue_planned(
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
    from orchestrator.executors.celery import CeleryTransport

    settings = settings or load_settings()
    with contextlib.ExitStack() as stack:
        # The broker first, as submit does: an unreachable broker changes nothing.
        transport = (
            stack.enter_context(CeleryTransport(settings, _broker(settings, broker)))
            if terminate and (broker or settings.broker_url)
            else None
        )
        store = stack.enter_context(ResultStore.open(db or settings.database_url))
        if store.find_study(study_id) is None:
            raise StudyError(f"study '{study_id}' is not in the store.")
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
    settings = settings or load_settings()
    detail = (study_id is not None) if detail is None else detail
    with ResultStore.open(db or settings.database_url) as store:
        infos = store.list_studies() if study_id is None else [store.find_study(study_id)]
        if study_id is not None and infos[0] is None:
            raise StudyError(
                f"study '{study_id}' is not in the store ({store.url}). "
                "Fix: `studyq status` lists the studies there."
            )
        out = []
        for info in infos:
            if info is None:
                continue
            counts = store.count_by_status(info.study_id)
            stats = store.progress_stats(info.study_id)
            remaining = sum(
                counts.get(s.value, 0)
                for s in (RunStatus.PLANNED, RunStatus.QUEUED, RunStatus.RUNNING)
            )
            rate = stats.recent_rate_per_s
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
            if detail:
                status.by = {by: store.count_by(info.study_id, by) for by in
                             ("condition", "agent", "problem")}  # fmt: skip
                status.top_errors = store.top_errors(info.study_id)
            out.append(status)
        return out
