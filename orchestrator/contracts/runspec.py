"""The run-spec contract: everything a worker needs to execute one run, and nothing more.

A :class:`RunSpec` travels from the planner to the store and, as a JSON message, to a worker.
Its ids and seed are computed exactly as design-research-experiments 0.4.0 computes them
(UPSTREAM.md section 6); nothing in it depends on the order runs are dispatched in.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from orchestrator.contracts.canonical import to_jsonable

__all__ = ["RunSpec", "spec_digest"]


@dataclass(frozen=True, slots=True)
class RunSpec:
    """One run of a study: a condition, a replicate, an agent and a problem.

    ``agent_id`` and ``problem_id`` keep the upstream's raw values: ``str(level value)`` when
    bound by a factor, the list entry as written (possibly an int) when taken from
    ``agent_specs`` / ``problem_ids``, and ``None`` for both in condition-runner mode.
    """

    study_id: str
    run_id: str
    condition_id: str
    replicate: int
    seed: int
    agent_id: Any
    problem_id: Any
    factor_assignments: dict[str, Any] = field(default_factory=dict)
    block_assignments: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    condition_fingerprint: str = ""

    @property
    def problem_key(self) -> str:
        """The upstream ``RunSpec.problem_id``: the problem id as text, ``""`` when falsy."""
        return str(self.problem_id) if self.problem_id else ""

    @property
    def agent_key(self) -> str:
        """The agent id as text (``""`` in condition-runner mode)."""
        return "" if self.agent_id is None else str(self.agent_id)

    def to_message(self) -> dict[str, Any]:
        """JSON-safe dict for the broker and the store (inverse of :meth:`from_message`)."""
        return {
            "study_id": self.study_id,
            "run_id": self.run_id,
            "condition_id": self.condition_id,
            "replicate": self.replicate,
            "seed": self.seed,
            "agent_id": to_jsonable(self.agent_id),
            "problem_id": to_jsonable(self.problem_id),
            "factor_assignments": to_jsonable(self.factor_assignments),
            "block_assignments": to_jsonable(self.block_assignments),
            "index": self.index,
            "condition_fingerprint": self.condition_fingerprint,
        }

    def digest(self) -> str:
        """:func:`spec_digest` of this spec's message."""
        return spec_digest(self.to_message())

    @classmethod
    def from_message(cls, message: dict[str, Any]) -> RunSpec:
        """Rebuild a spec from :meth:`to_message` output."""
        return cls(
            study_id=message["study_id"],
            run_id=message["run_id"],
            condition_id=message["condition_id"],
            replicate=int(message["replicate"]),
            seed=int(message["seed"]),
            agent_id=message.get("agent_id"),
            problem_id=message.get("problem_id"),
            factor_assignments=dict(message.get("factor_assignments") or {}),
            block_assignments=dict(message.get("block_assignments") or {}),
            index=int(message.get("index", 0)),
            condition_fingerprint=str(message.get("condition_fingerprint", "")),
        )


_encode_canonical = json.JSONEncoder(
    sort_keys=True, separators=(",", ":"), ensure_ascii=True
).encode
"""``canonical_json`` for values that are JSON already, without its conversion pass."""


def spec_digest(message: dict[str, Any]) -> str:
    """SHA-256 of a run message's canonical JSON: stored with the run at registration and
    recomputed by the worker from the message it received, so a claim only wins when the
    message carries exactly the registered spec (a tampered seed, assignment, agent or id
    changes the digest, and the run is neither claimed nor executed).

    ``message`` holds JSON values only (``to_message()`` output, or a decoded message), so
    the conversion pass of :func:`~orchestrator.contracts.canonical.canonical_json` is skipped: it
    cost two thirds of the digest, computed once per run at registration and per delivery.
    """
    return hashlib.sha256(_encode_canonical(message).encode("utf-8")).hexdigest()
