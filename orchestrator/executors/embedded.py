"""The embedded executor: runs on this machine, in-process, in processes or in threads.

The coordinator hands it claimed run specs and gets results back in completion order; the
executor never touches the store. The run itself is the worker's ``execute_run`` and the
study's resolver the worker's ``Resolver``, reached through their entry points
(:mod:`orchestrator.contracts.worker_api`): ``orchestrator/`` never imports ``workers/``.
Right before a run executes, the process executing it notes the run in the sweep's start
journal (:mod:`.start_journal`), so that when the coordinator is killed the next sweep
charges an attempt only to the claims that really started.

``jobs=1`` executes in the calling process (no pickling, no IPC: the cheapest path, and the
ancestor's default); ``pool="process"`` uses a process pool whose workers build the study's
resolver once and execute chunks of runs; ``pool="thread"`` uses threads, for I/O-bound
agents (API calls) whose cost is waiting.

Time limits: in-process and process-pool runs execute on their process's main thread under
the timer the workers use too (:class:`~orchestrator.contracts.interrupt.MainThreadInterrupt`),
which raises :class:`~orchestrator.contracts.errors.RunTimeoutError` inside the agent (Python
code is interrupted between bytecodes). Threads cannot be interrupted; there a run over its
limit is recorded as a timeout when it returns. Global RNG isolation holds per process, so
with threads only agents that use the ``seed``/``rng`` they are handed are deterministic
(docs/determinism.md).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import (
    FIRST_COMPLETED,
    Executor,
    Future,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    wait,
)
from contextlib import nullcontext
from dataclasses import dataclass, field
from itertools import islice
from multiprocessing.context import ForkServerContext
from typing import Any, Literal, cast

from orchestrator.contracts.errors import StudyError
from orchestrator.contracts.extensions import Bindings
from orchestrator.contracts.interrupt import MainThreadInterrupt
from orchestrator.contracts.results import RunResult
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.worker_api import RunResolver, worker_entry, worker_module
from orchestrator.executors.embedded_owner import EmbeddedOwner, process_alive
from orchestrator.executors.retries import mark_transient
from orchestrator.executors.start_journal import StartLog

__all__ = [
    "Claimed",
    "EmbeddedExecutor",
    "PoolKind",
    "ResolverSpec",
    "file_writers",
    "worker_name",
]

PoolKind = Literal["process", "thread"]

Claimed = tuple[RunSpec, int]
"""A run to execute and the attempt number of its claim (what the start journal records)."""


def worker_name() -> str:
    """``embedded:<host>:<pid>:<start>``: lets a restarted coordinator recognise its dead
    ancestors (:mod:`.embedded_owner`)."""
    return str(EmbeddedOwner.current())


@dataclass(slots=True)
class ResolverSpec:
    """Everything a process needs to build the study's resolver; picklable by design."""

    bindings: Bindings
    allowed_imports: tuple[str, ...] = ()
    agents: Mapping[str, Any] = field(default_factory=dict)
    problems: Mapping[str, Any] = field(default_factory=dict)
    runner: Callable[..., Any] | None = None
    import_path: tuple[str, ...] = ()
    """Folders put first on ``sys.path`` before anything resolves (the study's own folder),
    in each process: a forkserver child does not see the parent's later ``sys.path``."""

    def build(self) -> RunResolver:
        sys.path[:0] = [folder for folder in self.import_path if folder not in sys.path]
        return worker_entry("resolver")(
            self.bindings,
            agents=self.agents,
            problems=self.problems,
            runner=self.runner,
            allowed_imports=self.allowed_imports,
        )


def _execute(
    spec: RunSpec,
    resolver: RunResolver,
    timeout_s: float | None,
    worker: str,
    interrupt: MainThreadInterrupt | None,
    retry_on: tuple[str, ...] = (),
) -> RunResult:
    """One run; under ``interrupt``'s timer when the caller is a process's main thread. A
    failure whose exception ``retry_on`` names is marked transient (:mod:`.retries`)."""
    execute_run = worker_entry("execute_run")  # its first call imports it: not on the clock
    timer = interrupt.armed(timeout_s) if interrupt is not None else nullcontext()
    if not retry_on:
        with timer:
            return execute_run(spec, resolver, timeout_s=timeout_s, worker=worker)
    errors: list[BaseException] = []
    with timer:
        # on_error: the worker's execute_run hands it the run's exception (the contract's
        # ExecuteRun protocol predates it, hence the cast)
        result: RunResult = cast(Any, execute_run)(
            spec, resolver, timeout_s=timeout_s, worker=worker, on_error=errors.append
        )
    if errors:
        mark_transient(result, errors[-1], retry_on)
    return result


def _main_thread_interrupt(timeout_s: float | None) -> MainThreadInterrupt | None:
    """The timer for runs on the calling thread, or None where none is needed or possible."""
    interrupt = MainThreadInterrupt()
    return interrupt if timeout_s is not None and interrupt.usable else None


# --- process-pool side -----------------------------------------------------------------

_process_state: dict[str, Any] = {}


def _exit_with(coordinator: int, start: int | None) -> None:
    """Pool processes wait on a pipe forever; if the coordinator is killed (SIGKILL) nobody
    closes it, so each process watches its coordinator and leaves when it is gone (also
    while it is an unreaped zombie)."""
    while True:
        time.sleep(1.0)
        if not process_alive(coordinator, start):
            os._exit(1)


def _watch_coordinator(coordinator: tuple[int, int | None]) -> None:
    """Every pool process's start: Ctrl-C goes to the coordinator, which stops cleanly
    (children must not die mid-run), and the process leaves when its coordinator is gone."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    threading.Thread(target=_exit_with, args=coordinator, daemon=True).start()


def _init_process(
    resolver_spec: ResolverSpec,
    timeout_s: float | None,
    coordinator: tuple[int, int | None],
    journal: str | None,
    retry_on: tuple[str, ...] = (),
) -> None:
    _watch_coordinator(coordinator)
    _process_state["resolver"] = resolver_spec.build()
    _process_state["timeout_s"] = timeout_s
    _process_state["interrupt"] = _main_thread_interrupt(timeout_s)
    _process_state["worker"] = worker_name()
    _process_state["starts"] = StartLog(journal) if journal is not None else None
    _process_state["parent"] = os.getppid()
    _process_state["retry_on"] = retry_on


def _run_chunk(items: list[tuple[int, dict[str, Any]]]) -> list[RunResult]:
    """Execute ``(attempt, message)`` items in order, noting each start in the journal."""
    resolver: RunResolver = _process_state["resolver"]
    timeout_s: float | None = _process_state["timeout_s"]
    interrupt: MainThreadInterrupt | None = _process_state["interrupt"]
    worker = _process_state["worker"]
    starts: StartLog | None = _process_state["starts"]
    parent: int = _process_state["parent"]
    results = []
    for attempt, message in items:
        if os.getppid() != parent:
            # The forkserver left: the coordinator is dead, and its claims may already be
            # taken back by a new sweep. Start nothing more (_exit_with would, within 1 s).
            os._exit(1)
        spec = RunSpec.from_message(message)
        if starts is not None:
            starts.started(spec.index, attempt)
        results.append(
            _execute(spec, resolver, timeout_s, worker, interrupt, _process_state["retry_on"])
        )
    return results


# --- coordinator side ------------------------------------------------------------------


def _forkserver_context() -> ForkServerContext:
    """The process pool's context: a forkserver that has imported the worker's execution
    module and NumPy and looked up the entry points (:mod:`.pool_preload`), so that each
    pool process starts as a fork of it."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(
        [worker_module("execute_run"), "numpy", "orchestrator.executors.pool_preload"]
    )
    return context


def file_writers(processes: int) -> ProcessPoolExecutor:
    """Processes that write an export's per-run files
    (:class:`~orchestrator.export_records.RunFiles`), forked from the process pool's
    forkserver: after a sweep it is running already, with everything they need imported."""
    return ProcessPoolExecutor(
        max_workers=processes,
        mp_context=_forkserver_context(),
        initializer=_watch_coordinator,
        initargs=((os.getpid(), EmbeddedOwner.current().start),),
    )


class EmbeddedExecutor:
    """Executes batches of specs on this machine and yields results as they complete.

    Use as a context manager; :meth:`execute` yields lists of results (one list per finished
    chunk) and stops submitting as soon as :meth:`stop` is called. With a ``journal`` (the
    path of a created :class:`~.start_journal.StartJournal`), every run is noted there right
    before it executes.
    """

    def __init__(
        self,
        resolver_spec: ResolverSpec,
        *,
        jobs: int,
        pool: PoolKind = "process",
        timeout_s: float | None = None,
        chunk_size: int | None = None,
        journal: str | os.PathLike[str] | None = None,
        retry_on: tuple[str, ...] = (),
    ) -> None:
        if jobs < 1:
            raise StudyError(f"--jobs must be 1 or more, got {jobs}.")
        self.jobs = jobs
        self.pool: PoolKind | Literal["inline"] = "inline" if jobs == 1 else pool
        self.timeout_s = timeout_s
        self.chunk_size = chunk_size or (8 if self.pool == "process" else 1)
        self._resolver_spec = resolver_spec
        self._executor: Executor | None = None
        self._resolver: RunResolver | None = None
        self._interrupt: MainThreadInterrupt | None = None
        self._stopped = threading.Event()
        self._journal = os.fspath(journal) if journal is not None else None
        self._starts: StartLog | None = None
        self.worker = worker_name()
        self.retry_on = tuple(retry_on)
        """``execution.retry.on``: failures of these exceptions are marked transient."""

    @staticmethod
    def start_server(*, jobs: int, pool: PoolKind = "process") -> None:
        """Start the process pool's forkserver now, in the background, when an executor of
        ``jobs`` and ``pool`` will need one. It is a new interpreter importing NumPy and the
        execution module (0.3 s here): started before the study is registered, it loads
        while the coordinator works instead of before the first run. A no-op for threads,
        ``jobs == 1`` or a server already running (it lives as long as this process)."""
        if jobs > 1 and pool == "process":
            _forkserver_context()
            multiprocessing.forkserver.ensure_running()

    def __enter__(self) -> EmbeddedExecutor:
        if self.pool == "process":
            _check_picklable(self._resolver_spec)
            self._executor = ProcessPoolExecutor(
                max_workers=self.jobs,
                mp_context=_forkserver_context(),
                initializer=_init_process,
                initargs=(
                    self._resolver_spec,
                    self.timeout_s,
                    (os.getpid(), EmbeddedOwner.current().start),
                    self._journal,
                    self.retry_on,
                ),
            )
        else:
            self._resolver = self._resolver_spec.build()
            if self.pool == "inline":
                self._interrupt = _main_thread_interrupt(self.timeout_s)
            if self._journal is not None:
                self._starts = StartLog(self._journal)
            if self.pool == "thread":
                self._executor = ThreadPoolExecutor(
                    max_workers=self.jobs, thread_name_prefix="studyq-run"
                )
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        if self._executor is not None:
            self._executor.shutdown(wait=True, cancel_futures=True)
            self._executor = None
        if self._starts is not None:
            self._starts.close()
            self._starts = None
        if self._interrupt is not None:
            self._interrupt.close()  # the calling program's SIGALRM handler, as it was
            self._interrupt = None

    def stop(self) -> None:
        """Submit nothing more; runs already executing finish and are still yielded."""
        self._stopped.set()

    @property
    def stopped(self) -> bool:
        """Whether :meth:`stop` was called."""
        return self._stopped.is_set()

    def execute(self, runs: Iterable[Claimed]) -> Iterator[tuple[list[RunSpec], list[RunResult]]]:
        """Execute ``runs`` (spec, claim attempt); yield ``(specs, results)`` pairs in
        completion order.

        Results line up with their specs (run ids can repeat inside a study, so a result
        alone does not say which run it belongs to).
        """
        if self.pool == "inline":
            yield from self._inline(runs)
            return
        assert self._executor is not None
        iterator = iter(runs)
        in_flight: dict[Future[list[RunResult]], list[RunSpec]] = {}
        limit = self.jobs * 2
        exhausted = False
        while True:
            while not exhausted and not self._stopped.is_set() and len(in_flight) < limit:
                chunk = list(islice(iterator, self.chunk_size))
                if not chunk:
                    exhausted = True
                    break
                in_flight[self._submit(chunk)] = [spec for spec, _ in chunk]
            if not in_flight:
                return
            done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
            for future in done:
                yield in_flight.pop(future), future.result()

    def _submit(self, chunk: list[Claimed]) -> Future[list[RunResult]]:
        assert self._executor is not None
        if self.pool == "process":
            items = [(attempt, spec.to_message()) for spec, attempt in chunk]
            return self._executor.submit(_run_chunk, items)
        return self._executor.submit(self._run_threaded, chunk)

    def _started(self, spec: RunSpec, attempt: int) -> None:
        if self._starts is not None:
            self._starts.started(spec.index, attempt)

    def _run_threaded(self, chunk: list[Claimed]) -> list[RunResult]:
        assert self._resolver is not None
        results = []
        for spec, attempt in chunk:
            self._started(spec, attempt)
            results.append(
                _execute(spec, self._resolver, self.timeout_s, self.worker, None, self.retry_on)
            )
        return results

    def _inline(self, runs: Iterable[Claimed]) -> Iterator[tuple[list[RunSpec], list[RunResult]]]:
        assert self._resolver is not None
        resolver, timeout_s, worker = self._resolver, self.timeout_s, self.worker
        for spec, attempt in runs:
            if self._stopped.is_set():
                return
            self._started(spec, attempt)
            yield (
                [spec],
                [_execute(spec, resolver, timeout_s, worker, self._interrupt, self.retry_on)],
            )


def _check_picklable(resolver_spec: ResolverSpec) -> None:
    import pickle

    try:
        pickle.dumps(resolver_spec)
    except Exception as exc:
        raise StudyError(
            "in-process agents, problems or runners cannot be sent to worker processes "
            f"({type(exc).__name__}: {exc}). Fix: define them at module level, or run with "
            "jobs=1 or pool='thread'."
        ) from None
