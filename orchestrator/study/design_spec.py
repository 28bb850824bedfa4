"""How a study's conditions and runs are generated: the design kind and its options, the run
budget, the seed policy."""

from __future__ import annotations

from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, StrictInt, field_validator, model_validator

from orchestrator.study._fields import Flag, StudyModel, at_least, problem, to_int, to_str

__all__ = ["DesignKind", "DesignSpec", "RunBudget", "SeedPolicy"]


class DesignKind(StrEnum):
    """The eight design generators."""

    FULL_FACTORIAL = "full_factorial"
    CONSTRAINED_FACTORIAL = "constrained_factorial"
    RANDOMIZED_BLOCK = "randomized_block"
    REPEATED_MEASURES = "repeated_measures"
    LATIN_SQUARE = "latin_square"
    CUSTOM_MATRIX = "custom_matrix"
    LATIN_HYPERCUBE = "latin_hypercube"
    FRACTIONAL_FACTORIAL_2LEVEL = "fractional_factorial_2level"


_KIND_ALIASES = {kind.value: kind for kind in DesignKind} | {
    "full": DesignKind.FULL_FACTORIAL,
    "lhs": DesignKind.LATIN_HYPERCUBE,
    "frac2": DesignKind.FRACTIONAL_FACTORIAL_2LEVEL,
}


class DesignSpec(StudyModel):
    kind: DesignKind = DesignKind.FULL_FACTORIAL
    replicates: int = 1
    randomize: Flag = False
    counterbalance: Flag = False
    matrix_path: Any = None
    n_samples: int | None = None
    center_points: int = 0
    block_randomization_key: Any = None
    options: dict[Any, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_upstream(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        options = data.get("options", {})
        options = options if isinstance(options, dict) else {}
        out = dict(data)
        out["replicates"] = to_int(data.get("replicates", 1))
        n_samples = data.get("n_samples", options.get("n_samples"))
        out["n_samples"] = None if n_samples is None else to_int(n_samples)
        out["center_points"] = to_int(data.get("center_points", options.get("center_points", 0)))
        out["block_randomization_key"] = data.get(
            "block_randomization_key", options.get("block_randomization_key")
        )
        return out

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> DesignKind:
        raw_kind = to_str(value)
        kind = _KIND_ALIASES.get(raw_kind.strip().lower())
        if kind is None:
            allowed = ", ".join(sorted(_KIND_ALIASES))
            raise problem(f"Unsupported design kind: {raw_kind!r}.", f"use one of: {allowed}.")
        return kind

    _replicates = at_least(
        "replicates",
        1,
        "DesignSpec.replicates must be >= 1.",
        "set design_spec.replicates to 1 or more (it repeats design rows; run "
        "replicates are run_budget.replicates).",
    )
    _n_samples = at_least(
        "n_samples", 1, "DesignSpec.n_samples must be >= 1 when provided.", "use 1 or more."
    )
    _center_points = at_least(
        "center_points", 0, "DesignSpec.center_points must be >= 0.", "use 0 or more."
    )


class RunBudget(BaseModel):
    """Built by keyword expansion upstream: unknown keys and non-integers are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicates: StrictInt = 1
    max_runs: StrictInt | None = None
    parallelism: StrictInt = 1
    fail_fast: Flag = False

    _replicates = at_least(
        "replicates", 1, "RunBudget.replicates must be >= 1.", "set it to 1 or more."
    )
    _parallelism = at_least(
        "parallelism", 1, "RunBudget.parallelism must be >= 1.", "set it to 1 or more."
    )
    _max_runs = at_least(
        "max_runs",
        1,
        "RunBudget.max_runs must be >= 1 when provided.",
        "set it to 1 or more, or remove it.",
    )


class SeedPolicy(BaseModel):
    """Hashed with the JSON types as written (``base_seed: "7"`` hashes as a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_seed: Any = 0
    strategy: Any = "condition_replicate"
    per_run_offset: Any = 9973
