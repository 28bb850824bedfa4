"""The worker's entry points that the coordinator calls, found by name, never imported.

``orchestrator/`` does not import ``workers/`` (tests/test_architecture.py fails the build if
it does). Where the coordinator needs worker code (the embedded executor runs runs in its
own processes; ``studyq worker`` starts a worker), it asks for an entry point of the group
``studyq.worker`` that the installed distribution declares (pyproject.toml)::

    execute_run   workers.execution:execute_run   one run, with seed and failure isolation
    resolver      workers.bindings:Resolver       a study's agent/problem/runner ids -> code
    serve         workers.serve:serve             the `studyq worker` command's body

So the dependency is one-way and named: another worker implementation installed under the
same names replaces this one, and a reader finds every crossing in this table. The first two
are typed here (:class:`ExecuteRun`, :class:`ResolverFactory`); the coordinator holds a
resolver only to hand it back to ``execute_run`` (:class:`RunResolver`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any, Literal, Protocol, overload

from orchestrator.contracts.errors import SettingsError
from orchestrator.contracts.extensions import Bindings
from orchestrator.contracts.results import RunResult
from orchestrator.contracts.runspec import RunSpec

__all__ = [
    "GROUP",
    "NAMES",
    "ExecuteRun",
    "ResolverFactory",
    "RunResolver",
    "worker_entry",
    "worker_module",
]

GROUP = "studyq.worker"
"""The entry-point group of the worker's functions."""

NAMES = ("execute_run", "resolver", "serve")
"""The entry points the coordinator calls."""


class RunResolver(Protocol):
    """A study's agent, problem and runner ids resolved to code (``workers.bindings``)."""

    @property
    def uses_runner(self) -> bool:
        """Whether the study runs a condition runner instead of agents on problems."""
        ...


class ResolverFactory(Protocol):
    """Entry point ``resolver``: builds a study's :class:`RunResolver`."""

    def __call__(
        self,
        bindings: Bindings | None = None,
        *,
        agents: Mapping[Any, Any] | None = None,
        problems: Mapping[Any, Any] | None = None,
        runner: Callable[..., Any] | None = None,
        allowed_imports: Iterable[str] = (),
    ) -> RunResolver: ...


class ExecuteRun(Protocol):
    """Entry point ``execute_run``: one run, with seed and failure isolation; a run's failure
    is a failed :class:`RunResult`, never an exception."""

    def __call__(
        self,
        spec: RunSpec,
        resolver: RunResolver,
        *,
        timeout_s: float | None = None,
        worker: str = "",
    ) -> RunResult: ...


@overload
def worker_entry(name: Literal["execute_run"]) -> ExecuteRun: ...
@overload
def worker_entry(name: Literal["resolver"]) -> ResolverFactory: ...
@overload
def worker_entry(name: str) -> Any: ...
def worker_entry(name: str) -> Any:
    """The object behind entry point ``name`` of :data:`GROUP`, imported on first use.

    Raises:
        SettingsError: no installed distribution declares it (studyq's own metadata is
            missing: reinstall it).
    """
    return _load(name)


def worker_module(name: str) -> str:
    """The module behind entry point ``name``, without importing it (what a forkserver
    preloads so that its children start with the worker's code imported)."""
    return _entry(name).module


@cache
def _load(name: str) -> Any:
    return _entry(name).load()


def _entry(name: str) -> EntryPoint:
    for entry in entry_points(group=GROUP, name=name):
        return entry
    raise SettingsError(
        f"no worker entry point '{name}' in group '{GROUP}': studyq's installed metadata is "
        "missing or stale. Fix: reinstall studyq (`pip install -e .` in a checkout, or "
        "`pip install studyq`)."
    )
