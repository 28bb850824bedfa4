"""runs.csv carries the factor levels and the agent's metrics; each run gets upstream's files.

A real embedded sweep (in this process, SQLite) of an agent with its own metrics, then
``export_artifacts``; the CSVs are read back as text, as an analysis script would.
"""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api import run_study
from orchestrator.cli import main
from orchestrator.export import (
    RUN_CSV_COLUMNS,
    _ExtraColumns,
    _metric_cells,
    _MetricCells,
    export_artifacts,
)
from orchestrator.store import ResultStore
from workers.execution import agent_result

STUDY_ID = "export-columns"
RUNS = 2 * 2 * 2 * 2  # seed factor x temperature x site block x replicates


def metrics_agent(factors: dict[str, Any], seed: int) -> dict[str, Any]:
    """An agent with flat, nested and list metrics, a key that is already a column, and
    credentials in its output (which evidence records redact)."""
    return agent_result(
        {"text": f"t={factors['temperature']} Bearer tok3n", "api_key": "sk-0123456789abcdef"},
        metrics={
            "quality": seed % 7,
            "tokens": {"prompt": 3, "completion": {"text": 4}},
            "tags": ["a", "b"],
            "cost_usd": 0.5,
        },
    )


def _study(path: Path) -> Path:
    study = {
        "study_id": STUDY_ID,
        "title": "Export columns",
        "description": "A factor named like a runs.csv column, a block, agent metrics.",
        "factors": [
            {"name": "seed", "levels": [{"name": "one", "value": 1}, {"name": "two", "value": 2}]},
            {
                "name": "temperature",
                "levels": [{"name": "lo", "value": 0.1}, {"name": "hi", "value": 0.9}],
            },
        ],
        "blocks": [{"name": "site", "levels": ["north", "south"]}],
        "agent_specs": ["metrics-agent"],
        "problem_ids": ["noop"],
        "design_spec": {"kind": "full_factorial"},
        "run_budget": {"replicates": 2},
    }
    path.write_text(json.dumps(study), encoding="utf-8")
    return path


def _read(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        return list(reader.fieldnames or []), list(reader)


@pytest.fixture
def swept(tmp_path: Path) -> tuple[str, Path]:
    """The finished sweep: its store URL and its working folder."""
    db = f"sqlite:///{tmp_path / 'store.db'}"
    outcome = run_study(
        _study(tmp_path / "study.json"),
        jobs=1,
        db=db,
        export=False,
        agent_bindings={"metrics-agent": metrics_agent},
    )
    assert outcome.counts.get("success") == RUNS, outcome
    return db, tmp_path


@pytest.mark.timeout(120)
def test_runs_csv_has_factor_block_and_metric_columns(swept: tuple[str, Path]) -> None:
    """Given a finished sweep of 16 runs whose factor 'seed' shares a runs.csv column's name,
    when it is exported,
    then runs.csv keeps the upstream columns first and in order, then the factors (the
    clashing one as factor_seed), block_site and metric_* (nested keys joined by '.', lists
    as JSON, cost_usd not repeated), one row per run, each cell the run's own value."""
    db, folder = swept
    with ResultStore.open(db) as store:
        report = export_artifacts(store, STUDY_ID, folder / "out")
        planned = {run.run_id: run for run in store.iter_runs(STUDY_ID)}

    header, rows = _read(folder / "out" / "runs.csv")

    assert header[: len(RUN_CSV_COLUMNS)] == list(RUN_CSV_COLUMNS)
    extras = header[len(RUN_CSV_COLUMNS) :]
    assert extras[:3] == ["factor_seed", "temperature", "block_site"]
    metric_columns = [name for name in extras if name.startswith("metric_")]
    assert {"metric_quality", "metric_tokens.prompt", "metric_tokens.completion.text",
            "metric_tags"} <= set(metric_columns)  # fmt: skip
    assert "metric_cost_usd" not in extras and "metric_latency_s" not in extras
    assert len(rows) == report.runs == RUNS == report.run_files
    assert {row["run_id"] for row in rows} == set(planned)
    for row in rows:
        run = planned[row["run_id"]]
        assert row["factor_seed"] == str(run.factor_assignments["seed"])
        assert row["seed"] == str(run.seed)  # the run seed stays in its column
        assert row["temperature"] == str(run.factor_assignments["temperature"])
        assert row["block_site"] == run.block_assignments["site"]
        assert row["metric_quality"] == str(run.seed % 7)
        assert (row["metric_tokens.prompt"], row["metric_tokens.completion.text"]) == ("3", "4")
        assert row["metric_tags"] == '["a","b"]'
        assert row["cost_usd"] == "0.5"


@pytest.mark.timeout(120)
def test_each_run_gets_a_checkpoint_and_an_evidence_record(swept: tuple[str, Path]) -> None:
    """Given the finished sweep exported twice into one folder, with a stale checkpoint and
    evidence record of a run that is no longer terminal planted in between,
    then there is one upstream checkpoint and one run-evidence record per exported run (the
    stale ones gone), their cells are runs.csv's, and run_files=False writes the same
    runs.csv without them."""
    db, folder = swept
    out = folder / "out"
    with ResultStore.open(db) as store:
        export_artifacts(store, STUDY_ID, out)
        (out / "artifacts" / "checkpoints" / "run-stale.json").write_text("{}", encoding="utf-8")
        stale = out / "artifacts" / "runs" / "run-stale"
        (stale / "attachments").mkdir(parents=True)
        (stale / "run.json").write_text("{}", encoding="utf-8")
        export_artifacts(store, STUDY_ID, out)
        lean = export_artifacts(store, STUDY_ID, folder / "lean", run_files=False)

    _, rows = _read(out / "runs.csv")
    checkpoints = sorted((out / "artifacts" / "checkpoints").glob("*.json"))
    evidence = sorted((out / "artifacts" / "runs").iterdir())
    ledger = (out / "artifacts" / "checkpoints" / "runs.jsonl").read_text(encoding="utf-8")

    run_ids = sorted(row["run_id"] for row in rows)
    assert [path.stem for path in checkpoints] == run_ids
    assert [path.name for path in evidence] == run_ids
    assert len(ledger.splitlines()) == RUNS
    by_id = {row["run_id"]: row for row in rows}
    for path in checkpoints:
        payload = json.loads(path.read_text(encoding="utf-8"))
        row = by_id[payload["run_id"]]
        spec = payload["run_spec"]
        assert (spec["condition_id"], str(spec["seed"]), str(spec["replicate"])) == (
            row["condition_id"], row["seed"], row["replicate"],
        )  # fmt: skip
        assert payload["status"] == row["status"] == "success"
        assert payload["metrics"]["quality"] == int(row["metric_quality"])
        assert len(payload["evaluator_outputs"]) == 1  # noop's score row
        record = json.loads((out / "artifacts" / "runs" / path.stem / "run.json").read_text())
        assert (record["record_type"], record["status"], record["terminal"]) == (
            "run-evidence", "success", True,
        )  # fmt: skip
        assert (out / "artifacts" / "runs" / path.stem / "attachments").is_dir()
        # evidence is redacted as upstream redacts it; the checkpoint, like upstream's, is not
        assert record["observed"]["outputs"]["api_key"] == "[REDACTED]"
        assert payload["outputs"]["api_key"] == "sk-0123456789abcdef"
        observations = (out / "artifacts" / "runs" / path.stem / "observations.jsonl").read_text()
        assert "tok3n" not in observations and ' [REDACTED]"' in observations
    assert lean.run_files == 0
    assert not list((folder / "lean" / "artifacts" / "checkpoints").iterdir())
    assert not (folder / "lean" / "artifacts" / "runs").exists()
    lean_header, lean_rows = _read(folder / "lean" / "runs.csv")
    assert lean_header == _read(out / "runs.csv")[0]
    assert [{**row, "manifest_path": ""} for row in lean_rows] == [
        {**row, "manifest_path": ""} for row in rows
    ]


@pytest.mark.timeout(120)
def test_a_partial_export_keeps_an_evidence_record_for_every_planned_run(tmp_path: Path) -> None:
    """Given a sweep stopped after 5 of its 16 runs,
    when it is exported,
    then runs.csv and the checkpoints hold the 5 finished runs, and every planned run has an
    evidence record: the 11 others as 'pending', not attempted, not terminal (what
    draft-paper counts as incomplete)."""
    db = f"sqlite:///{tmp_path / 'store.db'}"
    outcome = run_study(
        _study(tmp_path / "study.json"),
        jobs=1,
        db=db,
        limit=5,
        export=False,
        agent_bindings={"metrics-agent": metrics_agent},
    )
    assert outcome.counts.get("success") == 5, outcome

    with ResultStore.open(db) as store:
        report = export_artifacts(store, STUDY_ID, tmp_path / "out")

    out = tmp_path / "out"
    _, rows = _read(out / "runs.csv")
    checkpoints = sorted(path.stem for path in (out / "artifacts" / "checkpoints").glob("*.json"))
    records = [
        json.loads(path.read_text(encoding="utf-8"))
        for path in sorted((out / "artifacts" / "runs").glob("*/run.json"))
    ]
    assert (report.runs, report.runs_planned, report.run_files) == (5, RUNS, 5)
    assert checkpoints == sorted(row["run_id"] for row in rows)
    assert len(records) == RUNS
    states = Counter((r["status"], r["attempted"], r["terminal"]) for r in records)
    assert states == {("success", True, True): 5, ("pending", False, False): RUNS - 5}


def test_export_no_run_files_writes_the_tables_only(
    swept: tuple[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """Given the finished sweep, when `studyq export --no-run-files` writes it, then runs.csv
    has every run and no per-run checkpoint or evidence file is written."""
    db, folder = swept

    code = main(["export", STUDY_ID, "--db", db, "--out", str(folder / "csv"), "--no-run-files"])

    assert code == 0, capsys.readouterr().err
    _, rows = _read(folder / "csv" / "runs.csv")
    assert len(rows) == RUNS
    assert not list((folder / "csv" / "artifacts" / "checkpoints").glob("*.json"))
    assert not (folder / "csv" / "artifacts" / "runs").exists()


METRIC_SETS: list[dict[str, Any] | None] = [
    {"quality": 1, "latency_s": 0.2, "steps": 3},
    {"quality": 2, "latency_s": 0.1, "steps": 4},  # the same names: the cached positions
    {"steps": 5, "quality": 3},  # the same names in another order
    {"quality": 4, "extra": True, "latency_s": 0.3},  # a new name, after a fixed one
    {"tokens": {"prompt": 3}, "quality": 5},  # nested: flattened as before
    None,
    {},
    {"extra": False, "steps": None, "quality": "high"},
    {"quality": 6, "latency_s": 0.4, "steps": 7},
]


def test_metric_cells_are_those_of_flattening_each_run() -> None:
    """Runs whose metrics change names, order and shape from run to run get the cells, and
    runs.csv the columns in the order, that flattening each run's metrics name by name
    gives (``_MetricCells`` looks positions up once per tuple of names)."""

    class Run:
        def __init__(self, metrics: dict[str, Any] | None) -> None:
            self.metrics = metrics

    expected_columns, got_columns = _ExtraColumns(RUN_CSV_COLUMNS), _ExtraColumns(RUN_CSV_COLUMNS)
    cells = _MetricCells(got_columns)
    for metrics in METRIC_SETS:
        run: Any = Run(metrics)
        assert cells(run) == list(_metric_cells(run, expected_columns)), metrics
    assert got_columns.order == expected_columns.order
    assert got_columns.order == ["metric_quality", "metric_steps", "metric_extra",
                                 "metric_tokens.prompt"]  # fmt: skip
