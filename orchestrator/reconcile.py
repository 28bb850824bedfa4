"""Reconcile: bring a distributed study's store and its broker back into agreement.

``studyq wait`` (:func:`orchestrator.distributed.wait_study`) runs :meth:`Reconciler.tick`
every ``reconcile_interval_s``; ``submit`` and ``resubmit`` use :func:`enqueue_planned`. One
tick is five named steps, the first three guarded transitions in the store, so two
coordinators on one study never publish a run twice and a killed coordinator loses nothing
(while the study is paused by its budget or breaker, only ``recover`` runs, without the
stale search: its waiting runs stay unpublished until a resume, :mod:`orchestrator.budget`)::

    publish_planned     planned runs (a submit that died half way, a resubmit elsewhere)
                        are marked queued and published
    stale_timeout       whether any queued run may have lost its message: only when the
                        broker holds fewer of the queue's messages than the study has
                        queued runs (a backlog that merely waits is left alone)
    recover             expired leases go back to the queue (or fail as lost after
                        max_attempts); queued runs nobody claimed for queued_timeout_s are
                        published again (store.reconcile)
    refresh             the counts and the progress bar
    watch_claims        runs queued for ``unclaimed_warning_s`` with none claimed or running:
                        one line on stderr naming the queue and the database workers must
                        use (again after ten times as long, and so on; never every tick)
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from itertools import islice
from typing import TypeVar

from orchestrator.contracts.errors import BrokerUnavailableError
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings
from orchestrator.executors.transport import Publication, Transport
from orchestrator.progress import Progress
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction
from orchestrator.store.pausing import Pause, pause_of

__all__ = ["Reconciler", "TickReport", "done_count", "enqueue_planned", "stale_queued_timeout"]

_Item = TypeVar("_Item")


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


def enqueue_planned(
    store: ResultStore,
    transport: Transport,
    study_id: str,
    *,
    labels: Mapping[str, str],
    queue: str,
    timeout_s: float | None,
    batch: int,
    progress: Progress | None = None,
    order: Iterable[RunSpec] | None = None,
) -> int:
    """Mark every ``planned`` run queued, page by page, and publish the ones this call won.

    ``order`` publishes in that order (a dispatch order of the study's plan, e.g.
    ``balanced``): runs that are not ``planned`` any more are skipped. Without it, runs go
    in plan order (:meth:`ResultStore.queue_next`); so do the runs a later ``wait`` or
    ``resubmit`` publishes.

    Marking first means a message always names a claimable run; a crash between the two
    leaves queued runs without a message (at most two pages: the next page is marked while
    this one is published), which reconcile re-publishes after ``queued_timeout_s``. Only
    the coordinator whose update won a run publishes it.
    """
    published = 0
    pages = (
        _pages_ahead(_pages_in_plan_order(store, study_id, batch))
        if order is None
        else _pages_ahead(_pages_in_order(store, study_id, order, batch))
    )
    for page in pages:
        published += transport.publish(
            [
                Publication(spec, attempt, labels.get(spec.condition_id, ""))
                for spec, attempt in page
            ],
            queue=queue,
            timeout_s=timeout_s,
        )
        if progress is not None:
            progress.update(len(page))
    return published


def _pages_in_plan_order(
    store: ResultStore, study_id: str, batch: int
) -> Callable[[], list[tuple[RunSpec, int]]]:
    """``next_page`` for :func:`_pages_ahead` in plan order: each page starts past the last
    index of the one before (``ResultStore.queue_next``'s ``after``)."""
    last = -1

    def next_page() -> list[tuple[RunSpec, int]]:
        nonlocal last
        page = store.queue_next(study_id, batch=batch, after=last)
        if page:
            last = page[-1][0].index
        return page

    return next_page


def _pages_in_order(
    store: ResultStore, study_id: str, order: Iterable[RunSpec], batch: int
) -> Callable[[], list[tuple[RunSpec, int]]]:
    """``next_page`` for :func:`_pages_ahead` over ``order``: each call marks the next
    ``batch`` specs of ``order`` queued and returns those it moved, in ``order``'s order."""
    specs = iter(order)

    def next_page() -> list[tuple[RunSpec, int]]:
        while chunk := list(islice(specs, batch)):
            moved = dict(store.queue_runs(study_id, [spec.index for spec in chunk]))
            page = [(spec, moved[spec.index]) for spec in chunk if spec.index in moved]
            if page:
                return page
        return []

    return next_page


def stale_queued_timeout(
    store: ResultStore, transport: Transport, study_id: str, queue: str, timeout_s: float
) -> float | None:
    """The ``queued_timeout_s`` for this reconcile pass: ``timeout_s`` when some queued run of
    the study may have lost its message, None (search no stale runs) when not.

    A message may be lost only when the broker holds fewer messages for ``queue`` than the
    study has queued runs (:meth:`Transport.queue_backlog`): the messages waiting in
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


def done_count(counts: Mapping[str, int]) -> int:
    terminal = (RunStatus.SUCCESS, RunStatus.FAILED, RunStatus.CANCELLED)
    return sum(counts.get(status.value, 0) for status in terminal)


@dataclass(slots=True)
class TickReport:
    """What the reconcile ticks of one wait did so far."""

    counts: dict[str, int]
    requeued: int = 0
    failed_lost: int = 0
    republished: int = 0
    paused: Pause | None = None
    """The study's pause (a spent budget, a tripped breaker) at the last tick, or None."""


@dataclass(slots=True)
class Reconciler:
    """The reconcile loop of one study: :meth:`tick` once per ``reconcile_interval_s``."""

    store: ResultStore
    transport: Transport
    study_id: str
    queue: str
    run_timeout_s: float | None
    labels: Mapping[str, str]
    settings: Settings
    progress: Progress
    report: TickReport = field(init=False)
    clock: Callable[[], float] = time.monotonic
    _backlog_unreadable: bool = field(default=False, init=False)
    _quiet_since: float | None = field(default=None, init=False)
    _claimed: int = field(default=-1, init=False)
    _hints: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        self.report = TickReport(self.store.count_by_status(self.study_id))

    def tick(self) -> None:
        """One pass: the five steps of the module's docstring, in order.

        Raises:
            StoreUnavailableError: the database failed; the next tick starts over.
        """
        self.report.paused = self.paused()
        if self.report.paused is None:
            self.publish_planned()
            self.recover(self.stale_timeout())
        else:  # paused: its waiting runs stay unpublished until a resume publishes them
            self.recover(None)
        self.refresh()
        self.watch_claims()

    def paused(self) -> Pause | None:
        """The study's pause (:mod:`orchestrator.store.pausing`): while it holds, planned
        runs are not published and queued ones are not re-published as stale."""
        with transaction(self.store.engine, readonly=True) as connection:
            return pause_of(connection, self.study_id)

    def publish_planned(self) -> None:
        if self.report.counts.get(RunStatus.PLANNED.value, 0):
            self.report.republished += enqueue_planned(
                self.store,
                self.transport,
                self.study_id,
                labels=self.labels,
                queue=self.queue,
                timeout_s=self.run_timeout_s,
                batch=self.settings.publish_batch,
            )

    def stale_timeout(self) -> float | None:
        """This pass's ``queued_timeout_s`` (None: search no stale runs). When the broker's
        count cannot be read, the pass says so once and re-publishes stale runs as if their
        messages were lost (a duplicate is a no-op)."""
        timeout_s = self.settings.queued_timeout_s
        try:
            stale = stale_queued_timeout(
                self.store, self.transport, self.study_id, self.queue, timeout_s
            )
        except BrokerUnavailableError as exc:
            if not self._backlog_unreadable:
                self.progress.write(
                    f"broker backlog unknown, re-publishing runs queued longer than "
                    f"{timeout_s:g} s: {exc}"
                )
            self._backlog_unreadable = True
            return timeout_s
        self._backlog_unreadable = False
        return stale

    def recover(self, queued_timeout_s: float | None) -> None:
        found = self.store.reconcile(self.study_id, queued_timeout_s=queued_timeout_s)
        self.report.requeued += found.requeued
        self.report.failed_lost += found.failed_lost
        if found.to_publish:
            self.report.republished += self.transport.publish(
                [
                    Publication(spec, attempt, self.labels.get(spec.condition_id, ""))
                    for spec, attempt in found.to_publish
                ],
                queue=self.queue,
                timeout_s=self.run_timeout_s,
            )
        if found.changed:
            self.progress.write(
                f"reconcile: {found.requeued} requeued (lease expired), "
                f"{found.failed_lost} failed as lost, "
                f"{found.stale_queued} re-published (never claimed)"
            )

    def refresh(self) -> None:
        counts = self.store.count_by_status(self.study_id)
        self.report.counts = counts
        self.progress.set_counts(
            done_count(counts),
            counts.get(RunStatus.SUCCESS.value, 0),
            counts.get(RunStatus.FAILED.value, 0),
        )

    def watch_claims(self) -> None:
        """Say so when runs wait and nothing claims them: no worker consumes the study's queue
        with its database (workers down, another ``-Q``, another ``STUDYQ_DATABASE_URL``: a
        worker returns the messages of studies its database does not hold). Quiet means
        queued runs, none running, and no run claimed since the last tick (the runs claimed
        so far, running or finished, unchanged); the first line comes after
        ``unclaimed_warning_s`` of quiet, the next after ten times as long, then twenty, ..."""
        threshold = self.settings.unclaimed_warning_s
        counts = self.report.counts
        queued = counts.get(RunStatus.QUEUED.value, 0)
        running = counts.get(RunStatus.RUNNING.value, 0)
        claimed = running + done_count(counts)
        now = self.clock()
        if not threshold or not queued or running or claimed != self._claimed:
            self._claimed = claimed
            self._quiet_since = None if not queued or running else now
            self._hints = 0
            return
        if self._quiet_since is None:
            self._quiet_since = now
        quiet = now - self._quiet_since
        if quiet < threshold * (10 * self._hints if self._hints else 1):
            return
        self._hints += 1
        self.progress.write(
            f"{queued} run{'s' if queued != 1 else ''} queued for {quiet:.0f} s and none "
            f"claimed: are workers running on queue '{self.queue}' with "
            f"STUDYQ_DATABASE_URL={self.store.url}? (`studyq check`; a worker returns the "
            "messages of studies its database does not hold)"
        )
