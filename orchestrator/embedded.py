"""The embedded sweep: plan, register, execute on this machine, record, export.

The coordinator claims runs in batches (one transaction per batch), hands the claimed specs
to the :class:`~orchestrator.executors.embedded.EmbeddedExecutor`, and records results in
batches through the same fenced ``finish`` transition the distributed workers use. The store
is the source of truth: a run is done when its success is recorded, so Ctrl-C (which releases
unfinished claims without charging an attempt) or SIGKILL (whose claims a later start
recognises as orphaned) never loses a recorded result, and the same command resumes.

After a SIGKILL the next start takes the dead coordinator's claims back at once and charges
an attempt only to the runs its start journal (:mod:`orchestrator.executors.start_journal`)
says had started; the claimed runs it never reached are handed back uncharged.
"""

from __future__ import annotations

import getpass
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import Future
from dataclasses import dataclass, field, replace
from functools import partial
from itertools import islice
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import select

from orchestrator.contracts.errors import StudyError
from orchestrator.contracts.extensions import RetryPolicy
from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings, load_settings
from orchestrator.executors.embedded import Claimed, EmbeddedExecutor, PoolKind, ResolverSpec
from orchestrator.executors.embedded_owner import EmbeddedOwner, is_dead_embedded_owner
from orchestrator.executors.retries import retry_delay, take_mark
from orchestrator.executors.start_journal import StartJournal
from orchestrator.export import ExportReport, export_artifacts
from orchestrator.progress import Progress
from orchestrator.store import ResultStore
from orchestrator.store.budget_gate import after_results, describe
from orchestrator.store.engine import transaction
from orchestrator.store.models import RunRow
from orchestrator.store.pausing import pause_of
from orchestrator.store.predicates import where_status
from orchestrator.store.records import Claim, RegisterReport, TakeBackReport
from orchestrator.store.retries import requeue_transient
from orchestrator.study.bindings_check import import_path_of
from orchestrator.study.model import Study
from orchestrator.study.plan import PreparedStudy, prepare

__all__ = ["StudyRun", "SweepOptions", "register", "run_embedded"]

_T = TypeVar("_T")

_CLAIM_BATCH = 256
_FLUSH_EVERY = 256
_FLUSH_SECONDS = 0.25
_EMBEDDED_LEASE_S = 24 * 3600.0  # the coordinator owns its runs; orphans are found by PID


@dataclass(frozen=True, slots=True, kw_only=True)
class SweepOptions:
    """How one embedded sweep runs: the knobs of ``run_study`` and ``studyq run``, declared
    once. Unset knobs fall back to the study file, then to the settings."""

    jobs: int | None = None
    """Runs at a time; default ``run_budget.parallelism`` if the study sets it, else the CPU
    count. 1 runs in the calling process."""
    pool: PoolKind = "process"
    """Where ``jobs > 1`` runs execute: processes, or threads for I/O-bound agents."""
    db: str | None = None
    """Result store URL; default the settings' ``database_url``."""
    resume: bool = True
    """False refuses a study that already has successful runs instead of running the rest."""
    dry_run: bool = False
    """Plan and count only: nothing is registered or executed."""
    show_progress: bool | None = None
    """Show a progress bar; default when stderr is a terminal."""
    limit: int | None = None
    """Run at most this many runs."""
    order: str | None = None
    """Dispatch order (``plan`` or ``balanced``); default the study's ``execution.order``."""
    fail_fast: bool | None = None
    """Stop after the first failure; default the study's ``run_budget.fail_fast``."""
    timeout_s: float | None = None
    """Per-run time limit in seconds; default the study's ``execution.timeout_s``."""
    export: bool = True
    """Export the canonical artifacts when the sweep ends (not after an interrupt)."""
    output_dir: str | Path | None = None
    """Where artifacts go; default the study's ``output_dir`` (``artifacts/<study_id>``)."""
    agent_bindings: Mapping[str, Any] | None = None
    """In-process agents by id (picklable with the process pool)."""
    problem_registry: Mapping[str, Any] | None = None
    """In-process problems by id (picklable with the process pool)."""
    condition_runner: Callable[..., Any] | None = None
    """An in-process condition runner: the study runs it instead of agents on problems."""


@dataclass(slots=True)
class StudyRun:
    """What one ``run_study`` call did, and where its results are."""

    study_id: str
    database_url: str
    planned: int
    executed: int = 0
    succeeded: int = 0
    failed: int = 0
    skipped_done: int = 0
    held_elsewhere: int = 0
    """Runs another live process holds (``running`` with a live lease): not run here."""
    taken_back: TakeBackReport | None = None
    """The claims of a killed predecessor on this host this call took back, if any."""
    interrupted: bool = False
    stopped_by_fail_fast: bool = False
    paused: str | None = None
    """Why dispatch stopped before the end: a spent budget or a tripped breaker (one line
    saying what continues it), or None."""
    counts: dict[str, int] = field(default_factory=dict)
    export: ExportReport | None = None

    @property
    def complete(self) -> bool:
        """Every planned run has a recorded success."""
        return self.counts.get(RunStatus.SUCCESS.value, 0) == self.planned

    def results(self) -> Iterator[Any]:
        """The study's runs with their results, streamed from the store in plan order."""
        store = ResultStore.open(self.database_url)
        try:
            yield from store.iter_runs(self.study_id)
        finally:
            store.close()


def _submitted_by() -> str:
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def register(
    store: ResultStore, prepared: PreparedStudy, *, references: Iterable[str] = ()
) -> RegisterReport:
    """Register the study, its conditions and every run spec (idempotent; refuses changes)."""
    study = prepared.study
    conditions = (
        {
            "condition_id": condition.condition_id,
            "admissible": condition.admissible,
            "constraint_messages": condition.constraint_messages,
            "factor_assignments": condition.factor_assignments,
            "block_assignments": condition.block_assignments,
            "metadata": condition.metadata,
        }
        for condition in prepared.conditions
    )
    return store.register_study(
        study_id=study.study_id,
        definition=study.to_upstream_dict(),
        definition_hash=study.definition_hash(),
        plan_fingerprint=prepared.plan_fingerprint(),
        conditions=conditions,
        run_specs=prepared.run_specs(),
        submitted_by=_submitted_by(),
        max_attempts=study.execution.max_attempts,
        references=sorted(set(references) | study.bindings.references()),
    )


def run_embedded(
    study: PreparedStudy | Study | str | Path,
    options: SweepOptions | None = None,
    *,
    settings: Settings | None = None,
    **changes: Any,
) -> StudyRun:
    """Run every run of ``study`` that has no recorded success, on this machine.

    ``changes`` set :class:`SweepOptions` fields over ``options``. A :class:`PreparedStudy`
    (a caller that checked it already, as ``studyq run`` does) is not prepared again.
    """
    options = replace(options or SweepOptions(), **changes)
    settings = settings or load_settings()
    condition_runner = options.condition_runner
    prepared = _prepared(study, settings, standalone=condition_runner is not None)
    study = prepared.study
    url = options.db or settings.database_url
    outcome = StudyRun(study.study_id, url, prepared.summary.planned)
    if options.dry_run:
        return outcome
    jobs = options.jobs or _default_jobs(study)
    execution = study.execution
    timeout_s = options.timeout_s if options.timeout_s is not None else execution.timeout_s
    fail_fast = options.fail_fast
    stop_on_failure = study.run_budget.fail_fast if fail_fast is None else fail_fast
    resolver_spec = ResolverSpec(
        bindings=study.bindings,
        allowed_imports=tuple(settings.allowed_imports),
        agents=dict(options.agent_bindings or {}),
        problems=dict(options.problem_registry or {}),
        runner=condition_runner,
        import_path=import_path_of(prepared.source),
    )
    # the pool's server loads while the store opens (its migrations) and the study registers
    EmbeddedExecutor.start_server(jobs=jobs, pool=options.pool)
    store = ResultStore.open(url)
    try:
        register(store, prepared)
        counts = store.count_by_status(study.study_id)
        if not options.resume and counts.get(RunStatus.SUCCESS.value, 0):
            raise StudyError(
                f"study '{study.study_id}' already has {counts[RunStatus.SUCCESS.value]} "
                f"successful runs in {store.url}. Fix: resume (the default) to run only what "
                "is missing, or use another database / study_id to start over."
            )
        journal = StartJournal.for_owner(EmbeddedOwner.current(), _store_key(store), study.study_id)
        taken_back = _take_back_dead_predecessors(store, study.study_id, journal)
        if taken_back.owners:
            outcome.taken_back = taken_back
        store.reconcile(study.study_id)  # claims of other hosts whose lease expired
        store.requeue_for_resubmit(
            study.study_id, statuses=[RunStatus.FAILED.value, RunStatus.CANCELLED.value]
        )
        pending = _pending_indices(store, study.study_id)
        counts = store.count_by_status(study.study_id)
        outcome.skipped_done = counts.get(RunStatus.SUCCESS.value, 0)
        outcome.held_elsewhere = counts.get(RunStatus.RUNNING.value, 0)
        specs: Iterator[RunSpec] = (
            spec
            for spec in prepared.run_specs(order=options.order or execution.order)
            if spec.index in pending
        )
        limit = options.limit
        if limit is not None:
            specs = islice(specs, limit)
        total = min(len(pending), limit) if limit is not None else len(pending)
        journal = _created(journal)  # before the first claim, so a kill leaves one behind
        executor = EmbeddedExecutor(
            resolver_spec,
            jobs=jobs,
            pool=options.pool,
            timeout_s=timeout_s,
            journal=journal.path if journal is not None else None,
            retry_on=tuple(execution.retry.on) if execution.retry is not None else (),
        )
        with executor, Progress(total, desc=study.study_id, show=options.show_progress) as progress:
            _drive(store, executor, specs, outcome, progress, stop_on_failure, execution.retry)
            outcome.paused = _paused(store, study.study_id)
            if outcome.paused is not None:
                progress.write(outcome.paused)
        if journal is not None:
            journal.remove()  # every claim is recorded or handed back
        outcome.counts = store.count_by_status(study.study_id)
        if options.export and not outcome.interrupted:
            # after a process pool's sweep, the per-run files are written in processes too
            # (its forkserver is warm); after threads or jobs=1, in this process (and the
            # side tables in a forked one, as by default)
            writers = jobs if options.pool == "process" and jobs > 1 else None
            outcome.export = export_artifacts(
                store, study.study_id, options.output_dir, jobs=writers
            )
    finally:
        store.close()
    return outcome


def _prepared(
    study: PreparedStudy | Study | str | Path, settings: Settings, *, standalone: bool
) -> PreparedStudy:
    """``study`` prepared; a prepared one as it is when it was prepared for the same mode
    (a condition runner makes a study standalone)."""
    if isinstance(study, PreparedStudy):
        if study.standalone or not standalone:
            return study
        study = study.study
    return prepare(
        study, max_bytes=settings.max_study_bytes, standalone=True if standalone else None
    )


def _default_jobs(study: Study) -> int:
    if "parallelism" in study.run_budget.model_fields_set:
        return study.run_budget.parallelism
    return os.cpu_count() or 1


def _take_back_dead_predecessors(
    store: ResultStore, study_id: str, journal: StartJournal | None
) -> TakeBackReport:
    """Take back at once the claims of embedded coordinators on this host that died (SIGKILL,
    crash): runs their start journal says had started are charged an attempt, the rest are
    handed back uncharged. Then remove those journals, and any other of this study left by a
    process that is gone."""
    journals: dict[str, StartJournal | None] = {}
    key = _store_key(store)

    def started_by(owner: str) -> set[tuple[int, int]] | None:
        parsed = EmbeddedOwner.parse(owner)
        kept = StartJournal.for_owner(parsed, key, study_id) if parsed is not None else None
        journals[owner] = kept
        return kept.read() if kept is not None else None

    report = store.take_back_orphans(
        study_id, is_dead=is_dead_embedded_owner, started_by=started_by
    )
    for kept in journals.values():
        if kept is not None:
            kept.remove()
    if journal is not None:
        journal.remove_stale()
    return report


def _store_key(store: ResultStore) -> str:
    """The database, named the same however its URL is spelled where that can be told (a
    SQLite file by its absolute path), so a rerun finds its predecessor's start journal."""
    database = store.engine.url.database
    if store.is_embedded and database and database != ":memory:":
        return f"sqlite:{Path(database).resolve()}"
    return store.url


def _created(journal: StartJournal | None) -> StartJournal | None:
    """``journal``, created empty; None if it cannot be (then, after a kill, the next start
    charges every claim: nothing says which runs had started)."""
    if journal is None:
        return None
    try:
        journal.create()
    except OSError:
        return None
    return journal


def _paused(store: ResultStore, study_id: str) -> str | None:
    """The study's pause (budget, breaker) as one line, or None: the claims of a paused
    study win nothing, so the sweep ended without running the rest."""
    with transaction(store.engine, readonly=True) as connection:
        pause = pause_of(connection, study_id)
    return None if pause is None else describe(pause)


def _pending_indices(store: ResultStore, study_id: str) -> set[int]:
    """The plan indices of the runs left to run; only the index is read (whole run records,
    their JSON decoded, cost as much as a no-op run each)."""
    query = select(RunRow.plan_index).where(
        RunRow.study_id == study_id, where_status(RunStatus.PLANNED, RunStatus.QUEUED)
    )
    with transaction(store.engine, readonly=True) as connection:
        return set(connection.scalars(query))


class _Recorder:
    """The one thread that writes to the store during a sweep.

    Results are written in batches while the dispatch loop keeps handing out runs (with 32
    threads of I/O-bound agents the writes, not the agents, were the ceiling). Claims go
    through the same thread (:meth:`call`), so the coordinator never waits on its own write
    lock: SQLite has one writer at a time and its busy handler sleeps in steps of up to 100 ms.
    """

    def __init__(self, store: ResultStore) -> None:
        self._store = store
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.recorded: set[int] = set()
        self.error: BaseException | None = None
        self.paused = threading.Event()
        """Set once a batch of results paused the study (a spent budget, a tripped breaker)."""
        self._thread = threading.Thread(target=self._loop, name="studyq-recorder", daemon=True)
        self._thread.start()

    def put(self, claim: Claim, result: RunResult) -> None:
        if self.error is not None:
            raise self.error
        self._queue.put((claim, result))

    def call(self, function: Callable[[], _T]) -> _T:
        """Run ``function`` on the writer thread, after the results queued before it."""
        if self.error is not None:
            raise self.error
        future: Future[_T] = Future()
        self._queue.put((function, future))
        return future.result()

    def close(self) -> None:
        """Write everything handed in, then stop; re-raises a write failure."""
        self._queue.put(None)
        self._thread.join()
        if self.error is not None:
            raise self.error

    def _flush(self, batch: list[tuple[Claim, RunResult]]) -> None:
        if batch and self.error is None:
            try:
                won = self._store.finish_runs_batch(batch)
                self.recorded.update(claim.index for claim, _ in batch)
                if after_results(  # a spent budget or a tripped breaker pauses the study
                    self._store, [item for item, ok in zip(batch, won, strict=True) if ok]
                ):
                    self.paused.set()
            except BaseException as exc:  # surfaced by put()/close() on the main thread
                self.error = exc
        batch.clear()

    def _loop(self) -> None:
        try:
            self._serve()
        except BaseException as exc:  # never die silently: results would be lost
            self.error = exc
            while True:  # fail whoever waits on a claim
                try:
                    item = self._queue.get_nowait()
                except queue.Empty:
                    return
                if item is not None and isinstance(item[1], Future):
                    item[1].set_exception(exc)

    def _serve(self) -> None:
        batch: list[tuple[Claim, RunResult]] = []
        deadline = 0.0  # when the oldest unwritten result must be written
        while True:
            try:
                timeout = max(0.0, deadline - time.monotonic()) if batch else None
                item = self._queue.get(timeout=timeout)
            except queue.Empty:
                self._flush(batch)
                continue
            if item is None:
                self._flush(batch)
                return
            first, second = item
            if isinstance(second, Future):
                self._flush(batch)  # results before a claim are written first
                try:
                    second.set_result(first())
                except BaseException as exc:
                    second.set_exception(exc)
                continue
            if not batch:
                deadline = time.monotonic() + _FLUSH_SECONDS
            batch.append(item)
            if len(batch) >= _FLUSH_EVERY or time.monotonic() >= deadline:
                self._flush(batch)


def _drive(
    store: ResultStore,
    executor: EmbeddedExecutor,
    specs: Iterator[RunSpec],
    outcome: StudyRun,
    progress: Progress,
    stop_on_failure: bool,
    retry: RetryPolicy | None = None,
) -> None:
    claims: dict[int, Claim] = {}
    recorder = _Recorder(store)
    retries: list[tuple[float, int, RunSpec]] = []  # (due, index, spec) of re-queued runs

    def claimed(specs: Iterator[RunSpec]) -> Iterator[Claimed]:
        while batch := list(islice(specs, _CLAIM_BATCH)):
            won = recorder.call(
                partial(
                    store.claim_runs,
                    outcome.study_id,
                    [spec.index for spec in batch],
                    worker=executor.worker,
                    lease_s=_EMBEDDED_LEASE_S,
                    allow_planned=True,
                )
            )
            for claim in won:
                claims[claim.index] = claim
            for spec in batch:
                if recorder.paused.is_set():
                    return  # no new run starts; the claims not handed out are released below
                if spec.index in claims:
                    yield spec, claims[spec.index].attempt

    def requeued(spec: RunSpec, result: RunResult) -> bool:
        """A transient failure with attempts left goes back to the queue (.retries)."""
        transient, retry_after = take_mark(result)
        if not transient or retry is None:
            return False
        claim = claims[spec.index]
        delay = retry_delay(retry, claim.attempt, retry_after)
        if not recorder.call(partial(_requeue_transient, store, claim, result, delay)):
            return False  # its last attempt: recorded as failed
        del claims[spec.index]
        retries.append((time.monotonic() + delay, spec.index, spec))
        return True

    def due_retries() -> list[RunSpec]:
        """The re-queued runs due next, once their delay has passed; none when the sweep
        stopped (they stay queued: the next ``studyq run`` takes them)."""
        if not retries or executor.stopped or recorder.paused.is_set():
            return []
        retries.sort()
        time.sleep(max(0.0, retries[0][0] - time.monotonic()))
        now = time.monotonic()
        due = [spec for at, _, spec in retries if at <= now]
        retries[:] = [item for item in retries if item[0] > now]
        return due

    try:
        for chunk, results in _passes(executor, claimed, specs, due_retries):
            ok = failed = 0
            for spec, result in zip(chunk, results, strict=True):
                if requeued(spec, result):
                    continue
                recorder.put(claims[spec.index], result)
                if result.status == RunStatus.SUCCESS:
                    ok += 1
                else:
                    failed += 1
            outcome.executed += len(results)
            outcome.succeeded += ok
            outcome.failed += failed
            progress.update(ok, failed)
            if failed and stop_on_failure and not outcome.stopped_by_fail_fast:
                outcome.stopped_by_fail_fast = True
                progress.write("fail_fast: a run failed; finishing runs in flight, then stopping.")
                executor.stop()
    except KeyboardInterrupt:
        outcome.interrupted = True
        executor.stop()
        progress.write("interrupted: recording finished runs; unfinished ones are released.")
    finally:
        try:
            recorder.close()
        finally:
            for index, claim in claims.items():
                if index not in recorder.recorded:
                    store.release_run(claim)
            claims.clear()


def _passes(
    executor: EmbeddedExecutor,
    claimed: Callable[[Iterator[RunSpec]], Iterator[Claimed]],
    specs: Iterator[RunSpec],
    due_retries: Callable[[], list[RunSpec]],
) -> Iterator[tuple[list[RunSpec], list[RunResult]]]:
    """The sweep's runs, then the re-queued ones as they come due (a run re-queued during a
    pass of retries is executed in a later pass)."""
    yield from executor.execute(claimed(specs))
    while due := due_retries():
        yield from executor.execute(claimed(iter(due)))


def _requeue_transient(store: ResultStore, claim: Claim, result: RunResult, delay: float) -> bool:
    with transaction(store.engine) as connection:
        return requeue_transient(connection, claim, result, delay)
