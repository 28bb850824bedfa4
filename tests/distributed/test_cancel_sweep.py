"""``studyq cancel`` on a real sweep: real ``celery worker``, a real broker (Redis and
RabbitMQ), real PostgreSQL.

Given a worker with two slots and a sweep of slow runs submitted to it, cancelling while two
runs execute leaves those two to finish (their results are recorded) and cancels the queued
ones, which never start; ``--terminate`` stops the two that execute: they end ``cancelled``
and the worker's slots are free again at once, long before the agents would have returned.
The revoke is broadcast to every worker: one that runs none of the runs (a bystander on
another queue) takes it without a word (no "No result backend is configured" per run).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator

import pytest
from _services import Broker
from dist_services import WorkerProcess
from test_celery_workers import wait_for

from orchestrator.cli import main as studyq_main
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import task_id_for
from orchestrator.distributed import cancel, submit_study, wait_study
from orchestrator.executors.celery.app import coordinator_app
from orchestrator.store import ResultStore
from orchestrator.study.model import Study, parse_study

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

HEARTBEAT_S = 0.2
"""The worker's heartbeat: a cancelled run's agent is stopped at most this long after."""


@pytest.fixture(scope="module")
def cancel_queue(live_broker: Broker) -> Iterator[str]:
    name = f"studyq-cancel-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    yield name
    live_broker.forget(name)


@pytest.fixture(scope="module")
def worker(
    pg_url: str, live_broker: Broker, cancel_queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """One prefork worker, two slots, heartbeating every 0.2 s."""
    process = WorkerProcess(
        f"cancel-{os.getpid()}",
        queue=cancel_queue,
        database_url=pg_url,
        broker_url=live_broker.url,
        log_dir=tmp_path_factory.mktemp("cancel-logs"),
        env={
            "STUDYQ_HEARTBEAT_S": str(HEARTBEAT_S),
            "STUDYQ_LEASE_S": "2",
            "STUDYQ_SHUTDOWN_GRACE_S": "1",
            "STUDYQ_TIME_LIMIT_GRACE_S": "1",
        },
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()


@pytest.fixture(scope="module")
def bystander(
    pg_url: str, live_broker: Broker, cancel_queue: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    """A worker on a queue of its own: it runs none of the cancelled runs, but every revoke
    is broadcast to it too."""
    idle_queue = f"{cancel_queue}-idle"
    process = WorkerProcess(
        f"cancel-idle-{os.getpid()}",
        queue=idle_queue,
        database_url=pg_url,
        broker_url=live_broker.url,
        log_dir=tmp_path_factory.mktemp("cancel-idle-logs"),
        concurrency=1,
        via_cli=True,
    )
    try:
        process.wait_ready()
        yield process
    finally:
        process.terminate()
        live_broker.forget(idle_queue)


def _revoked_on(settings: Settings, worker: WorkerProcess, task_ids: set[str]) -> None:
    """Wait until ``worker`` has handled the revoke of ``task_ids`` (its revoked list, read
    through the control channel, holds them)."""
    app = coordinator_app(settings, str(settings.broker_url))
    deadline = time.monotonic() + 15
    revoked: set[str] = set()
    while not task_ids <= revoked:
        assert time.monotonic() < deadline, f"{worker.name} never saw the revoke: {revoked}"
        replies = app.control.inspect(destination=[worker.nodename], timeout=1).revoked() or {}
        revoked = set(replies.get(worker.nodename, []))
    app.close()


@pytest.fixture
def settings(pg_url: str, live_broker: Broker) -> Settings:
    return Settings(
        database_url=pg_url,
        broker_url=live_broker.url,
        lease_s=2,
        heartbeat_s=HEARTBEAT_S,
        reconcile_interval_s=0.2,
        queued_timeout_s=30,
    )


def _study(queue: str, *, runs: int, sleep_s: float) -> Study:
    return parse_study(
        {
            "study_id": f"cancel-{uuid.uuid4().hex[:10]}",
            "title": "cancel test",
            "agent_specs": ["sleep"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": runs},
            "factors": [
                {
                    "name": "sleep_s",
                    "kind": "manipulated",
                    "levels": [{"name": "s", "value": sleep_s}],
                }
            ],
            "design_spec": {"kind": "full_factorial"},
            "execution": {"queue": queue},
        }
    )


def _running(store: ResultStore, study_id: str) -> set[int]:
    return {run.index for run in store.iter_runs(study_id, statuses=["running"])}


def test_cancel_lets_executing_runs_finish_and_cancels_the_queued_ones(
    worker: WorkerProcess, cancel_queue: str, settings: Settings, pg_url: str
) -> None:
    # Given 6 runs of 1.5 s on a worker with 2 slots, 2 of them executing
    study = _study(cancel_queue, runs=6, sleep_s=1.5)
    submit_study(study, settings=settings, show_progress=False)
    with ResultStore.open(pg_url) as store:
        wait_for(store, study.study_id, lambda counts: counts["running"] == 2, timeout=20)
        executing = _running(store, study.study_id)
        # When the study is cancelled (no --terminate)
        report = cancel(study.study_id, settings=settings)
        assert (report.cancelled, report.running, report.locked) == (4, 2, 0)
        # Then the 2 executing runs finish and are recorded, the 4 queued ones never start
        waited = wait_study(study.study_id, settings=settings, show_progress=False, timeout_s=20)
        assert waited.complete and not waited.timed_out
        assert waited.counts["success"] == 2 and waited.counts["cancelled"] == 4
        runs = {run.index: run for run in store.iter_runs(study.study_id)}
        assert {index for index, run in runs.items() if run.status == "success"} == executing
        assert all(runs[index].outputs == {"text": "slept 1.5 s"} for index in executing)
        attempts = sorted((a.index, a.outcome) for a in store.iter_attempts(study.study_id))
        assert attempts == [(index, "success") for index in sorted(executing)]
        # and nothing brings the cancelled ones back
        assert not store.reconcile(study.study_id, queued_timeout_s=0).changed
        assert store.count_by_status(study.study_id) == waited.counts


def test_cancel_terminate_stops_the_executing_runs(
    worker: WorkerProcess,
    bystander: WorkerProcess,
    cancel_queue: str,
    settings: Settings,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Given 4 runs of 30 s on a worker with 2 slots, 2 of them executing
    study = _study(cancel_queue, runs=4, sleep_s=30)
    submit_study(study, settings=settings, show_progress=False)
    with ResultStore.open(pg_url) as store:
        wait_for(store, study.study_id, lambda counts: counts["running"] == 2, timeout=20)
        executing = _running(store, study.study_id)
        task_ids = {
            task_id_for(run.spec, run.attempt - 1)
            for run in store.iter_runs(study.study_id, statuses=["running"])
        }
        # When `studyq cancel --terminate` runs
        monkeypatch.setenv("STUDYQ_DATABASE_URL", pg_url)
        monkeypatch.setenv("STUDYQ_BROKER_URL", str(settings.broker_url))
        stopped_at = time.monotonic()
        assert studyq_main(["cancel", study.study_id, "--terminate"]) == 0
        out, err = capsys.readouterr()
        assert "4 runs cancelled (2 of them stopped while running)" in out
        assert "backend" not in err.lower(), err
        # Then every run is cancelled, the executing ones with their attempts
        runs = {run.index: run for run in store.iter_runs(study.study_id)}
        assert {run.status for run in runs.values()} == {"cancelled"}
        assert all(run.outputs is None for run in runs.values())
        attempts = sorted((a.index, a.outcome) for a in store.iter_attempts(study.study_id))
        assert attempts == [(index, "cancelled") for index in sorted(executing)]
        # and the agents stopped: the worker's two slots run a new sweep at once
        after = _study(cancel_queue, runs=2, sleep_s=0.01)
        submit_study(after, settings=settings, show_progress=False)
        wait_for(store, after.study_id, lambda counts: counts["success"] == 2, timeout=10)
        assert time.monotonic() - stopped_at < 10, "the 30 s agents kept their slots"
        # nothing was written for the stopped runs, even late
        time.sleep(3 * HEARTBEAT_S)
        assert {run.status for run in store.iter_runs(study.study_id)} == {"cancelled"}
        assert not list(store.iter_evaluations(study.study_id))
    # and no worker logged a word about a result backend: neither the one that ran the two
    # runs, nor the bystander, which took the revoke of two tasks it never saw
    _revoked_on(settings, bystander, task_ids)
    for process in (worker, bystander):
        assert "No result backend" not in process.log, process.log
        assert "Failed to mark task" not in process.log, process.log


def test_a_cancelled_run_stops_through_its_heartbeat_even_without_the_revoke(
    worker: WorkerProcess, cancel_queue: str, settings: Settings, pg_url: str
) -> None:
    """The store's cancel alone (no broker revoke, as when the broker is down): the
    worker's next heartbeat is refused and it stops the agent."""
    study = _study(cancel_queue, runs=2, sleep_s=30)
    submit_study(study, settings=settings, show_progress=False)
    with ResultStore.open(pg_url) as store:
        wait_for(store, study.study_id, lambda counts: counts["running"] == 2, timeout=20)
        stopped_at = time.monotonic()
        assert store.cancel(study.study_id) == 2
        after = _study(cancel_queue, runs=2, sleep_s=0.01)
        submit_study(after, settings=settings, show_progress=False)
        wait_for(store, after.study_id, lambda counts: counts["success"] == 2, timeout=10)
        assert time.monotonic() - stopped_at < 10, "the 30 s agents kept their slots"
        run_ids = [run.run_id for run in store.iter_runs(study.study_id)]

    def stopped() -> list[str]:
        return [line for line in worker.log.splitlines() if "is no longer this worker's" in line]

    # a pool child's log line reaches the shared log file on its own schedule: wait for it
    deadline = time.monotonic() + 5.0
    while not all(any(run_id in line for line in stopped()) for run_id in run_ids):
        assert time.monotonic() < deadline, (run_ids, stopped(), worker.log[-3000:])
        time.sleep(0.1)
