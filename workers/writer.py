"""Results written behind the run: one writer thread per worker process.

Why. A result is durable only once PostgreSQL has flushed its commit to disk. A run task
that waited for that flush would hold its pool process idle for it, and Celery would deliver
the next run only afterwards: on a 2-core machine that wait was the largest part of a no-op
run's wall time (docs/benchmarks.md). Here the task hands its result to this process's
writer thread and returns; Celery acknowledges the message and delivers the next run while
the result is written. Results that wait together (the ``threads`` pool, or a database that
was slow for a moment) are written together, each fenced on its own claim, in one
transaction with one flush.

What does not change:

* Each result is written with the claim's fence (``ResultStore.finish_runs_batch``): a
  stale attempt writes nothing and is counted ``refused``.
* Through a database outage the write is retried with backoff for ``result_retry_s``; the
  agent is never called again because a write failed.
* The lease. A run whose result is pending is no longer heartbeated, so a write that takes
  longer than the lease (an outage) lets the coordinator re-queue the run; the store still
  accepts this attempt's result as long as nobody claimed the run since (``FINISH_FENCE``),
  exactly as for a synchronous write.

What a process that dies does: its message was acknowledged when the task returned, so a
process killed (``kill -9``) before the write lands leaves the run ``running`` under its
lease, as if it had died while executing; the lease expires and the coordinator re-queues
it. Nothing is lost or duplicated; the run is executed again, as any run in flight on a dead
worker is. A process that stops normally (warm shutdown, ``max_tasks_per_child``) first
waits for its pending writes (:meth:`ResultWriter.drain`, from Celery's shutdown signals).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable

from orchestrator.contracts.errors import StoreError, StoreUnavailableError
from orchestrator.contracts.results import RunResult
from orchestrator.store import Claim, ResultStore
from orchestrator.store.budget_gate import after_results
from workers.retrying import retry_unavailable

__all__ = ["MAX_BATCH", "NOT_RECORDED", "REFUSED", "ResultWriter"]

log = logging.getLogger("studyq.worker")

MAX_BATCH = 64
"""Results per transaction at most."""

REFUSED = "refused"
NOT_RECORDED = "not_recorded"


class ResultWriter:
    """Writes the results handed to it on one background thread, in batches.

    Args:
        store: This process's store.
        retry_s: How long one batch keeps retrying through a database outage.
        count: Records what each write came to (the runtime's counters): the run's status
            when written, ``refused`` or ``not_recorded``.
    """

    def __init__(self, store: ResultStore, *, retry_s: float, count: Callable[[str], int]):
        self._store = store
        self._retry_s = retry_s
        self._count = count
        self._pending: deque[tuple[Claim, RunResult]] = deque()
        self._writing = 0
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    def submit(self, claim: Claim, result: RunResult) -> None:
        """Queue ``result`` to be written; returns at once."""
        with self._changed:
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._loop, name="studyq-result-writer", daemon=True
                )
                self._thread.start()
            self._pending.append((claim, result))
            self._changed.notify_all()

    @property
    def pending(self) -> int:
        """Results handed in and not yet written (or given up on)."""
        with self._changed:
            return len(self._pending) + self._writing

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every result handed in so far is written or given up on; False if
        ``timeout_s`` ran out first."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        with self._changed:
            while self._pending or self._writing:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._changed.wait(remaining)
        return True

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._pending:
                    self._changed.wait()
                batch = [self._pending.popleft() for _ in range(min(MAX_BATCH, len(self._pending)))]
                self._writing = len(batch)
            try:
                self.write(batch)
            except Exception:  # never let the thread die: later results still need writing
                log.exception("writing %d result(s) failed unexpectedly", len(batch))
            finally:
                with self._changed:
                    self._writing = 0
                    self._changed.notify_all()

    def write(self, batch: list[tuple[Claim, RunResult]]) -> list[str]:
        """Write ``batch`` now, on the caller's thread; returns what each write came to: the
        run's status (``success``/``failed``), ``refused`` (a stale attempt: nothing
        written) or ``not_recorded`` (the database stayed unavailable, or refused it)."""
        what = (
            f"recording the result of run {batch[0][0].run_id} (index {batch[0][0].index}) "
            f"of {batch[0][0].study_id}"
            if len(batch) == 1
            else f"recording {len(batch)} results"
        )
        try:
            won = retry_unavailable(
                lambda: self._store.finish_runs_batch(batch),
                what=what,
                budget_s=self._retry_s,
                log=log,
            )
        except StoreError as error:
            if len(batch) > 1 and not isinstance(error, StoreUnavailableError):
                # One bad result must not take the others down with it: write them alone.
                return [outcome for item in batch for outcome in self.write([item])]
            return [self._not_recorded(claim, result, error) for claim, result in batch]
        outcomes = []
        for (claim, result), ok in zip(batch, won, strict=True):
            outcomes.append(result.status.value if ok else self._refused(claim))
            if ok:
                self._count(result.status.value)
        # A spent budget or a tripped breaker pauses the study (orchestrator.store.budget_gate).
        after_results(self._store, [item for item, ok in zip(batch, won, strict=True) if ok])
        return outcomes

    def _not_recorded(self, claim: Claim, result: RunResult, error: StoreError) -> str:
        count = self._count(NOT_RECORDED)
        log.error(
            "result of run %s (index %d, attempt %d) of %s was NOT recorded (%s: %s) [%d so "
            "far]; its lease will expire and the coordinator will re-queue the run",
            claim.run_id,
            claim.index,
            claim.attempt,
            claim.study_id,
            result.status.value,
            error,
            count,
        )
        return NOT_RECORDED

    def _refused(self, claim: Claim) -> str:
        count = self._count(REFUSED)
        log.warning(
            "result of run %s (index %d, attempt %d) of %s refused: the run is no longer this "
            "worker's (lease expired and re-claimed, or cancelled) [%d so far]",
            claim.run_id,
            claim.index,
            claim.attempt,
            claim.study_id,
            count,
        )
        return REFUSED
