"""The result store: the one object the coordinator, the workers and the exporter talk to.

:class:`ResultStore` owns an engine and opens one short transaction per call through
:func:`~orchestrator.store.engine.transaction`; the SQL lives in ``registration``,
``attempts``, ``recovery`` and ``queries``. Each state change is a guarded transition that returns
whether it won (a bool, a count, or the claims/keys it moved), so callers never read-then-write
and two actors can never both win.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from sqlalchemy import ColumnElement, Engine, delete, exists, text
from sqlalchemy.engine import URL

from orchestrator.contracts.errors import StudyInFlightError
from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import attempts, queries, recovery, registration
from orchestrator.store.counts import delete_counts, fold, lock_out_folds
from orchestrator.store.engine import (
    DEFAULT_URL,
    AutocommitLane,
    create_engine_for,
    mask_url,
    transaction,
)
from orchestrator.store.models import RunRow, StudyRow
from orchestrator.store.predicates import IN_CHUNK, where_status
from orchestrator.store.records import (
    AttemptRecord,
    Claim,
    ConditionRecord,
    ErrorSummary,
    EvaluationRecord,
    EventRecord,
    ProgressStats,
    ReconcileReport,
    RegisterReport,
    RunRecord,
    StudyInfo,
    TakeBackReport,
)
from orchestrator.store.schema import ensure_current, upgrade

__all__ = ["ResultStore"]

DEFAULT_MAX_ATTEMPTS = 3
"""Claims a run may use before a vanished worker makes it fail as ``lost``."""


IN_FLIGHT = (RunStatus.PLANNED, RunStatus.QUEUED, RunStatus.RUNNING)
"""Statuses of runs a worker may still pick up or is executing: a study holding any of them
is not deleted."""


def _in_flight(study_id: str) -> tuple[ColumnElement[bool], ...]:
    return RunRow.study_id == study_id, where_status(*IN_FLIGHT)


def _fast_commit(connection: Any) -> None:
    """Claims, heartbeats and releases need not wait for the WAL flush on PostgreSQL: if the
    server crashes and loses one, the run is merely claimable again (and the executing
    worker's fenced result is refused), never duplicated. Results stay fully durable. (The
    claim statement sets this itself: it runs in autocommit, as its own transaction.)"""
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("SET LOCAL synchronous_commit = off")


class ResultStore:
    """Studies, runs and results in SQLite (embedded) or PostgreSQL (shared).

    Build it with :meth:`open`; close it (or use it as a context manager) to release the
    connection pool. One instance is safe to share between threads.
    """

    def __init__(self, engine: Engine) -> None:
        """Wrap an engine from :func:`create_engine_for` (tests and callers that manage
        schema themselves); most code wants :meth:`open`."""
        self.engine = engine
        self._lane = AutocommitLane(engine) if engine.dialect.name == "postgresql" else None

    @classmethod
    def open(cls, url: str | URL = DEFAULT_URL, **engine_options: Any) -> ResultStore:
        """Connect to ``url`` and make sure its schema is usable.

        An embedded SQLite store is created (with its directory) or upgraded on the spot. A
        PostgreSQL store must already be at this version's schema; otherwise this raises a
        StoreError that says to run ``studyq db upgrade`` (a shared database is never
        migrated behind the backs of workers still running the old version).

        Raises:
            StoreUnavailableError: the database cannot be reached.
            StoreError: the schema is missing or at another version (PostgreSQL).
        """
        engine = create_engine_for(url, **engine_options)
        database = engine.url.database
        if engine.dialect.name == "sqlite" and database and database != ":memory:":
            Path(database).parent.mkdir(parents=True, exist_ok=True)
        try:
            if engine.dialect.name == "sqlite":
                upgrade(engine)
            else:
                ensure_current(engine)
        except BaseException:
            engine.dispose()
            raise
        return cls(engine)

    @property
    def url(self) -> str:
        """The database URL with the password masked."""
        return mask_url(self.engine.url)

    @property
    def is_embedded(self) -> bool:
        """Whether this is the embedded SQLite store (one writer: the local coordinator)."""
        return self.engine.dialect.name == "sqlite"

    def close(self) -> None:
        """Close every pooled connection."""
        if self._lane is not None:
            self._lane.close()
        self.engine.dispose()

    def __enter__(self) -> ResultStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"ResultStore({self.url!r})"

    # -- studies -----------------------------------------------------------------------------

    def register_study(
        self,
        study_id: str,
        definition: Mapping[str, Any],
        definition_hash: str,
        plan_fingerprint: str,
        conditions: Iterable[Mapping[str, Any]],
        run_specs: Iterable[RunSpec],
        *,
        submitted_by: str = "",
        max_attempts: int = DEFAULT_MAX_ATTEMPTS,
        references: Iterable[str] = (),
        batch_size: int = registration.BATCH_SIZE,
    ) -> RegisterReport:
        """Register a study with its conditions and run specs in one transaction.

        ``conditions`` are mappings with ``condition_id``, ``admissible``,
        ``constraint_messages``, ``factor_assignments``, ``block_assignments`` and
        ``metadata``, in design order. ``run_specs`` must come in plan order with
        ``index`` 0, 1, 2, ...; both are consumed lazily in batches. Registering the same
        ``definition_hash`` again is a no-op (``created=False``), also when two coordinators
        race.

        Raises:
            StudyConflictError: another definition is registered under ``study_id``; the
                message lists where the definitions differ and what to do.
        """
        with transaction(self.engine) as connection:
            report = registration.register_study(
                connection,
                study_id=study_id,
                definition=definition,
                definition_hash=definition_hash,
                plan_fingerprint=plan_fingerprint,
                conditions=conditions,
                run_specs=run_specs,
                submitted_by=submitted_by,
                max_attempts=max_attempts,
                allowed_references=references,
                batch_size=batch_size,
            )
        if report.created and self.engine.dialect.name == "postgresql":
            self._analyze()
        return report

    def _analyze(self) -> None:
        """Refresh PostgreSQL's statistics after a bulk load.

        Without them the planner takes a freshly loaded study for a handful of rows and
        answers single-run claims by scanning the status index, ~100x slower than the primary
        key at 100,000 runs. Autovacuum would get there, minutes later. A role that does not
        own the tables gets a warning from PostgreSQL, not an error.
        """
        with transaction(self.engine) as connection:
            connection.execute(text("ANALYZE runs, conditions"))

    def delete_study(self, study_id: str, *, if_idle: bool = False) -> bool:
        """Remove a study with all its runs and results; False if it was not registered.

        With ``if_idle`` the study is removed only while none of its runs is planned, queued
        or running: the check and the delete are one statement, so a run a worker claims
        meanwhile keeps the study.

        Raises:
            StudyInFlightError: ``if_idle`` and some runs are still in flight.
        """
        statement = delete(StudyRow).where(StudyRow.study_id == study_id)
        if if_idle:
            statement = statement.where(~exists().where(*_in_flight(study_id)))
        with transaction(self.engine) as connection:
            lock_out_folds(connection, study_id)
            deleted = connection.execute(statement)
            if deleted.rowcount == 1:
                delete_counts(connection, study_id)
            if deleted.rowcount == 1 or not if_idle:
                return deleted.rowcount == 1
            counts = queries.count_by_status(connection, study_id)
        in_flight = {s: counts.get(s.value, 0) for s in IN_FLIGHT if counts.get(s.value, 0)}
        if not in_flight:
            return False  # not registered
        raise StudyInFlightError(study_id, {s.value: n for s, n in in_flight.items()})

    def find_study(self, study_id: str) -> StudyInfo | None:
        """The registered study, or None."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.find_study(connection, study_id)

    def list_studies(self) -> list[StudyInfo]:
        """Every registered study, newest first."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.list_studies(connection)

    # -- enqueue and claim -------------------------------------------------------------------

    def queue_next(
        self, study_id: str, *, batch: int = queries.PAGE_SIZE, after: int = -1
    ) -> list[tuple[RunSpec, int]]:
        """Mark the next ``batch`` planned runs past index ``after`` queued and return their
        specs with their attempt counts, in plan order; publish exactly those (a concurrent
        coordinator gets other runs). Empty when no planned run is left past ``after``. Call
        it until it is empty, passing the last index of each page as the next ``after``."""
        with transaction(self.engine) as connection:
            return attempts.queue_next(connection, study_id, batch, after)

    def queue_runs(self, study_id: str, indices: Sequence[int]) -> list[tuple[int, int]]:
        """``planned -> queued``; returns ``(index, attempt)`` of the runs this call moved, in
        plan order. Publish exactly those (another coordinator moved the rest)."""
        with transaction(self.engine) as connection:
            return attempts.queue_runs(connection, study_id, indices)

    def mark_queued(self, study_id: str, indices: Sequence[int]) -> int:
        """:meth:`queue_runs` when only the count matters."""
        return len(self.queue_runs(study_id, indices))

    def claim_run(
        self,
        study_id: str,
        index: int,
        *,
        worker: str,
        lease_s: float,
        allow_planned: bool = False,
    ) -> Claim | None:
        """``queued -> running`` with a lease of ``lease_s`` seconds (database clock).

        Returns None when the run is not claimable: another worker holds it, it is terminal,
        cancelled, out of attempts, or (unless ``allow_planned``, the embedded mode) not yet
        queued. The returned claim's ``attempt`` is this attempt's number and fencing token.
        """
        claims = self.claim_runs(
            study_id, [index], worker=worker, lease_s=lease_s, allow_planned=allow_planned
        )
        return claims[0] if claims else None

    def claim_runs(
        self,
        study_id: str,
        indices: Sequence[int],
        *,
        worker: str,
        lease_s: float,
        allow_planned: bool = False,
        verify: attempts.Verify | None = None,
        durable: bool = False,
    ) -> list[Claim]:
        """:meth:`claim_run` for many runs in one statement (the embedded executor's batch);
        returns the claims won, in plan order.

        ``verify`` (index -> message digest and attempt; then ``indices`` is ignored) claims
        a run only for the message that carries its registered spec (a worker's check of
        what the broker delivered: :data:`~orchestrator.store.attempts.Verify`). ``durable``
        makes the claim survive a database crash before this returns (``at_most_once``); by
        default a claim commits asynchronously on PostgreSQL, so a crash can forget the last
        ~200 ms of claims and their runs are executed again.
        """
        if self._lane is not None:
            # One statement per 1,000 runs on PostgreSQL (it sets its own commit mode).
            count = len(indices) if verify is None else len(verify)
            with self._lane.cursor(transaction=count > IN_CHUNK) as cursor:
                return attempts.claim_pg(
                    attempts.cursor_executor(cursor),
                    study_id,
                    indices,
                    worker=worker,
                    lease_s=lease_s,
                    allow_planned=allow_planned,
                    verify=verify,
                    durable=durable,
                )
        with transaction(self.engine) as connection:
            return attempts.claim(
                connection,
                study_id,
                indices,
                worker=worker,
                lease_s=lease_s,
                allow_planned=allow_planned,
                verify=verify,
            )

    def heartbeat(self, claim: Claim, lease_s: float) -> bool:
        """Extend the lease; False means the run is no longer this worker's (lease expired
        and re-queued, cancelled): stop working on it, its result would be refused."""
        with transaction(self.engine) as connection:
            _fast_commit(connection)
            return attempts.heartbeat(connection, claim, lease_s)

    # -- ending an attempt -------------------------------------------------------------------

    def finish_run(self, claim: Claim, result: RunResult) -> bool:
        """Record the result in one transaction: the run becomes ``success`` or ``failed``
        and its evaluations, events and attempt history are written, or, if the claim no
        longer holds (stale attempt, already finished, cancelled), nothing is written and
        this returns False."""
        return self.finish_runs_batch([(claim, result)])[0]

    def finish_runs_batch(self, items: Iterable[tuple[Claim, RunResult]]) -> list[bool]:
        """:meth:`finish_run` for many runs in one transaction (the embedded fast path); each
        is fenced on its own. Returns one bool per item, in order."""
        batch = list(items)
        if self._lane is not None:
            # One statement per result on PostgreSQL; a batch shares one transaction (and
            # one wait for the WAL flush).
            with self._lane.cursor(transaction=len(batch) > 1) as cursor:
                execute = attempts.cursor_executor(cursor)
                return [attempts.finish_pg(execute, claim, result) for claim, result in batch]
        with transaction(self.engine) as connection:
            return attempts.finish(connection, batch)

    def release_run(self, claim: Claim) -> bool:
        """Warm shutdown: hand the run back to ``queued`` without charging the attempt."""
        with transaction(self.engine) as connection:
            _fast_commit(connection)
            return attempts.release(connection, claim)

    # -- coordinator-side transitions --------------------------------------------------------

    def reconcile(self, study_id: str, *, queued_timeout_s: float | None = None) -> ReconcileReport:
        """Expire lost leases (requeue, or fail as ``lost`` after ``max_attempts``) and find
        queued runs nobody claimed for ``queued_timeout_s``, in one transaction. Publish
        ``report.to_publish`` after this returns."""
        if self.engine.dialect.name == "postgresql":  # SQLite counts on shard 0 only
            with transaction(self.engine) as connection:
                fold(connection, study_id)  # its own transaction: its locks end here
        with transaction(self.engine) as connection:
            return recovery.reconcile(connection, study_id, queued_timeout_s=queued_timeout_s)

    def take_back_orphans(
        self,
        study_id: str,
        *,
        is_dead: Callable[[str], bool],
        started_by: Callable[[str], Collection[tuple[int, int]] | None],
    ) -> TakeBackReport:
        """Take back the claims of dead lease owners (``is_dead``) at once, charging only
        claims that started: ``started_by(owner)``
        names a dead owner's started claims as ``(index, attempt)`` (None: it cannot tell,
        all are charged); the others go back to ``queued`` uncharged, as :meth:`release_run`
        hands a run back."""
        with transaction(self.engine) as connection:
            return recovery.take_back_orphans(
                connection, study_id, is_dead=is_dead, started_by=started_by
            )

    def cancel(self, study_id: str) -> int:
        """Cancel every run that has not finished; returns how many."""
        with transaction(self.engine) as connection:
            return recovery.cancel(connection, study_id)

    def requeue_for_resubmit(
        self,
        study_id: str,
        *,
        statuses: Iterable[RunStatus | str] = (RunStatus.FAILED,),
        error_contains: str | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> int:
        """Put finished runs matching the filters back to ``planned`` with a fresh attempt
        budget; returns how many. Enqueue them with :meth:`queue_next` like any
        planned run. Filters: :func:`~orchestrator.store.predicates.where_filters`;
        ``error_contains`` matches the error kind, type or message, case-insensitively."""
        with transaction(self.engine) as connection:
            moved = recovery.requeue_for_resubmit(
                connection,
                study_id,
                statuses=statuses,
                error_contains=error_contains,
                where=where,
            )
            return len(moved)

    # -- reading -----------------------------------------------------------------------------

    def find_run(self, study_id: str, index: int) -> RunRecord | None:
        """The run at ``index`` in the plan, or None."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.find_run(connection, study_id, index)

    def find_runs_by_id(self, study_id: str, run_id: str) -> list[RunRecord]:
        """Every run with ``run_id`` (more than one only when the design repeats levels)."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.find_runs_by_id(connection, study_id, run_id)

    def count_by_status(self, study_id: str) -> dict[str, int]:
        """Runs per status, zero for absent statuses."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.count_by_status(connection, study_id)

    def count_by(self, study_id: str, by: str) -> dict[str, dict[str, int]]:
        """Runs per status within each ``condition``, ``agent`` or ``problem``."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.count_by(connection, study_id, by)

    def count_by_each(self, study_id: str) -> dict[str, dict[str, dict[str, int]]]:
        """:meth:`count_by` for ``condition``, ``agent`` and ``problem`` (PostgreSQL: one pass)."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.count_by_each(connection, study_id)

    def progress_stats(self, study_id: str, *, window_s: float = 300.0) -> ProgressStats:
        """Cost so far and the recent finishing rate (for a rate and an ETA)."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.progress_stats(connection, study_id, window_s=window_s)

    def top_errors(self, study_id: str, *, limit: int = 10) -> list[ErrorSummary]:
        """Failed runs grouped by error kind and type, largest first."""
        with transaction(self.engine, readonly=True) as connection:
            return queries.top_errors(connection, study_id, limit=limit)

    def iter_runs(
        self,
        study_id: str,
        *,
        statuses: Iterable[RunStatus | str] | None = None,
        batch: int = queries.PAGE_SIZE,
    ) -> Iterator[RunRecord]:
        """Runs in plan order, streamed ``batch`` rows at a time."""
        return queries.iter_runs(self.engine, study_id, statuses=statuses, batch=batch)

    def iter_conditions(
        self, study_id: str, *, batch: int = queries.PAGE_SIZE
    ) -> Iterator[ConditionRecord]:
        """Conditions in design order."""
        return queries.iter_conditions(self.engine, study_id, batch=batch)

    def iter_evaluations(
        self, study_id: str, *, batch: int = queries.PAGE_SIZE
    ) -> Iterator[EvaluationRecord]:
        """Evaluation rows in plan order."""
        return queries.iter_evaluations(self.engine, study_id, batch=batch)

    def iter_events(
        self, study_id: str, *, batch: int = queries.PAGE_SIZE
    ) -> Iterator[EventRecord]:
        """Event rows in plan order."""
        return queries.iter_events(self.engine, study_id, batch=batch)

    def iter_attempts(
        self, study_id: str, *, batch: int = queries.PAGE_SIZE
    ) -> Iterator[AttemptRecord]:
        """Attempt history in plan order, then attempt order."""
        return queries.iter_attempts(self.engine, study_id, batch=batch)
