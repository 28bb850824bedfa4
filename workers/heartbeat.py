"""Keeping claimed runs' leases alive, and ending runs that must end.

Each executing run has a :class:`RunSupervisor`; one :class:`LeaseKeeper` thread per worker
process serves all of them (a thread per run would cost more than a no-op run's own work).
For each run the keeper

* extends the lease every ``heartbeat_s`` (the store stamps it with the database clock); a
  heartbeat that is refused means the run is no longer ours (cancelled, or its lease expired
  and the coordinator re-queued it): the run is interrupted and writes nothing;
* records the run as failed with error kind ``timeout`` when it is still going
  ``time_limit_grace_s`` after its soft limit (the agent swallowed the soft interruption, or
  runs on a thread nothing can interrupt), and stops extending its lease;
* hands the run back on a warm shutdown (:meth:`RunSupervisor.request_hand_back`): the lease
  is released without charging an attempt, then the run is interrupted.

Heartbeats are single short statements made on the keeper's thread; a timeout or a hand-back
may retry through a database outage, so each gets a thread of its own and never delays the
other runs' heartbeats.

Exactly one way of ending wins (:class:`Ending`): the run's own result, the timeout, the
hand-back, or the lost lease. The decision is taken under a lock, and every write is also
fenced by the store on the claim's attempt, so even a race with another process (the prefork
parent recording a hard kill) writes one result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from enum import StrEnum

from orchestrator.contracts.errors import StoreError, StoreUnavailableError
from orchestrator.contracts.results import ErrorKind, failed_result
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import Claim, ResultStore
from orchestrator.store.budget_gate import after_results
from workers.interrupt import HandBack, LeaseLost, MainThreadInterrupt
from workers.retrying import retry_unavailable

__all__ = ["RELEASE_RETRY_S", "Ending", "LeaseKeeper", "RunSupervisor"]

log = logging.getLogger("studyq.worker")

RELEASE_RETRY_S = 5.0
"""How long a hand-back keeps trying to release a lease through a database outage. Short,
because a shutting-down worker is about to be killed; if it fails, the lease expires and the
coordinator re-queues the run (charging the attempt)."""

_NEVER = float("inf")


class Ending(StrEnum):
    """How an executing run ended; the first to be decided wins."""

    RUNNING = "running"
    RESULT = "result"  # the run returned; its own result is written
    TIMED_OUT = "timed_out"  # over the hard limit; a timeout was written for it
    HANDED_BACK = "handed_back"  # warm shutdown; lease released, attempt refunded
    LEASE_LOST = "lease_lost"  # cancelled or re-queued elsewhere; nothing written


class LeaseKeeper:
    """The one thread of a worker process that serves every :class:`RunSupervisor`."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._active: set[RunSupervisor] = set()
        self._thread: threading.Thread | None = None
        self._sleeping_until = _NEVER  # when the keeper wakes up next by itself

    def add(self, supervisor: RunSupervisor) -> None:
        """Start serving ``supervisor`` (starts the thread on first use).

        The keeper is woken only when the new run is due before it would wake anyway: a run
        that starts and ends within one heartbeat never costs the keeper a wake-up.
        """
        with self._cond:
            self._active.add(supervisor)
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="studyq-lease-keeper", daemon=True
                )
                self._thread.start()
            if supervisor.next_due() < self._sleeping_until:
                self._cond.notify()

    def remove(self, supervisor: RunSupervisor) -> None:
        """Stop serving ``supervisor``."""
        with self._cond:
            self._active.discard(supervisor)

    def poke(self) -> None:
        """Re-read the deadlines now (a hand-back was requested)."""
        with self._cond:
            self._cond.notify()

    def _loop(self) -> None:
        while True:
            with self._cond:
                while True:
                    now = time.monotonic()
                    due = min((s.next_due() for s in self._active), default=_NEVER)
                    if due <= now:
                        break
                    self._sleeping_until = due
                    self._cond.wait(None if due == _NEVER else due - now)
                self._sleeping_until = 0.0  # awake: nothing needs to wake it
                ready = [s for s in self._active if s.next_due() <= now]
            for supervisor in ready:
                try:
                    supervisor.on_due(now)
                except Exception:  # keep serving the other runs
                    log.exception("supervising run %s failed", supervisor.claim.run_id)


class RunSupervisor:
    """Heartbeats, the hard time limit and the hand-back of one claimed run.

    Args:
        store: The process's store.
        claim: The claim being supervised.
        spec: The run.
        keeper: The process's keeper thread.
        heartbeat_s: Lease extension interval.
        lease_s: Lease length set by each heartbeat.
        timeout_s: The run's soft limit (``execution.timeout_s``), or None.
        grace_s: How long past ``timeout_s`` the run may go before it is timed out here.
        retry_s: How long the timeout write retries through a database outage.
        interrupt: Interrupts the run when it executes on the main thread, else None.
    """

    def __init__(
        self,
        store: ResultStore,
        claim: Claim,
        spec: RunSpec,
        *,
        keeper: LeaseKeeper,
        heartbeat_s: float,
        lease_s: float,
        timeout_s: float | None,
        grace_s: float,
        retry_s: float,
        interrupt: MainThreadInterrupt | None,
    ) -> None:
        self.store = store
        self.claim = claim
        self.spec = spec
        self.keeper = keeper
        self.heartbeat_s = heartbeat_s
        self.lease_s = lease_s
        self.timeout_s = timeout_s
        self.grace_s = grace_s
        self.retry_s = retry_s
        self.interrupt = interrupt
        self.started_at = datetime.now(UTC)
        self._start = time.monotonic()
        self._next_beat = self._start + heartbeat_s
        self._hard = _NEVER if timeout_s is None else self._start + timeout_s + grace_s
        self._lock = threading.Lock()
        self._ending = Ending.RUNNING
        self._hand_back_requested = False
        self._acting = False  # the keeper handed this run an ending; nothing more is due
        self._timeout_recorded = threading.Event()  # _time_out's write and check are done

    @property
    def ending(self) -> Ending:
        """How the run ended so far (``RUNNING`` until decided)."""
        return self._ending

    @property
    def elapsed_s(self) -> float:
        """Seconds since the run started executing."""
        return time.monotonic() - self._start

    def start(self) -> None:
        """Have the keeper serve this run."""
        self.keeper.add(self)

    def stop(self) -> None:
        """Stop serving this run (it returned or is being ended); idempotent."""
        self.keeper.remove(self)

    def begin_result(self) -> bool:
        """Claim the right to write the run's own result; False if another ending won."""
        return self._decide(Ending.RESULT)

    def request_hand_back(self) -> None:
        """Warm shutdown: hand the run back as soon as possible (any thread)."""
        self._hand_back_requested = True
        self.keeper.poke()

    def hand_back(self) -> Ending:
        """Hand the run back now, from any thread, and return how the run ended.

        A run already past its soft limit is recorded as a timeout instead: it was going to
        fail, and handing it back would let a hung run come back forever without ever
        charging an attempt.
        """
        if self.timeout_s is not None and self.elapsed_s >= self.timeout_s:
            self._time_out(
                f"run was still going {self.elapsed_s:.1f} s after it started (time limit "
                f"{self.timeout_s} s) when the worker shut down"
            )
            return self._ending
        if not self._decide(Ending.HANDED_BACK):
            return self._ending
        try:
            released = retry_unavailable(
                lambda: self.store.release_run(self.claim),
                what=f"handing back run {self.claim.run_id} (index {self.claim.index})",
                budget_s=RELEASE_RETRY_S,
                log=log,
            )
        except StoreError as error:
            log.error(
                "could not hand back run %s (index %d) of %s: %s; its lease will expire and "
                "the coordinator will re-queue it",
                self.claim.run_id,
                self.claim.index,
                self.claim.study_id,
                error,
            )
            return self._ending
        if released:
            log.info(
                "handed back run %s (index %d) of %s on shutdown after %.1f s; attempt refunded",
                self.claim.run_id,
                self.claim.index,
                self.claim.study_id,
                self.elapsed_s,
            )
        return self._ending

    # -- served by the keeper ----------------------------------------------------------------

    def next_due(self) -> float:
        """When the keeper must next act for this run (``time.monotonic`` clock)."""
        if self._acting or self._ending is not Ending.RUNNING:
            return _NEVER
        if self._hand_back_requested:
            return 0.0
        return min(self._next_beat, self._hard)

    def on_due(self, now: float) -> None:
        """Do what is due: hand back, time out (each on a thread of its own), or heartbeat."""
        if self._acting or self._ending is not Ending.RUNNING:
            return
        if self._hand_back_requested:
            self._act(self._hand_back_and_interrupt)
        elif now >= self._hard:
            self._act(
                lambda: self._time_out(
                    f"run did not stop within {self.grace_s} s after its time limit of "
                    f"{self.timeout_s} s; abandoned"
                )
            )
        elif now >= self._next_beat:
            self._next_beat = now + self.heartbeat_s
            self._heartbeat()

    def _act(self, action: Callable[[], object]) -> None:
        self._acting = True
        threading.Thread(
            target=action, name=f"studyq-end-{self.claim.run_id[:12]}", daemon=True
        ).start()

    def _hand_back_and_interrupt(self) -> None:
        if self.hand_back() is Ending.HANDED_BACK and self.interrupt is not None:
            self.interrupt.interrupt(HandBack)

    def _decide(self, ending: Ending) -> bool:
        with self._lock:
            if self._ending is not Ending.RUNNING:
                return False
            self._ending = ending
            return True

    def _heartbeat(self) -> None:
        try:
            held = self.store.heartbeat(self.claim, self.lease_s)
        except StoreUnavailableError as error:
            log.warning(
                "heartbeat for run %s failed, database unavailable (next try in %.1f s): %s",
                self.claim.run_id,
                self.heartbeat_s,
                error,
            )
            return
        except StoreError as error:
            log.error("heartbeat for run %s failed: %s", self.claim.run_id, error)
            return
        if held or not self._decide(Ending.LEASE_LOST):
            return
        log.warning(
            "run %s (index %d) of %s is no longer this worker's (cancelled, or its lease "
            "expired and it was re-queued); stopping it, its result would be refused",
            self.claim.run_id,
            self.claim.index,
            self.claim.study_id,
        )
        if self.interrupt is not None:
            self.interrupt.interrupt(LeaseLost)

    def wait_timeout_recorded(self, timeout_s: float) -> bool:
        """A run that ended ``TIMED_OUT``: wait until its timeout is written and checked
        (``_time_out`` may be on the keeper's thread); False if ``timeout_s`` ran out."""
        return self._timeout_recorded.wait(timeout_s)

    def _time_out(self, message: str) -> None:
        if not self._decide(Ending.TIMED_OUT):
            return
        try:
            self._record_timeout(message)
        finally:
            self._timeout_recorded.set()

    def _record_timeout(self, message: str) -> None:
        result = failed_result(
            self.spec,
            ErrorKind.TIMEOUT,
            error_type="RunTimeoutError",
            message=message,
            started_at=self.started_at,
            worker=self.claim.worker,
        )
        log.warning(
            "run %s (index %d) of %s timed out: %s",
            self.claim.run_id,
            self.claim.index,
            self.claim.study_id,
            message,
        )
        try:
            won = retry_unavailable(
                lambda: self.store.finish_run(self.claim, result),
                what=f"recording the timeout of run {self.claim.run_id}",
                budget_s=self.retry_s,
                log=log,
            )
        except StoreError as error:
            log.error("could not record the timeout of run %s: %s", self.claim.run_id, error)
            return
        if won:  # a timeout counts for the breaker (orchestrator.store.budget_gate)
            after_results(self.store, [(self.claim, result)])

    def __repr__(self) -> str:
        return f"RunSupervisor({self.claim.run_id!r}, attempt={self.claim.attempt}, {self._ending})"
