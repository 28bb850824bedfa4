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

__all__ = ["RunSpec", "SpecTexts", "spec_digest"]


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


_encode_message = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode
"""How a message body encodes a spec (``orchestrator.contracts.wire``)."""
_plain_str = json.encoder.encode_basestring  # what ``_encode_message`` writes for a str
_ascii_str = json.encoder.encode_basestring_ascii  # what ``_encode_canonical`` writes

_TEXTS_LIMIT = 10_000
"""Distinct shared values :class:`SpecTexts` keeps encoded; past this many it starts over."""


class SpecTexts:
    """The JSON texts of many specs' messages: the body text (``to_message()`` encoded as
    the wire encodes it) and :func:`spec_digest`, the same strings as encoding each
    ``to_message()`` whole, for a fraction of the work.

    The specs of one plan share their condition's assignment mappings and their agent and
    problem values (the same objects run after run), and encoding those was most of the cost
    of a message (about two thirds of a digest). Each shared value is encoded once, keyed by
    its identity (held, so the identity stays its own): callers must not mutate a spec's
    values between calls. A spec whose scalar fields are not plain ``str``/``int`` is
    encoded whole.
    """

    def __init__(self) -> None:
        self._known: dict[int, tuple[Any, str, str]] = {}

    def _shared(self, value: Any) -> tuple[str, str]:
        """``value`` converted as ``to_message`` converts it, encoded both ways."""
        kind = type(value)
        if kind is str:
            return _plain_str(value), _ascii_str(value)
        if kind is int or value is None:
            text = "null" if value is None else int.__repr__(value)
            return text, text
        known = self._known.get(id(value))
        if known is not None and known[0] is value:
            return known[1], known[2]
        if len(self._known) >= _TEXTS_LIMIT:
            self._known.clear()
        converted = to_jsonable(value)
        texts = (value, _encode_message(converted), _encode_canonical(converted))
        self._known[id(value)] = texts
        return texts[1], texts[2]

    def _plain(self, spec: RunSpec) -> bool:
        return (
            type(spec.study_id) is str
            and type(spec.run_id) is str
            and type(spec.condition_id) is str
            and type(spec.condition_fingerprint) is str
            and type(spec.replicate) is int
            and type(spec.seed) is int
            and type(spec.index) is int
        )

    def _values(self, spec: RunSpec, form: int) -> tuple[str, str, str, str]:
        """The agent, problem, factor and block texts: ``form`` 0 as the body writes them,
        1 as the digest does."""
        return (
            self._shared(spec.agent_id)[form],
            self._shared(spec.problem_id)[form],
            self._shared(spec.factor_assignments)[form],
            self._shared(spec.block_assignments)[form],
        )

    def message(self, spec: RunSpec) -> str:
        """``spec.to_message()`` as the run message's body encodes it."""
        if not self._plain(spec):
            return _encode_message(spec.to_message())
        agent, problem, factors, blocks = self._values(spec, 0)
        return (
            f'{{"study_id":{_plain_str(spec.study_id)},"run_id":{_plain_str(spec.run_id)},'
            f'"condition_id":{_plain_str(spec.condition_id)},"replicate":{spec.replicate},'
            f'"seed":{spec.seed},"agent_id":{agent},"problem_id":{problem},'
            f'"factor_assignments":{factors},"block_assignments":{blocks},'
            f'"index":{spec.index},'
            f'"condition_fingerprint":{_plain_str(spec.condition_fingerprint)}}}'
        )

    def digest(self, spec: RunSpec) -> str:
        """``spec_digest(spec.to_message())``."""
        if not self._plain(spec):
            return spec_digest(spec.to_message())
        agent, problem, factors, blocks = self._values(spec, 1)
        text = (  # the keys in sorted order, as ``_encode_canonical`` writes them
            f'{{"agent_id":{agent},"block_assignments":{blocks},'
            f'"condition_fingerprint":{_ascii_str(spec.condition_fingerprint)},'
            f'"condition_id":{_ascii_str(spec.condition_id)},"factor_assignments":{factors},'
            f'"index":{spec.index},"problem_id":{problem},"replicate":{spec.replicate},'
            f'"run_id":{_ascii_str(spec.run_id)},"seed":{spec.seed},'
            f'"study_id":{_ascii_str(spec.study_id)}}}'
        )
        return hashlib.sha256(text.encode("utf-8")).hexdigest()
