"""A failed run is a failure in Celery and in Flower: a real ``studyq flower`` (basic auth) on
a real sweep with failing runs, real ``studyq worker`` processes (prefork and threads), Redis
and PostgreSQL; and the run task itself, applied eagerly on a real store.

Given a sweep of the demo ``flaky`` agent where half the runs fail on purpose, when it has
run, Flower's Failed filter (``/api/tasks?state=FAILURE``) lists exactly the failed runs' tasks,
each with the run's error class and message as its exception, and its Succeeded filter
exactly the others; the worker logs a failed run at INFO without a traceback.
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from _services import Broker
from dist_services import HOST, REPO, WorkerProcess
from dist_studies import worker_settings

from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import TASK_NAME, task_id_for
from orchestrator.distributed import submit_study, wait_study
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.model import Study, parse_study
from orchestrator.study.plan import prepare
from workers.app import create_app
from workers.failures import RunFailed, note_result, take_failure

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

LOGIN = "lab:flower-test-secret"
ERROR = "FlakyAgentError: flaky agent failed on purpose (fail=True)"
"""What the demo ``flaky`` agent's failure is, as ``error_info`` (class: message)."""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


class FlowerProcess:
    """``studyq flower`` on ``127.0.0.1:<port>`` with basic auth, its output in a file."""

    def __init__(self, broker_url: str, log_path: Path) -> None:
        self.port = _free_port()
        self.base = f"http://{HOST}:{self.port}"
        self.log_path = log_path
        self._log = log_path.open("w", encoding="utf-8")
        env = dict(os.environ, STUDYQ_FLOWER_BASIC_AUTH=LOGIN, PYTHONUNBUFFERED="1")
        command = [sys.executable, "-m", "orchestrator.cli", "flower"]
        command += ["--port", str(self.port), "--address", HOST, "--broker", broker_url]
        self.process = subprocess.Popen(
            command, cwd=REPO, env=env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def get(self, path: str, *, auth: bool = True) -> Any:
        """The JSON of ``GET path``; raises ``urllib.error.HTTPError`` on an error status."""
        return json.loads(self.page(path, auth=auth))

    def page(self, path: str, *, auth: bool = True) -> str:
        """The body of ``GET path``."""
        request = urllib.request.Request(self.base + path)
        if auth:
            token = base64.b64encode(LOGIN.encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return str(response.read().decode())

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.process.poll() is None, f"flower exited:\n{self.log}"
            try:
                self.get("/api/tasks?limit=1")
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert time.monotonic() < deadline, f"flower not up:\n{self.log}"
                time.sleep(0.2)

    def tasks(self, state: str) -> dict[str, dict[str, Any]]:
        tasks: dict[str, dict[str, Any]] = self.get(f"/api/tasks?state={state}&limit=100000")
        return tasks

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        self._log.close()


@pytest.fixture(scope="module")
def flower(
    live_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FlowerProcess]:
    process = FlowerProcess(live_broker.url, tmp_path_factory.mktemp("flower") / "flower.log")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@dataclass
class PoolWorker:
    queue: str
    process: WorkerProcess


@pytest.fixture(scope="module")
def workers(
    flower: FlowerProcess,
    pg_url: str,
    live_broker: Broker,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, PoolWorker]]:
    """Two ``studyq worker``s, started once Flower listens: a prefork one and a threads one,
    each on a queue of its own (so each pool gets its share of failures)."""
    log_dir = tmp_path_factory.mktemp("flower-worker-logs")
    suffix = f"{os.getpid()}-{uuid.uuid4().hex[:6]}"
    started: dict[str, PoolWorker] = {}
    try:
        for pool in ("prefork", "threads"):
            queue = f"studyq-flower-{pool}-{suffix}"
            process = WorkerProcess(
                f"flower-{pool}-{suffix}",
                queue=queue,
                database_url=pg_url,
                broker_url=live_broker.url,
                log_dir=log_dir,
                pool=pool,
                via_cli=True,
            )
            started[pool] = PoolWorker(queue, process)
        for worker in started.values():
            worker.process.wait_ready()
        yield started
    finally:
        for worker in started.values():
            worker.process.terminate()
            live_broker.forget(worker.queue)


def _settings(pg_url: str, live_broker: Broker) -> Settings:
    return Settings(database_url=pg_url, broker_url=live_broker.url, reconcile_interval_s=0.2)


def _study(queue: str, *, replicates: int, agent: str = "flaky") -> Study:
    return parse_study(
        {
            "study_id": f"flower-{uuid.uuid4().hex[:10]}",
            "title": "flower failures",
            "agent_specs": [agent],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": replicates},
            "factors": [
                {
                    "name": "fail",
                    "kind": "manipulated",
                    "levels": [{"name": "yes", "value": True}, {"name": "no", "value": False}],
                }
            ],
            "design_spec": {"kind": "full_factorial"},
            "execution": {"queue": queue},
        }
    )


def _task_ids(store: ResultStore, study_id: str, status: str) -> set[str]:
    """The Celery task ids of the study's runs in ``status`` (first publish: attempt 0)."""
    return {
        task_id_for(run.spec, run.attempt - 1)
        for run in store.iter_runs(study_id, statuses=[status])
    }


def _of(tasks: dict[str, dict[str, Any]], run_ids: set[str]) -> dict[str, dict[str, Any]]:
    """The tasks of these runs only (Flower sees every test's tasks on this broker)."""
    return {tid: task for tid, task in tasks.items() if tid.rsplit(".", 2)[0] in run_ids}


def _flower_sees_the_workers(
    flower: FlowerProcess, settings: Settings, store: ResultStore, queue: str
) -> None:
    """Flower receives the workers' events: a small canary study (no failures) shows up."""
    canary = _study(queue, replicates=1, agent="noop")
    submit_study(canary, settings=settings, show_progress=False)
    wait_study(canary.study_id, settings=settings, show_progress=False, timeout_s=20)
    run_ids = {run.run_id for run in store.iter_runs(canary.study_id)}
    deadline = time.monotonic() + 10
    while len(_of(flower.tasks("SUCCESS"), run_ids)) < len(run_ids):
        assert time.monotonic() < deadline, f"flower saw no task:\n{flower.log}"
        time.sleep(0.2)


@pytest.mark.redis_only("one Flower on one broker is enough: the events do not differ")
def test_flowers_failed_filter_lists_exactly_the_failed_runs(
    flower: FlowerProcess,
    workers: dict[str, PoolWorker],
    pg_url: str,
    live_broker: Broker,
) -> None:
    settings = _settings(pg_url, live_broker)
    failed: set[str] = set()
    succeeded: set[str] = set()
    run_ids: set[str] = set()
    with ResultStore.open(pg_url) as store:
        _flower_sees_the_workers(flower, settings, store, workers["prefork"].queue)
        # Given a sweep per pool of the flaky agent: 4 runs fail on purpose, 4 succeed
        studies = [_study(worker.queue, replicates=4) for worker in workers.values()]
        # When the sweeps run to the end
        for study in studies:
            submit_study(study, settings=settings, show_progress=False)
        for study in studies:
            waited = wait_study(
                study.study_id, settings=settings, show_progress=False, timeout_s=30
            )
            assert waited.complete and waited.counts["failed"] == waited.counts["success"] == 4
            failed |= _task_ids(store, study.study_id, "failed")
            succeeded |= _task_ids(store, study.study_id, "success")
            run_ids |= {run.run_id for run in store.iter_runs(study.study_id)}
    # Then Flower's Failed filter lists exactly the failed runs, and Succeeded the others
    deadline = time.monotonic() + 15
    while True:
        failures = _of(flower.tasks("FAILURE"), run_ids)
        successes = _of(flower.tasks("SUCCESS"), run_ids)
        if set(failures) == failed and set(successes) == succeeded:
            break
        assert time.monotonic() < deadline, (
            f"Flower shows {sorted(failures)} failed and {sorted(successes)} succeeded; the "
            f"store {sorted(failed)} and {sorted(succeeded)}"
        )
        time.sleep(0.3)
    # with the run's error class and message in the exception column
    assert {task["exception"] for task in failures.values()} == {f"RunFailed({ERROR!r})"}
    assert all(
        task["state"] == "FAILURE" and task["name"] == TASK_NAME for task in failures.values()
    )
    assert {task["result"] for task in successes.values()} == {"'success'"}
    # which studyq flower's task list shows (Flower's default columns do not)
    assert 'data-column="exception"' in flower.page("/tasks")
    # and each pool's worker logged its failures at INFO, one line each, no traceback
    for worker in workers.values():
        log = worker.process.log
        assert log.count(f"raised expected: RunFailed({ERROR!r})") == 4, log
        assert "Traceback" not in log and "ERROR/" not in log, log
        assert "'failed'" not in log, log  # no "succeeded in 0.005s: 'failed'" any more
        # and no message came back: each failed run's message was acknowledged once
        assert "not claimable" not in log, log


@pytest.mark.redis_only("Flower's login does not depend on the broker")
def test_flowers_api_answers_401_without_the_login(flower: FlowerProcess) -> None:
    # Given studyq flower started with STUDYQ_FLOWER_BASIC_AUTH
    # When its API is asked without the login, Then it answers 401; with it, 200
    with pytest.raises(urllib.error.HTTPError) as refused:
        flower.get("/api/tasks?limit=1", auth=False)
    assert refused.value.code == 401
    refused.value.close()
    assert isinstance(flower.get("/api/tasks?limit=1"), dict)


@pytest.mark.timeout(60, method="thread")  # the run arms SIGALRM on the main thread
def test_the_run_task_raises_for_a_failed_run_and_returns_otherwise(store_url: str) -> None:
    """The run task applied eagerly (no broker) on a real store: Celery's task state is the
    run's outcome."""
    app = create_app(worker_settings(store_url))
    task = app.tasks[TASK_NAME]
    # (a failure is acknowledged late, as a success is: not requeued, not retried)
    assert task.acks_late and task.acks_on_failure is True
    assert not getattr(task, "autoretry_for", None)
    try:
        with ResultStore.open(store_url) as store:
            # Given a queued sweep of the flaky agent: run 0 fails, run 1 succeeds
            study = _study("unused", replicates=1)
            prepared = prepare(study)
            register(store, prepared)
            specs = sorted(prepared.run_specs(), key=lambda spec: spec.index)
            store.mark_queued(study.study_id, [spec.index for spec in specs])
            fails = next(spec for spec in specs if spec.factor_assignments["fail"] is True)
            passes = next(spec for spec in specs if spec.factor_assignments["fail"] is False)
            # When each is delivered to the task
            failure = task.apply(kwargs={"spec": fails.to_message(), "attempt": 0})
            success = task.apply(kwargs={"spec": passes.to_message(), "attempt": 0})
            # Then the failed run's task fails with the run's error, the other succeeds
            assert failure.state == "FAILURE"
            assert isinstance(failure.result, RunFailed) and str(failure.result) == ERROR
            assert (success.state, success.result) == ("SUCCESS", "success")
            # and the store holds both results (the failure was recorded before the raise)
            app.runtime().drain()
            assert store.find_run(study.study_id, fails.index).status == "failed"  # type: ignore[union-attr]
            assert store.find_run(study.study_id, passes.index).status == "success"  # type: ignore[union-attr]
            # and a duplicate delivery of the failed run is a success: it changed nothing
            again = task.apply(kwargs={"spec": fails.to_message(), "attempt": 0})
            assert (again.state, again.result) == ("SUCCESS", "duplicate")
    finally:
        app.runtime().close()


def test_run_failed_survives_the_trip_to_the_prefork_parent() -> None:
    # Given the exception of a failed run, When it is pickled (child to parent) and back
    error = pickle.loads(pickle.dumps(RunFailed("ValueError", "bad input: x=3")))
    # Then it is the same error, class and message
    assert (error.error_type, error.message, str(error)) == (
        "ValueError",
        "bad input: x=3",
        "ValueError: bad input: x=3",
    )
    assert repr(error) == "RunFailed('ValueError: bad input: x=3')"


def test_a_noted_result_is_reported_for_its_own_run_only() -> None:
    now = datetime.now(UTC)
    failed = RunResult(
        "run-a", RunStatus.FAILED, now, now, error_type="KeyError", error_message="'k'"
    )
    # Given a failed result noted by this thread
    note_result(failed)
    # When another run asks, Then there is nothing for it, and the note is gone
    assert take_failure("run-b") is None
    assert take_failure("run-a") is None
    # When its own run asks, Then it gets the run's error
    note_result(failed)
    assert str(take_failure("run-a")) == "KeyError: 'k'"
    # and a success is never a failure
    note_result(RunResult("run-c", RunStatus.SUCCESS, now, now))
    assert take_failure("run-c") is None
