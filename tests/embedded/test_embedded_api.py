"""The Python API: ``run_study`` / ``resume_study`` with in-process agents, as upstream users
call it (``agent_bindings`` maps agent ids to callables)."""

from __future__ import annotations

import inspect
import signal
from dataclasses import fields
from pathlib import Path
from types import FrameType

import pytest
from embedded_agents import doubling
from embedded_support import factor, write_study

from orchestrator.api import export_study, resume_study, run_study
from orchestrator.contracts.errors import StudyError
from orchestrator.embedded import SweepOptions

RUNS = 2 * 4


def _study(path: Path, study_id: str) -> Path:
    """The agent id `doubler` is bound only in process (no bindings section, no entry point)."""
    return write_study(
        path,
        {
            "study_id": study_id,
            "title": "In-process agent",
            "factors": [factor("arm", "a", "b")],
            "agent_specs": ["doubler"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 4},
        },
    )


@pytest.mark.timeout(60)
@pytest.mark.parametrize("jobs", [1, 2], ids=["in-process", "process-pool"])
def test_run_study_with_agent_bindings_returns_every_run(
    tmp_path: Path, db_url: str, jobs: int
) -> None:
    """Given a study whose agent is a module-level function passed as agent_bindings,
    when run_study runs it (in process, or on the process pool, which pickles the function
    by reference),
    then the StudyRun is complete and results() yields every run with the agent's output;
    resume_study afterwards executes nothing and export_study writes the artifacts."""
    study = _study(tmp_path / "study.yaml", f"api-{jobs}")

    outcome = run_study(
        study,
        jobs=jobs,
        db=db_url,
        agent_bindings={"doubler": doubling},
        output_dir=tmp_path / "out",
        show_progress=False,
    )

    assert outcome.complete
    assert (outcome.planned, outcome.executed, outcome.succeeded, outcome.failed) == (
        RUNS,
        RUNS,
        RUNS,
        0,
    )
    assert outcome.export is not None
    assert (outcome.export.runs, outcome.export.partial) == (RUNS, False)
    results = list(outcome.results())
    assert len(results) == RUNS
    assert len({run.run_id for run in results}) == RUNS
    for run in results:
        assert run.status == "success"
        assert run.outputs == {"doubled": run.seed * 2, "arm": run.factor_assignments["arm"]}

    again = resume_study(
        study, jobs=jobs, db=db_url, agent_bindings={"doubler": doubling}, export=False
    )
    assert (again.executed, again.skipped_done, again.complete) == (0, RUNS, True)
    report = export_study(f"api-{jobs}", db=db_url, output_dir=tmp_path / "again")
    assert (report.runs, report.partial) == (RUNS, False)


@pytest.mark.timeout(60)
def test_resume_false_refuses_a_study_that_has_results(tmp_path: Path, db_url: str) -> None:
    """Given a study with recorded successes,
    when run_study is called with resume=False,
    then it raises StudyError naming the fix, and executes nothing."""
    study = _study(tmp_path / "study.yaml", "api-no-resume")
    first = run_study(study, jobs=1, db=db_url, agent_bindings={"doubler": doubling}, export=False)
    assert first.complete

    with pytest.raises(StudyError, match="already has 8 successful runs") as raised:
        run_study(
            study,
            jobs=1,
            db=db_url,
            resume=False,
            agent_bindings={"doubler": doubling},
            export=False,
        )

    assert "resume" in str(raised.value)
    results = list(first.results())
    assert len(results) == RUNS
    assert all(run.attempts_used == 1 for run in results)


def test_run_study_keywords_are_the_sweep_options() -> None:
    """Given run_study's documented keywords (README.md, docs/embedded.md),
    then each is a SweepOptions field of the same name, except the ancestor's aliases
    (``parallelism`` for ``jobs``, ``threads`` for ``pool``): one declaration, no renames."""
    keywords = set(inspect.signature(run_study).parameters) - {"study"}
    options = {field.name for field in fields(SweepOptions)}
    assert keywords - options == {"parallelism", "threads"}
    assert options - keywords == {"pool"}


@pytest.mark.timeout(60, method="thread")
def test_an_in_process_sweep_puts_back_the_callers_alarm_handler(
    tmp_path: Path, db_url: str
) -> None:
    """Given a program with its own SIGALRM handler,
    when it runs a study in its own process with a time limit (the runs are timed by SIGALRM),
    then its handler is installed again when run_study returns."""

    def mine(signum: int, frame: FrameType | None) -> None:
        raise AssertionError("the program's own alarm fired")

    previous = signal.signal(signal.SIGALRM, mine)
    try:
        outcome = run_study(
            _study(tmp_path / "study.yaml", "api-alarm"),
            jobs=1,
            db=db_url,
            timeout_s=30,
            agent_bindings={"doubler": doubling},
            export=False,
            show_progress=False,
        )
        assert outcome.complete
        assert signal.getsignal(signal.SIGALRM) is mine
    finally:
        signal.signal(signal.SIGALRM, previous)
