"""Failed and timed-out runs: recorded with their cause, exit 1, and re-run by the next run."""

from __future__ import annotations

from pathlib import Path

import pytest
from embedded_support import (
    cli_env,
    count_calls,
    explain,
    factor,
    read_csv,
    run_cli,
    store_counts,
    write_study,
)

from orchestrator.store import ResultStore

EXIT_FAILED = 1


def _flaky_study(path: Path, study_id: str) -> Path:
    """3 replicates of a condition that succeeds and of one whose agent raises."""
    return write_study(
        path,
        {
            "study_id": study_id,
            "title": "Some runs fail",
            "factors": [factor("fail", False, True)],
            "agent_specs": ["counted_flaky"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 3},
            "bindings": {"agents": {"counted_flaky": "embedded_agents:counted_flaky"}},
        },
    )


def _failures(url: str, study_id: str) -> dict[str, tuple[str | None, str | None, bool]]:
    """run_id -> (error_kind, error_type, the fail factor) of every failed run."""
    with ResultStore.open(url) as store:
        return {
            run.run_id: (run.error_kind, run.error_type, run.factor_assignments["fail"])
            for run in store.iter_runs(study_id, statuses=["failed"])
        }


@pytest.mark.timeout(60)
def test_failed_runs_keep_their_error_and_only_they_run_again(
    tmp_path: Path, store_url: str
) -> None:
    """Given a study whose agent raises FlakyAgentError on one factor level,
    when `studyq run` runs it, and then runs it again,
    then both times exit 1; the failing level's runs are failed with error_type
    FlakyAgentError and error_kind 'error' (also in runs.csv's error_info); the second run
    executes only the failed runs, which fail again the same way."""
    study_id = "failing"
    study = _flaky_study(tmp_path / "study.yaml", study_id)
    calls_file = tmp_path / "calls.txt"
    command = ["run", str(study), "--db", store_url, "--jobs", "1"]

    first = run_cli(command, tmp_path, env=cli_env(calls_file))

    assert first.returncode == EXIT_FAILED, explain(first)
    assert "some runs failed" in first.stderr
    assert store_counts(store_url, study_id) == {"success": 3, "failed": 3}
    failures = _failures(store_url, study_id)
    assert set(failures.values()) == {("error", "FlakyAgentError", True)}
    header, rows = read_csv(tmp_path / "artifacts" / study_id / "runs.csv")
    assert header[header.index("manifest_path") + 1] == "error_info"  # then factors, metrics
    for row in rows:
        if row["run_id"] in failures:
            assert row["status"] == "failed"
            assert row["error_info"].startswith("FlakyAgentError: flaky agent failed on purpose")
        else:
            assert (row["status"], row["error_info"]) == ("success", "")
    first_calls = count_calls(calls_file)
    assert len(first_calls) == 6
    assert set(first_calls.values()) == {1}

    second = run_cli(command, tmp_path, env=cli_env(calls_file))

    assert second.returncode == EXIT_FAILED, explain(second)
    assert "executed 3 runs now (0 succeeded, 3 failed); 3 were already done" in second.stdout
    assert store_counts(store_url, study_id) == {"success": 3, "failed": 3}
    assert _failures(store_url, study_id) == failures
    calls = count_calls(calls_file)
    assert {run_id for run_id, count in calls.items() if count == 2} == set(failures)
    assert {run_id for run_id, count in calls.items() if count == 1} == set(first_calls) - set(
        failures
    )


@pytest.mark.timeout(60)
def test_fail_fast_stops_after_the_first_failure(tmp_path: Path, db_url: str) -> None:
    """Given the same study and --fail-fast, in process (runs execute in plan order),
    when `studyq run` meets the first failing run,
    then it stops there: exit 1, one failed run, every later run still unrun, none running."""
    study_id = "fail-fast"
    study = _flaky_study(tmp_path / "study.yaml", study_id)
    calls_file = tmp_path / "calls.txt"

    done = run_cli(
        ["run", str(study), "--db", db_url, "--jobs", "1", "--fail-fast"],
        tmp_path,
        env=cli_env(calls_file),
    )

    assert done.returncode == EXIT_FAILED, explain(done)
    assert "fail_fast" in done.stdout + done.stderr
    counts = store_counts(db_url, study_id)
    assert counts.get("failed") == 1, counts
    assert "running" not in counts, counts
    assert counts.get("success", 0) + 1 < 6, counts
    assert sum(count_calls(calls_file).values()) == counts.get("success", 0) + 1


def _sleepy_study(path: Path, study_id: str, seconds: float) -> Path:
    """Two runs of the demo `sleep` agent: one instant, one sleeping ``seconds``."""
    return write_study(
        path,
        {
            "study_id": study_id,
            "title": "One run is too slow",
            "factors": [factor("sleep_s", 0.0, seconds)],
            "agent_specs": ["sleep"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
        },
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("flags", "interrupted"),
    [
        (["--jobs", "1"], True),
        (["--jobs", "2"], True),
        (["--threads", "--jobs", "2"], False),
    ],
    ids=["in-process", "process-pool", "threads"],
)
def test_a_run_over_the_timeout_fails_as_timeout(
    tmp_path: Path, db_url: str, flags: list[str], interrupted: bool
) -> None:
    """Given a run that sleeps 1.5 s and --timeout 0.3,
    when `studyq run` runs it in process, on the process pool, or on threads,
    then it fails with error_kind 'timeout' while the instant run succeeds; in process and on
    the process pool the slow run is interrupted at its limit (SIGALRM), on threads it is
    recorded as a timeout when it returns (threads cannot be interrupted)."""
    study_id = "timeouts"
    study = _sleepy_study(tmp_path / "study.yaml", study_id, 1.5)

    done = run_cli(["run", str(study), "--db", db_url, "--timeout", "0.3", *flags], tmp_path)

    assert done.returncode == EXIT_FAILED, explain(done)
    with ResultStore.open(db_url) as store:
        runs = {run.factor_assignments["sleep_s"]: run for run in store.iter_runs(study_id)}
    assert runs[0.0].status == "success"
    slow = runs[1.5]
    assert (slow.status, slow.error_kind, slow.error_type) == (
        "failed",
        "timeout",
        "RunTimeoutError",
    )
    latency = (slow.metrics or {})["latency_s"]
    if interrupted:
        # well under its 1.5 s of sleep, with room for a loaded machine's scheduling delays
        assert 0.3 <= latency < 1.4, f"the run was not interrupted at its limit: {latency} s"
    else:
        assert latency >= 1.5
