"""`kill -9` of `studyq run`: the next start takes the claims back at once and charges only
the runs that had started.

The sweep tests run real ``studyq run`` processes and SIGKILL their whole process group, as
the OOM killer or ``kill -9 -PGID`` would, and start the next one at once, while the killed
coordinator is still an unreaped zombie. The agent appends its run id to a counter file on
every call, so the tests know how many times each run really started.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections import Counter
from collections.abc import Iterator
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
    reap_group,
    run_cli,
    start_cli,
    store_counts,
    wait_until,
    write_study,
)

from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.store.models import AttemptOutcome
from orchestrator.study.plan import prepare

DEAD = "embedded:ghost-host:101:7"
ALSO_DEAD = "embedded:ghost-host:102:7"
LIVE = "embedded:ghost-host:202:7"


def _registered(tmp_path: Path, store: ResultStore, study_id: str, *, max_attempts: int) -> None:
    study = write_study(
        tmp_path / "study.yaml",
        {
            "study_id": study_id,
            "title": "Take back",
            "agent_specs": ["noop"],
            "problem_ids": ["noop"],
            "run_budget": {"replicates": 6},
            "execution": {"max_attempts": max_attempts},
        },
    )
    register(store, prepare(study))


def _history(store: ResultStore, study_id: str) -> dict[int, list[str]]:
    history: dict[int, list[str]] = {}
    for attempt in store.iter_attempts(study_id):
        history.setdefault(attempt.index, []).append(attempt.outcome)
    return history


def test_take_back_charges_the_started_claims_and_refunds_the_others(
    tmp_path: Path, store_url: str
) -> None:
    """Given runs 0-4 claimed by a dead coordinator whose journal says it started runs 0 and 1
    (and run 4 at an older attempt, which is not this claim), and run 5 held by a live one,
    when its claims are taken back, twice (a second claim of everything by another dead
    coordinator that started runs 0 and 2), with max_attempts 2,
    then started claims are charged as lost (requeued, or failed on their last attempt), the
    others go back to queued with the attempt refunded and their attempt `released`, and the
    live owner's run is untouched."""
    study_id = "take-back"
    with ResultStore.open(store_url) as store:
        _registered(tmp_path, store, study_id, max_attempts=2)
        first = store.claim_runs(study_id, range(5), worker=DEAD, lease_s=3600, allow_planned=True)
        [held] = store.claim_runs(study_id, [5], worker=LIVE, lease_s=3600, allow_planned=True)
        asked: list[str] = []

        def started_by(owner: str) -> set[tuple[int, int]]:
            asked.append(owner)
            return {(0, first[0].attempt), (1, first[1].attempt), (4, first[4].attempt - 1)}

        report = store.take_back_orphans(
            study_id, is_dead=lambda owner: owner != LIVE, started_by=started_by
        )

        assert asked == [DEAD]
        assert (report.owners, report.released, report.requeued, report.failed_lost) == (
            (DEAD,),
            3,
            2,
            0,
        )
        assert [spec.index for spec, _ in report.to_publish] == [0, 1, 2, 3, 4]
        runs = {run.index: run for run in store.iter_runs(study_id)}
        assert {index: runs[index].status for index in range(6)} == {
            **dict.fromkeys(range(5), "queued"),
            5: "running",
        }
        assert [runs[index].attempts_used for index in range(5)] == [1, 1, 0, 0, 0]
        assert runs[5].lease_owner == LIVE

        second = store.claim_runs(
            study_id, range(5), worker=ALSO_DEAD, lease_s=3600, allow_planned=True
        )
        assert [claim.index for claim in second] == [0, 1, 2, 3, 4]
        report = store.take_back_orphans(
            study_id,
            is_dead=lambda owner: owner != LIVE,
            started_by=lambda owner: {(0, second[0].attempt), (2, second[2].attempt)},
        )

        assert (report.released, report.requeued, report.failed_lost) == (3, 1, 1)
        runs = {run.index: run for run in store.iter_runs(study_id)}
        assert [runs[index].status for index in range(6)] == [
            "failed",
            *["queued"] * 4,
            "running",
        ]
        assert runs[0].error_kind == "lost"
        assert [runs[index].attempts_used for index in range(5)] == [2, 1, 1, 0, 0]
        lost, released = AttemptOutcome.LOST, AttemptOutcome.RELEASED
        assert _history(store, study_id) == {
            0: [lost, lost],
            1: [lost, released],
            2: [released, lost],
            3: [released, released],
            4: [released, released],
            5: [AttemptOutcome.RUNNING],
        }
        assert store.heartbeat(held, 3600) is True  # the live claim still holds


def test_take_back_without_a_journal_charges_every_claim(tmp_path: Path, store_url: str) -> None:
    """Given claims of a dead coordinator and no journal saying which started (None),
    when they are taken back,
    then every claim is charged as lost, as when nothing but the PID is known."""
    study_id = "take-back-blind"
    with ResultStore.open(store_url) as store:
        _registered(tmp_path, store, study_id, max_attempts=3)
        store.claim_runs(study_id, range(6), worker=DEAD, lease_s=3600, allow_planned=True)

        report = store.take_back_orphans(
            study_id, is_dead=lambda owner: True, started_by=lambda owner: None
        )

        assert (report.released, report.requeued, report.failed_lost) == (0, 6, 0)
        assert {run.attempts_used for run in store.iter_runs(study_id)} == {1}
        assert _history(store, study_id) == {index: [AttemptOutcome.LOST] for index in range(6)}


# -- real sweeps, real SIGKILL -----------------------------------------------------------------

RUNS = 120
SLEEP_S = 0.15
KILLS = 3
PROGRESS_PER_ROUND = 16
MAX_ATTEMPTS = 3


def _sweep_study(path: Path, study_id: str) -> Path:
    """``RUNS`` runs of the counting agent, ``SLEEP_S`` each, ``max_attempts`` 3."""
    return write_study(
        path,
        {
            "study_id": study_id,
            "title": "Killed sweep",
            "factors": [factor("arm", "a", "b"), factor("sleep_s", SLEEP_S)],
            "agent_specs": ["counted"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": RUNS // 2},
            "execution": {"max_attempts": MAX_ATTEMPTS},
            "bindings": {"agents": {"counted": "embedded_agents:counted"}},
        },
    )


def _proc_state(pid: int) -> str:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]


def _kill_9_once_it_recorded(
    victim: subprocess.Popen[str], db_url: str, study_id: str, target: int
) -> int:
    """SIGKILL ``victim``'s process group once ``target`` successes are recorded, leave it
    unreaped (a zombie), and return the successes recorded by then."""

    def ready() -> bool:
        return (
            victim.poll() is not None or store_counts(db_url, study_id).get("success", 0) >= target
        )

    reached = wait_until(ready, timeout=60)
    if victim.poll() is not None:
        pytest.fail(f"the sweep ended before it was killed: {explain(finish(victim, timeout=10))}")
    assert reached, f"the sweep never recorded {target} runs"
    os.killpg(victim.pid, signal.SIGKILL)
    assert wait_until(lambda: _proc_state(victim.pid) == "Z", timeout=10), (
        "the killed coordinator should be a zombie: nobody has reaped it"
    )
    counts = store_counts(db_url, study_id)
    assert counts.get("running", 0) > 0, f"nothing was held at the kill: {counts}"
    return counts.get("success", 0)


@pytest.fixture
def victims() -> Iterator[list[subprocess.Popen[str]]]:
    """Started sweeps; every one is reaped at the end (only then: until then the killed ones
    stay zombies, the state the next start must see through)."""
    started: list[subprocess.Popen[str]] = []
    yield started
    for child in started:
        reap_group(child, grace_s=5.0)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc (Linux)")
@pytest.mark.timeout(180)
@pytest.mark.parametrize("jobs", ["2", "1"], ids=["process-pool", "in-process"])
def test_three_kill_9s_then_an_immediate_rerun_completes_charging_only_started_runs(
    tmp_path: Path, db_url: str, victims: list[subprocess.Popen[str]], jobs: str
) -> None:
    """Given `studyq run --jobs 2` (process pool; also `--jobs 1`, in process) of a 120-run
    sweep (max_attempts 3), SIGKILLed with its whole process group three times mid-sweep,
    each next `studyq run` started at once while the killed one is still an unreaped zombie,
    when a fourth `studyq run` starts right after the third kill,
    then it takes the dead coordinator's claims back without waiting for their leases and
    completes the sweep (exit 0); every run's charged attempts (all but `released`) equal the
    times its agent really started, so no run was charged for a claim it never began; the
    claimed-but-unstarted runs were handed back as `released`; no run used more than
    max_attempts; and the artifacts equal those of an uninterrupted sweep.

    The one inexactness by design: a kill landing in the ~25 us between a run's journal line
    and its agent's first statement charges a run whose agent did not begin (about 1 in 1,000
    runs of this test at 150 ms per run)."""
    study_id = "kill-9-thrice"
    study = _sweep_study(tmp_path / "study.yaml", study_id)
    reference_dir = tmp_path / "reference"
    reference_dir.mkdir()
    reference = start_cli(
        ["run", str(study), "--db", f"sqlite:///{reference_dir / 's.db'}", "--jobs", jobs],
        reference_dir,
        env=cli_env(reference_dir / "calls.txt"),
    )
    victims.append(reference)
    calls_file = tmp_path / "calls.txt"
    command = ["run", str(study), "--db", db_url, "--jobs", jobs]

    recorded = 0
    for _ in range(KILLS):
        victim = start_cli(command, tmp_path, env=cli_env(calls_file))
        victims.append(victim)
        recorded = _kill_9_once_it_recorded(victim, db_url, study_id, recorded + PROGRESS_PER_ROUND)

    done = run_cli(command, tmp_path, env=cli_env(calls_file), timeout=90)

    assert done.returncode == 0, explain(done)
    assert "held by another" not in done.stdout + done.stderr, explain(done)
    assert "took back the claims of a killed run of this study" in done.stderr, explain(done)
    assert "had not started (not charged)" in done.stderr, explain(done)
    assert store_counts(db_url, study_id) == {"success": RUNS}
    calls = count_calls(calls_file)
    charged: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    with ResultStore.open(db_url) as store:
        runs = list(store.iter_runs(study_id))
        for attempt in store.iter_attempts(study_id):
            outcomes[attempt.outcome] += 1
            if attempt.outcome != AttemptOutcome.RELEASED:
                charged[attempt.run_id] += 1
    assert len(runs) == RUNS
    overcharged = {
        run.run_id: (charged[run.run_id], calls[run.run_id])
        for run in runs
        if charged[run.run_id] != calls[run.run_id]
    }
    assert not overcharged, f"run id: (charged attempts, agent starts) {overcharged}"
    assert all(run.attempts_used <= MAX_ATTEMPTS for run in runs)
    assert max(charged.values()) <= MAX_ATTEMPTS
    assert outcomes[AttemptOutcome.SUCCESS] == RUNS
    # Each kill left claims never started (refunded) and runs in flight (charged as lost).
    assert outcomes[AttemptOutcome.RELEASED] >= KILLS * PROGRESS_PER_ROUND, outcomes
    assert outcomes[AttemptOutcome.LOST] >= 1, outcomes
    assert set(outcomes) == {AttemptOutcome.SUCCESS, AttemptOutcome.RELEASED, AttemptOutcome.LOST}

    finished = finish(reference, timeout=90)
    assert finished.returncode == 0, explain(finished)
    resumed_out = tmp_path / "artifacts" / study_id
    reference_out = reference_dir / "artifacts" / study_id
    for name in CSV_FILES:
        assert comparable_csv(resumed_out / name) == comparable_csv(reference_out / name), name
    assert comparable_manifest(resumed_out / "manifest.json") == comparable_manifest(
        reference_out / "manifest.json"
    )
