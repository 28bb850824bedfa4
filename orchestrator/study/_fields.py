"""The upstream's coercions, as pydantic field types and validators the study model shares.

Names go through ``str()``, flags through ``bool()`` (so the string ``"false"`` is true), design
numbers through ``int()``; a problem is a pydantic error carrying its fix.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError


def to_str(value: Any) -> str:
    return value if isinstance(value, str) else str(value)


def to_bool(value: Any) -> bool:
    return bool(value)


def to_int(value: Any) -> Any:
    """``int()`` as upstream does for design-spec numbers; leave failures to pydantic."""
    if isinstance(value, bool | int):
        return int(value)
    try:
        return int(value)
    except (TypeError, ValueError):
        return value


Text = Annotated[str, BeforeValidator(to_str)]


Flag = Annotated[bool, BeforeValidator(to_bool)]


def problem(message: str, fix: str = "") -> PydanticCustomError:
    return PydanticCustomError("studyq", message, {"fix": fix})


def non_blank(value: str, label: str) -> str:
    if not value.strip():
        field = label.rsplit(".", 1)[-1]
        raise problem(f"{label} must be non-empty.", f"give `{field}` a non-blank value.")
    return value


def non_blank_fields(*fields: str) -> Any:
    """A validator refusing blank text in ``fields``, reported as ``<Model>.<field>``."""

    def check(cls: type[BaseModel], value: str, info: ValidationInfo) -> str:
        return non_blank(value, f"{cls.__name__}.{info.field_name}")

    return field_validator(*fields)(classmethod(check))


def at_least(field: str, minimum: int, message: str, fix: str) -> Any:
    """A validator refusing a number (when given) below ``minimum`` with upstream's message."""

    def check(cls: type[BaseModel], value: int | None) -> int | None:
        if value is not None and value < minimum:
            raise problem(message, fix)
        return value

    return field_validator(field)(classmethod(check))


def non_empty(field: str, message: str, fix: str) -> Any:
    """A validator refusing an empty list with upstream's message."""

    def check(cls: type[BaseModel], value: list[Any]) -> list[Any]:
        if not value:
            raise problem(message, fix)
        return value

    return field_validator(field)(classmethod(check))


class StudyModel(BaseModel):
    """Upstream ignores unknown keys almost everywhere; so do we (``validate`` warns)."""

    model_config = ConfigDict(extra="ignore", frozen=True, use_enum_values=False)


def enum_field(enum: type[StrEnum], label: str) -> BeforeValidator:
    allowed = ", ".join(member.value for member in enum)

    def convert(value: Any) -> Any:
        text = to_str(value)
        try:
            return enum(text)
        except ValueError:
            raise problem(f"'{text}' is not a valid {label}.", f"use one of: {allowed}.") from None

    return BeforeValidator(convert)
