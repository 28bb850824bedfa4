"""What a study varies and restricts: factors and their levels, blocks, constraints."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import Field, ValidationInfo, field_validator, model_validator

from orchestrator.study._fields import (
    StudyModel,
    Text,
    enum_field,
    non_blank_fields,
    non_empty,
    problem,
)

__all__ = ["Block", "Constraint", "Factor", "FactorKind", "Level"]


class FactorKind(StrEnum):
    """Factor kinds; the kind never changes a design."""

    MANIPULATED = "manipulated"
    MEASURED = "measured"
    BLOCKED = "blocked"
    NUISANCE = "nuisance"


class Level(StudyModel):
    """One level of a factor; only ``value`` enters ids, never the name or label."""

    name: Text
    value: Any = None
    label: str | None = None
    metadata: dict[Any, Any] = Field(default_factory=dict)

    _non_blank = non_blank_fields("name")

    @model_validator(mode="after")
    def _default_label(self) -> Level:
        if self.label is None:
            object.__setattr__(self, "label", self.name)
        return self


class Factor(StudyModel):
    name: Text
    description: Text = ""
    kind: Annotated[FactorKind, enum_field(FactorKind, "factor kind")] = FactorKind.MANIPULATED
    levels: list[Level] = Field(default_factory=list)
    dtype: Any = None
    default: Any = None
    metadata: dict[Any, Any] = Field(default_factory=dict)

    _non_blank = non_blank_fields("name")

    @field_validator("levels")
    @classmethod
    def _unique_levels(cls, levels: list[Level], info: ValidationInfo) -> list[Level]:
        names = [level.name for level in levels]
        if len(names) != len(set(names)):
            duplicated = sorted({name for name in names if names.count(name) > 1})
            factor = info.data.get("name", "?")
            raise problem(
                f"Factor '{factor}' has duplicate level names: {', '.join(duplicated)}.",
                "give every level of a factor its own name.",
            )
        return levels

    @model_validator(mode="after")
    def _levels(self) -> Factor:
        if not self.levels and self.default is None:
            raise problem(
                f"Factor '{self.name}' must declare at least one level or a default value.",
                "add `levels: [{name: ..., value: ...}]` or a `default:`.",
            )
        return self

    def values(self) -> tuple[Any, ...]:
        """The values designs combine: the levels' values, else the single default."""
        if self.levels:
            return tuple(level.value for level in self.levels)
        return (self.default,)


class Block(StudyModel):
    name: Text
    levels: list[Any]
    metadata: dict[Any, Any] = Field(default_factory=dict)

    _non_blank = non_blank_fields("name")

    _levels = non_empty(
        "levels",
        "Block must contain at least one level.",
        "list the block's levels, e.g. `levels: [morning, evening]`.",
    )


class Constraint(StudyModel):
    constraint_id: Text
    description: Text = ""
    expression: str | None = None
    callable_ref: str | None = None
    severity: Any = "error"

    _non_blank = non_blank_fields("constraint_id")

    @model_validator(mode="after")
    def _rule(self) -> Constraint:
        if self.expression is None and self.callable_ref is None:
            raise problem(
                "Constraint must define either `expression` or `callable_ref`.",
                'add `expression: "..."` (e.g. `temperature < 1.0`).',
            )
        return self

    @property
    def is_error(self) -> bool:
        """Only the exact lower-case ``"error"`` makes a failing condition inadmissible."""
        return bool(self.severity == "error")
