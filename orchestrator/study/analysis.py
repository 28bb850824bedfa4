"""What a study measures and tests: outcomes, hypotheses, analysis plans (recorded, never run)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field

from orchestrator.study._fields import (
    Flag,
    StudyModel,
    Text,
    enum_field,
    non_blank_fields,
    non_empty,
)

__all__ = ["AnalysisPlan", "Hypothesis", "OutcomeSpec"]


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


class OutcomeSpec(StudyModel):
    name: Text
    source_table: Text
    column: Text
    aggregation: Text
    derivation: Any = None
    primary: Flag = False
    expected_type: Text = "float"
    missing_data_policy: Text = "drop"
    description: Text = ""

    _non_blank = non_blank_fields("name", "source_table", "column")


class Moderator(StudyModel):
    name: Text
    levels: list[Any] = Field(default_factory=list)


class Mediator(StudyModel):
    name: Text
    description: Text = ""


class Contrast(StudyModel):
    label: Text = "contrast"
    left: Text
    right: Text
    operation: Text = "difference"


class Hypothesis(StudyModel):
    hypothesis_id: Text
    label: Text = Field(default="", validate_default=True)
    statement: Text = Field(default="", validate_default=True)
    kind: Annotated[HypothesisKind, enum_field(HypothesisKind, "hypothesis kind")] = (
        HypothesisKind.EFFECT
    )
    independent_vars: list[Any] = Field(default_factory=list)
    dependent_vars: list[Any] = Field(default_factory=list)
    moderators: list[Moderator] = Field(default_factory=list)
    mediators: list[Mediator] = Field(default_factory=list)
    contrast: Contrast | None = None
    direction: Annotated[
        HypothesisDirection, enum_field(HypothesisDirection, "hypothesis direction")
    ] = HypothesisDirection.DIFFERENT
    minimum_effect_of_interest: Any = None
    notes: Text = ""

    _non_blank = non_blank_fields("hypothesis_id", "label", "statement")


class AnalysisPlan(StudyModel):
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

    _non_blank = non_blank_fields("analysis_plan_id")

    _hypotheses = non_empty(
        "hypothesis_ids",
        "AnalysisPlan.hypothesis_ids must contain at least one hypothesis ID.",
        "list the hypotheses this plan tests.",
    )
    _tests = non_empty(
        "tests",
        "AnalysisPlan.tests must contain at least one test family.",
        "name at least one test, e.g. `tests: [anova]`.",
    )
