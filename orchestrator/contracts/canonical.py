"""Canonical JSON and short hashed identifiers, byte-compatible with design-research-experiments.

Every id studyq computes (condition ids, run ids, seeds) goes through :func:`canonical_json`,
so a study planned here and planned by the upstream package gets the same ids. The rules are
Python's own ``json.dumps`` with sorted keys, compact separators and ASCII escapes, applied
after :func:`to_jsonable` (UPSTREAM.md sections 1-2): do not "improve" them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from enum import Enum
from pathlib import Path
from typing import Any

__all__ = ["canonical_json", "derive_seed", "hash_identifier", "sha256_hex", "to_jsonable"]

_SEED_MODULUS = 2**31 - 1


def to_jsonable(value: Any) -> Any:
    """Convert a value to JSON types exactly as the upstream ``to_jsonable`` does.

    Order matters: ``bool`` must stay ``true`` (checked with ``int``), dict keys become
    ``str(key)`` (so ``True`` -> ``"True"``), and unknown objects (dates) become ``str(value)``.
    """
    if value is None:
        return None
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, str | int | float | bool):
        return value
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, dict):
        return {str(key): to_jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [to_jsonable(item) for item in value]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return to_jsonable(dataclasses.asdict(value))
    return str(value)


def canonical_json(value: Any) -> str:
    """Serialize ``value`` as the upstream ``stable_json_dumps`` does."""
    return json.dumps(to_jsonable(value), sort_keys=True, separators=(",", ":"), ensure_ascii=True)


def sha256_hex(text: str) -> str:
    """Lowercase hex SHA-256 of the UTF-8 bytes of ``text``."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def hash_identifier(prefix: str, payload: Any, *, length: int = 12) -> str:
    """``prefix-<first 12 hex chars of sha256(canonical_json(payload))>``."""
    return f"{prefix}-{sha256_hex(canonical_json(payload))[:length]}"


def derive_seed(
    *,
    base_seed: Any,
    strategy: Any,
    per_run_offset: Any,
    study_id: str,
    condition_id: str,
    replicate: int,
    salt: str,
) -> int:
    """Per-run seed: the first 64 bits of the payload hash, modulo 2**31 - 1 (UPSTREAM 6.3)."""
    payload = {
        "base_seed": base_seed,
        "strategy": strategy,
        "per_run_offset": per_run_offset,
        "study_id": study_id,
        "condition_id": condition_id,
        "replicate": replicate,
        "salt": salt,
    }
    return int(sha256_hex(canonical_json(payload))[:16], 16) % _SEED_MODULUS
