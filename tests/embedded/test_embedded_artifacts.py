"""The exported artifacts keep the design-research-experiments 0.4.0 contract (UPSTREAM.md 7).

The column lists below are written out from the contract, not imported from studyq, so a
change to the exporter's constants cannot silently change what is checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
import yaml
from embedded_support import (
    ARTIFACT_FILES,
    REPO_ROOT,
    cli_env,
    explain,
    factor,
    plan_jsonl,
    read_csv,
    run_cli,
    write_study,
)

RUN_COLUMNS = [
    "study_id", "condition_id", "run_id", "problem_id", "problem_family", "agent_id",
    "agent_kind", "pattern_name", "model_name", "seed", "replicate", "status", "start_time",
    "end_time", "latency_s", "input_tokens", "output_tokens", "cost_usd", "primary_outcome",
    "trace_path", "manifest_path", "error_info",
]  # fmt: skip
CONDITION_COLUMNS = [
    "study_id", "condition_id", "admissible", "constraint_messages", "assignment_meta_json",
]  # fmt: skip
EVENT_COLUMNS = [
    "timestamp", "record_id", "text", "session_id", "actor_id", "event_type", "meta_json",
]  # fmt: skip
EVALUATION_COLUMNS = [
    "run_id", "evaluator_id", "metric_name", "metric_value", "metric_unit",
    "aggregation_level", "notes_json",
]  # fmt: skip
MANIFEST_KEYS = {
    "schema_version", "study_id", "generated_at", "status_counts", "model_ids", "run_count",
    "provenance",
}  # fmt: skip
PROVENANCE_KEYS = {
    "captured_at", "host", "platform", "python_version", "package_versions", "git_sha", "extra",
}  # fmt: skip
UPSTREAM_PACKAGES = {
    "design-research-experiments", "design-research-agents", "design-research-problems",
    "design-research-analysis",
}  # fmt: skip
RUN_STATUSES = {"pending", "running", "success", "failed", "skipped"}
UTC_SECONDS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00")

STUDY_ID = "contract"
RUNS = 2 * 2 * 3  # fail x site block x replicates


def _contract_study(path: Path) -> Path:
    return write_study(
        path,
        {
            "study_id": STUDY_ID,
            "title": "Artifact contract",
            "description": "Half the runs fail; a block adds a block_ column.",
            "factors": [factor("fail", False, True)],
            "blocks": [{"name": "site", "levels": ["north", "south"]}],
            "agent_specs": ["counted_flaky"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 3},
            "outcomes": [
                {
                    "name": "score",
                    "source_table": "runs",
                    "column": "primary_outcome",
                    "aggregation": "mean",
                    "primary": True,
                }
            ],
            "hypotheses": [
                {
                    "hypothesis_id": "h1",
                    "label": "Failing lowers the score",
                    "statement": "Runs told to fail score lower.",
                    "kind": "effect",
                    "independent_vars": ["fail"],
                    "dependent_vars": ["score"],
                    "direction": "less",
                }
            ],
            "analysis_plans": [
                {
                    "analysis_plan_id": "ap1",
                    "hypothesis_ids": ["h1"],
                    "tests": ["welch_t"],
                    "outcomes": ["score"],
                }
            ],
            "bindings": {"agents": {"counted_flaky": "embedded_agents:counted_flaky"}},
        },
    )


def _hash_identifier(prefix: str, payload: Any) -> str:
    """UPSTREAM.md 2, computed here independently of studyq's implementation."""
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return f"{prefix}-{hashlib.sha256(text.encode()).hexdigest()[:12]}"


def _assert_upstream_json(path: Path) -> Any:
    """``json.dump(indent=2, sort_keys=True, ensure_ascii=True)`` plus one newline."""
    text = path.read_text(encoding="utf-8")
    payload = json.loads(text)
    assert text == json.dumps(payload, indent=2, sort_keys=True, ensure_ascii=True) + "\n", path
    return payload


def _assert_excel_csv(path: Path) -> None:
    """``csv.DictWriter`` excel dialect: every line ends with CRLF."""
    raw = path.read_bytes()
    assert raw.endswith(b"\r\n"), path
    assert raw.count(b"\n") == raw.count(b"\r\n"), f"{path.name}: bare LF line ends"


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The contract study run in three steps: --limit 5 (exports partially), `studyq
    export` while runs remain, then the rest of the sweep."""
    folder = tmp_path_factory.mktemp("contract")
    study = _contract_study(folder / "study.yaml")
    url = f"sqlite:///{folder / 's.db'}"
    env = cli_env(folder / "calls.txt")
    limited = run_cli(
        ["run", str(study), "--db", url, "--jobs", "1", "--limit", "5"], folder, env=env
    )
    partial_out = folder / "partial"
    export = run_cli(["export", STUDY_ID, "--db", url, "--out", str(partial_out)], folder, env=env)
    manifest_after_limit = json.loads(
        (folder / "artifacts" / STUDY_ID / "manifest.json").read_text(encoding="utf-8")
    )
    full = run_cli(["run", str(study), "--db", url, "--jobs", "1"], folder, env=env)
    return {
        "folder": folder,
        "limited": limited,
        "manifest_after_limit": manifest_after_limit,
        "export": export,
        "partial_out": partial_out,
        "full": full,
        "out": folder / "artifacts" / STUDY_ID,
        "plan": plan_jsonl(study, folder),
    }


@pytest.mark.timeout(60)
def test_partial_export_is_flagged_while_runs_remain(exported: dict[str, Any]) -> None:
    """Given a sweep stopped by --limit 5 with 7 runs left,
    when its own export and `studyq export` write the artifacts,
    then manifest.json says partial, with 5 runs exported and 7 pending, and runs.csv has
    the 5 finished runs only."""
    limited = exported["limited"]
    first_five = exported["plan"][:5]
    any_failing = any(record["factor_assignments"]["fail"] for record in first_five)
    assert limited.returncode == (1 if any_failing else 0), explain(limited)
    for manifest in (
        exported["manifest_after_limit"],
        json.loads((exported["partial_out"] / "manifest.json").read_text(encoding="utf-8")),
    ):
        assert manifest["partial"] is True
        assert (manifest["run_count"], manifest["runs_planned"], manifest["runs_pending"]) == (
            5,
            RUNS,
            RUNS - 5,
        )
        assert sum(manifest["status_counts"].values()) == 5
    assert exported["export"].returncode == 0, explain(exported["export"])
    assert "partial: 5 of 12 runs finished" in exported["export"].stdout
    _, rows = read_csv(exported["partial_out"] / "runs.csv")
    assert [row["run_id"] for row in rows] == [record["run_id"] for record in exported["plan"][:5]]
    assert all(
        row["manifest_path"] == str(exported["partial_out"] / "manifest.json") for row in rows
    )


@pytest.mark.timeout(60)
def test_complete_export_keeps_the_upstream_contract(exported: dict[str, Any]) -> None:
    """Given the completed sweep (6 successes, 6 failures),
    then every canonical file exists in its upstream format with the required columns in
    order, one runs.csv row per run in plan order with the plan's seeds and replicates,
    upstream status words, error_info on failures, one evaluation and one auto-generated
    event per successful run, the conditions with factor and block columns, and a manifest
    with the upstream keys and provenance."""
    full = exported["full"]
    assert full.returncode == 1, explain(full)
    out: Path = exported["out"]
    plan: list[dict[str, Any]] = exported["plan"]
    for name in ARTIFACT_FILES:
        assert (out / name).is_file(), name
    assert (out / "artifacts" / "checkpoints").is_dir()
    for name in ("conditions.csv", "runs.csv", "events.csv", "evaluations.csv"):
        _assert_excel_csv(out / name)

    header, runs = read_csv(out / "runs.csv")
    # the upstream's columns in order, then studyq's extras: factors, blocks, metric_*
    assert header[: len(RUN_COLUMNS)] == RUN_COLUMNS
    extras = header[len(RUN_COLUMNS) :]
    assert extras[:2] == ["fail", "block_site"]
    assert extras[2:] and all(name.startswith("metric_") for name in extras[2:]), extras
    assert [row["run_id"] for row in runs] == [record["run_id"] for record in plan]
    for row, record in zip(runs, plan, strict=True):
        expected = (
            STUDY_ID,
            record["condition_id"],
            str(record["seed"]),
            str(record["replicate"]),
            record["agent_id"],
            record["problem_id"],
            "artifacts/contract/manifest.json",
        )
        actual = (
            row["study_id"],
            row["condition_id"],
            row["seed"],
            row["replicate"],
            row["agent_id"],
            row["problem_id"],
            row["manifest_path"],
        )
        assert actual == expected
        assert row["status"] in RUN_STATUSES
        assert row["start_time"] and row["end_time"]
        if record["factor_assignments"]["fail"]:
            assert row["status"] == "failed"
            assert row["error_info"].startswith("FlakyAgentError: ")
            assert row["primary_outcome"] == ""
        else:
            assert (row["status"], row["error_info"]) == ("success", "")
            assert row["primary_outcome"] == "1.0"
            assert row["problem_family"] == "benchmark"
        assert (row["input_tokens"], row["output_tokens"], row["cost_usd"]) == ("0", "0", "0.0")
    succeeded = [row["run_id"] for row in runs if row["status"] == "success"]
    assert len(succeeded) == RUNS // 2

    header, evaluations = read_csv(out / "evaluations.csv")
    assert header[: len(EVALUATION_COLUMNS)] == EVALUATION_COLUMNS
    assert [row["run_id"] for row in evaluations] == succeeded
    for row in evaluations:
        assert (
            row["evaluator_id"],
            row["metric_name"],
            row["metric_unit"],
            row["aggregation_level"],
            row["notes_json"],
        ) == ("problem_evaluator", "score", "unitless", "run", "{}")
        # its text form: test_integral_float_metric_values_export_as_upstream_writes_them
        assert float(row["metric_value"]) == 1.0

    header, events = read_csv(out / "events.csv")
    assert header[: len(EVENT_COLUMNS)] == EVENT_COLUMNS
    assert [row["run_id"] for row in events] == succeeded
    for row in events:
        run_id = row["run_id"]
        assert row["record_id"] == _hash_identifier("evt", {"run_id": run_id, "index": 0})
        assert (row["event_type"], row["session_id"], row["actor_id"], row["level"]) == (
            "assistant_output",
            run_id,
            "agent",
            "step",
        )
        assert row["meta_json"] == '{"auto_generated":true}'
        assert UTC_SECONDS.fullmatch(row["timestamp"]), row["timestamp"]

    header, conditions = read_csv(out / "conditions.csv")
    assert header == [*CONDITION_COLUMNS, "fail", "block_site"]
    assert [row["condition_id"] for row in conditions] == list(
        dict.fromkeys(record["condition_id"] for record in plan)
    )
    for row in conditions:
        assert (row["admissible"], row["constraint_messages"]) == ("True", "[]")
        assert row["fail"] in ("True", "False")
        assert row["block_site"] in ("north", "south")
        assert "fingerprint" in json.loads(row["assignment_meta_json"])

    manifest = _assert_upstream_json(out / "manifest.json")
    assert set(manifest) >= MANIFEST_KEYS
    assert (manifest["schema_version"], manifest["study_id"], manifest["run_count"]) == (
        "0.2.0",
        STUDY_ID,
        RUNS,
    )
    assert manifest["status_counts"] == {"success": RUNS // 2, "failed": RUNS // 2}
    assert manifest["model_ids"] == []
    assert manifest["partial"] is False
    assert UTC_SECONDS.fullmatch(manifest["generated_at"])
    provenance = manifest["provenance"]
    assert set(provenance) == PROVENANCE_KEYS
    assert set(provenance["package_versions"]) >= UPSTREAM_PACKAGES
    assert UTC_SECONDS.fullmatch(provenance["captured_at"])

    study_yaml = yaml.safe_load((out / "study.yaml").read_text(encoding="utf-8"))
    assert (study_yaml["schema_version"], study_yaml["study_id"]) == ("0.2.0", STUDY_ID)
    assert {"title", "description"} <= set(study_yaml)
    hypotheses = _assert_upstream_json(out / "hypotheses.json")
    assert [item["hypothesis_id"] for item in hypotheses] == ["h1"]
    plans = _assert_upstream_json(out / "analysis_plan.json")
    assert [item["analysis_plan_id"] for item in plans] == ["ap1"]


@pytest.mark.timeout(60)
def test_integral_float_metric_values_export_as_upstream_writes_them(
    tmp_path: Path, store_url: str
) -> None:
    """Given an evaluator that scores every run 1.0 (a float, as the noop problem does),
    when the sweep runs and exports, on SQLite and on PostgreSQL,
    then evaluations.csv writes metric_value as Python's str(1.0) == "1.0", as upstream's
    csv.DictWriter does, and the same on both backends (runs.csv's primary_outcome, which
    comes from the same value, already says "1.0")."""
    study = write_study(
        tmp_path / "study.yaml",
        {"study_id": "float-metric", "title": "Float metric", "agent_specs": ["noop"],
         "problem_ids": ["noop"]},
    )  # fmt: skip
    done = run_cli(["run", str(study), "--db", store_url, "--jobs", "1"], tmp_path)
    assert done.returncode == 0, explain(done)
    out = tmp_path / "artifacts" / "float-metric"

    _, runs = read_csv(out / "runs.csv")
    _, evaluations = read_csv(out / "evaluations.csv")

    assert [row["primary_outcome"] for row in runs] == ["1.0"]
    assert [row["metric_value"] for row in evaluations] == ["1.0"]


# --- design-research-analysis reads what studyq exports ------------------------------------

ANALYSIS_REQUIREMENT = "design-research-analysis==0.4.0"
ANALYSIS_VENV = REPO_ROOT / ".cache" / "analysis-venv"
_ANALYSIS_PROBE = "import importlib.metadata as m; print(m.version('design-research-analysis'))"
_VERSION_PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"

# Runs in the analysis venv: every artifact helper a user starts from, on the export.
_READ_EXPORT = """\
import json, sys
import design_research_analysis as dra
from design_research_analysis.integration import validate_experiment_events

path = sys.argv[1]
artifacts = dra.load_experiment_artifacts(path)
report = validate_experiment_events(path)
events = dra.build_event_table_from_artifacts(path)
runs = dra.build_run_metric_table_from_artifacts(path, metrics=["objective"])
by_condition = dra.build_condition_metric_table_from_artifacts(
    path, metric="objective", condition_column="agent"
)
print(json.dumps({
    "tables": {name: len(rows) for name, rows in artifacts.items() if isinstance(rows, list)},
    "events_valid": report.is_valid,
    "event_errors": list(report.errors),
    "enriched_events": len(events),
    "run_metrics": len(runs),
    "condition_metrics": len(by_condition),
    "agents": sorted({row["condition"] for row in by_condition}),
}))
"""


def _unavailable(reason: str) -> NoReturn:
    """Skip locally; fail where the cross-check is required (CI sets STUDYQ_REQUIRE_COMPAT)."""
    if os.environ.get("STUDYQ_REQUIRE_COMPAT") == "1":
        pytest.fail(f"compat check required but unavailable: {reason}")
    pytest.skip(reason)


def _clean_env() -> dict[str, str]:
    hidden = {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    env = {key: value for key, value in os.environ.items() if key not in hidden}
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _probe(command: list[str]) -> str | None:
    try:
        done = subprocess.run(
            command, capture_output=True, text=True, timeout=30, check=False, env=_clean_env()
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _python312_candidates() -> Iterator[str]:
    """The compat test's search order (reused when tests/ is importable), else the same
    list: $STUDYQ_PY312, python3.12 on PATH, pyenv, the usual prefixes."""
    try:
        from test_compat_upstream import _python312_candidates as shared
    except ImportError:
        import glob
        import shutil

        explicit = os.environ.get("STUDYQ_PY312")
        if explicit:
            yield explicit
        on_path = shutil.which("python3.12")
        if on_path:
            yield on_path
        pattern = str(Path.home() / ".pyenv" / "versions" / "3.12*" / "bin" / "python3.12")
        yield from sorted(glob.glob(pattern), reverse=True)
        yield from ("/usr/local/bin/python3.12", "/usr/bin/python3.12")
        return
    yield from shared()


def _analysis_python() -> Path:
    """A Python 3.12 venv with design-research-analysis from PyPI (built once, reused)."""
    python = ANALYSIS_VENV / ("Scripts" if sys.platform == "win32" else "bin") / "python"
    expected = ANALYSIS_REQUIREMENT.split("==")[1]
    if _probe([str(python), "-c", _ANALYSIS_PROBE]) == expected:
        return python
    python312 = next(
        (c for c in _python312_candidates() if _probe([c, "-c", _VERSION_PROBE]) == "3.12"), None
    )
    if python312 is None:
        _unavailable("no Python 3.12 found (design-research-analysis needs >= 3.12)")
    for step in (
        [python312, "-m", "venv", "--clear", str(ANALYSIS_VENV)],
        [str(python), "-m", "pip", "install", "--quiet", "--no-input", ANALYSIS_REQUIREMENT],
    ):
        try:
            built = subprocess.run(
                step, capture_output=True, text=True, timeout=600, check=False, env=_clean_env()
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _unavailable(f"cannot build {ANALYSIS_VENV}: {exc}")
        if built.returncode != 0:
            _unavailable(f"cannot build {ANALYSIS_VENV}: {built.stderr[-800:]}")
    if _probe([str(python), "-c", _ANALYSIS_PROBE]) != expected:
        _unavailable(f"{ANALYSIS_VENV} has no {ANALYSIS_REQUIREMENT}")
    return python


@pytest.mark.compat
@pytest.mark.timeout(900)
def test_design_research_analysis_reads_the_export(tmp_path: Path) -> None:
    """Given the quickstart-like sweep exported by studyq (search agents, step events,
    four evaluation rows per run),
    when design-research-analysis 0.4.0 (PyPI, Python 3.12) loads the folder with its
    artifact helpers,
    then it reads every table without error, finds the events valid, and joins runs,
    conditions and evaluations into one row per run."""
    python = _analysis_python()
    study = write_study(
        tmp_path / "study.yaml",
        {
            "study_id": "analysis-handoff",
            "title": "Hand-off to design-research-analysis",
            "factors": [factor("agent", "random-search", "hill-climb"), factor("budget", 20)],
            "problem_ids": ["beam-design"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 3},
        },
    )
    done = run_cli(["run", str(study), "--db", f"sqlite:///{tmp_path / 's.db'}", "--jobs", "1"],
                   tmp_path)  # fmt: skip
    assert done.returncode == 0, explain(done)
    out = tmp_path / "artifacts" / "analysis-handoff"

    read = subprocess.run(
        [str(python), "-c", _READ_EXPORT, str(out)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=_clean_env(),
    )

    assert read.returncode == 0, read.stderr[-4000:]
    result = json.loads(read.stdout.strip().splitlines()[-1])
    _, events = read_csv(out / "events.csv")
    assert result["tables"] == {
        "conditions.csv": 2,
        "runs.csv": 6,
        "events.csv": len(events),
        "evaluations.csv": 6 * 4,
    }
    assert result["events_valid"], result["event_errors"]
    assert result["enriched_events"] == len(events)
    assert result["run_metrics"] == result["condition_metrics"] == 6
    assert result["agents"] == ["hill-climb", "random-search"]
