"""Test studies for the distributed tests: registered through
``orchestrator.embedded.register`` and marked queued, as the coordinator leaves them."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

from dist_services import BROKER_URL

from orchestrator.contracts.runspec import RunSpec
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers.config import WorkerSettings

TEST_GRACE_S = 1.0
"""time_limit_grace_s of the test workers and publisher: hard limits 1 s after soft ones."""


@dataclass
class Sweep:
    """A registered study whose runs are queued, ready to publish."""

    study_id: str
    specs: list[RunSpec]
    labels: dict[str, str] = field(default_factory=dict)

    def publishable(self, attempt: int = 0) -> list[tuple[RunSpec, int, str]]:
        return [(spec, attempt, self.labels.get(spec.condition_id, "")) for spec in self.specs]


def make_sweep(
    store: ResultStore,
    *,
    agents: list[str],
    problems: list[str] | None = None,
    replicates: int = 1,
    factors: dict[str, Any] | None = None,
    timeout_s: float | None = None,
    bindings: dict[str, Any] | None = None,
    queued: bool = True,
) -> Sweep:
    """Register a study (through ``orchestrator.embedded.register``) and mark it queued."""
    study_id = f"dist-{uuid.uuid4().hex[:10]}"
    payload: dict[str, Any] = {
        "study_id": study_id,
        "title": "distributed test",
        "agent_specs": agents,
        "problem_ids": problems or ["noop"],
        "run_budget": {"replicates": replicates},
    }
    if factors:
        payload["factors"] = [
            {"name": name, "kind": "manipulated", "levels": [{"name": "x", "value": value}]}
            for name, value in factors.items()
        ]
        payload["design_spec"] = {"kind": "full_factorial"}
    if timeout_s is not None:
        payload["execution"] = {"timeout_s": timeout_s}
    if bindings:
        payload["bindings"] = bindings
    prepared = prepare(parse_study(payload))
    register(store, prepared)
    specs = list(prepared.run_specs())
    if queued:
        store.mark_queued(study_id, [spec.index for spec in specs])
    labels = {condition.condition_id: condition.label for condition in prepared.conditions}
    return Sweep(study_id, specs, labels)


def worker_settings(url: str, **overrides: Any) -> WorkerSettings:
    """Explicit settings (the environment does not leak into the tests)."""
    values: dict[str, Any] = {
        "database_url": url,
        "broker_url": BROKER_URL,
        "lease_s": 60.0,
        "heartbeat_s": 15.0,
        "result_retry_s": 20.0,
        "time_limit_grace_s": TEST_GRACE_S,
        "shutdown_grace_s": 1.0,
        "allowed_imports": [],
    }
    values.update(overrides)
    return WorkerSettings(**values)
