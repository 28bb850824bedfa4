"""Per-run files written by processes are the files written by one.

``export_artifacts(..., jobs=N)`` hands batches of runs' checkpoint payloads to writer
processes and keeps the ledger in plan order itself. A real embedded sweep (SQLite) of more
runs than two batches hold, with failures, credentials to redact and runs left pending, is
exported with one process and with writers; every file must be byte for byte the same.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from orchestrator.api import run_study
from orchestrator.cli import main
from orchestrator.contracts.errors import StudyqError
from orchestrator.export import _writers, export_artifacts
from orchestrator.export_records import _WRITER_BATCH
from orchestrator.store import ResultStore
from orchestrator.store.export_reads import has_repeated_run_ids
from workers.execution import agent_result

INTEGRATION = pytest.mark.integration
STUDY_ID = "export-parallel"
REPLICATES = 60
RUNS = 2 * 2 * REPLICATES  # temperature x problems x replicates
FINISHED = RUNS - 17  # the rest stay pending: they get evidence records only


def flaky_agent(factors: dict[str, Any], seed: int) -> dict[str, Any]:
    """Fails one run in nine; the others return credentials (redacted in evidence) and
    metrics."""
    if seed % 9 == 0:
        raise ValueError(f"seed {seed} is unlucky")
    return agent_result(
        {"text": f"t={factors['temperature']} Bearer tok3n", "api_key": "sk-0123456789abcdef"},
        metrics={"quality": seed % 7, "tokens": {"prompt": 3}},
    )


def _study(path: Path) -> Path:
    study = {
        "study_id": STUDY_ID,
        "title": "Parallel export",
        "factors": [
            {
                "name": "temperature",
                "levels": [{"name": "lo", "value": 0.1}, {"name": "hi", "value": 0.9}],
            },
        ],
        "agent_specs": ["flaky-agent"],
        "problem_ids": ["noop", "noop-too"],
        "design_spec": {"kind": "full_factorial"},
        "run_budget": {"replicates": REPLICATES},
        "bindings": {"problems": {"noop-too": "workers.demo.problems:noop"}},
    }
    path.write_text(json.dumps(study), encoding="utf-8")
    return path


def _files(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path; the manifest without its clocks."""
    found: dict[str, bytes] = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = Path(folder) / name
            found[str(path.relative_to(root))] = path.read_bytes()
    manifest = json.loads(found.pop("manifest.json"))
    manifest.pop("generated_at")
    manifest["provenance"].pop("captured_at")
    found["manifest.json"] = json.dumps(manifest, sort_keys=True).encode()
    return found


def _sweep(tmp_path: Path, db: str) -> str:
    outcome = run_study(
        _study(tmp_path / "study.json"),
        jobs=1,
        db=db,
        limit=FINISHED,
        export=False,
        agent_bindings={"flaky-agent": flaky_agent},
    )
    assert outcome.executed == FINISHED and outcome.failed > 0, outcome
    return db


@pytest.fixture
def swept(tmp_path: Path) -> str:
    return _sweep(tmp_path, f"sqlite:///{tmp_path / 'store.db'}")


@pytest.mark.timeout(180)
def test_writer_processes_write_the_same_bytes(swept: str, tmp_path: Path) -> None:
    """Given a sweep of 240 runs, 223 finished (some failed) and 17 pending,
    when it is exported with one process, then with jobs=3 (writers: one per core at most)
    into the same folder (replacing the first export's files),
    then every file is byte for byte the same (the manifest but for its clocks): the
    ledger in plan order across batches, every checkpoint and evidence record, redacted
    alike."""
    assert FINISHED > 3 * _WRITER_BATCH  # several batches, so their order matters
    out = tmp_path / "out"  # one folder: runs.csv names its manifest's path
    with ResultStore.open(swept) as store:
        serial = export_artifacts(store, STUDY_ID, out, jobs=1)
        one = _files(out)
        parallel = export_artifacts(store, STUDY_ID, out, jobs=3)
        many = _files(out)

    assert serial.run_files == parallel.run_files == FINISHED
    assert sorted(one) == sorted(many)
    assert [name for name in one if one[name] != many[name]] == []
    ledger = one[os.path.join("artifacts", "checkpoints", "runs.jsonl")].decode().splitlines()
    assert len(ledger) == FINISHED
    record = json.loads(
        many[os.path.join("artifacts", "runs", json.loads(ledger[1])["run_id"], "run.json")]
    )
    assert record["observed"]["outputs"]["api_key"] == "[REDACTED]"


@pytest.mark.timeout(180)
def test_cli_export_jobs_writes_every_run(swept: str, tmp_path: Path) -> None:
    """Given the sweep, when `studyq export --jobs 2` writes it, then every finished run has
    its checkpoint and every planned run its evidence record; --jobs 0 is a usage error
    that writes nothing."""
    out = tmp_path / "cli"

    code = main(["export", STUDY_ID, "--db", swept, "--out", str(out), "--jobs", "2"])

    assert code == 0
    assert len(list((out / "artifacts" / "checkpoints").glob("*.json"))) == FINISHED
    assert len(list((out / "artifacts" / "runs").glob("*/run.json"))) == RUNS
    with pytest.raises(SystemExit) as exit_info:
        main(["export", STUDY_ID, "--db", swept, "--out", str(tmp_path / "no"), "--jobs", "0"])
    assert exit_info.value.code == 2
    assert not (tmp_path / "no").exists()


def test_export_refuses_jobs_below_one(swept: str, tmp_path: Path) -> None:
    with ResultStore.open(swept) as store, pytest.raises(StudyqError, match="jobs must be 1"):
        export_artifacts(store, STUDY_ID, tmp_path / "out", jobs=0)
    assert not (tmp_path / "out").exists()


@pytest.mark.timeout(180)
def test_repeated_run_ids_are_written_by_one_process(tmp_path: Path, swept: str) -> None:
    """Given a study whose two temperature levels have the same value (so every run id is
    planned twice, UPSTREAM.md 6.4, and two runs' files share each path),
    when it is exported with jobs=3,
    then has_repeated_run_ids says so (and not for the study without repeats), and the files
    are those of one process writing in plan order: each path holds the later run's files."""
    study = json.loads(_study(tmp_path / "plain.json").read_text(encoding="utf-8"))
    study["study_id"] = "export-repeated"
    study["factors"][0]["levels"][1]["value"] = 0.1
    study["run_budget"]["replicates"] = 40
    path = tmp_path / "repeated.json"
    path.write_text(json.dumps(study), encoding="utf-8")
    db = f"sqlite:///{tmp_path / 'repeated.db'}"
    outcome = run_study(
        path, jobs=1, db=db, export=False, agent_bindings={"flaky-agent": flaky_agent}
    )
    assert outcome.executed == 2 * 2 * 40

    with ResultStore.open(db) as store:
        assert has_repeated_run_ids(store.engine, "export-repeated")
        assert _writers(store, "export-repeated", 3) == 1
        export_artifacts(store, "export-repeated", tmp_path / "out", jobs=1)
        one = _files(tmp_path / "out")
        export_artifacts(store, "export-repeated", tmp_path / "out", jobs=3)
        many = _files(tmp_path / "out")
    with ResultStore.open(swept) as store:
        assert not has_repeated_run_ids(store.engine, STUDY_ID)
        assert _writers(store, STUDY_ID, 3) == min(3, os.cpu_count() or 1)

    assert one == many
    checkpoints = [
        name for name in one if name.startswith(os.path.join("artifacts", "checkpoints"))
    ]
    assert len(checkpoints) == 2 * 40 + 1  # one per distinct run id, and the ledger


def _scenario(name: str, *args: str) -> dict[str, Any]:
    """A scenario of tests/export_fork_scenarios.py in a fresh interpreter (no other
    test's threads, so the export may fork): its findings."""
    done = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("export_fork_scenarios.py")), name, *args],
        capture_output=True,
        text=True,
        timeout=150,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    found: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return found


FORKS = 1 if (os.cpu_count() or 1) > 1 else 0
"""Children an export forks here: one, on a machine with more than one core."""


@pytest.mark.parametrize("backend", ["sqlite", pytest.param("postgresql", marks=INTEGRATION)])
@pytest.mark.timeout(180)
def test_side_tables_from_a_forked_child_are_the_same_bytes(
    backend: str, tmp_path: Path, services: Any
) -> None:
    """Given the sweep (on each backend),
    when it is exported without run files with jobs=1 in this process, then in a fresh
    process with jobs=2 and by default,
    then those two fork a child for evaluations.csv, events.csv and attempts.csv, every
    file is byte for byte the same as with one process (the manifest but for its clocks,
    and runs.csv but for its manifest path), and the parent's store still reads after the
    child opened and closed connections of its own."""
    with contextlib.ExitStack() as stack:
        url = f"sqlite:///{tmp_path / 'store.db'}"
        if backend == "postgresql":
            url = stack.enter_context(services.pg_database("export_fork", migrate=True))
        _sweep(tmp_path, url)
        with ResultStore.open(url) as store:
            serial = export_artifacts(store, STUDY_ID, tmp_path / "one", run_files=False, jobs=1)
        found = _scenario("exports", url, str(tmp_path / "out"), "2", "default")

    one = _files(tmp_path / "one")
    assert serial.events > 0 and serial.evaluations > 0
    assert one["attempts.csv"].count(b"\n") > FINISHED
    for chosen in ("2", "default"):
        assert found[chosen]["children"] == FORKS
        assert found[chosen]["counts"] == [serial.runs, serial.events, serial.evaluations]
        many = _files(tmp_path / f"out-{chosen}")
        many["runs.csv"] = many["runs.csv"].replace(
            str(tmp_path / "out").encode(), str(tmp_path / "one").encode()
        )
        assert sorted(one) == sorted(many)
        assert [name for name in one if one[name] != many[name]] == []
    assert found["parent_reads"]


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_forked_export_leaves_the_parents_connections_alone(
    tmp_path: Path, services: Any
) -> None:
    """Given a PostgreSQL store with a connection checked out (as the store's autocommit
    lane keeps one for claims and results),
    when the export forks its side tables,
    then that connection still works in the parent, and once it is back and the store
    closed, no connection is left to be collected unclosed (no ResourceWarning)."""
    with services.pg_database("export_fork_lane", migrate=True) as url:
        _sweep(tmp_path, url)
        found = _scenario("lane", url, str(tmp_path / "out"))
    assert found == {"children": FORKS, "counted": RUNS, "unclosed": []}


@pytest.mark.timeout(180)
def test_an_error_in_the_forked_child_is_raised_by_the_export(swept: str, tmp_path: Path) -> None:
    """events.csv cannot be written (a folder is in its place): the child's error is the
    export's, and runs.csv is still written by the parent before it is raised."""
    found = _scenario("error", swept, str(tmp_path / "out"))
    assert found == {"children": FORKS, "raised": "IsADirectoryError", "runs_lines": FINISHED + 1}


def test_a_child_killed_before_its_result_is_a_clear_error() -> None:
    found = _scenario("killed")
    assert found == {
        "message": "the doomed process ended without a result (exit code -9).",
        "value": 42,
    }


def test_no_fork_with_another_thread_or_an_in_memory_store() -> None:
    """A fork with another thread running could inherit a lock held forever; an in-memory
    SQLite store lives in its process only: both export in the one process."""
    found = _scenario("gating")
    assert found == {"alone": sys.platform.startswith("linux"), "with_thread": False,
                     "in_memory": False}  # fmt: skip
