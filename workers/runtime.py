"""What one worker process keeps between deliveries.

A :class:`WorkerRuntime` holds the process's store (an engine created in this process, never
inherited across a fork), the study contexts (resolver and time limit, built once per study
from the stored definition), the counters of what deliveries came to, the lease keeper thread,
and the runs executing now, so a warm shutdown can hand them back.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from pydantic import ValidationError

from orchestrator.contracts.extensions import Bindings, ExecutionPolicy
from orchestrator.store import ResultStore, StudyInfo, create_engine_for
from workers.bindings import Resolver
from workers.claims import ClaimBatcher
from workers.config import WorkerSettings
from workers.heartbeat import LeaseKeeper, RunSupervisor
from workers.interrupt import MainThreadInterrupt
from workers.retrying import retry_unavailable
from workers.writer import ResultWriter

__all__ = ["StudyContext", "WorkerRuntime", "worker_name"]

log = logging.getLogger("studyq.worker")


def worker_name(nodename: str, pid: int | None = None) -> str:
    """``<nodename>:<pid>``, the lease owner a worker process claims runs as.

    The Celery node name (``celery@host`` by default) says which worker in Flower; the pid
    says which process, so the prefork parent can recognise its killed child's leases.
    """
    return f"{nodename}:{os.getpid() if pid is None else pid}"


@dataclass(frozen=True, slots=True)
class StudyContext:
    """What executing a study's runs needs, built once per study and process."""

    study_id: str
    resolver: Resolver
    timeout_s: float | None
    problem: str | None = None
    """Why the study's runs cannot execute (its stored sections do not parse), or None."""
    at_most_once: bool = False
    """Claims of its runs commit durably before the agent runs (``execution.at_most_once``)."""

    @classmethod
    def build(
        cls, info: StudyInfo, allowed_imports: list[str], *, trust_study_bindings: bool = True
    ) -> StudyContext:
        """Resolver and time limit from the stored definition.

        The resolver trusts exactly what the study was registered with
        (``StudyInfo.allowed_references``: its bindings and what the submitter allowed;
        nothing of it with ``trust_study_bindings`` false) plus this worker's
        ``STUDYQ_ALLOWED_IMPORTS`` and the installed entry points; nothing else is imported.
        """
        definition = info.definition
        problem = None
        try:
            bindings = Bindings.model_validate(definition.get("bindings") or {})
            execution = ExecutionPolicy.model_validate(definition.get("execution") or {})
        except ValidationError as error:
            bindings, execution = Bindings(), ExecutionPolicy()
            problem = f"the stored study's bindings/execution sections are invalid: {error}"
        resolver = Resolver(
            bindings,
            allowed_imports=allowed_imports,
            trust_study=trust_study_bindings,
            registered_references=info.allowed_references,
        )
        return cls(info.study_id, resolver, execution.timeout_s, problem, execution.at_most_once)


class WorkerRuntime:
    """One worker process's store, study contexts, counters and executing runs.

    Build it in the process that uses it (Celery's ``worker_process_init``, i.e. after the
    fork); an engine must never cross a fork. Safe to share between the threads of the
    ``threads`` pool.
    """

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        worker: str,
        store: ResultStore | None = None,
        write_behind: bool = False,
    ) -> None:
        """``write_behind``: results go to :attr:`writer`'s thread and a delivery returns
        before its result is written (the Celery worker; see :mod:`workers.writer`);
        otherwise a delivery writes its result before it returns."""
        self.settings = settings
        self.worker = worker
        self.pid = os.getpid()
        # No pre-ping: it is one more round trip before every heartbeat and release (claims
        # and results use connections kept open, without one either). A connection the
        # server dropped fails its statement instead, SQLAlchemy discards the pool's older
        # connections, and the write is retried (workers.retrying).
        self.store = store or ResultStore(
            create_engine_for(settings.database_url, pool_pre_ping=False)
        )
        self.interrupt = MainThreadInterrupt()
        self.keeper = LeaseKeeper()
        self.counters: Counter[str] = Counter()
        self.claims = ClaimBatcher(self.store, worker=worker, lease_s=settings.lease_s)
        self.write_behind = write_behind
        self.writer = ResultWriter(self.store, retry_s=settings.result_retry_s, count=self.count)
        self._studies: dict[str, StudyContext] = {}
        self._lock = threading.Lock()
        self._active: set[RunSupervisor] = set()
        self._shutting_down = False

    def drain(self) -> bool:
        """Wait for the results still being written, for up to ``shutdown_grace_s`` (a
        process told to stop must not hang on a database outage); False if some were not.
        Called before the process exits."""
        pending = self.writer.pending
        if not pending:
            return True
        log.info("waiting for %d result(s) to be written before exiting", pending)
        written = self.writer.drain(self.settings.shutdown_grace_s)
        if not written:
            log.error(
                "%d result(s) not written before exiting; their leases will expire and the "
                "coordinator will re-queue those runs",
                self.writer.pending,
            )
        return written

    def close(self) -> None:
        """Write what is pending, then release the database connections."""
        self.drain()
        self.store.close()

    def abandon_after_fork(self) -> None:
        """Forget an inherited runtime in a forked child without touching the parent's
        connections (SQLAlchemy's ``dispose(close=False)`` recipe for ``os.fork``)."""
        self.store.engine.dispose(close=False)

    def count(self, what: str) -> int:
        """Increment and return a counter."""
        with self._lock:
            self.counters[what] += 1
            return self.counters[what]

    def study(self, study_id: str) -> StudyContext | None:
        """The study's context, loaded from the store once per process; None if the study is
        not (or no longer) registered."""
        cached = self._studies.get(study_id)
        if cached is not None:
            return cached
        info = retry_unavailable(
            lambda: self.store.find_study(study_id),
            what=f"loading study {study_id}",
            budget_s=self.settings.result_retry_s,
            log=log,
        )
        if info is None:
            return None
        context = StudyContext.build(
            info,
            list(self.settings.allowed_imports),
            trust_study_bindings=self.settings.trust_study_bindings,
        )
        with self._lock:
            return self._studies.setdefault(study_id, context)

    # -- warm shutdown ---------------------------------------------------------------------

    @property
    def shutting_down(self) -> bool:
        """Whether a warm shutdown asked for runs to be handed back."""
        return self._shutting_down

    def hand_back_all(self) -> int:
        """Warm shutdown: hand back every run executing in this process and claim no more;
        returns how many were executing."""
        with self._lock:
            self._shutting_down = True
            active = list(self._active)
        for supervisor in active:
            supervisor.request_hand_back()
        return len(active)

    @contextmanager
    def executing(self, supervisor: RunSupervisor) -> Iterator[None]:
        """Track a run as executing, so a warm shutdown can find it."""
        with self._lock:
            self._active.add(supervisor)
        try:
            yield
        finally:
            with self._lock:
                self._active.discard(supervisor)
