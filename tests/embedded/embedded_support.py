"""Helpers of the embedded-sweep tests: run ``studyq`` as a user would, read what it left.

Every ``studyq`` here is a real child process (``.venv/bin/studyq``) in a temporary working
directory with its own SQLite file; nothing touches the repository. The test agents
(:mod:`embedded_agents`) reach the child and its pool workers through ``PYTHONPATH``.
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml
from embedded_agents import CALLS_ENV

from orchestrator.store import ResultStore

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
QUICKSTART = REPO_ROOT / "examples" / "quickstart" / "study.yaml"

# Columns whose values legitimately differ between two executions of the same run.
TIME_COLUMNS = frozenset({"start_time", "end_time", "latency_s", "timestamp"})
# Provenance keys that say where a run executed (process, host), not what it computed.
WHERE_KEYS = frozenset({"host", "pid", "worker"})

CSV_FILES = ("conditions.csv", "runs.csv", "events.csv", "evaluations.csv")
ARTIFACT_FILES = (
    "study.yaml",
    "manifest.json",
    *CSV_FILES,
    "hypotheses.json",
    "analysis_plan.json",
)


def studyq_command() -> list[str]:
    """The installed ``studyq`` script next to this interpreter, else ``python -m``."""
    script = Path(sys.executable).parent / "studyq"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "orchestrator.cli"]


def cli_env(calls_file: Path | None = None, **extra: str) -> dict[str, str]:
    """A clean environment: no inherited ``STUDYQ_*``, the test agents importable."""
    env = {key: value for key, value in os.environ.items() if not key.startswith("STUDYQ_")}
    env["PYTHONPATH"] = os.pathsep.join([str(HERE), *filter(None, [os.environ.get("PYTHONPATH")])])
    env["PYTHONUNBUFFERED"] = "1"
    if calls_file is not None:
        env[CALLS_ENV] = str(calls_file)
    env.update(extra)
    return env


def run_cli(
    args: Sequence[str],
    cwd: Path,
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    """Run ``studyq ARGS`` to completion in ``cwd``."""
    return subprocess.run(
        [*studyq_command(), *args],
        cwd=cwd,
        env=dict(env) if env is not None else cli_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def start_cli(args: Sequence[str], cwd: Path, *, env: Mapping[str, str]) -> subprocess.Popen[str]:
    """Start ``studyq ARGS`` in a session of its own (so its whole tree can be signalled)."""
    return subprocess.Popen(
        [*studyq_command(), *args],
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def finish(child: subprocess.Popen[str], *, timeout: float) -> subprocess.CompletedProcess[str]:
    """Wait for a started child and collect its output."""
    out, err = child.communicate(timeout=timeout)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


def explain(done: subprocess.CompletedProcess[str]) -> str:
    """Exit code and output of a finished child, for assertion messages."""
    return f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr[-4000:]}"


def group_alive(pgid: int) -> bool:
    """Whether any process of the process group ``pgid`` still runs.

    Zombies do not count: they have exited, and once their parent (here, the killed
    coordinator) is gone only PID 1 reaps them, which in some sandboxes never happens.
    """
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        fields = stat.rsplit(")", 1)[1].split()
        state, group = fields[0], int(fields[2])
        if group == pgid and state != "Z":
            return True
    return False


def reap_group(process: subprocess.Popen[str], *, grace_s: float = 10.0) -> None:
    """Wait until every process of ``process``'s group has gone; SIGKILL the rest after
    ``grace_s``. Only the group this test started is ever signalled."""
    pgid = process.pid
    deadline = time.monotonic() + grace_s
    while group_alive(pgid) and time.monotonic() < deadline:
        process.poll()  # reap the leader, or the group never empties
        time.sleep(0.05)
    if group_alive(pgid):
        os.killpg(pgid, signal.SIGKILL)
    if process.poll() is None:
        process.kill()
    process.communicate(timeout=30)


def wait_until(predicate: Callable[[], bool], *, timeout: float, interval: float = 0.02) -> bool:
    """Poll ``predicate`` until it holds or ``timeout`` passes; return whether it held."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def write_study(path: Path, study: Mapping[str, Any]) -> Path:
    """Write ``study`` as a YAML study file."""
    path.write_text(yaml.safe_dump(dict(study), sort_keys=False), encoding="utf-8")
    return path


def factor(name: str, *values: Any) -> dict[str, Any]:
    """A manipulated factor with one level per value (level names ``l0``, ``l1``, ...)."""
    return {
        "name": name,
        "kind": "manipulated",
        "levels": [{"name": f"l{index}", "value": value} for index, value in enumerate(values)],
    }


def read_csv(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    """Header and rows of a CSV artifact."""
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle)
        rows = list(reader)
        return list(reader.fieldnames or []), rows


def comparable_csv(path: Path, *, drop: Iterable[str] = TIME_COLUMNS) -> list[tuple[Any, ...]]:
    """A CSV's rows without the ``drop`` columns, sorted (by ``run_id`` first when present)."""
    header, rows = read_csv(path)
    dropped = set(drop)
    keep = [column for column in header if column not in dropped]
    first = [keep.index("run_id")] if "run_id" in keep else []
    table = [tuple(row[column] for column in keep) for row in rows]
    order = first + list(range(len(keep)))
    return [tuple(keep), *sorted(table, key=lambda row: tuple(row[i] for i in order))]


def comparable_manifest(path: Path) -> dict[str, Any]:
    """manifest.json without the moments it was written and captured."""
    manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    manifest.pop("generated_at", None)
    provenance = dict(manifest.get("provenance") or {})
    provenance.pop("captured_at", None)
    manifest["provenance"] = provenance
    return manifest


def count_calls(calls_file: Path) -> Counter[str]:
    """Agent calls per run id, from the counter file (missing file: no calls)."""
    if not calls_file.exists():
        return Counter()
    return Counter(line for line in calls_file.read_text(encoding="ascii").splitlines() if line)


def store_counts(url: str, study_id: str) -> dict[str, int]:
    """Runs per status in the store at ``url`` (non-zero statuses only)."""
    with ResultStore.open(url) as store:
        return {key: value for key, value in store.count_by_status(study_id).items() if value}


def run_outcomes(url: str, study_id: str) -> dict[str, dict[str, Any]]:
    """What each run computed, by run id, from the store: status, outputs, metrics,
    evaluation and event rows and error; without timings and where it executed."""
    outcomes: dict[str, dict[str, Any]] = {}
    with ResultStore.open(url) as store:
        for run in store.iter_runs(study_id):
            metrics = {key: value for key, value in (run.metrics or {}).items()}
            metrics.pop("latency_s", None)
            provenance = {
                key: value for key, value in (run.provenance or {}).items() if key not in WHERE_KEYS
            }
            outcomes[run.run_id] = {
                "status": run.status,
                "seed": run.seed,
                "outputs": run.outputs,
                "metrics": metrics,
                "primary_outcome": run.primary_outcome,
                "provenance": provenance,
                "error_kind": run.error_kind,
                "error_type": run.error_type,
                "evaluations": [],
                "events": [],
            }
        for evaluation in store.iter_evaluations(study_id):
            outcomes[evaluation.run_id]["evaluations"].append(evaluation.row)
        for event in store.iter_events(study_id):
            row = {key: value for key, value in event.row.items() if key != "timestamp"}
            outcomes[event.run_id]["events"].append(row)
    return outcomes


def plan_jsonl(study: Path, cwd: Path) -> list[dict[str, Any]]:
    """``studyq plan STUDY --format jsonl``, parsed."""
    done = run_cli(["plan", str(study), "--format", "jsonl"], cwd)
    assert done.returncode == 0, explain(done)
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
