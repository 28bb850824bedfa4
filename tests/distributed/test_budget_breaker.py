"""Budgets and the failure breaker on a real sweep (issue 12, items 3-4): two real ``studyq
worker`` processes (2 threads each: 4 run slots) on Redis and the test PostgreSQL, studies
submitted, watched, raised and resumed through the ``studyq`` commands.

* Budget: runs that each cost $0.01 under ``max_cost_usd: 1.00`` stop at 100 successful
  runs plus at most those in flight (one per slot); ``status`` says the budget stopped it;
  ``budget --max-cost-usd`` finishes the study without resubmitting; no run executes twice
  (every execution is a line in a journal file).
* Breaker: an agent that always fails pauses its study after about ``window`` of its 1,000
  runs; a second study on the same workers and queue finishes; ``resume`` continues it.
* Bad input: a budget below what is spent is refused with one line, exit 2, nothing written.
* ``wait`` publishes none of a paused study's runs, even those that look stale; a resume
  publishes them again.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from _services import Broker
from dist_services import WorkerProcess
from dist_studies import make_sweep
from sqlalchemy import update

from orchestrator import distributed
from orchestrator.budget import resume
from orchestrator.cli import main as studyq_main
from orchestrator.contracts.settings import Settings
from orchestrator.executors import celery as celery_executor
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction
from orchestrator.store.models import RunRow
from orchestrator.store.pausing import BREAKER, budget_overrides, pause, pause_of
from orchestrator.store.sqltypes import db_now_plus

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(150),
    pytest.mark.redis_only("a pause is the store's; one broker shows it"),
]

SLOTS = 4  # 2 workers x 2 threads
WINDOW = 20


@pytest.fixture(scope="module")
def budget_queue(
    pg_url: str, live_broker: Broker, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[WorkerProcess]]]:
    """Two ``studyq worker`` processes with 2 threads each on a queue of this module."""
    queue = f"studyq-budget-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    log_dir = tmp_path_factory.mktemp("budget-logs")
    workers = [
        WorkerProcess(
            f"budget-{name}-{os.getpid()}",
            queue=queue,
            database_url=pg_url,
            broker_url=live_broker.url,
            log_dir=log_dir,
            concurrency=2,
            pool="threads",
            via_cli=True,
        )
        for name in ("a", "b")
    ]
    try:
        for worker in workers:
            worker.wait_ready()
        yield queue, workers
    finally:
        for worker in workers:
            worker.terminate()
        live_broker.forget(queue)


@pytest.fixture(autouse=True)
def quick_reconcile(monkeypatch: pytest.MonkeyPatch) -> None:
    """`studyq wait` looks at the store every 0.2 s."""
    monkeypatch.setenv("STUDYQ_RECONCILE_INTERVAL_S", "0.2")


def _study_file(
    tmp_path: Path, queue: str, *, agent: str, runs: int, execution: dict[str, Any]
) -> tuple[str, Path, Path]:
    """A study of ``runs`` replicates of one budget agent; its id, file and journal."""
    study_id = f"{agent}-{uuid.uuid4().hex[:8]}"
    journal = tmp_path / f"{study_id}.journal"
    journal.touch()
    path = tmp_path / f"{study_id}.json"
    path.write_text(
        json.dumps(
            {
                "study_id": study_id,
                "title": "budgets and the breaker",
                "agent_specs": [agent],
                "problem_ids": ["noop"],
                "run_budget": {"replicates": runs},
                "factors": [
                    {
                        "name": "journal",
                        "kind": "manipulated",
                        "levels": [{"name": "j", "value": str(journal)}],
                    }
                ],
                "design_spec": {"kind": "full_factorial"},
                "bindings": {"agents": {agent: f"budget_agents:{agent}"}},
                "execution": {"queue": queue, **execution},
            }
        )
    )
    return study_id, path, journal


def _urls(pg_url: str, broker: Broker) -> list[str]:
    return ["--db", pg_url, "--broker", broker.url]


def _executions(journal: Path) -> Counter[str]:
    return Counter(journal.read_text(encoding="utf-8").split())


def _paused(store: ResultStore, study_id: str) -> Any:
    with transaction(store.engine, readonly=True) as connection:
        return pause_of(connection, study_id)


def test_a_budget_stops_the_study_and_raising_it_finishes_it(
    budget_queue: tuple[str, list[WorkerProcess]],
    pg_url: str,
    live_broker: Broker,
    pg_store: ResultStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue, _ = budget_queue
    urls = _urls(pg_url, live_broker)
    # Given 300 runs that each cost $0.01 under max_cost_usd: 1.00, submitted
    study_id, path, journal = _study_file(
        tmp_path, queue, agent="costly", runs=300, execution={"max_cost_usd": 1.00}
    )
    assert studyq_main(["submit", str(path), *urls, "--no-progress"]) == 0
    # When the sweep runs, `studyq wait` ends once the budget stopped it (exit 1, says so)
    assert studyq_main(["wait", study_id, *urls, "--no-progress", "--timeout", "60"]) == 1
    err = capsys.readouterr().err
    assert "stopped: budget (spent $1.0" in err and f"studyq budget {study_id}" in err
    # Then 100 runs succeeded, plus at most one in flight per worker slot; the rest wait
    counts = pg_store.count_by_status(study_id)
    assert 100 <= counts["success"] <= 100 + SLOTS, counts
    assert counts["running"] == 0 and counts["failed"] == 0
    assert counts["queued"] + counts["planned"] == 300 - counts["success"]
    # And nothing executed twice, nothing executed unrecorded
    first = _executions(journal)
    assert sum(first.values()) == counts["success"] and set(first.values()) == {1}
    # And status says the budget stopped it, with spent, limit and burn rate
    assert studyq_main(["status", study_id, "--db", pg_url]) == 0
    out = capsys.readouterr().out
    assert f"stopped: budget (spent ${counts['success'] / 100:.2f} of $1.00, burn $" in out
    assert f"`studyq budget {study_id} --max-cost-usd N (or --max-tokens N)` continues it" in out

    # When the budget is raised to $4, the study continues without a resubmit
    assert studyq_main(["budget", study_id, "--max-cost-usd", "4", *urls]) == 0
    out = capsys.readouterr().out
    assert "continues (was paused: budget)" in out and "waiting runs published" in out
    assert studyq_main(["wait", study_id, *urls, "--no-progress", "--timeout", "60"]) == 0
    # Then every run succeeded, each executed exactly once
    counts = pg_store.count_by_status(study_id)
    assert counts["success"] == 300, counts
    executed = _executions(journal)
    assert len(executed) == 300 and set(executed.values()) == {1}
    assert _paused(pg_store, study_id) is None


def test_a_budget_below_what_is_spent_is_refused_and_nothing_is_written(
    budget_queue: tuple[str, list[WorkerProcess]],
    pg_url: str,
    live_broker: Broker,
    pg_store: ResultStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue, _ = budget_queue
    urls = _urls(pg_url, live_broker)
    # Given a study its budget of $0.10 stopped
    study_id, path, _ = _study_file(
        tmp_path, queue, agent="costly", runs=40, execution={"max_cost_usd": 0.10}
    )
    assert studyq_main(["submit", str(path), *urls, "--no-progress"]) == 0
    assert studyq_main(["wait", study_id, *urls, "--no-progress", "--timeout", "60"]) == 1
    capsys.readouterr()
    before = pg_store.count_by_status(study_id)
    # When the budget is set below what it spent
    code = studyq_main(["budget", study_id, "--max-cost-usd", "0.05", *urls])
    # Then one line names the flag and the fix, exit 2
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("--max-cost-usd: 0.05 is not above the $0.1")
    assert "Fix: pass more than" in err[0]
    # And nothing was written: no override, still paused, no run moved
    with transaction(pg_store.engine, readonly=True) as connection:
        assert budget_overrides(connection, study_id) == (None, None)
    assert _paused(pg_store, study_id).reason == "budget"
    time.sleep(0.5)
    assert pg_store.count_by_status(study_id) == before


def test_the_breaker_pauses_a_failing_study_and_leaves_the_other_running(
    budget_queue: tuple[str, list[WorkerProcess]],
    pg_url: str,
    live_broker: Broker,
    pg_store: ResultStore,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    queue, _ = budget_queue
    urls = _urls(pg_url, live_broker)
    # Given 1,000 runs of an agent whose every call fails, under a breaker of 20 at 0.5
    broken_id, broken_path, broken_journal = _study_file(
        tmp_path,
        queue,
        agent="broken",
        runs=1000,
        execution={"breaker": {"window": WINDOW, "max_failure_rate": 0.5}},
    )
    # And a second study of 100 good runs on the same queue, submitted behind it
    good_id, good_path, good_journal = _study_file(
        tmp_path, queue, agent="costly", runs=100, execution={}
    )
    assert studyq_main(["submit", str(broken_path), *urls, "--no-progress"]) == 0
    assert studyq_main(["submit", str(good_path), *urls, "--no-progress"]) == 0
    # When both run: the second study finishes, every run once
    assert studyq_main(["wait", good_id, *urls, "--no-progress", "--timeout", "60"]) == 0
    assert pg_store.count_by_status(good_id)["success"] == 100
    assert set(_executions(good_journal).values()) == {1}
    # Then the failing study paused after about `window` runs, not all 1,000
    assert studyq_main(["wait", broken_id, *urls, "--no-progress", "--timeout", "60"]) == 1
    assert "paused: breaker" in capsys.readouterr().err
    counts = pg_store.count_by_status(broken_id)
    assert WINDOW <= counts["failed"] <= WINDOW + SLOTS, counts  # plus those in flight
    assert counts["queued"] + counts["planned"] == 1000 - counts["failed"]
    assert sum(_executions(broken_journal).values()) == counts["failed"]
    # And status shows the breaker with the top error class and message
    assert studyq_main(["status", broken_id, "--db", pg_url]) == 0
    out = capsys.readouterr().out
    assert f"paused: breaker ({WINDOW} of the last {WINDOW} runs failed; top error: " in out
    assert "AuthenticationError: 401: invalid API key" in out
    assert f"`studyq resume {broken_id}` continues it" in out

    # When it is resumed, it continues: its runs execute again, until the breaker, looking
    # only at runs that ended since the resume, pauses it again after about another window
    assert studyq_main(["resume", broken_id, *urls]) == 0
    assert "resumed (was paused: breaker)" in capsys.readouterr().out
    assert studyq_main(["wait", broken_id, *urls, "--no-progress", "--timeout", "60"]) == 1
    after = pg_store.count_by_status(broken_id)
    assert counts["failed"] + WINDOW <= after["failed"] <= counts["failed"] + WINDOW + SLOTS
    executed = _executions(broken_journal)
    assert sum(executed.values()) == after["failed"] and set(executed.values()) == {1}


class _RecordingTransport:
    """The transport as ``wait_study`` uses it: an empty broker that records what is
    published (so every queued run looks as if it had lost its message)."""

    published: ClassVar[list[int]] = []

    def __init__(self, settings: Any, broker_url: str) -> None:
        pass

    def __enter__(self) -> _RecordingTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def queue_backlog(self, queue: str, *, delivered_within_s: float | None = None) -> int:
        return 0

    def publish(self, items: Any, *, queue: str, timeout_s: float | None) -> int:
        indices = [spec.index for spec, _, _ in items]
        self.published.extend(indices)
        return len(indices)


def test_wait_publishes_nothing_of_a_paused_study(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(celery_executor, "CeleryTransport", _RecordingTransport)
    _RecordingTransport.published = []
    # Given a paused study whose 4 queued runs were queued 10 minutes ago, and a broker that
    # holds no message for them (a paused study's deliveries are acknowledged unexecuted)
    url = f"sqlite:///{tmp_path / 'studyq.db'}"
    with ResultStore.open(url) as store:
        sweep = make_sweep(store, agents=["noop"], replicates=4)
        with transaction(store.engine) as connection:
            connection.execute(
                update(RunRow)
                .where(RunRow.study_id == sweep.study_id)
                .values(queued_at=db_now_plus(-600))
            )
            pause(connection, sweep.study_id, BREAKER, {"failed": 4, "window": 4})
    settings = Settings(
        database_url=url,
        broker_url="redis://127.0.0.1:1/0",
        queued_timeout_s=300.0,
        reconcile_interval_s=0.05,
    )
    # When `studyq wait` reconciles
    report = distributed.wait_study(sweep.study_id, settings=settings, show_progress=False)
    # Then it publishes none of them again (they would be stale), and ends saying it is paused
    assert _RecordingTransport.published == [] and report.republished == 0
    assert report.paused is not None and report.paused.startswith("paused: breaker")
    assert report.counts["queued"] == 4
    # And resumed, the same runs are published again
    resumed = resume(sweep.study_id, db=url, broker="redis://127.0.0.1:1/0", settings=settings)
    assert resumed.published == 4 and sorted(_RecordingTransport.published) == [0, 1, 2, 3]
