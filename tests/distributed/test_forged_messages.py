"""Forged but well-formed run messages on the real broker, delivered to real workers: the
store, not the message, decides what runs. Each forgery claims nothing, changes no row, and
is refused; the genuine messages run exactly the registered specs."""

from __future__ import annotations

import json
import time
from dataclasses import astuple, replace
from pathlib import Path
from typing import Any

import pytest
import redis
from dist_services import WorkerPair
from dist_studies import Sweep, make_sweep
from publishing import publish_runs
from test_celery_workers import finished, wait_for

from orchestrator.contracts.deadletters import DeadLetter, dead_letter_key
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import ResultStore
from workers.app import StudyqCelery

pytestmark = [pytest.mark.integration, pytest.mark.timeout(90)]

JOURNAL = {"agents": {"journal": "dist_agents:journal"}}
REFUSED = ": mismatch: message for run"


def journal_sweep(store: ResultStore, path: Path, replicates: int = 4) -> Sweep:
    return make_sweep(
        store,
        agents=["journal"],
        factors={"journal": str(path), "x": 1},
        replicates=replicates,
        bindings=JOURNAL,
    )


def calls(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines()]


def snapshot(store: ResultStore, study_id: str) -> list[tuple[Any, ...]]:
    """Every stored field of every run and attempt of a study."""
    runs = [astuple(run) for run in store.iter_runs(study_id)]
    attempts = [astuple(attempt) for attempt in store.iter_attempts(study_id)]
    return runs + attempts


def refusals(pair: WorkerPair) -> int:
    """Messages the workers quarantined as disagreeing with the store (one log line each)."""
    return pair.log.count(REFUSED)


def dead_letters(redis_db: redis.Redis, pair: WorkerPair) -> list[DeadLetter]:
    return [
        DeadLetter.from_json(entry) for entry in redis_db.lrange(dead_letter_key(pair.queue), 0, -1)
    ]


def wait_for_refusals(pair: WorkerPair, count: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while refusals(pair) < count:
        assert time.monotonic() < deadline, f"{refusals(pair)} of {count} refusals logged"
        time.sleep(0.1)


@pytest.mark.redis_only("reads the dead letters of the Redis quarantine")
def test_forged_messages_execute_nothing_and_change_no_row(
    worker_pair: WorkerPair,
    pg_store: ResultStore,
    publisher: StudyqCelery,
    tmp_path: Path,
    redis_db: redis.Redis,
):
    # Given study A (4 queued runs of an agent that journals every call), study B whose
    # runs stay queued, and study C, cancelled
    a = journal_sweep(pg_store, tmp_path / "a.jsonl")
    b = journal_sweep(pg_store, tmp_path / "b.jsonl")
    c = journal_sweep(pg_store, tmp_path / "c.jsonl")
    assert pg_store.cancel(c.study_id) == 4
    before_b, before_c = snapshot(pg_store, b.study_id), snapshot(pg_store, c.study_id)
    refused_before = refusals(worker_pair)
    dead_before = len(dead_letters(redis_db, worker_pair))
    first = a.specs[0]
    forged: list[tuple[RunSpec, int, str]] = [
        (replace(first, seed=999), 0, "seed"),
        (replace(first, factor_assignments={**first.factor_assignments, "x": 2}), 0, "factor"),
        (replace(first, agent_id="noop"), 0, "agent"),
        (replace(first, problem_id="beam-design"), 0, "problem"),
        (replace(first, run_id="run-000000000000"), 0, "run id"),
        (replace(first, study_id=b.study_id), 0, "study id"),
        (first, 7, "attempt ahead"),
        (replace(first, index=99), 0, "unknown run"),
        (replace(c.specs[0], seed=1), 0, "cancelled study"),
    ]
    # When the forgeries are published ahead of A's genuine messages, and C's genuine ones
    # after them
    assert publish_runs(publisher, forged, queue=worker_pair.queue) == len(forged)
    publish_runs(publisher, a.publishable() + c.publishable(), queue=worker_pair.queue)
    # Then A's runs ran once each, with exactly their registered specs
    wait_for(pg_store, a.study_id, finished(4), timeout=60)
    wait_for_refusals(worker_pair, refused_before + len(forged))
    journal = calls(tmp_path / "a.jsonl")
    assert sorted(call["seed"] for call in journal) == sorted(s.seed for s in a.specs)
    assert all(call["factors"] == first.factor_assignments for call in journal)
    runs = list(pg_store.iter_runs(a.study_id))
    assert {(r.status, r.attempt, r.attempts_used, r.agent_key) for r in runs} == {
        ("success", 1, 1, "journal")
    }
    assert [r.outputs for r in runs] == [{"seed": s.seed} for s in a.specs]
    assert len(list(pg_store.iter_attempts(a.study_id))) == 4
    # ...and nothing of B or C ran or changed
    assert calls(tmp_path / "b.jsonl") == calls(tmp_path / "c.jsonl") == []
    # ...and each forgery is in the dead-letter list, saying what disagreed
    every = dead_letters(redis_db, worker_pair)
    assert len(every) == dead_before + len(forged)
    letters = every[: len(forged)]  # newest first
    assert {letter.reason for letter in letters} == {"mismatch"}
    details = " ".join(letter.detail for letter in letters)
    for field in ("at seed", "factor_assignments.x", "agent_id", "problem_id", "run_id"):
        assert field in details, details
    assert "attempt 7" in details and "does not have" in details
    assert snapshot(pg_store, b.study_id) == before_b
    assert snapshot(pg_store, c.study_id) == before_c

    # When a forged message for a finished run arrives, beside a genuine replay of it
    after_a = snapshot(pg_store, a.study_id)
    refused_before = refusals(worker_pair)
    publish_runs(
        publisher, [(replace(first, seed=5), 1, ""), (first, 1, "")], queue=worker_pair.queue
    )
    # Then the forgery is refused, the replay is a duplicate, and no row changed
    wait_for_refusals(worker_pair, refused_before + 1)
    time.sleep(1.0)  # the replay is acknowledged too (a duplicate: no log line to wait for)
    assert refusals(worker_pair) == refused_before + 1
    assert snapshot(pg_store, a.study_id) == after_a
    assert len(calls(tmp_path / "a.jsonl")) == 4
