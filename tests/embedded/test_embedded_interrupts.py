"""Interrupted sweeps: SIGKILL and Ctrl-C lose nothing recorded, and the same command resumes.

The agent appends its run id to a counter file on every call (one ``O_APPEND`` write), so the
tests know exactly which runs really executed, and how often, across all processes.
"""

from __future__ import annotations

import os
import signal
import socket
import time
from pathlib import Path

import pytest
from embedded_support import (
    CSV_FILES,
    cli_env,
    comparable_csv,
    comparable_manifest,
    count_calls,
    explain,
    factor,
    finish,
    group_alive,
    reap_group,
    run_cli,
    start_cli,
    store_counts,
    wait_until,
    write_study,
)

from orchestrator.api import run_study
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.plan import prepare

EXIT_INTERRUPTED = 130
RUNS = 400


def _slow_study(path: Path, study_id: str, runs: int = RUNS, sleep_s: float = 0.01) -> Path:
    """``runs`` runs of the counting agent, ``sleep_s`` each."""
    return write_study(
        path,
        {
            "study_id": study_id,
            "title": "Interrupted sweep",
            "factors": [factor("arm", "a", "b"), factor("sleep_s", sleep_s)],
            "agent_specs": ["counted"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": runs // 2},
            "bindings": {"agents": {"counted": "embedded_agents:counted"}},
        },
    )


def _succeeded(url: str, study_id: str) -> set[str]:
    with ResultStore.open(url) as store:
        return {run.run_id for run in store.iter_runs(study_id, statuses=["success"])}


def _assert_recorded_once(url: str, study_id: str, runs_planned: int = RUNS) -> None:
    """Every run is a success, and its result rows were written exactly once."""
    with ResultStore.open(url) as store:
        runs = list(store.iter_runs(study_id))
        evaluations = [row.run_id for row in store.iter_evaluations(study_id)]
        events = [row.run_id for row in store.iter_events(study_id)]
    assert len(runs) == runs_planned
    assert len({run.run_id for run in runs}) == runs_planned
    assert {run.status for run in runs} == {"success"}
    # the noop problem scores one row per run; the agent emits no events, so one is added
    assert sorted(evaluations) == sorted(run.run_id for run in runs)
    assert sorted(events) == sorted(run.run_id for run in runs)


@pytest.mark.timeout(90)
def test_sigkill_halfway_then_rerun_executes_only_what_was_not_recorded(
    tmp_path: Path, db_url: str
) -> None:
    """Given a 400-run sweep on the process pool, killed with SIGKILL once about half of its
    successes are recorded,
    when the same `studyq run` command runs again,
    then every run ends a success exactly once, no run whose success was recorded before the
    kill executes again, only the runs in flight at the kill execute twice, and the artifacts
    equal those of an uninterrupted run of the same study (timestamps and latencies aside)."""
    study_id = "resume-after-kill"
    study = _slow_study(tmp_path / "study.yaml", study_id)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = start_cli(
        ["run", str(study), "--db", f"sqlite:///{reference_dir / 's.db'}", "--jobs", "2"],
        reference_dir,
        env=cli_env(reference_dir / "calls.txt"),
    )
    try:
        _kill_halfway_and_resume(study, study_id, tmp_path, db_url)
        finished = finish(reference, timeout=60)
    finally:
        reap_group(reference, grace_s=30)
    assert finished.returncode == 0, explain(finished)
    resumed_out = tmp_path / "artifacts" / study_id
    reference_out = reference_dir / "artifacts" / study_id
    for name in CSV_FILES:
        assert comparable_csv(resumed_out / name) == comparable_csv(reference_out / name), name
    assert comparable_manifest(resumed_out / "manifest.json") == comparable_manifest(
        reference_out / "manifest.json"
    )


def _kill_halfway_and_resume(study: Path, study_id: str, tmp_path: Path, db_url: str) -> None:
    """SIGKILL a sweep once half its successes are recorded, run it again, and check what
    executed (the counter file) and what was recorded (the store)."""
    calls_file = tmp_path / "calls.txt"
    command = ["run", str(study), "--db", db_url, "--jobs", "2"]

    victim = start_cli(command, tmp_path, env=cli_env(calls_file))
    try:
        reached = wait_until(
            lambda: store_counts(db_url, study_id).get("success", 0) >= RUNS // 2, timeout=60
        )
        assert victim.poll() is None, "the sweep ended before it could be killed"
        os.kill(victim.pid, signal.SIGKILL)
    finally:
        # Its orphaned pool workers finish the chunk in hand, then are killed too (they would
        # otherwise linger: test_pool_workers_exit_when_the_coordinator_is_killed), so no
        # agent call lands after this point.
        reap_group(victim, grace_s=1.0)
    assert reached, "the sweep never recorded half of its runs"
    recorded_before_kill = _succeeded(db_url, study_id)
    called_before_kill = count_calls(calls_file)
    assert RUNS // 2 <= len(recorded_before_kill) < RUNS

    done = run_cli(command, tmp_path, env=cli_env(calls_file))

    assert done.returncode == 0, explain(done)
    assert store_counts(db_url, study_id) == {"success": RUNS}
    _assert_recorded_once(db_url, study_id)
    calls = count_calls(calls_file)
    assert len(calls) == RUNS
    assert all(calls[run_id] == 1 for run_id in recorded_before_kill)
    executed_twice = {run_id for run_id, count in calls.items() if count > 1}
    in_flight = set(called_before_kill) - recorded_before_kill
    assert executed_twice == in_flight
    assert max(calls.values()) <= 2
    assert sum(calls.values()) - RUNS == len(in_flight) <= 100, (
        f"{len(in_flight)} runs were in flight at the kill"
    )


@pytest.mark.timeout(90)
@pytest.mark.parametrize("jobs", [1, 2], ids=["in-process", "process-pool"])
def test_ctrl_c_exits_130_keeps_results_and_the_same_command_completes(
    tmp_path: Path, db_url: str, jobs: int
) -> None:
    """Given a running 120-run sweep,
    when the terminal's Ctrl-C (SIGINT to the whole process group) arrives,
    then studyq exits 130, its recorded successes stay, no run is left `running`, and the
    same command completes the sweep without executing a recorded run again."""
    study_id = f"ctrl-c-{jobs}"
    runs = 120
    # 50 ms runs: after the 30th success the sweep has seconds left, not a fraction of one,
    # so a loaded machine's slow polls cannot let it finish before the Ctrl-C lands
    study = _slow_study(tmp_path / "study.yaml", study_id, runs, sleep_s=0.05)
    calls_file = tmp_path / "calls.txt"
    command = ["run", str(study), "--db", db_url, "--jobs", str(jobs)]

    child = start_cli(command, tmp_path, env=cli_env(calls_file))
    try:
        reached = wait_until(
            lambda: store_counts(db_url, study_id).get("success", 0) >= 30, timeout=60
        )
        assert child.poll() is None, "the sweep ended before it could be interrupted"
        os.killpg(child.pid, signal.SIGINT)
        interrupted = finish(child, timeout=30)
    finally:
        reap_group(child)
    assert reached, "the sweep never recorded 30 runs"

    assert interrupted.returncode == EXIT_INTERRUPTED, explain(interrupted)
    assert "interrupted" in interrupted.stderr
    counts = store_counts(db_url, study_id)
    assert "running" not in counts, counts
    assert 30 <= counts.get("success", 0) < runs, counts
    assert "failed" not in counts, counts
    kept = _succeeded(db_url, study_id)

    done = run_cli(command, tmp_path, env=cli_env(calls_file))

    assert done.returncode == 0, explain(done)
    assert store_counts(db_url, study_id) == {"success": runs}
    _assert_recorded_once(db_url, study_id, runs)
    calls = count_calls(calls_file)
    assert len(calls) == runs
    assert all(calls[run_id] == 1 for run_id in kept)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("reaped", [True, False], ids=["reaped", "zombie"])
def test_pool_workers_exit_when_the_coordinator_is_killed(
    tmp_path: Path, db_url: str, reaped: bool
) -> None:
    """Given a sweep on the process pool,
    when its coordinator alone is killed with SIGKILL (the OOM killer, `kill -9 PID`),
    whether or not its parent has reaped it yet (unreaped, it is a zombie, which
    `kill(pid, 0)` still finds),
    then its pool workers, forkserver and resource tracker exit on their own within a few
    seconds instead of lingering as orphans (each holds the agent code and NumPy in memory)."""
    study_id = "orphans"
    study = _slow_study(tmp_path / "study.yaml", study_id, 100)
    child = start_cli(["run", str(study), "--db", db_url, "--jobs", "2"], tmp_path, env=cli_env())
    try:
        assert wait_until(
            lambda: store_counts(db_url, study_id).get("success", 0) >= 10, timeout=60
        ), "the sweep never recorded 10 runs"
        os.kill(child.pid, signal.SIGKILL)
        if reaped:
            child.wait(timeout=10)
        left = wait_until(lambda: not group_alive(child.pid), timeout=2, interval=0.1)
        survivors = _group_members(child.pid)
    finally:
        reap_group(child, grace_s=0.0)
    assert left, f"orphaned processes still alive 2 s after the coordinator died: {survivors}"


def _group_members(pgid: int) -> list[str]:
    """``pid command`` of every live process in the group (for the failure message)."""
    members = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getpgid(int(entry.name)) != pgid:
                continue
            command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:100]
        except (ProcessLookupError, FileNotFoundError, PermissionError):
            continue
        members.append(f"{entry.name} {command}")
    return members


def _held_elsewhere(tmp_path: Path, db_url: str, study_id: str, lease_s: float) -> Path:
    """A registered 4-run no-op study whose first two runs another coordinator claimed: an
    ``embedded`` owner on another host (a second machine sharing the store, or this machine's
    container before a restart gave it a new hostname)."""
    study = write_study(
        tmp_path / "study.yaml",
        {
            "study_id": study_id,
            "title": "Runs held elsewhere",
            "agent_specs": ["noop"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": 4},
        },
    )
    with ResultStore.open(db_url) as store:
        register(store, prepare(study))
        claims = store.claim_runs(
            study_id,
            [0, 1],
            worker="embedded:another-host:4242",
            lease_s=lease_s,
            allow_planned=True,
        )
    assert len(claims) == 2
    return study


@pytest.mark.timeout(60)
def test_expired_claims_of_a_coordinator_on_another_host_run_again(
    tmp_path: Path, db_url: str
) -> None:
    """Given two runs claimed by a coordinator on another host whose lease has expired,
    when `studyq run` runs the study,
    then it takes those runs back (as `studyq wait`'s reconcile would) and completes the
    sweep, instead of leaving them `running` forever."""
    study = _held_elsewhere(tmp_path, db_url, "expired-elsewhere", lease_s=0.2)
    time.sleep(0.5)

    done = run_cli(["run", str(study), "--db", db_url, "--jobs", "1"], tmp_path)

    assert store_counts(db_url, "expired-elsewhere") == {"success": 4}, explain(done)
    assert done.returncode == 0, explain(done)


@pytest.mark.timeout(60)
def test_runs_held_by_a_live_claim_elsewhere_are_not_reported_done(
    tmp_path: Path, db_url: str
) -> None:
    """Given two runs claimed, with a live lease, by a coordinator on another host,
    when `studyq run` runs the study and executes the other two,
    then it does not report the sweep as done: it exits non-zero and does not count the two
    held runs among those 'already done' (they have no result)."""
    study = _held_elsewhere(tmp_path, db_url, "held-elsewhere", lease_s=3600)

    done = run_cli(["run", str(study), "--db", db_url, "--jobs", "1"], tmp_path)

    assert store_counts(db_url, "held-elsewhere") == {"success": 2, "running": 2}
    assert "2 were already done" not in done.stdout, explain(done)
    assert done.returncode != 0, explain(done)


@pytest.mark.timeout(60)
def test_claims_left_under_this_process_name_by_a_dead_predecessor_run_again(
    tmp_path: Path, db_url: str
) -> None:
    """Given two runs left `running` under the owner name this very process has
    (`embedded:<host>:<pid>`), as after a container restart where the killed coordinator
    and the new one are both PID 1 on the same hostname,
    when run_study starts in this process,
    then it takes those runs back (a coordinator that has just started holds no claims yet)
    and completes the sweep."""
    study_id = "same-name"
    study = write_study(
        tmp_path / "study.yaml",
        {
            "study_id": study_id,
            "title": "Claims under my own name",
            "agent_specs": ["noop"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": 4},
        },
    )
    with ResultStore.open(db_url) as store:
        register(store, prepare(study))
        store.claim_runs(
            study_id,
            [0, 1],
            worker=f"embedded:{socket.gethostname()}:{os.getpid()}",
            lease_s=3600,
            allow_planned=True,
        )

    outcome = run_study(study, jobs=1, db=db_url, export=False, show_progress=False)

    assert store_counts(db_url, study_id) == {"success": 4}
    assert outcome.complete
