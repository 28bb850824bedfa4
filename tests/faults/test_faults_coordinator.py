"""The coordinator as a user runs it, ``studyq submit`` / ``studyq wait`` subprocesses: killed
mid-sweep and restarted, and two of them started on one study at once."""

from __future__ import annotations

import re
import signal
import subprocess
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
from fault_bed import Bed
from fault_services import reaped, studyq
from fault_study import LONG_SWEEP

pytestmark = [pytest.mark.integration]

_ENQUEUED = re.compile(r"(\d+) enqueued now")


def cli(bed: Bed, name: str, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    """``studyq ARGS`` against the bed's services, its output in ``<tmp>/<name>.log``."""
    log = bed.tmp / f"{name}.log"
    process = studyq(args, database_url=bed.database_url, broker_url=bed.broker_url, log=log)
    return process, log


def finished(process: subprocess.Popen[bytes], log: Path, timeout: float) -> str:
    """Wait for ``process``; its output, which must report exit code 0."""
    try:
        process.wait(timeout)
    except subprocess.TimeoutExpired:
        output = log.read_text()
        raise AssertionError(f"{log.name} still running after {timeout} s:\n{output}") from None
    output = log.read_text()
    assert process.returncode == 0, f"{log.name} exited {process.returncode}:\n{output}"
    return output


@pytest.mark.timeout(150)
def test_the_coordinator_killed_twice_then_waited_for_again_completes_the_sweep(
    make_bed: Callable[..., Bed],
):
    # Given a study submitted with `studyq submit` and two workers
    bed = make_bed(shape=LONG_SWEEP)
    workers = bed.workers.start(2)
    submit, submit_log = cli(bed, "submit", "submit", str(bed.study_file()), "--no-progress")
    assert f"{bed.shape.runs} enqueued now" in finished(submit, submit_log, 60)
    processes: list[subprocess.Popen[bytes]] = []
    with reaped(processes):
        # When `studyq wait` is killed (SIGKILL) twice mid-sweep, and while no coordinator
        # runs a pool child is killed mid-run (its lease expires with nobody watching)
        lost: list[int] = []
        for round_ in range(2):
            wait, _ = cli(bed, f"wait-{round_}", "wait", bed.study_id, "--no-progress")
            processes.append(wait)
            bed.wait_for_successes(bed.shape.runs * (round_ + 1) // 4)
            wait.send_signal(signal.SIGKILL)
            assert wait.wait(10) == -signal.SIGKILL
            lost.append(bed.kill_pool_child_mid_run(workers[round_]))
        # and `studyq wait` is started once more
        wait, wait_log = cli(bed, "wait-final", "wait", bed.study_id, "--no-progress")
        processes.append(wait)
        output = finished(wait, wait_log, 100)
    # Then the last wait recovers the runs lost while no coordinator ran, reports every run
    # succeeded, and the audit passes
    assert f"{bed.shape.runs} succeeded, 0 failed" in output, output
    for index in lost:
        history = bed.attempts_of(index)
        assert history[0][2] == "lost" and history[-1][2] == "success", history
    bed.audit()


@pytest.mark.timeout(120)
def test_two_coordinators_on_one_study_enqueue_each_run_once(bed: Bed):
    # Given two workers
    bed.workers.start(2)
    study_file = str(bed.study_file())
    processes: list[subprocess.Popen[bytes]] = []
    with reaped(processes):
        # When two `studyq submit` of the same study start at once, then two `studyq wait`
        submits = [cli(bed, f"submit-{i}", "submit", study_file, "--no-progress") for i in (1, 2)]
        processes.extend(process for process, _ in submits)
        outputs = [finished(process, log, 60) for process, log in submits]
        waits = [cli(bed, f"wait-{i}", "wait", bed.study_id, "--no-progress") for i in (1, 2)]
        processes.extend(process for process, _ in waits)
        results = [finished(process, log, 90) for process, log in waits]
    # Then between them they enqueued every run exactly once, both waits saw the sweep
    # complete, each run was claimed and executed once, and the audit passes
    enqueued = [int(match.group(1)) for out in outputs for match in _ENQUEUED.finditer(out)]
    assert len(enqueued) == 2 and sum(enqueued) == bed.shape.runs, outputs
    for result in results:
        assert f"{bed.shape.runs} succeeded, 0 failed" in result, result
    audit = bed.audit()
    assert set(audit.attempts_per_run.values()) == {1}
    seeds = [run.seed for run in bed.store.iter_runs(bed.study_id)]
    assert Counter(bed.calls()) == Counter(seeds)
