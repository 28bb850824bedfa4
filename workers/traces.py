"""The trace store: trace files a run returns are copied where every worker writes, so a
trace outlives the worker's disk.

An agent returns ``trace_refs`` (or ``metadata.trace_path``): paths on the machine that ran
it. With ``STUDYQ_TRACE_DIR`` set (a directory shared by all workers, e.g. a network file
system), each ref that is an existing file or directory is copied to
``<trace_dir>/<study_id>/<run_id>/<name>`` and the run records the stored copy instead, so
runs.csv ``trace_path`` points at it. A ref that is not a local path (a URL, an object-store
key) or no longer exists is recorded as given. Object storage is a later step.

Copying is part of the run: it happens before the result is written, and a copy that fails
(the share is full or gone) fails the run with the error, since its trace would be lost.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path

from orchestrator.contracts.runspec import RunSpec

__all__ = ["run_trace_dir", "store_traces"]


def run_trace_dir(trace_dir: Path, spec: RunSpec) -> Path:
    """Where one run's traces are stored."""
    return trace_dir / spec.study_id / spec.run_id


def store_traces(refs: Sequence[str], spec: RunSpec, trace_dir: Path) -> list[str]:
    """Copy each local trace of ``refs`` into the store; the refs to record, in order.

    Raises:
        OSError: a trace could not be copied.
    """
    target = run_trace_dir(trace_dir, spec)
    stored: list[str] = []
    used: set[str] = set()
    for ref in refs:
        source = Path(ref).expanduser()
        if "://" in ref or not source.exists():
            stored.append(ref)
            continue
        name = _unique(source.name or "trace", used)
        destination = target / name
        target.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination, dirs_exist_ok=True)
        else:
            shutil.copy2(source, destination)
        stored.append(str(destination))
    return stored


def _unique(name: str, used: set[str]) -> str:
    """``name``, or ``name`` with a counter when two traces of one run share a file name."""
    candidate, counter = name, 1
    while candidate in used:
        stem, dot, suffix = name.partition(".")
        candidate = f"{stem}-{counter}{dot}{suffix}"
        counter += 1
    used.add(candidate)
    return candidate
