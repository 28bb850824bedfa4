"""Two deployments on one broker queue: a worker never acknowledges a run of a study its
database does not hold, it returns it (workers/foreign.py); ``studyq wait`` says when runs wait
and nothing claims them. Real PostgreSQL (two databases), a real broker (Redis and RabbitMQ),
real ``celery worker`` processes.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import Broker, ServiceSupplier
from dist_services import WorkerProcess

from orchestrator.contracts.deadletters import Reason
from orchestrator.contracts.settings import Settings
from orchestrator.distributed import submit_study, wait_study
from orchestrator.store import ResultStore, create_engine_for
from orchestrator.study.model import Study, parse_study
from workers.foreign import ForeignMessages
from workers.runtask import Outcome, UnknownStudy, foreign_messages, run_delivery
from workers.tasks import Quarantined

pytestmark = [pytest.mark.integration, pytest.mark.timeout(200)]

RUNS = 10


@pytest.fixture(scope="module")
def other_pg_url(services: ServiceSupplier) -> Iterator[str]:
    """A second deployment's database (the first is ``pg_url``)."""
    with services.pg_database("shared", migrate=True) as url:
        yield url


@pytest.fixture
def shared_queue(live_broker: Broker) -> Iterator[str]:
    name = f"studyq-shared-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    yield name
    live_broker.forget(name)


def _settings(url: str, broker: Broker, **overrides: float) -> Settings:
    values: dict[str, float] = {"reconcile_interval_s": 0.2, "queued_timeout_s": 600.0}
    values.update(overrides)
    return Settings(database_url=url, broker_url=broker.url, **values)


def _study(tag: str, queue: str, *, runs: int = RUNS, sleep_s: float = 0.05) -> Study:
    return parse_study(
        {
            "study_id": f"shared-{tag}-{uuid.uuid4().hex[:8]}",
            "title": "shared queue test",
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


def _worker(name: str, queue: str, url: str, broker: Broker, logs: Path) -> WorkerProcess:
    return WorkerProcess(
        f"{name}-{os.getpid()}",
        queue=queue,
        database_url=url,
        broker_url=broker.url,
        log_dir=logs,
        env={"STUDYQ_SHUTDOWN_GRACE_S": "1", "STUDYQ_TIME_LIMIT_GRACE_S": "1"},
    )


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) of ``pid`` and its children (a prefork worker's pool)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    for each in [str(pid), *children]:
        try:
            fields = Path(f"/proc/{each}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks
    return total


def test_two_stores_on_one_queue_both_finish_each_in_its_own_store(
    pg_url: str, other_pg_url: str, live_broker: Broker, shared_queue: str, tmp_path: Path
) -> None:
    # Given two deployments (two databases) on one broker and one queue, and only the
    # first deployment's worker running
    first = _worker("shared-a", shared_queue, pg_url, live_broker, tmp_path)
    second: WorkerProcess | None = None
    try:
        first.wait_ready()
        # When the second deployment submits its study first (its messages reach only the
        # first deployment's worker, whose database does not hold that study)
        study_b = _study("b", shared_queue)
        settings_b = _settings(other_pg_url, live_broker)
        submit_study(study_b, settings=settings_b, show_progress=False)
        first.wait_for_log(f"study {study_b.study_id} is not in this worker's database")
        # Then it returns them without acknowledging, and without spinning on them
        before = _cpu_s(first.process.pid)
        time.sleep(3)
        spent = _cpu_s(first.process.pid) - before
        assert spent < 1.0, f"worker spent {spent:.2f} CPU s in 3 s returning foreign messages"
        with ResultStore.open(other_pg_url) as store_b:
            assert store_b.count_by_status(study_b.study_id).get("queued") == RUNS
        # When the first deployment submits its own study and the second's worker starts
        study_a = _study("a", shared_queue)
        settings_a = _settings(pg_url, live_broker)
        submit_study(study_a, settings=settings_a, show_progress=False)
        second = _worker("shared-b", shared_queue, other_pg_url, live_broker, tmp_path)
        second.wait_ready()
        done_a = wait_study(study_a.study_id, settings=settings_a, show_progress=False,
                            timeout_s=80)  # fmt: skip
        done_b = wait_study(study_b.study_id, settings=settings_b, show_progress=False,
                            timeout_s=80)  # fmt: skip
        # Then both studies finish, every run once, nothing re-published (no message lost)
        for done in (done_a, done_b):
            assert done.complete and not done.timed_out, done
            assert done.counts.get("success") == RUNS, done.counts
            assert done.republished == 0
        # ... each in its own store only, executed by its own deployment's worker
        for url, mine, theirs, worker in (
            (pg_url, study_a, study_b, first),
            (other_pg_url, study_b, study_a, second),
        ):
            with ResultStore.open(url) as store:
                assert store.find_study(theirs.study_id) is None
                attempts = list(store.iter_attempts(mine.study_id))
                assert len(attempts) == RUNS
                assert {(a.attempt, a.outcome) for a in attempts} == {(1, "success")}
                assert {a.worker.rsplit(":", 1)[0] for a in attempts} == {worker.nodename}
        # ... and Celery did not log the routine returns as rejected tasks
        for each in (first, second):
            assert "reject requeue" not in each.log
    finally:
        first.terminate()
        if second is not None:
            second.terminate()


def test_wait_names_the_queue_and_database_when_nothing_claims_the_runs(
    pg_url: str, live_broker: Broker, shared_queue: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study submitted to a queue no worker consumes, through a URL with a password
    url = pg_url.replace("postgres@", "postgres:hunter2@")
    settings = _settings(url, live_broker, reconcile_interval_s=0.1, unclaimed_warning_s=0.4)
    study = _study("idle", shared_queue, runs=3)
    submit_study(study, settings=settings, show_progress=False)
    capsys.readouterr()
    # When the coordinator waits for 5 s (the hint's repeat comes after 10 x 0.4 s)
    report = wait_study(study.study_id, settings=settings, show_progress=False, timeout_s=5.2)
    # Then the wait says twice, not every tick, that 3 runs wait unclaimed, names the queue
    # and the database workers must use (password hidden), and nothing was claimed
    assert report.timed_out and report.counts.get("queued") == 3
    hints = [line for line in capsys.readouterr().err.splitlines() if "none claimed" in line]
    assert len(hints) == 2, hints
    assert re.match(r"3 runs queued for \d+ s and none claimed", hints[0])
    assert f"queue '{shared_queue}'" in hints[0]
    assert "STUDYQ_DATABASE_URL=postgresql" in hints[0] and "hunter2" not in hints[0]
    assert "studyq check" in hints[0]


def test_wait_gives_no_hint_while_runs_are_claimed(
    pg_url: str, live_broker: Broker, shared_queue: str, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    # Given a worker of this deployment on the study's queue and a short hint threshold
    worker = _worker("shared-busy", shared_queue, pg_url, live_broker, tmp_path)
    try:
        worker.wait_ready()
        settings = _settings(pg_url, live_broker, reconcile_interval_s=0.1, unclaimed_warning_s=0.3)
        # When a study of runs longer than the threshold (two slots, six runs) is waited for
        study = _study("busy", shared_queue, runs=6, sleep_s=0.6)
        submit_study(study, settings=settings, show_progress=False)
        report = wait_study(study.study_id, settings=settings, show_progress=False, timeout_s=60)
        # Then it finishes and the wait never said nothing was claimed
        assert report.complete and report.counts.get("success") == 6
        assert "none claimed" not in capsys.readouterr().err
    finally:
        worker.terminate()


# -- the worker's side, without Celery ----------------------------------------------------


def test_a_foreign_message_is_returned_then_dead_lettered_only_after_long_and_often(
    pg_url: str, other_pg_url: str, runtime_for
) -> None:
    # Given a queued run of a study in the other deployment's database, and a worker runtime
    # on this one whose dead-letter bounds are shortened (3 returns over 0.5 s)
    from dist_studies import make_sweep

    with ResultStore(create_engine_for(other_pg_url)) as theirs:
        sweep = make_sweep(theirs, agents=["noop"])
        message = sweep.specs[0].to_message()
        ours = ResultStore(create_engine_for(pg_url))
        try:
            runtime = runtime_for(ours)
            tracker = foreign_messages(runtime)
            tracker.dead_letter_min_returns, tracker.dead_letter_after_s = 3, 0.5
            # When the message is delivered again and again
            outcomes = [run_delivery(runtime, message, 0) for _ in range(4)]
            # Then it is returned each time while it is young, however often
            assert outcomes == [Outcome.NOT_OURS] * 4
            # ... and dead-lettered as unknown_study once it has been returned for long
            time.sleep(0.5)
            with pytest.raises(UnknownStudy, match="not in this worker's database") as raised:
                run_delivery(runtime, message, 0)
            assert raised.value.reason is Reason.UNKNOWN_STUDY
            # (the task files it under that reason: RunRequest dead-letters a Quarantined)
            quarantined = Quarantined(raised.value.reason, str(raised.value))
            assert quarantined.reason is Reason.UNKNOWN_STUDY
            assert runtime.counters[Outcome.NOT_OURS] == 4
            assert runtime.counters[Outcome.UNKNOWN_STUDY] == 1
            # ... and the run in its own store was never touched
            run = theirs.find_run(sweep.study_id, 0)
            assert run is not None and (run.status, run.attempt) == ("queued", 0)
        finally:
            ours.close()


def test_the_back_off_grows_with_foreign_deliveries_in_a_row_and_resets_on_an_own_one() -> None:
    # Given a process's foreign-message tracker on a clock of the test's own
    now, jitter = [0.0], [1.0]
    tracker = ForeignMessages(clock=lambda: now[0], jitter=lambda: jitter[0])
    # When foreign deliveries come in a row, then the wait before returning each grows
    # from nothing by doubling to its cap of 0.3 s
    waits = [tracker.returned("s", ("s", i)).backoff_s for i in range(7)]
    assert waits == pytest.approx([0.0, 0.05, 0.1, 0.2, 0.3, 0.3, 0.3])
    # ... each times a random factor between 0.5 and 1
    jitter[0] = 0.0
    assert tracker.returned("s", ("s", 7)).backoff_s == pytest.approx(0.15)
    # ... and a delivery of a study this database holds starts it over
    tracker.own()
    assert tracker.returned("s", ("s", 99)).backoff_s == 0.0
    # ... and only the first delivery of a study is worth a log line
    assert tracker.returned("t", ("t", 0)).first_of_study
    assert not tracker.returned("t", ("t", 1)).first_of_study


def test_a_message_returned_often_but_not_for_long_is_never_dead_lettered() -> None:
    # Given a tracker with the default bounds (20 returns over 600 s)
    now = [0.0]
    tracker = ForeignMessages(clock=lambda: now[0])
    # When one message comes back 100 times within 599 s
    verdicts = []
    for _ in range(100):
        verdicts.append(tracker.returned("s", "m"))
        now[0] += 5.99
    # Then it is returned every time; long but rarely is not enough either
    assert not any(v.dead_letter for v in verdicts)
    rare = ForeignMessages(clock=lambda: now[0])
    for _ in range(19):
        assert not rare.returned("s", "m").dead_letter
        now[0] += 3600
    # ... and the 20th return after more than 600 s dead-letters it
    assert rare.returned("s", "m").dead_letter
