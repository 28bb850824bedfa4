"""``SpecTexts`` gives, character for character, what encoding each ``to_message()`` whole
gives (the body's spec and ``spec_digest``): for every run of real plans, for awkward values,
and after its memo starts over. A worker recomputes the digest from the decoded message, so
any difference would make every claim of a registered run fail."""

from __future__ import annotations

import json
from dataclasses import replace
from enum import IntEnum
from typing import Any

import pytest

from orchestrator.contracts import runspec
from orchestrator.contracts.runspec import RunSpec, SpecTexts, spec_digest
from orchestrator.contracts.wire import run_message
from orchestrator.study.model import parse_study
from orchestrator.study.plan import iter_run_specs

AWKWARD = 'tab\t"quote" back\\slash new\nline é 雪 \x01 \u2028 \U0001f600'
_encode = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False).encode


class Level(IntEnum):
    HIGH = 2


def _check(texts: SpecTexts, spec: RunSpec) -> None:
    message = spec.to_message()
    assert texts.message(spec) == _encode(message)
    assert texts.digest(spec) == spec_digest(message)


def _base(**fields: Any) -> RunSpec:
    values: dict[str, Any] = {
        "study_id": "s",
        "run_id": "run-1",
        "condition_id": "c",
        "replicate": 1,
        "seed": 7,
        "agent_id": "a",
        "problem_id": "p",
        "factor_assignments": {"x": 1},
        "block_assignments": {},
        "index": 0,
        "condition_fingerprint": "fp",
    }
    return RunSpec(**(values | fields))


@pytest.mark.parametrize(
    "fields",
    [
        {},
        {"study_id": AWKWARD, "run_id": AWKWARD, "condition_id": AWKWARD},
        {"condition_fingerprint": AWKWARD},
        {"agent_id": None, "problem_id": None},  # condition-runner mode
        {"agent_id": 3, "problem_id": 0},
        {"agent_id": True, "problem_id": 2.5},
        {"agent_id": ("a", 1), "problem_id": Level.HIGH},
        {"factor_assignments": {"b": 1.5, "a": {"z": [1, AWKWARD], "y": None}, 2: True}},
        {"factor_assignments": {AWKWARD: float("inf")}, "block_assignments": {"k": [None]}},
        {"replicate": True, "seed": Level.HIGH},  # not plain ints: encoded whole
        {"seed": 2**70, "index": 10**9},
    ],
)
def test_awkward_specs_encode_as_whole(fields: dict[str, Any]) -> None:
    _check(SpecTexts(), _base(**fields))


def test_every_run_of_real_plans_encodes_as_whole() -> None:
    study = parse_study(
        {
            "study_id": "texts",
            "title": "texts",
            "factors": [
                {
                    "name": "prompt",
                    "levels": [{"name": "t", "value": AWKWARD}, {"name": "v", "value": 2}],
                },
                {
                    "name": "temperature",
                    "levels": [{"name": "lo", "value": 0.1}, {"name": "hi", "value": 0.9}],
                },
            ],
            "agent_specs": ["agent-é", "b"],
            "problem_ids": ["p1", 7],
            "run_budget": {"replicates": 3},
        }
    )
    texts = SpecTexts()
    specs = list(iter_run_specs(study))
    assert len(specs) == 4 * 2 * 2 * 3
    for spec in specs:
        _check(texts, spec)


def test_the_memo_starts_over_and_stays_right(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runspec, "_TEXTS_LIMIT", 3)
    texts = SpecTexts()
    for i in range(20):
        spec = _base(factor_assignments={"x": i}, block_assignments={"b": [i]}, index=i)
        _check(texts, spec)
        _check(texts, replace(spec, run_id=f"run-{i}"))


@pytest.mark.parametrize("attempt", [0, 3])
def test_the_body_is_the_message_encoded_whole(attempt: int) -> None:
    spec = _base(agent_id=AWKWARD, factor_assignments={"t": 0.5, "p": AWKWARD})
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    expected = _encode([[], {"spec": spec.to_message(), "attempt": attempt}, embed])
    for texts in (None, SpecTexts()):
        parts = run_message(
            spec, attempt, label="l", origin="1@h", time_limit=[None, None], texts=texts
        )
        assert parts.body == expected
