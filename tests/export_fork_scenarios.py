"""Scenarios of the export's forked child, each run in a fresh interpreter by
tests/test_export_parallel.py.

The export forks only when no other thread runs (``orchestrator.executors.forked``), and a
pytest process that has run other tests holds their leftover threads: there the export
rightly writes everything itself. So each scenario runs as ``python
tests/export_fork_scenarios.py NAME ARGS...`` and prints one JSON object, its findings, as
its last line. A spy on ``ForkedCall`` counts the children the export starts.
"""

from __future__ import annotations

import gc
import json
import os
import signal
import sys
import threading
import warnings
from pathlib import Path
from typing import Any, ClassVar

from orchestrator import export
from orchestrator.contracts.errors import StudyqError
from orchestrator.executors.forked import ForkedCall, can_fork
from orchestrator.store import ResultStore

STUDY_ID = "export-parallel"


class Spied(ForkedCall[Any]):
    """ForkedCall, counting the children it starts."""

    children: ClassVar[int] = 0

    def __init__(self, call: Any, *, name: str) -> None:
        super().__init__(call, name=name)
        Spied.children += 1


export.ForkedCall = Spied  # type: ignore[misc]


def exports(url: str, out: str, *jobs: str) -> dict[str, Any]:
    """Export into ``out`` with each of ``jobs`` ("default" or a number), copying each
    export's folder to ``out-<jobs>``; the reports' counts and the children started."""
    found: dict[str, Any] = {}
    with ResultStore.open(url) as store:
        for chosen in jobs:
            before = Spied.children
            options = {} if chosen == "default" else {"jobs": int(chosen)}
            report = export.export_artifacts(store, STUDY_ID, out, run_files=False, **options)
            os.rename(out, f"{out}-{chosen}")
            found[chosen] = {
                "children": Spied.children - before,
                "counts": [report.runs, report.events, report.evaluations],
            }
        found["parent_reads"] = store.find_study(STUDY_ID) is not None
    return found


def lane(url: str, out: str) -> dict[str, Any]:
    """A connection checked out (as the store's autocommit lane keeps one) through a forked
    export: whether it still works, and the ResourceWarnings once all is closed."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with ResultStore.open(url) as store:
            held = store.engine.raw_connection()
            export.export_artifacts(store, STUDY_ID, out, run_files=False)
            cursor = held.cursor()
            cursor.execute("SELECT count(*) FROM runs")
            counted = cursor.fetchone()[0]
            cursor.close()
            held.close()
        del held, cursor
        gc.collect()
    unclosed = [str(w.message) for w in caught if w.category is ResourceWarning]
    return {"children": Spied.children, "counted": counted, "unclosed": unclosed}


def error(url: str, out: str) -> dict[str, Any]:
    """events.csv cannot be written (a folder is in its place)."""
    (Path(out) / "events.csv").mkdir(parents=True)
    raised = None
    with ResultStore.open(url) as store:
        try:
            export.export_artifacts(store, STUDY_ID, out, run_files=False)
        except OSError as failure:
            raised = type(failure).__name__
    lines = (Path(out) / "runs.csv").read_text(encoding="utf-8").count("\n")
    return {"children": Spied.children, "raised": raised, "runs_lines": lines}


def killed() -> dict[str, Any]:
    """A child killed before it replies, then one that replies."""

    def die() -> int:
        os.kill(os.getpid(), signal.SIGKILL)
        return 0

    try:
        ForkedCall(die, name="doomed").result()
        message = None
    except StudyqError as failure:
        message = str(failure)
    return {"message": message, "value": ForkedCall(lambda: 41 + 1, name="fine").result()}


def gating() -> dict[str, Any]:
    """can_fork alone, with another thread running, and _beside for an in-memory store."""
    alone = can_fork()
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    try:
        with_thread = can_fork()
    finally:
        stop.set()
        other.join()
    with ResultStore.open("sqlite://") as memory:
        in_memory = export._beside(memory, lambda: (0, 0), jobs=2)
    return {"alone": alone, "with_thread": with_thread, "in_memory": in_memory is not None}


if __name__ == "__main__":
    name, *args = sys.argv[1:]
    scenarios = {
        "exports": exports, "lane": lane, "error": error, "killed": killed, "gating": gating,
    }  # fmt: skip
    print(json.dumps(scenarios[name](*args)))
