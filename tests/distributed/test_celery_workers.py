"""Real ``celery worker`` processes on a real broker (Redis and RabbitMQ: the ``transport``
of tests/conftest.py) and PostgreSQL: a sweep, duplicates, a pickled message, soft and hard
time limits, and a warm shutdown."""

from __future__ import annotations

import builtins
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from _services import Broker
from celery import Celery
from dist_services import BROKER_URL, HOST, PG_PORT, REPO, WorkerPair, WorkerProcess
from dist_studies import TEST_GRACE_S, make_sweep
from publishing import publish_runs

from orchestrator.contracts.wire import TASK_NAME
from orchestrator.store import ResultStore
from workers.app import StudyqCelery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

DEMO_AGENTS = ["hill-climb", "random-search"]


def wait_for(
    store: ResultStore, study_id: str, done: Callable[[dict[str, int]], bool], timeout: float
) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = store.count_by_status(study_id)
        if done(counts):
            return counts
        assert time.monotonic() < deadline, f"study {study_id} stuck at {counts}"
        time.sleep(0.1)


def finished(total: int) -> Callable[[dict[str, int]], bool]:
    return lambda counts: counts["success"] + counts["failed"] == total


def test_a_sweep_of_50_runs_completes_on_two_workers_each_run_exactly_once(
    worker_pair: WorkerPair, pg_store: ResultStore, publisher: StudyqCelery
):
    # Given 50 queued runs of the demo search agents on the beam problem
    study = make_sweep(
        pg_store,
        agents=DEMO_AGENTS,
        problems=["beam-design"],
        factors={"budget": 20},
        replicates=25,
    )
    assert len(study.specs) == 50
    # When they are published to the two workers
    assert publish_runs(publisher, study.publishable(), queue=worker_pair.queue) == 50
    # Then every run succeeds, with one attempt each, and both workers took part
    counts = wait_for(pg_store, study.study_id, finished(50), timeout=60)
    assert counts["success"] == 50
    runs = list(pg_store.iter_runs(study.study_id))
    assert {(run.attempt, run.attempts_used) for run in runs} == {(1, 1)}
    attempts = list(pg_store.iter_attempts(study.study_id))
    assert len(attempts) == 50 and {a.outcome for a in attempts} == {"success"}
    nodes = {run.lease_owner.rsplit(":", 1)[0] for run in runs if run.lease_owner}
    assert nodes == {worker.nodename for worker in worker_pair.workers}


def test_republished_finished_runs_are_acknowledged_without_running_again(
    worker_pair: WorkerPair, pg_store: ResultStore, publisher: StudyqCelery
):
    # Given five runs that finished
    study = make_sweep(pg_store, agents=["noop"], replicates=5)
    publish_runs(publisher, study.publishable(), queue=worker_pair.queue)
    wait_for(pg_store, study.study_id, finished(5), timeout=30)
    # When their messages are delivered again (attempt 1 this time)
    publish_runs(publisher, study.publishable(attempt=1), queue=worker_pair.queue)
    # Then each delivery is acknowledged as a duplicate and nothing runs again
    expected = [f"{spec.run_id}.{spec.index}.1]" for spec in study.specs]
    deadline = time.monotonic() + 20
    while not all(
        any(task in line and "'duplicate'" in line for line in worker_pair.log.splitlines())
        for task in expected
    ):
        assert time.monotonic() < deadline, worker_pair.log[-3000:]
        time.sleep(0.1)
    assert {(run.status, run.attempt) for run in pg_store.iter_runs(study.study_id)} == {
        ("success", 1)
    }


class _Trap:
    """Unpickling this creates a file: proof that a pickled message was deserialized."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (builtins.open, (str(self.path), "w"))


def test_a_pickled_message_is_refused_and_the_worker_keeps_working(
    worker_pair: WorkerPair,
    pg_store: ResultStore,
    publisher: StudyqCelery,
    tmp_path: Path,
    live_broker: Broker,
):
    # Given a client that sends the run task a pickled message (what an attacker with
    # broker access would do)
    marker = tmp_path / "unpickled"
    evil = Celery("evil", broker=live_broker.url, set_as_current=False)
    evil.conf.update(task_serializer="pickle", accept_content=["pickle"])
    with evil.producer_or_acquire() as producer:
        # declare=[]: the workers declared the queue (on RabbitMQ with arguments this bare
        # app would contradict); the message only has to arrive
        evil.send_task(
            TASK_NAME, args=[_Trap(marker)], queue=worker_pair.queue, producer=producer, declare=[]
        )
    # When a worker receives it, and then a normal run
    study = make_sweep(pg_store, agents=["noop"])
    publish_runs(publisher, study.publishable(), queue=worker_pair.queue)
    # Then the pickle was refused unread, logged, and the worker went on to the next run
    wait_for(pg_store, study.study_id, finished(1), timeout=30)
    assert not marker.exists()
    assert "pickle" in worker_pair.log and "refus" in worker_pair.log.lower()
    assert pg_store.count_by_status(study.study_id)["success"] == 1
    evil.close()


def test_a_run_over_its_time_limit_fails_as_timeout(
    worker_pair: WorkerPair, pg_store: ResultStore, publisher: StudyqCelery
):
    # Given a run of an agent that sleeps 30 s in a study with a 1 s time limit
    study = make_sweep(pg_store, agents=["sleep"], factors={"sleep_s": 30}, timeout_s=1)
    # When a worker executes it
    publish_runs(publisher, study.publishable(), queue=worker_pair.queue, time_limit_s=1)
    # Then it is interrupted at its soft limit and recorded as failed / timeout
    wait_for(pg_store, study.study_id, finished(1), timeout=20)
    run = pg_store.find_run(study.study_id, 0)
    assert run is not None
    assert (run.status, run.error_kind, run.error_type) == ("failed", "timeout", "RunTimeoutError")
    assert run.latency_s is not None and run.latency_s < 1 + TEST_GRACE_S


def test_a_run_hung_in_native_code_is_killed_at_its_hard_limit_and_fails_as_timeout(
    worker_pair: WorkerPair, pg_store: ResultStore, publisher: StudyqCelery
):
    # Given a run that hangs in C code holding the GIL: no signal handler or thread of its
    # process can run, so only killing the process stops it
    study = make_sweep(
        pg_store,
        agents=["hung"],
        bindings={"agents": {"hung": "dist_agents:hung_in_c"}},
        timeout_s=1,
    )
    # When it is published with the study's 1 s limit (hard limit 1 s later)
    publish_runs(publisher, study.publishable(), queue=worker_pair.queue, time_limit_s=1)
    # Then Celery kills the child at the hard limit and the worker's main process records
    # the run as failed / timeout
    wait_for(pg_store, study.study_id, finished(1), timeout=30)
    run = pg_store.find_run(study.study_id, 0)
    assert run is not None
    assert (run.status, run.error_kind, run.error_type) == (
        "failed",
        "timeout",
        "TimeLimitExceeded",
    )
    # And the pool replaced the child and keeps working
    after = make_sweep(pg_store, agents=["noop"], replicates=4)
    publish_runs(publisher, after.publishable(), queue=worker_pair.queue)
    assert wait_for(pg_store, after.study_id, finished(4), timeout=30)["success"] == 4


def test_a_worker_refuses_to_start_on_a_database_without_the_studyq_schema(redis_db: redis.Redis):
    # Given the PostgreSQL maintenance database, which has no studyq schema
    unmigrated = f"postgresql://postgres@{HOST}:{PG_PORT}/postgres"
    # When `studyq worker` is started on it
    done = subprocess.run(
        [sys.executable, "-m", "orchestrator.cli", "worker", "--db", unmigrated, "-c", "1"],
        cwd=REPO,
        env={**os.environ, "STUDYQ_BROKER_URL": BROKER_URL},
        capture_output=True,
        text=True,
        timeout=60,
    )
    # Then it exits with the usage code and says what to run
    assert done.returncode == 2, done.stdout + done.stderr
    assert "studyq db upgrade" in done.stderr


def test_the_worker_command_prints_its_urls_with_passwords_masked(
    worker_pair: WorkerPair, live_broker: Broker
):
    banner = worker_pair.workers[1].log
    assert f"studyq worker: broker {live_broker.masked_url}" in banner
    assert "postgres:***@127.0.0.1" in banner
    assert "hunter2" not in banner


@pytest.mark.parametrize(
    ("pool", "sleep_s"),
    [
        ("prefork", 30),  # the child is told to stop; its run hands back and the child exits
        ("solo", 30),  # the run is interrupted in the worker process itself
        ("threads", 4),  # a thread cannot be interrupted: released now, requeued on return
    ],
)
def test_a_warm_shutdown_hands_running_runs_back_and_requeues_their_messages(
    pool: str,
    sleep_s: int,
    pg_url: str,
    pg_store: ResultStore,
    publisher: StudyqCelery,
    queue: str,
    live_broker: Broker,
    tmp_path: Path,
):
    # Given a worker with a 1 s shutdown grace, executing a long run
    worker = WorkerProcess(
        f"warm-{pool}-{os.getpid()}",
        queue=queue,
        database_url=pg_url,
        broker_url=live_broker.url,
        log_dir=tmp_path,
        concurrency=1,
        pool=pool,
        env={"STUDYQ_SHUTDOWN_GRACE_S": "1"},
    )
    try:
        worker.wait_ready()
        study = make_sweep(pg_store, agents=["sleep"], factors={"sleep_s": sleep_s})
        publish_runs(publisher, study.publishable(), queue=queue)
        wait_for(pg_store, study.study_id, lambda counts: counts["running"] == 1, timeout=20)
        # When it is asked to stop (SIGTERM to its main process)
        started = time.monotonic()
        code = worker.terminate(timeout=20)
    finally:
        worker.terminate()
    # Then it stopped soon after the grace (or, on threads, when the run returned), the run
    # is queued again with its attempt refunded, and its message is back on the queue
    limit = sleep_s + 10 if pool == "threads" else 15
    assert time.monotonic() - started < limit
    assert code == 0, worker.log[-3000:]
    run = pg_store.find_run(study.study_id, 0)
    assert run is not None
    assert (run.status, run.attempts_used, run.lease_owner) == ("queued", 0, None)
    assert [a.outcome for a in pg_store.iter_attempts(study.study_id)] == ["released"]
    assert live_broker.waiting(queue) == 1, worker.log[-3000:]
