"""The trace store (``STUDYQ_TRACE_DIR``): a run's trace files are copied under
``<trace_dir>/<study_id>/<run_id>/`` and the run records the stored copies, so runs.csv's
``trace_path`` still opens after the worker's own disk is gone."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api import run_study
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import ResultStore
from workers.execution import agent_result
from workers.traces import store_traces

STUDY_ID = "trace-store"
SCRATCH_ENV = "STUDYQ_TEST_TRACE_SCRATCH"


def tracing_agent(run_spec: RunSpec) -> dict[str, Any]:
    """Writes a trace file and a trace folder on the worker's disk and returns both, plus a
    URL that is not a local path."""
    import os

    scratch = Path(os.environ[SCRATCH_ENV]) / run_spec.run_id
    (scratch / "steps").mkdir(parents=True, exist_ok=True)
    (scratch / "trace.jsonl").write_text(json.dumps({"run": run_spec.run_id}) + "\n")
    (scratch / "steps" / "1.json").write_text("{}")
    return agent_result(
        {"text": "done"},
        trace_refs=[str(scratch / "trace.jsonl"), str(scratch / "steps"), "s3://b/k.jsonl"],
    )


def _spec(run_id: str = "run-0123456789ab") -> RunSpec:
    return RunSpec(
        study_id="s",
        run_id=run_id,
        condition_id="cond-1",
        replicate=1,
        seed=1,
        agent_id="a",
        problem_id="p",
        factor_assignments={},
        block_assignments={},
        index=0,
    )


def test_local_traces_are_copied_and_other_refs_kept(tmp_path: Path) -> None:
    # Given a file, a folder, two files of the same name, a URL and a path that is gone
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "t.jsonl").write_text("a")
    (tmp_path / "b" / "t.jsonl").write_text("b")
    (tmp_path / "dir").mkdir()
    (tmp_path / "dir" / "x").write_text("x")
    refs = [
        str(tmp_path / "a" / "t.jsonl"),
        str(tmp_path / "b" / "t.jsonl"),
        str(tmp_path / "dir"),
        "https://traces.example/1",
        str(tmp_path / "gone.jsonl"),
    ]
    store = tmp_path / "store"
    # When they are stored
    stored = store_traces(refs, _spec(), store)
    # Then local ones are copies under <store>/<study>/<run>/, the rest as given
    run_dir = store / "s" / "run-0123456789ab"
    assert stored == [
        str(run_dir / "t.jsonl"),
        str(run_dir / "t-1.jsonl"),
        str(run_dir / "dir"),
        "https://traces.example/1",
        str(tmp_path / "gone.jsonl"),
    ]
    assert (run_dir / "t.jsonl").read_text() == "a" and (run_dir / "t-1.jsonl").read_text() == "b"
    assert (run_dir / "dir" / "x").read_text() == "x"


def test_a_sweep_records_the_stored_traces_and_they_outlive_the_worker_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a trace store and an agent that writes its traces to a scratch folder
    scratch, trace_dir = tmp_path / "scratch", tmp_path / "traces"
    monkeypatch.setenv(SCRATCH_ENV, str(scratch))
    monkeypatch.setenv("STUDYQ_TRACE_DIR", str(trace_dir))
    study = tmp_path / "study.json"
    study.write_text(
        json.dumps(
            {
                "study_id": STUDY_ID,
                "title": "Traces",
                "agent_specs": ["tracer"],
                "problem_ids": ["noop"],
                "run_budget": {"replicates": 3},
            }
        )
    )
    db = f"sqlite:///{tmp_path / 'store.db'}"
    # When the sweep runs and the scratch folder is wiped (threads: a process pool's
    # forkserver may predate this test's environment, as it is shared by the session)
    outcome = run_study(
        study, jobs=2, threads=True, db=db, output_dir=str(tmp_path / "out"),
        agent_bindings={"tracer": tracing_agent},
    )  # fmt: skip
    shutil.rmtree(scratch)
    # Then every run's trace_path in runs.csv names its stored copy, which still opens
    assert outcome.counts["success"] == 3, outcome
    with (tmp_path / "out" / "runs.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert len(rows) == 3
    for row in rows:
        stored = Path(row["trace_path"])
        assert stored == trace_dir / STUDY_ID / row["run_id"] / "trace.jsonl"
        assert json.loads(stored.read_text()) == {"run": row["run_id"]}
    with ResultStore.open(db) as store:
        refs = [run.trace_refs for run in store.iter_runs(STUDY_ID)]
    assert all(r[1].startswith(str(trace_dir)) and r[2] == "s3://b/k.jsonl" for r in refs), refs
