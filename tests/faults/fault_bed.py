"""The test bed of one fault test: its study, services, queue, workers, store and coordinator.

A :class:`Bed` is made by the ``make_bed`` fixture (conftest.py), which also cleans it up.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from _services import Broker
from fault_agents import read_calls
from fault_audit import Audit, audit
from fault_services import Worker, Workers, wait_until
from fault_study import Shape, prepared, write_study_file
from sqlalchemy import text

from orchestrator.contracts.settings import Settings
from orchestrator.distributed import SubmitReport, WaitReport, submit_study, wait_study
from orchestrator.store import ResultStore

SETTLE_S = 0.3
"""After a SIGKILL, how long until the killed process's connections are closed and any
transaction it had open is rolled back, so the store shows what the kill left behind."""


def fast_settings(database_url: str, broker_url: str) -> Settings:
    """The coordinator's settings in the tests: short leases, quick reconcile passes."""
    return Settings(
        database_url=database_url,
        broker_url=broker_url,
        lease_s=4.0,
        heartbeat_s=1.0,
        queued_timeout_s=5.0,
        reconcile_interval_s=0.5,
    )


@dataclass
class Bed:
    """One fault test's sweep: its study, services, queue, workers and store."""

    shape: Shape
    database_url: str
    broker: Broker
    queue: str
    tmp: Path
    workers: Workers
    store: ResultStore
    reference: Path
    calls_dir: Path
    threads: list[threading.Thread] = field(default_factory=list)

    @property
    def study_id(self) -> str:
        return self.shape.study_id

    @property
    def broker_url(self) -> str:
        return self.broker.url

    @property
    def settings(self) -> Settings:
        return fast_settings(self.database_url, self.broker_url)

    def study_file(self) -> Path:
        return write_study_file(self.shape, self.tmp, queue=self.queue)

    def prepared(self) -> Any:
        return prepared(self.shape, queue=self.queue)

    def submit(self) -> SubmitReport:
        """``submit_study`` in this process."""
        return submit_study(self.study_file(), settings=self.settings, show_progress=False)

    def wait(self, timeout_s: float = 90.0) -> WaitReport:
        """``wait_study`` in this process, until every run is terminal."""
        report = wait_study(
            self.study_id, settings=self.settings, show_progress=False, timeout_s=timeout_s
        )
        assert not report.timed_out, f"sweep not done after {timeout_s} s: {report.counts}\n" + (
            self.workers.tail()
        )
        return report

    def wait_in_background(self, timeout_s: float = 90.0) -> dict[str, Any]:
        """``wait_study`` on a thread; the returned box gets ``report`` or ``error``."""
        box: dict[str, Any] = {}

        def run() -> None:
            try:
                box["report"] = wait_study(
                    self.study_id, settings=self.settings, show_progress=False, timeout_s=timeout_s
                )
            except BaseException as error:
                box["error"] = error

        thread = threading.Thread(target=run, name="fault-coordinator", daemon=True)
        box["thread"] = thread
        self.threads.append(thread)
        thread.start()
        return box

    def open_transactions(self, older_than_s: float = 0.2) -> int:
        """Sessions on the sweep's database sitting in an open transaction for longer than
        ``older_than_s``: a frozen worker caught between a statement and its commit."""
        with self.store.engine.connect() as connection:
            return int(
                connection.execute(
                    text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                        " AND state LIKE 'idle in transaction%' AND pid <> pg_backend_pid()"
                        " AND now() - state_change > make_interval(secs => :age)"
                    ),
                    {"age": older_than_s},
                ).scalar_one()
            )

    def broker_backlog(self) -> tuple[int, int]:
        """``(messages waiting in the queue, messages delivered but not acknowledged)``."""
        return self.broker.backlog(self.queue)

    def counts(self) -> dict[str, int]:
        return self.store.count_by_status(self.study_id)

    def wait_for_successes(self, count: int, timeout: float = 60.0) -> dict[str, int]:
        return wait_until(
            lambda: (c := self.counts()).get("success", 0) >= count and c,
            timeout,
            f"{count} successes",
        )

    def running(self) -> list[tuple[int, str]]:
        """``(plan_index, lease_owner)`` of the runs executing now (one light query: the
        fault helpers poll it while runs of 40 ms come and go)."""
        with self.store.engine.connect() as connection:
            rows = connection.execute(
                text(
                    "SELECT plan_index, lease_owner FROM runs WHERE study_id = :s "
                    "AND status = 'running' ORDER BY plan_index"
                ),
                {"s": self.study_id},
            ).all()
        return [(int(row.plan_index), str(row.lease_owner)) for row in rows]

    def running_on(self, worker: Worker) -> Callable[[], tuple[int, int] | None]:
        """A predicate: ``(plan index, pool child pid)`` of a run ``worker`` executes now."""

        def find() -> tuple[int, int] | None:
            for index, owner in self.running():
                if worker.owns(owner):
                    return index, int(owner.rsplit(":", 1)[1])
            return None

        return find

    def kill_pool_child_mid_run(self, worker: Worker) -> int:
        """SIGKILL a pool child of ``worker`` that executes a run now; returns the plan index
        of a run the kill left ``running`` under that child.

        A run the child finished just before the kill does not count, but one it claimed in
        the moment between does: that is the run the kill interrupted. A run left by an
        earlier kill stays ``running`` under its dead child until its lease expires, so only
        runs whose owner is a live child are candidates (otherwise such a run, first in plan
        order, would hide every live one until the sweep ended)."""

        def kill() -> int | None:
            live = [
                (index, pid)
                for index, owner in self.running()
                if worker.owns(owner) and worker.is_child(pid := int(owner.rsplit(":", 1)[1]))
            ]
            if not live:
                return None
            index, pid = live[0]
            os.kill(pid, signal.SIGKILL)
            time.sleep(SETTLE_S)
            owner = f"{worker.nodename}:{pid}"
            left = [i for i, lease_owner in self.running() if lease_owner == owner]
            return (index if index in left else left[0]) if left else None

        return int(wait_until(kill, 30, f"a pool child of {worker.name} killed mid-run"))

    def kill_workers(self, workers: list[Worker]) -> list[int]:
        """SIGKILL whole workers (each process group) at once; returns the plan indices of
        the runs they were executing."""
        for worker in workers:
            worker.signal_group(signal.SIGKILL)
        for worker in workers:
            worker.kill()  # reaps the main process
        time.sleep(SETTLE_S)
        return [
            index
            for index, owner in self.running()
            if any(worker.owns(owner) for worker in workers)
        ]

    def kill_worker_mid_run(self, worker: Worker) -> list[int]:
        """SIGKILL the whole worker (its process group) while it executes a run; returns the
        plan indices of the runs it was executing."""

        def kill() -> list[int] | None:
            wait_until(self.running_on(worker), 20, f"a run executing on {worker.name}")
            return self.kill_workers([worker]) or None

        return list(wait_until(kill, 30, f"{worker.name} killed mid-run"))

    def replace_dead_workers(self, workers: list[Worker]) -> list[str]:
        """Start a replacement for each of ``workers`` that exited by itself (what a
        supervisor would do), so the sweep can finish; returns what each one died of."""
        deaths = []
        for worker in workers:
            if worker.alive():
                continue
            lines = worker.log.splitlines()
            last = lines[-1] if lines else "?"
            cause = next((line for line in lines if "CRITICAL" in line), last)
            deaths.append(f"worker {worker.name} exited ({worker.process.returncode}): {cause}")
            self.workers.start(1, wait=False)
        return deaths

    def attempts_of(self, index: int) -> list[tuple[int, str, str]]:
        """``(attempt, worker, outcome)`` of one run, oldest first."""
        return [
            (attempt.attempt, attempt.worker, attempt.outcome)
            for attempt in self.store.iter_attempts(self.study_id)
            if attempt.index == index
        ]

    def calls(self) -> list[int]:
        """Seeds of every agent call the workers made (the agent's own tally)."""
        return read_calls(self.calls_dir)

    def audit(self, **options: Any) -> Audit:
        """The audit (fault_audit.py), plus the agent's own tally: the agent ran at most once
        per claim of a run, and at least once for every run that succeeded."""
        report = audit(self.store, self.study_id, self.reference, self.tmp / "export", **options)
        calls = Counter(self.calls())
        runs = list(self.store.iter_runs(self.study_id))
        problems = [
            f"run {run.index} (seed {run.seed}): agent called {calls[run.seed]} times in "
            f"{report.attempts_per_run[run.index]} attempts ({run.status})"
            for run in runs
            if calls[run.seed] > report.attempts_per_run[run.index]
            or (run.status == "success" and not calls[run.seed])
        ]
        assert not problems, "agent calls do not match the attempts:\n  " + "\n  ".join(
            problems[:10]
        )
        return report

    def close(self) -> None:
        """Stop the workers (a frozen one's locks go with it), end a coordinator thread still
        waiting by cancelling the study (its wait then sees every run terminal), close the
        store."""
        self.workers.stop_all()
        if any(thread.is_alive() for thread in self.threads):
            with contextlib.suppress(Exception):
                self.store.cancel(self.study_id)
            for thread in self.threads:
                thread.join(timeout=15)
        self.store.close()
