"""The study model: a study file as design-research-experiments 0.4.0 reads it, plus studyq's
``bindings`` and ``execution`` sections.

Every coercion here copies the upstream's (UPSTREAM.md section 3): names go through
``str()``, ``design_spec.randomize`` through ``bool()`` (so the string ``"false"`` is true),
``run_budget`` and ``seed_policy`` refuse unknown keys while everything else ignores them.
Those quirks decide which files load and what gets hashed, so they are kept on purpose.
What differs is reporting: every problem in a file is reported at once, with its field path
and a fix, instead of the first ``KeyError``.
"""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StrictInt,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from orchestrator.contracts.canonical import canonical_json, sha256_hex, to_jsonable
from orchestrator.contracts.extensions import Bindings, ExecutionPolicy

__all__ = [
    "SCHEMA_VERSION",
    "AnalysisPlan",
    "Block",
    "Constraint",
    "DesignKind",
    "DesignSpec",
    "Factor",
    "FactorKind",
    "Hypothesis",
    "Level",
    "OutcomeSpec",
    "RunBudget",
    "SeedPolicy",
    "Study",
]

SCHEMA_VERSION = "0.2.0"


def _to_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def _to_bool(value: Any) -> bool:
    return bool(value)


def _to_int(value: Any) -> Any:
    """``int()`` as upstream does for design-spec numbers; leave failures to pydantic."""
    if isinstance(value, bool | int):
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


Text = Annotated[str, BeforeValidator(_to_str)]
Flag = Annotated[bool, BeforeValidator(_to_bool)]


def _problem(message: str, fix: str = "") -> PydanticCustomError:
    return PydanticCustomError("studyq", message, {"fix": fix})


def _non_blank(value: str, label: str) -> str:
    if not value.strip():
        field = label.rsplit(".", 1)[-1]
        raise _problem(f"{label} must be non-empty.", f"give `{field}` a non-blank value.")
    return value


class _Model(BaseModel):
    """Upstream ignores unknown keys almost everywhere; so do we (``validate`` warns)."""

    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)


class FactorKind(StrEnum):
    """Factor kinds; the kind never changes a design."""

    MANIPULATED = "manipulated"
    MEASURED = "measured"
    BLOCKED = "blocked"
    NUISANCE = "nuisance"


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


class HypothesisKind(StrEnum):
    EFFECT = "effect"
    MODERATION = "moderation"
    MEDIATION = "mediation"
    EQUIVALENCE = "equivalence"
    ROBUSTNESS = "robustness"
    EXPLORATORY = "exploratory"


class HypothesisDirection(StrEnum):
    GREATER = "greater"
    LESS = "less"
    DIFFERENT = "different"
    EQUIVALENT = "equivalent"


def _enum(enum: type[StrEnum], label: str) -> BeforeValidator:
    allowed = ", ".join(member.value for member in enum)

    def convert(value: Any) -> Any:
        text = _to_str(value)
        try:
            return enum(text)
        except ValueError:
            raise _problem(f"'{text}' is not a valid {label}.", f"use one of: {allowed}.") from None

    return BeforeValidator(convert)


class Level(_Model):
    """One level of a factor; only ``value`` enters ids, never the name or label."""

    name: Text
    value: Any = None
    label: str | None = None
    metadata: dict[Any, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _non_blank(value, "Level.name")

    @model_validator(mode="after")
    def _default_label(self) -> Level:
        if self.label is None:
            object.__setattr__(self, "label", self.name)
        return self


class Factor(_Model):
    name: Text
    description: Text = ""
    kind: Annotated[FactorKind, _enum(FactorKind, "factor kind")] = FactorKind.MANIPULATED
    levels: list[Level] = Field(default_factory=list)
    dtype: Any = None
    default: Any = None
    metadata: dict[Any, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _non_blank(value, "Factor.name")

    @field_validator("levels")
    @classmethod
    def _unique_levels(cls, levels: list[Level], info: ValidationInfo) -> list[Level]:
        names = [level.name for level in levels]
        if len(names) != len(set(names)):
            duplicated = sorted({name for name in names if names.count(name) > 1})
            factor = info.data.get("name", "?")
            raise _problem(
                f"Factor '{factor}' has duplicate level names: {', '.join(duplicated)}.",
                "give every level of a factor its own name.",
            )
        return levels

    @model_validator(mode="after")
    def _levels(self) -> Factor:
        if not self.levels and self.default is None:
            raise _problem(
                f"Factor '{self.name}' must declare at least one level or a default value.",
                "add `levels: [{name: ..., value: ...}]` or a `default:`.",
            )
        return self

    def values(self) -> tuple[Any, ...]:
        """The values designs combine: the levels' values, else the single default."""
        if self.levels:
            return tuple(level.value for level in self.levels)
        return (self.default,)


class Block(_Model):
    name: Text
    levels: list[Any]
    metadata: dict[Any, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        return _non_blank(value, "Block.name")

    @field_validator("levels")
    @classmethod
    def _levels(cls, levels: list[Any]) -> list[Any]:
        if not levels:
            raise _problem(
                "Block must contain at least one level.",
                "list the block's levels, e.g. `levels: [morning, evening]`.",
            )
        return levels


class Constraint(_Model):
    constraint_id: Text
    description: Text = ""
    expression: str | None = None
    callable_ref: str | None = None
    severity: Any = "error"

    @field_validator("constraint_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _non_blank(value, "Constraint.constraint_id")

    @model_validator(mode="after")
    def _rule(self) -> Constraint:
        if self.expression is None and self.callable_ref is None:
            raise _problem(
                "Constraint must define either `expression` or `callable_ref`.",
                'add `expression: "..."` (e.g. `temperature < 1.0`).',
            )
        return self

    @property
    def is_error(self) -> bool:
        """Only the exact lower-case ``"error"`` makes a failing condition inadmissible."""
        return bool(self.severity == "error")


class DesignSpec(_Model):
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
        out["replicates"] = _to_int(data.get("replicates", 1))
        n_samples = data.get("n_samples", options.get("n_samples"))
        out["n_samples"] = None if n_samples is None else _to_int(n_samples)
        out["center_points"] = _to_int(data.get("center_points", options.get("center_points", 0)))
        out["block_randomization_key"] = data.get(
            "block_randomization_key", options.get("block_randomization_key")
        )
        return out

    @field_validator("kind", mode="before")
    @classmethod
    def _kind(cls, value: Any) -> DesignKind:
        raw_kind = _to_str(value)
        kind = _KIND_ALIASES.get(raw_kind.strip().lower())
        if kind is None:
            allowed = ", ".join(sorted(_KIND_ALIASES))
            raise _problem(f"Unsupported design kind: {raw_kind!r}.", f"use one of: {allowed}.")
        return kind

    @field_validator("replicates")
    @classmethod
    def _replicates(cls, value: int) -> int:
        if value < 1:
            raise _problem(
                "DesignSpec.replicates must be >= 1.",
                "set design_spec.replicates to 1 or more (it repeats design rows; run "
                "replicates are run_budget.replicates).",
            )
        return value

    @field_validator("n_samples")
    @classmethod
    def _n_samples(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise _problem("DesignSpec.n_samples must be >= 1 when provided.", "use 1 or more.")
        return value

    @field_validator("center_points")
    @classmethod
    def _center_points(cls, value: int) -> int:
        if value < 0:
            raise _problem("DesignSpec.center_points must be >= 0.", "use 0 or more.")
        return value


class RunBudget(BaseModel):
    """Built by keyword expansion upstream: unknown keys and non-integers are refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    replicates: StrictInt = 1
    max_runs: StrictInt | None = None
    parallelism: StrictInt = 1
    fail_fast: Flag = False

    @field_validator("replicates")
    @classmethod
    def _replicates(cls, value: int) -> int:
        if value < 1:
            raise _problem("RunBudget.replicates must be >= 1.", "set it to 1 or more.")
        return value

    @field_validator("parallelism")
    @classmethod
    def _parallelism(cls, value: int) -> int:
        if value < 1:
            raise _problem("RunBudget.parallelism must be >= 1.", "set it to 1 or more.")
        return value

    @field_validator("max_runs")
    @classmethod
    def _max_runs(cls, value: int | None) -> int | None:
        if value is not None and value < 1:
            raise _problem(
                "RunBudget.max_runs must be >= 1 when provided.",
                "set it to 1 or more, or remove it.",
            )
        return value


class SeedPolicy(BaseModel):
    """Hashed with the JSON types as written (``base_seed: "7"`` hashes as a string)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_seed: Any = 0
    strategy: Any = "condition_replicate"
    per_run_offset: Any = 9973


class OutcomeSpec(_Model):
    name: Text
    source_table: Text
    column: Text
    aggregation: Text
    derivation: Any = None
    primary: Flag = False
    expected_type: Text = "float"
    missing_data_policy: Text = "drop"
    description: Text = ""

    @field_validator("name", "source_table", "column")
    @classmethod
    def _non_blank(cls, value: str, info: Any) -> str:
        return _non_blank(value, f"OutcomeSpec.{info.field_name}")


class Moderator(_Model):
    name: Text
    levels: list[Any] = Field(default_factory=list)


class Mediator(_Model):
    name: Text
    description: Text = ""


class Contrast(_Model):
    label: Text = "contrast"
    left: Text
    right: Text
    operation: Text = "difference"


class Hypothesis(_Model):
    hypothesis_id: Text
    label: Text = Field(default="", validate_default=True)
    statement: Text = Field(default="", validate_default=True)
    kind: Annotated[HypothesisKind, _enum(HypothesisKind, "hypothesis kind")] = (
        HypothesisKind.EFFECT
    )
    independent_vars: list[Any] = Field(default_factory=list)
    dependent_vars: list[Any] = Field(default_factory=list)
    moderators: list[Moderator] = Field(default_factory=list)
    mediators: list[Mediator] = Field(default_factory=list)
    contrast: Contrast | None = None
    direction: Annotated[
        HypothesisDirection, _enum(HypothesisDirection, "hypothesis direction")
    ] = HypothesisDirection.DIFFERENT
    minimum_effect_of_interest: Any = None
    notes: Text = ""

    @field_validator("hypothesis_id", "label", "statement")
    @classmethod
    def _non_blank(cls, value: str, info: Any) -> str:
        return _non_blank(value, f"Hypothesis.{info.field_name}")


class AnalysisPlan(_Model):
    analysis_plan_id: Text
    hypothesis_ids: list[Any] = Field(default_factory=list)
    tests: list[Any] = Field(default_factory=list)
    outcomes: list[Any] = Field(default_factory=list)
    covariates: list[Any] = Field(default_factory=list)
    random_effects: list[Any] = Field(default_factory=list)
    filters: dict[Any, Any] = Field(default_factory=dict)
    multiple_comparison_policy: Text = "none"
    plots: list[Any] = Field(default_factory=list)
    export_tables: list[Any] = Field(default_factory=list)
    notes: Text = ""

    @field_validator("analysis_plan_id")
    @classmethod
    def _id(cls, value: str) -> str:
        return _non_blank(value, "AnalysisPlan.analysis_plan_id")

    @field_validator("hypothesis_ids")
    @classmethod
    def _hypotheses(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise _problem(
                "AnalysisPlan.hypothesis_ids must contain at least one hypothesis ID.",
                "list the hypotheses this plan tests.",
            )
        return value

    @field_validator("tests")
    @classmethod
    def _tests(cls, value: list[Any]) -> list[Any]:
        if not value:
            raise _problem(
                "AnalysisPlan.tests must contain at least one test family.",
                "name at least one test, e.g. `tests: [anova]`.",
            )
        return value


def _none_as_empty(value: Any) -> Any:
    return {} if value is None else value


class Study(_Model):
    """A study: the design-research-experiments fields in their upstream order, then studyq's."""

    study_id: Text
    title: Text = Field(default="", validate_default=True)
    description: Text = ""
    authors: list[Any] = Field(default_factory=list)
    rationale: Text = ""
    tags: list[Any] = Field(default_factory=list)
    hypotheses: list[Hypothesis] = Field(default_factory=list)
    factors: list[Factor] = Field(default_factory=list)
    blocks: list[Block] = Field(default_factory=list)
    constraints: list[Constraint] = Field(default_factory=list)
    design_spec: DesignSpec = Field(default_factory=DesignSpec)
    outcomes: list[OutcomeSpec] = Field(default_factory=list)
    analysis_plans: list[AnalysisPlan] = Field(default_factory=list)
    run_budget: Annotated[RunBudget, BeforeValidator(_none_as_empty)] = Field(
        default_factory=RunBudget
    )
    seed_policy: Annotated[SeedPolicy, BeforeValidator(_none_as_empty)] = Field(
        default_factory=SeedPolicy
    )
    output_dir: Any = None
    provenance_metadata: dict[Any, Any] = Field(default_factory=dict)
    notes: Text = ""
    problem_ids: list[Any] = Field(default_factory=list)
    agent_specs: list[Any] = Field(default_factory=list)
    bindings: Annotated[Bindings, BeforeValidator(_none_as_empty)] = Field(default_factory=Bindings)
    execution: Annotated[ExecutionPolicy, BeforeValidator(_none_as_empty)] = Field(
        default_factory=ExecutionPolicy
    )

    @field_validator("study_id")
    @classmethod
    def _study_id(cls, value: str) -> str:
        return _non_blank(value, "Study.study_id")

    @field_validator("title")
    @classmethod
    def _title(cls, value: str) -> str:
        return _non_blank(value, "Study.title")

    @field_validator("output_dir")
    @classmethod
    def _output_dir(cls, value: Any) -> Any:
        return str(value) if value else None

    @property
    def resolved_output_dir(self) -> Path:
        """``output_dir``, or the upstream default ``artifacts/<study_id>``."""
        return Path(self.output_dir) if self.output_dir else Path("artifacts") / self.study_id

    @property
    def standalone(self) -> bool:
        """A condition runner replaces the agent x problem fan-out (UPSTREAM.md 6.5)."""
        return self.bindings.runner is not None

    def to_upstream_dict(self) -> dict[str, Any]:
        """The study as the upstream writes study.yaml (UPSTREAM.md 3.5), plus studyq's sections
        when they are not the defaults."""
        payload: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        for name in type(self).model_fields:
            if name in {"bindings", "execution"}:
                continue
            value = getattr(self, name)
            if name == "output_dir":
                value = str(self.resolved_output_dir)
            payload[name] = to_jsonable(_plain(value))
        for name in ("bindings", "execution"):
            section = getattr(self, name)
            if section != type(section)():
                payload[name] = section.model_dump(mode="json")
        return payload

    def definition_hash(self) -> str:
        """Fingerprint of everything that can change what a run is or does."""
        return sha256_hex(canonical_json(self.to_upstream_dict()))


def _plain(value: Any) -> Any:
    """Models to dicts in field order, enums to their values, recursively."""
    if isinstance(value, BaseModel):
        return {name: _plain(getattr(value, name)) for name in type(value).model_fields}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


def parse_study(payload: dict[str, Any], source: str | None = None) -> Study:
    """Build a :class:`Study` from a mapping, or raise every problem in it at once."""
    import pydantic

    from orchestrator.contracts.errors import StudyValidationError
    from orchestrator.study.validation import (
        apply_legacy_outcome_roles,
        flatten,
        reference_problems,
        schema_problems,
    )

    payload = dict(payload)
    problems = apply_legacy_outcome_roles(payload)
    try:
        study = Study.model_validate(payload)
    except pydantic.ValidationError as exc:
        problems += schema_problems(exc)
        broken = {str(item["loc"][0]) for item in exc.errors() if item["loc"]}
        problems += reference_problems(_lenient(payload, broken), payload, skip=broken)
        raise StudyValidationError(flatten(problems), source) from None
    problems += reference_problems(study, payload)
    if problems:
        raise StudyValidationError(flatten(problems), source)
    return study


def _lenient(payload: dict[str, Any], broken: set[str]) -> Study:
    """The study without its broken sections, so cross-reference checks can still run and
    every problem is reported at once."""
    kept = {key: value for key, value in payload.items() if key not in broken}
    kept["study_id"] = kept.get("study_id") or "study"
    kept["title"] = kept.get("title") or "study"
    try:
        return Study.model_validate(kept)
    except Exception:  # a section broken only in combination: check nothing further
        return Study(study_id="study", title="study")


def load_study(path: str | Path, *, max_bytes: int | None = None) -> Study:
    """Read, parse and cross-check a study file (YAML via ``safe_load``, or JSON).

    ``max_bytes`` defaults to ``STUDYQ_MAX_STUDY_BYTES`` (10 MiB).
    """
    from orchestrator.contracts.settings import load_settings
    from orchestrator.study.studyfile import read_study_mapping

    limit = max_bytes if max_bytes is not None else load_settings().max_study_bytes
    return parse_study(read_study_mapping(path, max_bytes=limit), source=str(path))
