"""The worker's entry points that the coordinator calls, found by name, never imported.

``orchestrator/`` does not import ``workers/`` (tests/test_architecture.py fails the build if
it does). Where the coordinator needs worker code (the embedded executor runs runs in its
own processes; ``studyq worker`` starts a worker), it asks for an entry point of the group
``studyq.worker`` that the installed distribution declares (pyproject.toml)::

    execute_run   workers.execution:execute_run   one run, with seed and failure isolation
    resolver      workers.bindings:Resolver       a study's agent/problem/runner ids -> code
    serve         workers.serve:serve             the `studyq worker` command's body

So the dependency is one-way and named: another worker implementation installed under the
same names replaces this one, and a reader finds every crossing in this table.
"""

from __future__ import annotations

from functools import cache
from importlib.metadata import entry_points
from typing import Any

from orchestrator.contracts.errors import SettingsError

__all__ = ["GROUP", "NAMES", "worker_entry"]

GROUP = "studyq.worker"
"""The entry-point group of the worker's functions."""

NAMES = ("execute_run", "resolver", "serve")
"""The entry points the coordinator calls."""


@cache
def worker_entry(name: str) -> Any:
    """The object behind entry point ``name`` of :data:`GROUP`, imported on first use.

    Raises:
        SettingsError: no installed distribution declares it (studyq's own metadata is
            missing: reinstall it).
    """
    found = entry_points(group=GROUP, name=name)
    for entry in found:
        return entry.load()
    raise SettingsError(
        f"no worker entry point '{name}' in group '{GROUP}': studyq's installed metadata is "
        "missing or stale. Fix: reinstall studyq (`pip install -e .` in a checkout, or "
        "`pip install studyq`)."
    )
