"""Round trip: design-research-experiments 0.4.0's own commands work on studyq's export.

A real ``studyq run`` (embedded, demo agents, some runs failing) exports its artifacts; then
upstream's CLI (``drexp``, Python 3.12, in the venv that ``tests/test_compat_upstream.py``
builds and reuses) runs on that folder:

* ``drexp export-analysis`` rebuilds runs.csv, events.csv and evaluations.csv from the
  checkpoints studyq wrote: every row is still there, with studyq's cells;
* ``drexp bundle-results`` packs the folder, runs.csv and all;
* ``drexp draft-paper`` finds one evidence record per run and reports their outcomes.

Skipped where Python 3.12 or the venv is unavailable, unless ``STUDYQ_REQUIRE_COMPAT=1``
(CI), as the other compat tests.
"""

from __future__ import annotations

import csv
import io
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import test_compat_upstream as compat_upstream
import yaml

pytestmark = pytest.mark.compat

upstream_python = compat_upstream.upstream_python
"""The shared fixture: the Python 3.12 venv with design-research-experiments 0.4.0 that
tests/test_compat_upstream.py builds once and reuses (it skips or, required, fails)."""
_clean_env = compat_upstream._clean_env

STUDY_ID = "drexp-roundtrip"
RUNS = 2 * 2 * 2 * 2  # agent x site block x problems x replicates
OUT = Path("artifacts") / STUDY_ID
UPSTREAM_RUN_COLUMNS = [
    "study_id", "condition_id", "run_id", "problem_id", "problem_family", "agent_id",
    "agent_kind", "pattern_name", "model_name", "seed", "replicate", "status", "start_time",
    "end_time", "latency_s", "input_tokens", "output_tokens", "cost_usd", "primary_outcome",
    "trace_path", "manifest_path", "error_info",
]  # fmt: skip


def _study(path: Path) -> Path:
    study = {
        "study_id": STUDY_ID,
        "title": "Round trip through drexp",
        "description": "Two demo agents, one of them flaky, on two design problems.",
        "factors": [
            {"name": "agent", "levels": [{"name": "hc", "value": "hill-climb"},
                                         {"name": "flaky", "value": "flaky"}]},
            {"name": "budget", "levels": [{"name": "small", "value": 20}]},
            {"name": "fail_rate", "levels": [{"name": "half", "value": 0.5}]},
        ],
        "blocks": [{"name": "site", "levels": ["north", "south"]}],
        "problem_ids": ["beam-design", "spring-design"],
        "design_spec": {"kind": "full_factorial"},
        "run_budget": {"replicates": 2},
        "seed_policy": {"base_seed": 11},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(study, sort_keys=False), encoding="utf-8")
    return path


def _studyq(args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = Path(sys.executable).parent / "studyq"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDYQ_")}
    return subprocess.run(
        [*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


def _drexp(python: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    script = python.parent / ("drexp.exe" if sys.platform == "win32" else "drexp")
    command = (
        [str(script)] if script.exists() else [str(python), "-m", "design_research_experiments.cli"]
    )
    return subprocess.run(
        [*command, *args],
        cwd=cwd,
        env=_clean_env(),
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
    )


def _explain(done: subprocess.CompletedProcess[str]) -> str:
    return f"exit {done.returncode}\nstdout:\n{done.stdout[-3000:]}\nstderr:\n{done.stderr[-3000:]}"


def _rows(text: str) -> list[dict[str, str]]:
    return list(csv.DictReader(io.StringIO(text, newline="")))


def _table(path: Path) -> list[dict[str, str]]:
    return _rows(path.read_text(encoding="utf-8"))


def _multiset(rows: list[dict[str, str]], columns: list[str]) -> Counter[tuple[str, ...]]:
    return Counter(tuple(row.get(column, "") for column in columns) for row in rows)


@pytest.mark.timeout(900)
def test_drexp_export_analysis_bundle_and_draft_keep_every_run(
    upstream_python: Path, tmp_path: Path
) -> None:
    """Given a finished studyq sweep of 16 runs (some failed) and its export,
    when drexp export-analysis rewrites the tables from studyq's checkpoints, then
    bundle-results packs the folder and draft-paper drafts from it,
    then all three exit 0, the rebuilt runs.csv has one row per run with studyq's cells in
    every upstream column, events.csv, evaluations.csv and conditions.csv keep every row,
    the bundle's runs.csv has every run, and the draft accounts for each run's outcome."""
    ran = _studyq(["run", str(_study(tmp_path / "study.yaml")), "--db",
                   f"sqlite:///{tmp_path / 'store.db'}", "--jobs", "1"], tmp_path)  # fmt: skip
    assert ran.returncode in (0, 1), _explain(ran)  # 1: some flaky runs failed, as intended
    out = tmp_path / OUT
    studyq_tables = {
        name: _table(out / name)
        for name in ("runs.csv", "events.csv", "evaluations.csv", "conditions.csv")
    }
    statuses = Counter(row["status"] for row in studyq_tables["runs.csv"])
    assert len(studyq_tables["runs.csv"]) == RUNS
    assert statuses["success"] and statuses["failed"], statuses  # both kinds go round

    exported = _drexp(
        upstream_python,
        ["export-analysis", str(tmp_path / "study.yaml"), "--output-dir", str(OUT)],
        tmp_path,
    )
    assert exported.returncode == 0, _explain(exported)
    upstream_runs = _table(out / "runs.csv")
    assert len(upstream_runs) == RUNS
    assert list(upstream_runs[0])[: len(UPSTREAM_RUN_COLUMNS)] == UPSTREAM_RUN_COLUMNS
    assert _multiset(upstream_runs, UPSTREAM_RUN_COLUMNS) == _multiset(
        studyq_tables["runs.csv"], UPSTREAM_RUN_COLUMNS
    )
    for name in ("events.csv", "evaluations.csv", "conditions.csv"):
        rebuilt = _table(out / name)
        columns = list(rebuilt[0]) if rebuilt else []
        assert len(rebuilt) == len(studyq_tables[name]) > 0, name
        assert _multiset(rebuilt, columns) == _multiset(studyq_tables[name], columns), name

    bundled = _drexp(upstream_python, ["bundle-results", str(OUT)], tmp_path)
    assert bundled.returncode == 0, _explain(bundled)
    bundle = out.with_suffix(".tar.gz")
    with tarfile.open(bundle) as archive:
        member = archive.extractfile(f"{STUDY_ID}/runs.csv")
        assert member is not None
        assert len(_rows(member.read().decode("utf-8"))) == RUNS
        names = archive.getnames()
    assert sum(name.startswith(f"{STUDY_ID}/artifacts/checkpoints/run-") for name in names) == RUNS

    drafted = _drexp(upstream_python, ["draft-paper", str(OUT)], tmp_path)
    assert drafted.returncode == 0, _explain(drafted)
    draft = (out / "paper-draft" / "paper_draft.md").read_text(encoding="utf-8")
    assert (
        f"The exported evidence accounts for {RUNS} planned runs: {statuses['success']} "
        f"successful, {statuses['failed']} failed, 0 skipped, and 0 incomplete."
    ) in draft
    assert "No durable run evidence was found" not in draft
