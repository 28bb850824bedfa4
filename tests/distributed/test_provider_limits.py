"""Cluster-wide provider limits (workers/limits.py) on real ``celery worker`` processes, a
real Redis broker, PostgreSQL and a simulated provider (sim_provider.py: an HTTP server on
127.0.0.1 that answers 429 above its limits and records what it saw).

* 4 workers x 8 threads run 400 runs under ``max_concurrency: 5, requests_per_minute: 300``:
  the provider's own counters never exceed them, every run succeeds on its first charged
  attempt (waiting for a slot charges none);
* the same agents without the limits: the provider refuses;
* a worker killed -9 while holding slots: they come back within one lease;
* the limits' Redis restarted mid-sweep: no run lost, the limits still hold afterwards.

The module's workers keep their limits in a Redis of the test's own (``redis-server`` on a
free port, no persistence: the one the restart test restarts, by its PID); the killed worker
keeps them in its broker (Redis database 15), the default.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from _services import ServiceSupplier, forget_redis_queue
from dist_services import BROKER_URL, REDIS_DB, WorkerProcess
from publishing import publish_runs
from sim_provider import SimProvider

from orchestrator.contracts.runspec import RunSpec
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers.limits import RENEW_S, Limiter, deployment_id

pytestmark = [pytest.mark.integration, pytest.mark.timeout(180)]

LEASE_S = 4.0
WORKER_ENV = {
    "STUDYQ_LEASE_S": str(LEASE_S),
    "STUDYQ_HEARTBEAT_S": "1",
    "STUDYQ_SHUTDOWN_GRACE_S": "1",
    "STUDYQ_TIME_LIMIT_GRACE_S": "1",
}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class PrivateRedis:
    """A ``redis-server`` of this test module's own (never the shared one on 6379), no
    persistence, stopped by the PID in its pid file."""

    def __init__(self, directory: Path) -> None:
        if shutil.which("redis-server") is None:
            pytest.skip("redis-server is not installed")
        self.port = free_port()
        self.directory = directory
        self.pid_file = directory / "redis.pid"
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        subprocess.run(
            [
                "redis-server",
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "no",
                "--daemonize", "yes",
                "--pidfile", str(self.pid_file),
                "--dir", str(self.directory),
                "--logfile", str(self.directory / "redis.log"),
            ],
            check=True,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            probe = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, text=True
            )
            if probe.stdout.strip() == "PONG" and self.pid_file.exists():
                return
            time.sleep(0.05)
        raise AssertionError(f"redis-server on port {self.port} did not start")

    def stop(self) -> None:
        if not self.pid_file.exists():
            return
        pid = int(self.pid_file.read_text().strip())
        os.kill(pid, signal.SIGKILL)  # as a crash: nothing saved (there is no persistence)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        self.pid_file.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def limits_redis(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path_factory.mktemp("limits-redis"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def broker_db(services: ServiceSupplier) -> redis.Redis:
    """Redis database 15 as the session's (its marker keeps other engineers' sessions from
    flushing it, with our queues in it, while we run)."""
    return services.redis(REDIS_DB)


@pytest.fixture(scope="module")
def cluster(
    pg_url: str,
    limits_redis: PrivateRedis,
    broker_db: redis.Redis,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[tuple[str, list[WorkerProcess]]]:
    """4 real ``celery worker`` processes x 8 threads on one queue."""
    queue = f"studyq-limits-{uuid.uuid4().hex[:8]}"
    log_dir = tmp_path_factory.mktemp("limits-workers")
    env = {**WORKER_ENV, "STUDYQ_LIMITS_URL": limits_redis.url}
    workers = [
        WorkerProcess(
            f"limits-{n}-{os.getpid()}",
            queue=queue,
            database_url=pg_url,
            log_dir=log_dir,
            concurrency=8,
            pool="threads",
            env=env,
        )
        for n in range(4)
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield queue, workers
    finally:
        for worker in workers:
            worker.terminate()
        forget_redis_queue(broker_db, queue)


def register_sweep(
    store: ResultStore,
    runs: int,
    provider: SimProvider,
    *,
    hold_s: float,
    limits: dict[str, Any] | None,
    agent: str = "limit_agents:llm_call",
) -> tuple[str, list[RunSpec]]:
    """A study of ``runs`` runs of one agent that calls ``provider``, bound to provider
    ``sim`` with ``limits`` (None: no providers, no limits)."""
    study_id = f"lim-{uuid.uuid4().hex[:10]}"
    factors = {"provider_url": provider.url, "hold_s": hold_s, "tokens": 50}
    payload: dict[str, Any] = {
        "study_id": study_id,
        "title": "provider limits",
        "agent_specs": ["writer"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": runs},
        "factors": [
            {"name": name, "kind": "manipulated", "levels": [{"name": "x", "value": value}]}
            for name, value in factors.items()
        ],
        "design_spec": {"kind": "full_factorial"},
        "bindings": {
            "agents": {"writer": agent},
            "problems": {"noop": "workers.demo.problems:noop"},
        },
        "execution": {"max_attempts": 3},
    }
    if limits is not None:
        payload["bindings"]["providers"] = {"writer": "sim"}
        payload["execution"]["limits"] = {"sim": limits}
    prepared = prepare(parse_study(payload))
    register(store, prepared)
    specs = list(prepared.run_specs())
    store.mark_queued(study_id, [spec.index for spec in specs])
    return study_id, specs


def publish(queue: str, specs: list[RunSpec], pg_url: str) -> None:
    from dist_studies import worker_settings

    settings = worker_settings(pg_url, broker_url=BROKER_URL)
    assert publish_runs(settings, [(spec, 0, "") for spec in specs], queue=queue) == len(specs)


def wait_finished(store: ResultStore, study_id: str, total: int, timeout: float) -> dict[str, int]:
    deadline = time.monotonic() + timeout
    while True:
        counts = store.count_by_status(study_id)
        if counts["success"] + counts["failed"] == total:
            return counts
        assert time.monotonic() < deadline, f"study {study_id} stuck at {counts}"
        time.sleep(0.2)


def test_400_runs_on_4_workers_x_8_threads_never_exceed_the_providers_limits(
    cluster, pg_store: ResultStore, pg_url: str
):
    # Given a provider that refuses above 5 at once or 300 a minute, and 400 runs of an
    # agent bound to it under the same limits (each call held 0.3 s: 5 at a time could make
    # 1,000 calls a minute, so the 300 a minute binds even on a slow machine)
    queue, _ = cluster
    with SimProvider(max_concurrency=5, requests_per_minute=300) as provider:
        study_id, specs = register_sweep(
            pg_store,
            400,
            provider,
            hold_s=0.3,
            limits={"max_concurrency": 5, "requests_per_minute": 300},
        )
        # When the 32 worker threads run them
        started = time.monotonic()
        publish(queue, specs, pg_url)
        counts = wait_finished(pg_store, study_id, 400, timeout=150)
        elapsed = time.monotonic() - started
    # Then every run succeeded, and the provider never saw more than its limits
    assert counts["success"] == 400, counts
    assert provider.refused == 0
    assert provider.accepted == 400
    assert provider.peak_concurrency <= 5
    assert provider.peak_per_minute <= 300
    # And the limits were reached, not just respected: 5 at once, and 300 in the first
    # minute so the last 100 waited for the window (a 60 s sweep at least)
    assert provider.peak_concurrency == 5
    assert provider.peak_per_minute == 300
    assert elapsed > 60
    # And every run was charged one attempt: waiting for a slot charged nothing; each
    # wait is recorded as a released attempt
    runs = list(pg_store.iter_runs(study_id))
    assert {run.attempts_used for run in runs} == {1}
    attempts = list(pg_store.iter_attempts(study_id))
    outcomes = [attempt.outcome for attempt in attempts]
    assert outcomes.count("success") == 400
    assert set(outcomes) <= {"success", "released"}
    assert outcomes.count("released") > 0


def test_the_same_sweep_without_limits_makes_the_provider_refuse(
    cluster, pg_store: ResultStore, pg_url: str
):
    # Given the same provider and agent, and a study that declares no limits
    queue, _ = cluster
    with SimProvider(max_concurrency=5, requests_per_minute=300) as provider:
        study_id, specs = register_sweep(pg_store, 120, provider, hold_s=0.4, limits=None)
        # When the 32 worker threads run them
        publish(queue, specs, pg_url)
        counts = wait_finished(pg_store, study_id, 120, timeout=60)
    # Then the provider saw more than 5 at once and refused; those runs failed rate limited
    assert provider.peak_concurrency > 5
    assert provider.refused > 0
    assert counts["failed"] > 0
    failed = [run for run in pg_store.iter_runs(study_id) if run.status == "failed"]
    assert {run.error_type for run in failed} == {"RateLimited"}


def test_a_worker_killed_9_while_holding_slots_gives_them_back_within_one_lease(
    pg_url: str, pg_store: ResultStore, broker_db: redis.Redis, tmp_path: Path
):
    # Given a worker (limits in its Redis broker) running 3 long runs of a provider capped
    # at 3, lease 3 s
    lease_s = 3.0
    queue = f"studyq-kill-{uuid.uuid4().hex[:8]}"
    worker = WorkerProcess(
        f"limits-kill-{os.getpid()}",
        queue=queue,
        database_url=pg_url,
        log_dir=tmp_path,
        concurrency=4,
        pool="threads",
        env={**WORKER_ENV, "STUDYQ_LEASE_S": str(lease_s), "STUDYQ_HEARTBEAT_S": "0.5"},
    )
    limiter = Limiter(BROKER_URL, deployment_id(pg_url), lease_s=lease_s)
    try:
        worker.wait_ready()
        with SimProvider() as provider:
            _study_id, specs = register_sweep(
                pg_store, 4, provider, hold_s=60, limits={"max_concurrency": 3}
            )
            publish(queue, specs, pg_url)
            deadline = time.monotonic() + 30
            while limiter.held("sim") < 3:
                assert time.monotonic() < deadline, f"slots never taken:\n{worker.log}"
                time.sleep(0.1)
            # And the slots outlive their lease while the runs go on (they are renewed)
            time.sleep(2 * lease_s)
            assert limiter.held("sim") == 3
            assert provider.in_flight == 3
            # When the worker is killed -9
            worker.process.kill()
            worker.process.wait(10)
            killed = time.monotonic()
            # Then its slots are free again within one lease (plus the renew interval)
            while limiter.held("sim") > 0:
                assert time.monotonic() - killed < lease_s + RENEW_S + 1, limiter.held("sim")
                time.sleep(0.05)
            back_after = time.monotonic() - killed
            assert back_after <= lease_s + RENEW_S + 1
            # And another process can take all 3
            assert all(limiter.try_slot("sim", f"next-{n}", 3) for n in range(3))
            for n in range(3):
                limiter.release_slot("sim", f"next-{n}")
    finally:
        worker.terminate()
        forget_redis_queue(broker_db, queue)
        for key in limiter.client.scan_iter(f"{limiter.prefix}:*"):
            limiter.client.delete(key)


def test_the_limits_redis_restarted_mid_sweep_loses_no_run_and_the_limits_hold_after(
    cluster, limits_redis: PrivateRedis, pg_store: ResultStore, pg_url: str
):
    # Given 150 runs under max_concurrency 5 (and 300 a minute), each call held 0.3 s
    queue, _ = cluster
    with SimProvider(max_concurrency=5, requests_per_minute=300) as provider:
        study_id, specs = register_sweep(
            pg_store,
            150,
            provider,
            hold_s=0.3,
            limits={"max_concurrency": 5, "requests_per_minute": 300},
        )
        publish(queue, specs, pg_url)
        deadline = time.monotonic() + 60
        while pg_store.count_by_status(study_id)["success"] < 30:
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # When the limits' Redis dies (no persistence: every slot and window is lost) while
        # runs hold slots, and comes back 2 s later
        limits_redis.stop()
        time.sleep(2)
        limits_redis.start()
        restarted = time.monotonic()
        counts = wait_finished(pg_store, study_id, 150, timeout=90)
    # Then no run was lost: every run succeeded, charged once
    assert counts["success"] == 150, counts
    assert {run.attempts_used for run in pg_store.iter_runs(study_id)} == {1}
    # And the provider never saw more than 5 at once, after the restart included
    assert provider.refused == 0
    assert provider.peak_concurrency <= 5
    after_concurrency, after_per_minute = provider.peak_since(restarted)
    assert after_concurrency == 5  # the cap was reached again after the restart, and held
    assert after_per_minute <= 300
