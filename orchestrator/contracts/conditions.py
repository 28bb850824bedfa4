"""The condition contract: one realized treatment combination, as planned and as run.

The planner (:mod:`orchestrator.study.designs`) builds these; a worker rebuilds one from a
run spec and hands it to the agent or condition runner as ``condition``. One type on both
sides, shaped like the upstream ``Condition`` (design-research-experiments 0.4.0).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

__all__ = ["Condition", "condition_label"]


@dataclass(slots=True)
class Condition:
    """One realized treatment combination; inadmissible ones stay listed but get no runs."""

    condition_id: str
    factor_assignments: dict[str, Any]
    block_assignments: dict[str, Any]
    metadata: dict[str, Any] = field(default_factory=dict)
    admissible: bool = True
    constraint_messages: list[str] = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return str(self.metadata.get("fingerprint", ""))

    @property
    def label(self) -> str:
        """A short readable name for progress output and Flower."""
        return condition_label(self)


def condition_label(condition: Any) -> str:
    """The readable name of a condition, planned or stored (anything with ``metadata``,
    ``factor_assignments``, ``block_assignments`` and ``condition_id``)."""
    if condition.metadata.get("condition_label"):
        return str(condition.metadata["condition_label"])
    parts = [f"{key}={value}" for key, value in condition.factor_assignments.items()]
    parts += [f"{key}={value}" for key, value in condition.block_assignments.items()]
    return ", ".join(parts) or str(condition.condition_id)
