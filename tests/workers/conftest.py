"""Shared helpers for the worker-side tests: run specs and a clean resolver per test."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest

from orchestrator.contracts.runspec import RunSpec
from workers import bindings


def _make_spec(
    agent_id: Any = "noop",
    problem_id: Any = "noop",
    *,
    seed: int = 750557790,
    factors: dict[str, Any] | None = None,
    run_id: str = "run-6a65a0bce80f",
) -> RunSpec:
    return RunSpec(
        study_id="ff-3factor",
        run_id=run_id,
        condition_id="cond-d3c8e8a79055",
        replicate=1,
        seed=seed,
        agent_id=agent_id,
        problem_id=problem_id,
        factor_assignments=dict(factors or {}),
        block_assignments={"site": "a"},
        condition_fingerprint='{"blocks":{"site":"a"},"factors":{}}',
    )


@pytest.fixture
def make_spec() -> Callable[..., RunSpec]:
    """Build a run spec; keyword arguments override the defaults."""
    return _make_spec


@pytest.fixture(autouse=True)
def _fresh_ecosystem_cache() -> Iterator[None]:
    """The ecosystem probe is cached per process; tests that fake a package must not leak."""
    bindings._ecosystem_integration.cache_clear()
    yield
    bindings._ecosystem_integration.cache_clear()
