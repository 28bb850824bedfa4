"""The study model: a study file as design-research-experiments 0.4.0 reads it, plus studyq's
``bindings`` and ``execution`` sections.

Every coercion here copies the upstream's (UPSTREAM.md section 3): names go through
``str()``, ``design_spec.randomize`` through ``bool()`` (so the string ``"false"`` is true),
``run_budget`` and ``seed_policy`` refuse unknown keys while everything else ignores them.
Those quirks decide which files load and what gets hashed, so they are kept on purpose.
What differs is reporting: every problem in a file is reported at once, with its field path
and a fix, instead of the first ``KeyError``.

The sections live by what they describe: :mod:`~orchestrator.study.factors` (factors, levels,
blocks, constraints), :mod:`~orchestrator.study.design_spec` (design, run budget, seeds) and
:mod:`~orchestrator.study.analysis` (outcomes, hypotheses, analysis plans); this module holds
the :class:`Study` that composes them, and the functions that load one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, Field, field_validator

from orchestrator.contracts.canonical import canonical_json, sha256_hex, to_jsonable
from orchestrator.contracts.extensions import Bindings, ExecutionPolicy
from orchestrator.study._fields import StudyModel, Text, non_blank_fields
from orchestrator.study.analysis import AnalysisPlan, Hypothesis, OutcomeSpec
from orchestrator.study.design_spec import DesignSpec, RunBudget, SeedPolicy
from orchestrator.study.factors import Block, Constraint, Factor

__all__ = ["SCHEMA_VERSION", "Study", "load_study", "parse_study"]

SCHEMA_VERSION = "0.2.0"


def _none_as_empty(value: Any) -> Any:
    return {} if value is None else value


class Study(StudyModel):
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

    _non_blank = non_blank_fields("study_id", "title")

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
                payload[name] = section.definition_dump()
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
