"""Retries by error class on real workers: one ``studyq worker`` and one ``celery worker``
process (prefork) on the test's broker (Redis, and RabbitMQ unless ``-m "not rabbitmq"``) and
PostgreSQL. Transient errors (``execution.retry.on``) are re-queued with backoff and succeed
on a later attempt, every attempt is in attempts.csv, a permanent error is attempted once,
``retry_after_s`` is honoured, the last attempt fails with its real error, and ``studyq
resubmit --error-class`` re-runs exactly that class.

The agents (tests/distributed/retry_agents.py) count their attempts in a journal file per
run, so the tests see how often each run really executed, whichever process ran it.
"""

from __future__ import annotations

import csv
import itertools
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from _services import Broker
from dist_services import REPO, WorkerProcess
from dist_studies import TEST_GRACE_S, Sweep
from publishing import publish_runs

from orchestrator.embedded import register
from orchestrator.export import export_artifacts
from orchestrator.store import ResultStore
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers.app import StudyqCelery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

RETRY = {
    "on": ["TimeoutError", "RateLimited", "retry_agents:Transient"],
    "backoff_s": 0.4,
    "max_backoff_s": 1.0,
}


@pytest.fixture(scope="module")
def retry_queue(
    live_broker: Broker, pg_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[WorkerProcess]]]:
    """Two real worker processes (``studyq worker`` and ``celery worker``) on a queue of
    this module's own."""
    queue = f"studyq-retry-{os.getpid()}-{live_broker.kind}"
    log_dir = tmp_path_factory.mktemp(f"retry-logs-{live_broker.kind}")
    env = {"STUDYQ_TIME_LIMIT_GRACE_S": str(TEST_GRACE_S), "STUDYQ_SHUTDOWN_GRACE_S": "1"}
    workers = [
        WorkerProcess(
            f"retry-{name}-{os.getpid()}",
            queue=queue,
            database_url=pg_url,
            broker_url=live_broker.url,
            log_dir=log_dir,
            env=env,
            via_cli=via_cli,
        )
        for name, via_cli in (("cli", True), ("celery", False))
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield queue, workers
    finally:
        for worker in workers:
            worker.terminate()
        live_broker.forget(queue)


def retry_sweep(
    store: ResultStore,
    journal: Path,
    *,
    agent: str,
    queue: str,
    replicates: int = 1,
    max_attempts: int = 3,
    retry: dict[str, Any] | None = None,
    **factors: Any,
) -> Sweep:
    """A registered, queued study of one retry agent with a retry policy, on ``queue``."""
    journal.mkdir(parents=True, exist_ok=True)
    study_id = f"retry-{uuid.uuid4().hex[:10]}"
    levels = {"journal": str(journal), **factors}
    payload: dict[str, Any] = {
        "study_id": study_id,
        "title": "retries by error class",
        "agent_specs": ["agent"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": replicates},
        "factors": [
            {"name": name, "kind": "manipulated", "levels": [{"name": "x", "value": value}]}
            for name, value in levels.items()
        ],
        "design_spec": {"kind": "full_factorial"},
        "bindings": {"agents": {"agent": f"retry_agents:{agent}"}},
        "execution": {"max_attempts": max_attempts, "retry": retry or RETRY, "queue": queue},
    }
    prepared = prepare(parse_study(payload))
    register(store, prepared)
    specs = list(prepared.run_specs())
    store.mark_queued(study_id, [spec.index for spec in specs])
    return Sweep(study_id, specs)


def wait_finished(store: ResultStore, study_id: str, total: int, timeout: float = 45) -> None:
    deadline = time.monotonic() + timeout
    while True:
        counts = store.count_by_status(study_id)
        if counts["success"] + counts["failed"] == total:
            return
        assert time.monotonic() < deadline, f"study {study_id} stuck at {counts}"
        time.sleep(0.1)


def executions(journal: Path, spec: Any) -> int:
    path = journal / f"{spec.run_id}.{spec.index}"
    return len(path.read_text(encoding="utf-8").splitlines()) if path.exists() else 0


def attempts_csv(store: ResultStore, study_id: str, out: Path) -> list[dict[str, str]]:
    export_artifacts(store, study_id, out, run_files=False)
    with (out / "attempts.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def announced_delays(workers: list[WorkerProcess], run_id: str) -> dict[int, float]:
    """attempt -> the delay the worker announced after that attempt failed transiently."""
    pattern = re.compile(
        rf"run {re.escape(run_id)} \(index \d+, attempt (\d+)\) of \S+ raised \w+, transient "
        r"for its study: re-queued, next attempt in ([\d.]+) s"
    )
    found: dict[int, float] = {}
    for worker in workers:
        for attempt, delay in pattern.findall(worker.log):
            found[int(attempt)] = float(delay)
    return found


def test_transient_failures_on_attempts_1_and_2_succeed_on_attempt_3(
    retry_queue: tuple[str, list[WorkerProcess]],
    pg_store: ResultStore,
    publisher: StudyqCelery,
    tmp_path: Path,
):
    queue, workers = retry_queue
    # Given four runs whose agent times out on attempts 1 and 2 (TimeoutError is in retry.on)
    journal = tmp_path / "journal"
    study = retry_sweep(pg_store, journal, agent="flaky_timeout", queue=queue, replicates=4)
    # When they are published once
    assert publish_runs(publisher, study.publishable(), queue=queue) == 4
    # Then every run succeeds, each executed exactly three times
    wait_finished(pg_store, study.study_id, 4)
    runs = list(pg_store.iter_runs(study.study_id))
    assert {(run.status, run.attempt, run.attempts_used) for run in runs} == {("success", 3, 3)}
    assert [executions(journal, spec) for spec in study.specs] == [3, 3, 3, 3]
    # And attempts.csv holds all three attempts of each run: two retried, one success
    rows = attempts_csv(pg_store, study.study_id, tmp_path / "export")
    assert len(rows) == 12
    for spec in study.specs:
        mine = [row for row in rows if row["run_id"] == spec.run_id]
        assert [row["attempt"] for row in mine] == ["1", "2", "3"]
        assert [row["status"] for row in mine] == ["retried", "retried", "success"]
        assert [row["error_type"] for row in mine] == ["TimeoutError", "TimeoutError", ""]
        assert mine[0]["error_message"] == "provider timed out on attempt 1"
        assert all(row["worker"] and row["started"] and row["ended"] for row in mine)
        # And the backoff is visible in the attempt times: each next attempt started no
        # earlier than the delay the worker announced after the failure (full jitter: at
        # most backoff_s * 2**(attempt-1), capped at max_backoff_s)
        delays = announced_delays(workers, spec.run_id)
        assert set(delays) == {1, 2}
        assert delays[1] <= 0.4 and delays[2] <= 0.8
        for before, after in itertools.pairwise(mine):
            gap = (
                datetime.fromisoformat(after["started"]) - datetime.fromisoformat(before["ended"])
            ).total_seconds()
            assert gap >= delays[int(before["attempt"])] - 0.01, (gap, delays)


def test_a_permanent_error_is_attempted_once(
    retry_queue: tuple[str, list[WorkerProcess]],
    pg_store: ResultStore,
    publisher: StudyqCelery,
    tmp_path: Path,
):
    queue, _ = retry_queue
    # Given runs whose agent raises ValueError, which retry.on does not list
    journal = tmp_path / "journal"
    study = retry_sweep(pg_store, journal, agent="permanent", queue=queue, replicates=3)
    # When they are published
    publish_runs(publisher, study.publishable(), queue=queue)
    # Then each fails at once, after one execution, with its real error
    wait_finished(pg_store, study.study_id, 3)
    runs = list(pg_store.iter_runs(study.study_id))
    assert {(run.status, run.attempt, run.error_type) for run in runs} == {
        ("failed", 1, "ValueError")
    }
    assert [executions(journal, spec) for spec in study.specs] == [1, 1, 1]
    rows = attempts_csv(pg_store, study.study_id, tmp_path / "export")
    assert [(row["attempt"], row["status"], row["error_type"]) for row in rows] == [
        ("1", "failed", "ValueError")
    ] * 3


def test_rate_limited_waits_at_least_retry_after_and_a_study_class_is_transient(
    retry_queue: tuple[str, list[WorkerProcess]],
    pg_store: ResultStore,
    publisher: StudyqCelery,
    tmp_path: Path,
):
    queue, _ = retry_queue
    # Given runs answered 429 with Retry-After 1.5 s (above max_backoff_s 1.0), and runs
    # raising the study's own class retry_agents:Transient (an import reference in retry.on)
    limited = retry_sweep(
        pg_store,
        tmp_path / "limited",
        agent="rate_limited_once",
        queue=queue,
        replicates=2,
        retry_after=1.5,
    )
    own = retry_sweep(
        pg_store, tmp_path / "own", agent="own_transient_once", queue=queue, replicates=2
    )
    # When both are published
    publish_runs(publisher, limited.publishable(), queue=queue)
    publish_runs(publisher, own.publishable(), queue=queue)
    # Then every run succeeds on attempt 2
    for study in (limited, own):
        wait_finished(pg_store, study.study_id, 2)
        runs = list(pg_store.iter_runs(study.study_id))
        assert {(run.status, run.attempt) for run in runs} == {("success", 2)}
    # And the rate-limited ones waited at least the 1.5 s the provider asked for
    rows = attempts_csv(pg_store, limited.study_id, tmp_path / "export")
    for spec in limited.specs:
        first, second = (row for row in rows if row["run_id"] == spec.run_id)
        assert (first["status"], first["error_type"]) == ("retried", "RateLimited")
        assert first["error_message"] == "429 Too Many Requests (retry after 1.5 s)"
        gap = datetime.fromisoformat(second["started"]) - datetime.fromisoformat(first["ended"])
        assert gap.total_seconds() >= 1.5


def test_the_last_attempt_fails_with_its_error_and_resubmit_by_error_class(
    retry_queue: tuple[str, list[WorkerProcess]],
    pg_store: ResultStore,
    pg_url: str,
    live_broker: Broker,
    publisher: StudyqCelery,
    tmp_path: Path,
):
    queue, _ = retry_queue
    # Given one study with a run that always times out (max_attempts 2) and one whose run
    # raises ValueError
    journal = tmp_path / "journal"
    study = retry_sweep(pg_store, journal, agent="always_timeout", queue=queue, max_attempts=2)
    publish_runs(publisher, study.publishable(), queue=queue)
    # When the attempts run out
    wait_finished(pg_store, study.study_id, 1)
    # Then the run fails with its real error after exactly max_attempts executions
    [run] = pg_store.iter_runs(study.study_id)
    assert (run.status, run.attempt, run.error_kind, run.error_type) == (
        "failed",
        2,
        "error",
        "TimeoutError",
    )
    assert run.error_message == "provider timed out on attempt 2"
    assert executions(journal, study.specs[0]) == 2
    outcomes = [a.outcome for a in pg_store.iter_attempts(study.study_id)]
    assert outcomes == ["retried", "failed"]

    def resubmit(error_class: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "resubmit", study.study_id,
             "--error-class", error_class, "--db", pg_url, "--broker", live_broker.url],
            cwd=REPO, capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        return done.stdout

    # When the runs of another error class are resubmitted, nothing is reset
    assert "0 runs reset, 0 enqueued" in resubmit("ValueError")
    assert "0 runs reset" in resubmit("Timeout")  # exact class names only
    # When the TimeoutError runs are resubmitted
    assert "1 runs reset, 1 enqueued" in resubmit("TimeoutError")
    # Then the run gets a fresh attempt budget: two more executions, attempts 3 and 4
    deadline = time.monotonic() + 30
    while (
        pg_store.count_by_status(study.study_id)["failed"] != 1
        or executions(journal, study.specs[0]) < 4
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    [run] = pg_store.iter_runs(study.study_id)
    assert (run.status, run.attempt, run.error_type) == ("failed", 4, "TimeoutError")
    assert executions(journal, study.specs[0]) == 4
    outcomes = [a.outcome for a in pg_store.iter_attempts(study.study_id)]
    assert outcomes == ["retried", "failed", "retried", "failed"]


def test_a_stopping_worker_publishes_its_waiting_retries_early(
    live_broker: Broker,
    pg_url: str,
    pg_store: ResultStore,
    publisher: StudyqCelery,
    tmp_path: Path,
):
    # Given a worker of its own queue, and a run answered 429 with Retry-After 30 s
    queue = f"studyq-retry-stop-{uuid.uuid4().hex[:8]}"
    env = {"STUDYQ_TIME_LIMIT_GRACE_S": str(TEST_GRACE_S), "STUDYQ_SHUTDOWN_GRACE_S": "1"}

    def worker(name: str) -> WorkerProcess:
        return WorkerProcess(
            f"{name}-{os.getpid()}", queue=queue, database_url=pg_url,
            broker_url=live_broker.url, log_dir=tmp_path, env=env, concurrency=1, via_cli=True,
        )  # fmt: skip

    journal = tmp_path / "journal"
    study = retry_sweep(pg_store, journal, agent="rate_limited_once", queue=queue, retry_after=30)
    first = worker("retry-stop-a")
    second: WorkerProcess | None = None
    try:
        first.wait_ready()
        publish_runs(publisher, study.publishable(), queue=queue)
        first.wait_for_log("re-queued, next attempt in 30.00 s")
        started = time.monotonic()
        # When that worker stops (warm shutdown) while the retry waits in its memory
        assert first.terminate() == 0
        # Then it publishes the waiting message before it exits, so another worker runs the
        # next attempt now instead of after a reconcile (queued_timeout_s after it was due)
        assert "published 1 waiting retry early: this process is stopping" in first.log
        second = worker("retry-stop-b")
        second.wait_ready()
        wait_finished(pg_store, study.study_id, 1, timeout=20)
        assert time.monotonic() - started < 25
        [run] = pg_store.iter_runs(study.study_id)
        assert (run.status, run.attempt) == ("success", 2)
        assert executions(journal, study.specs[0]) == 2
    finally:
        for process in (first, second):
            if process is not None:
                process.terminate()
        live_broker.forget(queue)
