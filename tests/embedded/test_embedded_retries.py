"""Retries by error class in ``studyq run`` (the embedded executor): a transient failure on
attempts 1-2 succeeds on attempt 3 with every attempt recorded, a permanent error is
attempted once, ``retry_after_s`` is waited, and the last attempt fails with its error; in
the calling process, a thread pool and a process pool."""

from __future__ import annotations

import csv
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from orchestrator.embedded import run_embedded
from orchestrator.store import ResultStore

AGENTS = """
import json, time
from pathlib import Path


def _attempt(run_spec, factors):
    path = Path(factors["journal"]) / f"{run_spec.run_id}.{run_spec.index}"
    with path.open("a") as out:
        out.write(json.dumps({"t": time.time()}) + "\\n")
    return len(path.read_text().splitlines())


def flaky(run_spec, factors):
    attempt = _attempt(run_spec, factors)
    if attempt <= 2:
        raise TimeoutError(f"timed out on attempt {attempt}")
    return {"output": {"attempt": attempt}}


def limited(run_spec, factors):
    from workers.transient import RateLimited

    attempt = _attempt(run_spec, factors)
    if attempt == 1:
        raise RateLimited("429", retry_after_s=1.0)
    return {"output": {"attempt": attempt}}


def permanent(run_spec, factors):
    _attempt(run_spec, factors)
    raise ValueError("bad template")


def always(run_spec, factors):
    attempt = _attempt(run_spec, factors)
    raise ConnectionResetError(f"reset on attempt {attempt}")
"""


def _study(tmp_path: Path, agent: str, *, replicates: int = 2, max_attempts: int = 3) -> Path:
    (tmp_path / "retry_lab.py").write_text(AGENTS, encoding="utf-8")
    journal = tmp_path / "journal"
    journal.mkdir(exist_ok=True)
    study: dict[str, Any] = {
        "study_id": f"embedded-retry-{agent}",
        "title": "embedded retries",
        "agent_specs": ["a"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": replicates},
        "factors": [
            {
                "name": "journal",
                "kind": "manipulated",
                "levels": [{"name": "x", "value": str(journal)}],
            }
        ],
        "design_spec": {"kind": "full_factorial"},
        "bindings": {"agents": {"a": f"retry_lab:{agent}"}},
        "execution": {
            "max_attempts": max_attempts,
            "retry": {
                "on": ["TimeoutError", "ConnectionError", "RateLimited"],
                "backoff_s": 0.2,
                "max_backoff_s": 0.4,
            },
        },
        "output_dir": str(tmp_path / "artifacts"),
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study), encoding="utf-8")
    return path


def _attempts(tmp_path: Path) -> list[dict[str, str]]:
    with (tmp_path / "artifacts" / "attempts.csv").open(encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


def _executions(tmp_path: Path) -> list[int]:
    return sorted(
        len(path.read_text(encoding="utf-8").splitlines())
        for path in (tmp_path / "journal").iterdir()
    )


POOLS = [
    pytest.param({"jobs": 1}, id="inline"),
    pytest.param({"jobs": 2, "pool": "thread"}, id="threads"),
    pytest.param({"jobs": 2, "pool": "process"}, id="processes"),
]


@pytest.mark.parametrize("pool", POOLS)
def test_transient_failures_succeed_on_attempt_3_with_every_attempt_recorded(
    tmp_path: Path, db_url: str, pool: dict[str, Any]
):
    # Given two runs that time out on attempts 1 and 2
    study = _study(tmp_path, "flaky")
    # When the study runs on this machine
    outcome = run_embedded(study, db=db_url, show_progress=False, **pool)
    # Then both succeed, each executed three times
    assert outcome.counts["success"] == 2 and outcome.counts["failed"] == 0
    assert _executions(tmp_path) == [3, 3]
    with ResultStore.open(db_url) as store:
        runs = list(store.iter_runs("embedded-retry-flaky"))
    assert {(run.status, run.attempt) for run in runs} == {("success", 3)}
    # And attempts.csv has all three attempts of each run, the wait between them
    rows = _attempts(tmp_path)
    assert sorted((row["attempt"], row["status"]) for row in rows) == sorted(
        [("1", "retried"), ("2", "retried"), ("3", "success")] * 2
    )
    assert {row["error_type"] for row in rows if row["status"] == "retried"} == {"TimeoutError"}
    assert all("provenance" not in row for row in rows)


def test_retry_after_permanent_errors_and_the_last_attempt(tmp_path: Path, db_url: str):
    # Given a 429 with Retry-After 1 s (above max_backoff_s)
    limited = tmp_path / "limited"
    limited.mkdir()
    run_embedded(_study(limited, "limited", replicates=1), db=db_url, show_progress=False)
    # Then the second attempt started at least 1 s after the first ended
    first, second = _attempts(limited)
    assert (first["status"], first["error_type"], second["status"]) == (
        "retried",
        "RateLimited",
        "success",
    )
    gap = datetime.fromisoformat(second["started"]) - datetime.fromisoformat(first["ended"])
    assert gap.total_seconds() >= 1.0
    # Given a ValueError (not in retry.on): attempted once, failed
    permanent = tmp_path / "permanent"
    permanent.mkdir()
    outcome = run_embedded(_study(permanent, "permanent"), db=db_url, show_progress=False)
    assert outcome.counts["failed"] == 2 and _executions(permanent) == [1, 1]
    assert {(row["attempt"], row["status"]) for row in _attempts(permanent)} == {("1", "failed")}
    # Given a ConnectionResetError every time (a ConnectionError) and max_attempts 2
    always = tmp_path / "always"
    always.mkdir()
    outcome = run_embedded(
        _study(always, "always", replicates=1, max_attempts=2), db=db_url, show_progress=False
    )
    # Then it fails after two attempts, with its real error, the mark never recorded
    assert outcome.counts["failed"] == 1 and _executions(always) == [2]
    with ResultStore.open(db_url) as store:
        [run] = store.iter_runs("embedded-retry-always")
    assert (run.attempt, run.error_type, run.error_message) == (
        2,
        "ConnectionResetError",
        "reset on attempt 2",
    )
    assert "studyq_transient" not in (run.provenance or {})
    assert [row["status"] for row in _attempts(always)] == ["retried", "failed"]
