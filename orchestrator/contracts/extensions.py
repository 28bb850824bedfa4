"""studyq's own sections of a study file: ``bindings`` and ``execution``.

design-research-experiments ignores unknown top-level keys, so these sections keep a study
file valid for the upstream package while telling studyq how to find the code to run and how
to run it.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError

__all__ = ["Bindings", "ExecutionPolicy"]

_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def check_reference(value: str) -> str:
    """Accept ``package.module:callable`` only; anything else cannot be imported safely."""
    if not _REFERENCE.match(value):
        raise PydanticCustomError(
            "studyq",
            "'{value}' is not an import reference.",
            {"value": value, "fix": "write it as 'package.module:callable'."},
        )
    return value


Reference = Annotated[str, AfterValidator(check_reference)]


class Bindings(BaseModel):
    """Where the code behind agent and problem ids lives.

    ``agents`` / ``problems`` map an id used in the study to ``package.module:callable``.
    ``runner`` names a condition runner for pure simulations (no agent/problem fan-out).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    agents: dict[str, Reference] = Field(default_factory=dict)
    problems: dict[str, Reference] = Field(default_factory=dict)
    runner: Reference | None = None

    def references(self) -> set[str]:
        """Every import reference the study itself names (the default allow-list)."""
        refs = set(self.agents.values()) | set(self.problems.values())
        if self.runner:
            refs.add(self.runner)
        return refs


class ExecutionPolicy(BaseModel):
    """Defaults for how each run is executed; CLI flags and settings may override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float | None = Field(
        default=None, gt=0, description="Hard time limit per run; a run over it fails as timeout."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Deliveries a run may use before it is failed as lost."
    )
    queue: str = Field(default="studyq", min_length=1, description="Celery queue for the runs.")
    rate_limit: str | None = Field(
        default=None, description="Celery rate limit per worker for the run task, e.g. '10/m'."
    )
    at_most_once: bool = Field(
        default=False,
        description="Commit each claim durably before the agent runs, so that a database crash "
        "can never make an agent run twice (paid API calls); costs one WAL flush per claim. "
        "By default claims commit asynchronously and a crash can re-run the runs claimed in "
        "its last ~200 ms.",
    )
    order: str = Field(
        default="plan",
        pattern="^(plan|balanced)$",
        description="Dispatch order: 'plan' (design order) or 'balanced' (replicate by "
        "replicate, shuffled with the study seed inside each replicate).",
    )
