"""``studyq status``, ``studyq runs`` and ``studyq show`` on a small real study (issue 15).

Given a study of the demo agents ``flaky`` (fails on the level ``fail=True``) and ``sleep``
(sleeps ``sleep_s``), run embedded with ``studyq run`` (in this process, one job) into a
SQLite store under ``tmp_path``, with its last runs cancelled, when a researcher inspects
it, then ``status`` names conditions by their levels, counts cancelled runs, keeps a
finished study's rate and ends each error line in a fix; ``runs`` lists the failed, the
slowest and the best runs; ``show`` prints one run with its traceback; a metric no run has
and an unknown run id exit 2 with a fix. Nothing prints a repr. One case runs the same
commands against PostgreSQL.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from _services import ServiceSupplier
from cli_support import _no_studyq_environment, one_clear_line, run_main  # noqa: F401

from orchestrator.cli import EXIT_FAILED, EXIT_OK, EXIT_USAGE
from orchestrator.store import ResultStore, RunRecord

STUDY_ID = "inspect-study"
STUDY = {
    "study_id": STUDY_ID,
    "title": "Inspecting a study",
    "factors": [
        {
            "name": "fail",
            "levels": [{"name": "ok", "value": False}, {"name": "broken", "value": True}],
        },
        {
            "name": "sleep_s",
            "levels": [{"name": "short", "value": 0.01}, {"name": "long", "value": 0.06}],
        },
    ],
    "agent_specs": ["flaky", "sleep"],
    "problem_ids": ["noop"],
    "run_budget": {"replicates": 2},
    "outcomes": [
        {"name": "latency", "source_table": "runs", "column": "latency_s", "aggregation": "mean"}
    ],
    "hypotheses": [
        {
            "hypothesis_id": "h-fast",
            "label": "Short sleeps are faster",
            "statement": "Runs with a short sleep take less time.",
            "independent_vars": ["sleep_s"],
            "dependent_vars": ["latency"],
            "direction": "less",
        }
    ],
}
RUNS = 16  # 4 conditions x 2 agents x 2 replicates
EXECUTED = 14  # the last 2 are cancelled before they run
REPR = re.compile(r"\b[A-Z]\w+\((\w+=)|\{'\w+': ")
RUN_ID = re.compile(r"^(run-[0-9a-f]{12})\b", re.MULTILINE)


def _no_repr(*texts: str) -> None:
    for text in texts:
        match = REPR.search(text)
        assert match is None, f"a repr in the output: {match and match.group(0)!r}\n{text}"


def _ran(folder: Path, db: str, capsys: pytest.CaptureFixture[str]) -> None:
    """Run the study's first runs into ``db`` and cancel the rest."""
    study = folder / "study.yaml"
    study.write_text(yaml.safe_dump(STUDY, sort_keys=False), encoding="utf-8")
    argv = ["run", str(study), "--db", db, "--jobs", "1", "--limit", str(EXECUTED)]
    code, _, err = run_main([*argv, "--no-export", "--no-progress"], capsys)
    assert code == EXIT_FAILED, err  # the flaky agent's broken level failed
    code, _, err = run_main(["cancel", STUDY_ID, "--db", db], capsys)
    assert code == EXIT_OK, err


def _runs(db: str) -> list[RunRecord]:
    with ResultStore.open(db) as store:
        return list(store.iter_runs(STUDY_ID))


@pytest.fixture
def sqlite_db(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> str:
    db = f"sqlite:///{tmp_path / 'studyq.db'}"
    _ran(tmp_path, db, capsys)
    return db


# --- status -----------------------------------------------------------------------------------


def _study_row(out: str) -> list[str]:
    header, row = out.splitlines()[:2]
    assert header.split()[:10] == [
        "study", "submitted", "by", "runs", "success", "failed", "cancelled", "running",
        "queued", "rate",
    ]  # fmt: skip
    return row.split()


def test_status_names_conditions_counts_cancelled_and_fixes_errors(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the finished study with failed and cancelled runs
    runs = _runs(sqlite_db)
    counts = {status: sum(r.status == status for r in runs) for status in ("success", "failed")}
    assert sum(r.status == "cancelled" for r in runs) == RUNS - EXECUTED
    # When status shows it
    code, out, err = run_main(["status", STUDY_ID, "--db", sqlite_db], capsys)
    # Then the study's row counts every status, cancelled included, and has no ETA
    assert code == EXIT_OK, err
    row = _study_row(out)
    # study, date, time, by, runs, success, failed, cancelled, running, queued, rate, eta
    assert row[4:10] == [
        str(RUNS), str(counts["success"]), str(counts["failed"]), str(RUNS - EXECUTED), "0", "0"
    ]  # fmt: skip
    assert row[11] == "-"
    # And conditions are named by their levels, not by their ids
    section = out.split("by condition", 1)[1].split("by agent", 1)[0]
    assert "fail=True, sleep_s=0.06" in section and "fail=False, sleep_s=0.01" in section
    assert "cond-" not in section
    # And the error line is a sentence that ends in the fix and names a failed run to show
    failed = {r.run_id for r in runs if r.status == "failed"}
    errors = out.split("top errors", 1)[1].strip().splitlines()
    assert (
        errors[0]
        .strip()
        .startswith(
            f"{counts['failed']} runs failed with an error (FlakyAgentError), e.g.: flaky agent "
            "failed on purpose"
        )
    )
    shown = re.search(r"`studyq show (run-[0-9a-f]{12})` prints one of them", errors[0])
    assert shown is not None and shown.group(1) in failed, errors[0]
    assert "Fix:" in errors[0] and "`studyq run STUDY_FILE` re-runs the failed runs" in errors[0]
    _no_repr(out, err)


def test_a_finished_study_keeps_its_rate(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the finished study and its rate now
    _, first, _ = run_main(["status", "--db", sqlite_db], capsys)
    rate = _study_row(first)[10]
    assert rate.endswith("/s"), first
    # When more wall time passes
    time.sleep(1.2)
    _, later, _ = run_main(["status", "--db", sqlite_db], capsys)
    # Then the rate is still the study's own (runs over its span), not falling with the clock
    assert _study_row(later)[10] == rate
    assert _study_row(later)[11] == "-"


# --- runs -------------------------------------------------------------------------------------


def test_runs_lists_the_failed_ones_with_their_error(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the study's failed runs in the store
    failed = [r.run_id for r in _runs(sqlite_db) if r.status == "failed"]
    # When runs lists the failed ones
    code, out, err = run_main(["runs", STUDY_ID, "--status", "failed", "--db", sqlite_db], capsys)
    # Then exactly those are listed, in plan order, with their label and a one-line error
    assert code == EXIT_OK, err
    assert RUN_ID.findall(out) == failed
    lines = [line for line in out.splitlines() if line.startswith("run-")]
    assert all("fail=True" in line and " failed " in line for line in lines)
    assert all("FlakyAgentError: flaky agent failed on purpose" in line for line in lines)
    assert "`studyq show RUN_ID`" in out
    _no_repr(out, err)


def test_runs_limit_says_how_many_more(sqlite_db: str, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run_main(["runs", STUDY_ID, "--limit", "3", "--db", sqlite_db], capsys)
    assert code == EXIT_OK
    assert RUN_ID.findall(out) == [r.run_id for r in _runs(sqlite_db)][:3]
    assert f"3 of {RUNS} runs shown; --limit N shows more." in out


def test_runs_slowest_are_the_longest_sleeps(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the runs' recorded durations
    timed = [r for r in _runs(sqlite_db) if r.latency_s is not None]
    expected = [r.run_id for r in sorted(timed, key=lambda r: -float(r.latency_s or 0))][:3]
    # When runs lists the 3 slowest
    code, out, err = run_main(["runs", STUDY_ID, "--slowest", "3", "--db", sqlite_db], capsys)
    # Then they are the 3 longest, longest first: the sleep agent's long level
    assert code == EXIT_OK, err
    assert out.startswith("slowest 3 runs")
    assert RUN_ID.findall(out) == expected
    assert all("sleep_s=0.06" in line for line in out.splitlines() if line.startswith("run-"))


@pytest.mark.parametrize("metric", ["latency", "latency_s"])
def test_runs_best_follows_the_study_direction(
    metric: str, sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a study whose hypothesis says its latency outcome should be less
    timed = [r for r in _runs(sqlite_db) if r.latency_s is not None]
    expected = [r.run_id for r in sorted(timed, key=lambda r: float(r.latency_s or 0))][:4]
    # When runs lists the best 4 by that outcome (by name or by its column)
    argv = ["runs", STUDY_ID, "--best", "4", "--metric", metric, "--db", sqlite_db]
    code, out, err = run_main(argv, capsys)
    # Then the lowest come first, and the header says why
    assert code == EXIT_OK, err
    assert RUN_ID.findall(out) == expected
    assert "lowest first (hypothesis h-fast has direction: less)" in out.splitlines()[0]


def test_runs_best_without_a_direction_is_highest_first(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a metric the study declares no direction for (an agent metric key)
    argv = ["runs", STUDY_ID, "--best", "2", "--metric", "step_event_count", "--db", sqlite_db]
    # When runs ranks by it
    code, out, err = run_main(argv, capsys)
    # Then it says so, and ranks the highest first
    assert code == EXIT_OK, err
    assert "highest first (the study declares no direction for it)" in out
    assert len(RUN_ID.findall(out)) == 2


def test_runs_with_a_metric_no_run_has_exits_2_naming_the_metrics(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["runs", STUDY_ID, "--best", "3", "--metric", "latncy_s", "--db", sqlite_db]
    code, out, err = run_main(argv, capsys)
    assert code == EXIT_USAGE and out == ""
    line = one_clear_line(err, "--metric latncy_s", "did you mean latency_s?", "score")
    assert "latency_s" in line and "primary_outcome" in line


def test_runs_of_an_unknown_study_exits_2(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_main(["runs", "no-such-study", "--db", sqlite_db], capsys)
    assert code == EXIT_USAGE
    one_clear_line(err, "no study 'no-such-study'", "studies: inspect-study")


# --- show -------------------------------------------------------------------------------------


def test_show_prints_a_failed_run_with_its_traceback(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a failed run of the study
    run = next(r for r in _runs(sqlite_db) if r.status == "failed")
    # When show prints it
    code, out, err = run_main(["show", run.run_id, "--db", sqlite_db], capsys)
    # Then its spec, its attempt and its error with the full traceback are there
    assert code == EXIT_OK, err
    assert out.startswith(f"run {run.run_id}\n")
    assert f"  study:       {STUDY_ID}" in out
    assert f"  condition:   {run.condition_id} (fail=True, sleep_s=" in out
    assert f"  seed:        {run.seed}" in out
    assert f"  replicate:   {run.replicate}" in out
    assert "  agent:       flaky" in out and "  status:      failed" in out
    assert re.search(r"^attempts \(1\)\n  1\. failed on worker ", out, re.MULTILINE), out
    assert "Traceback (most recent call last):" in out
    assert 'workers/demo/agents.py", line' in out
    assert "FlakyAgentError: flaky agent failed on purpose (fail=True)" in out
    _no_repr(out, err)


def test_show_prints_a_successful_run_with_outputs_metrics_and_evaluations(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a run of the sleep agent
    run = next(r for r in _runs(sqlite_db) if r.agent_key == "sleep" and r.status == "success")
    # When show prints it
    code, out, err = run_main(["show", run.run_id, "--db", sqlite_db], capsys)
    # Then its outputs are JSON, its metrics key: value lines, and its evaluation is listed
    assert code == EXIT_OK, err
    assert '"text": "slept ' in out
    assert re.search(r"^metrics\n(  \w+: .+\n)*  latency_s: [0-9.e-]+\n", out, re.MULTILINE), out
    assert re.search(r"^evaluations \(1\)\n  score: 1\.0", out, re.MULTILINE), out
    assert "error\n" not in out
    _no_repr(out, err)


def test_show_of_an_unknown_run_exits_2_with_did_you_mean(
    sqlite_db: str, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given a run id with its last character missing, and one that is nothing like any
    run_id = _runs(sqlite_db)[0].run_id
    # When show is asked for them
    code, out, err = run_main(["show", run_id[:-1], "--db", sqlite_db], capsys)
    # Then exit 2, one line with a did-you-mean, or the hint to list the run ids
    assert code == EXIT_USAGE and out == ""
    one_clear_line(err, f"no run '{run_id[:-1]}'", f"did you mean {run_id}?")
    code, out, err = run_main(["show", "run-nothing-like-it", "--db", sqlite_db], capsys)
    assert code == EXIT_USAGE and out == ""
    one_clear_line(err, "`studyq runs STUDY` lists a study's run ids", STUDY_ID)


# --- PostgreSQL -------------------------------------------------------------------------------


@pytest.fixture
def pg_db(services: ServiceSupplier) -> Iterator[str]:
    with services.pg_database("inspect", migrate=True) as url:
        yield url


@pytest.mark.integration
def test_runs_and_show_on_postgresql(
    pg_db: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # Given the same study run into PostgreSQL (JSONB metrics and evaluations)
    _ran(tmp_path, pg_db, capsys)
    runs = _runs(pg_db)
    timed = [r for r in runs if r.latency_s is not None]
    # When runs ranks by the outcome, by an agent metric and by an evaluation
    code, out, err = run_main(
        ["runs", STUDY_ID, "--best", "3", "--metric", "latency", "--db", pg_db], capsys
    )
    # Then the order is the store's, on this backend too
    assert code == EXIT_OK, err
    expected = [r.run_id for r in sorted(timed, key=lambda r: float(r.latency_s or 0))][:3]
    assert RUN_ID.findall(out) == expected
    for metric in ("step_event_count", "score", "primary_outcome"):
        argv = ["runs", STUDY_ID, "--best", "2", "--metric", metric, "--db", pg_db]
        code, out, err = run_main(argv, capsys)
        assert code == EXIT_OK and len(RUN_ID.findall(out)) == 2, err + out
    code, _, err = run_main(
        ["runs", STUDY_ID, "--best", "2", "--metric", "nope", "--db", pg_db], capsys
    )
    assert code == EXIT_USAGE
    one_clear_line(err, "--metric nope", "score")
    # And show prints a failed run with its traceback, and status its labels
    failed = next(r for r in runs if r.status == "failed")
    code, out, err = run_main(["show", failed.run_id, "--db", pg_db], capsys)
    assert code == EXIT_OK and "Traceback (most recent call last):" in out, err
    code, status, err = run_main(["status", STUDY_ID, "--db", pg_db], capsys)
    assert code == EXIT_OK and "fail=True, sleep_s=0.06" in status, err
    assert "`studyq resubmit inspect-study` re-runs the failed runs" in status
    _no_repr(out, status, err)
