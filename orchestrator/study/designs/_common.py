"""What every design family shares: its errors, its shuffles, block combinations, and the
condition of one design row."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TypeGuard

from orchestrator.contracts.canonical import canonical_json, hash_identifier
from orchestrator.contracts.conditions import Condition
from orchestrator.contracts.errors import Problem, StudyValidationError
from orchestrator.study.model import Study

if TYPE_CHECKING:
    from orchestrator.study.designs._checker import ConstraintChecker


def seeded_rng(seed: Any) -> random.Random:
    """``random.Random(base_seed)``, as the upstream shuffles; unusable seeds are a problem."""
    try:
        return random.Random(seed)
    except TypeError:
        raise fail(
            "seed_policy.base_seed",
            f"base_seed {seed!r} ({type(seed).__name__}) cannot seed a shuffle.",
            "use an integer (or a string) base_seed.",
        ) from None


def fail(field_name: str, message: str, fix: str = "") -> StudyValidationError:
    return StudyValidationError([Problem(field_name, message, fix)])


def counterbalance(conditions: Sequence[Condition]) -> list[Condition]:
    """Even positions, then odd positions reversed (``[a,b,c,d,e]`` -> ``[a,c,e,d,b]``)."""
    ordered = list(conditions)
    if len(ordered) < 3:
        return ordered
    return ordered[::2] + ordered[1::2][::-1]


def block_assignments(study: Study) -> list[dict[str, Any]]:
    if not study.blocks:
        return [{}]
    names = [block.name for block in study.blocks]
    return [
        dict(zip(names, combination, strict=True))
        for combination in itertools.product(*(block.levels for block in study.blocks))
    ]


def row_condition(
    factors: dict[str, Any],
    blocks: dict[str, Any],
    row_metadata: dict[str, Any],
    checker: ConstraintChecker,
) -> Condition:
    admissible, messages = checker.check(factors, blocks)
    return Condition(
        condition_id=hash_identifier(
            "cond", {"factors": factors, "blocks": blocks, "metadata": row_metadata}
        ),
        factor_assignments=dict(factors),
        block_assignments=dict(blocks),
        metadata={
            **row_metadata,
            "fingerprint": canonical_json({"factors": factors, "blocks": blocks}),
        },
        admissible=admissible,
        constraint_messages=messages,
    )


def is_numeric(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, int | float) and not isinstance(value, bool)
