"""The run plan: fast ids equal the reference hashes, dispatch orders, counts and streaming.

``orchestrator.study.plan`` assembles the canonical JSON of the run-id and seed payloads from
pre-serialized parts instead of calling :func:`orchestrator.contracts.canonical.hash_identifier` and
:func:`orchestrator.contracts.canonical.derive_seed` per run. These tests pin that shortcut to the
reference functions over thousands of randomized studies, and re-derive the upstream plan
order (UPSTREAM.md 6.1) with plain nested loops.

The published worked example (UPSTREAM.md 6.3: ``cond-d3c8e8a79055`` -> ``run-6a65a0bce80f``,
seed 750557790) is pinned, by hand and through the planner, in
``tests/test_golden.py::test_worked_example_hashes_by_hand`` and
``::test_worked_example_golden_and_studyq``; here it is only checked that a dispatch order
keeps it.
"""

from __future__ import annotations

import datetime
import inspect
import itertools
import math
import random
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from orchestrator.contracts.canonical import canonical_json, derive_seed, hash_identifier
from orchestrator.contracts.runspec import RunSpec
from orchestrator.study.designs import Condition, build_conditions
from orchestrator.study.model import Study, parse_study
from orchestrator.study.plan import iter_run_specs, plan_cells, summarize

# --- helpers ---------------------------------------------------------------------------------

_AGENT_FACTORS = ("agent_id", "agent", "agent_spec")
_PROBLEM_FACTORS = ("problem_id", "problem")


def _study(**fields: Any) -> Study:
    payload: dict[str, Any] = {"study_id": "plan-test", "title": "Plan test"}
    payload.update(fields)
    return parse_study(payload)


def _condition(factors: dict[str, Any], *, admissible: bool = True) -> Condition:
    payload = {"factors": factors, "blocks": {}}
    return Condition(
        condition_id=hash_identifier("cond", payload),
        factor_assignments=dict(factors),
        block_assignments={},
        metadata={"fingerprint": canonical_json(payload)},
        admissible=admissible,
    )


def _grid(levels: int, factors: int = 2) -> list[Condition]:
    names = [f"f{index}" for index in range(factors)]
    return [
        _condition(dict(zip(names, combination, strict=True)))
        for combination in itertools.product(range(levels), repeat=factors)
    ]


def _bound(
    condition: Condition, names: Sequence[str], listed: Sequence[Any], default: str
) -> list[Any]:
    for name in names:
        if name in condition.factor_assignments:
            return [str(condition.factor_assignments[name])]
    return list(listed) if listed else [default]


def _reference_plan(study: Study, conditions: Sequence[Condition]) -> list[dict[str, Any]]:
    """UPSTREAM.md 6.1-6.3 written out with the reference hash functions, no shortcuts."""
    policy = study.seed_policy
    runs = []
    for condition in conditions:
        if not condition.admissible:
            continue
        if study.standalone:
            agents: list[Any] = [None]
            problems: list[Any] = [None]
        else:
            agents = _bound(condition, _AGENT_FACTORS, study.agent_specs, "default-agent")
            problems = _bound(condition, _PROBLEM_FACTORS, study.problem_ids, "default-problem")
        for replicate in range(1, study.run_budget.replicates + 1):
            for agent in agents:
                for problem in problems:
                    run_payload = {
                        "study_id": study.study_id,
                        "condition_id": condition.condition_id,
                        "replicate": replicate,
                        "agent_id": agent,
                        "problem_id": problem,
                    }
                    runs.append(
                        {
                            "run_id": hash_identifier("run", run_payload),
                            "condition_id": condition.condition_id,
                            "replicate": replicate,
                            "agent_id": _typed(agent),
                            "problem_id": _typed(problem),
                            "seed": derive_seed(
                                base_seed=policy.base_seed,
                                strategy=policy.strategy,
                                per_run_offset=policy.per_run_offset,
                                study_id=study.study_id,
                                condition_id=condition.condition_id,
                                replicate=replicate,
                                salt=f"{agent}:{problem}",
                            ),
                        }
                    )
    if study.run_budget.max_runs is not None:
        runs = runs[: study.run_budget.max_runs]
    return runs


def _typed(value: Any) -> str:
    # 1 == 1.0 == True and nan != nan in Python, but they hash differently / fine: compare
    # type and repr instead of values.
    return f"{type(value).__name__}:{value!r}"


def _view(spec: RunSpec) -> dict[str, Any]:
    return {
        "run_id": spec.run_id,
        "condition_id": spec.condition_id,
        "replicate": spec.replicate,
        "agent_id": _typed(spec.agent_id),
        "problem_id": _typed(spec.problem_id),
        "seed": spec.seed,
    }


# --- randomized inputs -----------------------------------------------------------------------

_TEXT_POOL = (
    "abcxyz ABC-_.:/0123456789"
    '"\\\n\t\r\b\f\x00\x1f\x7f'
    "éÅßøñ\u0301\u2028\u2029\u00a0\ufeff\uffff"
    "λΩжשعह中文日本語한"
    "🚀🧪\U0001d518\U0010ffff"
)


def _text(rng: random.Random, max_length: int = 12) -> str:
    return "".join(rng.choices(_TEXT_POOL, k=rng.randint(1, max_length)))


def _float(rng: random.Random) -> float:
    return rng.choice(
        [
            0.1,
            -0.0,
            1.0,
            1e-7,
            1e16,
            1e300,
            0.30000000000000004,
            math.inf,
            -math.inf,
            math.nan,
            rng.uniform(-1e6, 1e6),
            rng.random(),
        ]
    )


def _scalar(rng: random.Random) -> Any:
    kind = rng.randrange(8)
    if kind == 5:  # YAML dates: hashed as str(), "2024-01-02 03:04:05" with a space
        day = datetime.date(2024, 1, 1) + datetime.timedelta(days=rng.randrange(400))
        return day if rng.random() < 0.5 else datetime.datetime(day.year, day.month, day.day, 3)
    if kind == 0:
        return rng.randint(-(10**20), 10**20)
    if kind == 1:
        return rng.randint(0, 20)
    if kind == 2:
        return _float(rng)
    if kind == 3:
        return rng.choice([True, False])
    if kind == 4:
        return None
    return _text(rng)


def _seed_value(rng: random.Random) -> Any:
    kind = rng.randrange(6)
    if kind == 0:
        return rng.randint(-(2**70), 2**70)
    if kind == 1:
        return str(rng.randint(0, 10**6))
    if kind == 2:
        return None
    if kind == 3:
        return _float(rng)
    if kind == 4:
        return {_text(rng, 4): _scalar(rng), rng.randint(0, 9): [_scalar(rng), _scalar(rng)]}
    return [_scalar(rng), {"nested": _scalar(rng)}]


def _ids(rng: random.Random) -> list[Any]:
    # Entries of agent_specs / problem_ids are used as given: ints, floats, None, text, dicts.
    return [
        rng.choice([_scalar(rng), _text(rng), {"name": _text(rng, 4), "v": _scalar(rng)}])
        for _ in range(rng.randint(0, 3))
    ]


def _random_case(rng: random.Random) -> tuple[Study, list[Condition]]:
    conditions = []
    for _ in range(rng.randint(1, 3)):
        factors: dict[str, Any] = {_text(rng, 5): _scalar(rng)}
        roll = rng.random()
        if roll < 0.25:
            factors[rng.choice(_AGENT_FACTORS)] = _scalar(rng)
        if 0.15 < roll < 0.4:
            factors[rng.choice(_PROBLEM_FACTORS)] = _scalar(rng)
        condition = _condition(factors, admissible=rng.random() > 0.15)
        if rng.random() < 0.2:
            condition.condition_id = _text(rng)  # ids are opaque text to the run hash
        conditions.append(condition)
    budget: dict[str, Any] = {"replicates": rng.randint(1, 2)}
    agent_specs, problem_ids = _ids(rng), _ids(rng)
    if rng.random() < 0.3:
        # validate_study refuses max_runs below one condition's problems x agents x replicates
        one_condition = max(1, len(agent_specs)) * max(1, len(problem_ids)) * budget["replicates"]
        budget["max_runs"] = one_condition + rng.randint(0, 20)
    seed_policy = {"base_seed": _seed_value(rng)}
    if rng.random() < 0.3:
        seed_policy["strategy"] = rng.choice([_text(rng), 3, None])
    if rng.random() < 0.3:
        seed_policy["per_run_offset"] = rng.choice([_scalar(rng), "9973", 9973.0])
    fields: dict[str, Any] = {
        "study_id": "s" + _text(rng, 20),  # blank ids are refused
        "agent_specs": agent_specs,
        "problem_ids": problem_ids,
        "run_budget": budget,
        "seed_policy": seed_policy,
    }
    if rng.random() < 0.1:
        fields["bindings"] = {"runner": "sims.model:run_condition"}
    return _study(**fields), conditions


_CASES = 2_000


def test_fast_ids_and_seeds_equal_the_reference_hashes_on_random_studies() -> None:
    """Given 2,000 random studies (unicode study ids; int, float, None, date, text and dict
    agent and problem ids; factor-bound agents and problems; str/None/float/int/dict base
    seeds; max_runs; inadmissible conditions; condition runners), when planned, then every
    run id, seed and position equals the reference ``hash_identifier``/``derive_seed`` plan."""
    rng = random.Random(20261129)
    compared = 0
    for case in range(_CASES):
        study, conditions = _random_case(rng)

        expected = _reference_plan(study, conditions)
        actual = list(iter_run_specs(study, conditions))

        assert [_view(spec) for spec in actual] == expected, f"case {case}: {study.study_id!r}"
        assert [spec.index for spec in actual] == list(range(len(actual)))
        compared += len(actual)
    assert compared > 5 * _CASES  # the generator does produce runs, not mostly empty plans


def test_factor_bound_agents_and_problems_are_str_of_the_level_value() -> None:
    """Given agent and problem factors with int, float, bool and None values, then their ids
    are Python ``str()`` of the value (``1.0`` -> ``"1.0"``, ``True`` -> ``"True"``) and they
    override ``agent_specs`` / ``problem_ids`` for the fan-out."""
    study = _study(agent_specs=["a1", "a2"], problem_ids=[7, 8])
    conditions = [
        _condition({"agent": 1.0, "problem_id": True}),
        _condition({"agent_spec": None, "x": 1}),
        _condition({"agent_id": 2, "agent": "ignored", "problem": None}),
    ]

    pairs = [(spec.agent_id, spec.problem_id) for spec in iter_run_specs(study, conditions)]

    assert pairs == [("1.0", "True"), ("None", 7), ("None", 8), ("2", "None")]


def test_standalone_mode_has_no_agent_or_problem_and_salt_none_none() -> None:
    """Given ``bindings.runner``, then one run per condition x replicate with agent_id and
    problem_id None, hashed as JSON null, and the seed salted with ``"None:None"``."""
    study = _study(
        bindings={"runner": "sims.model:run_condition"},
        agent_specs=["ignored-agent"],
        problem_ids=["p1", "p2"],
        run_budget={"replicates": 2},
        seed_policy={"base_seed": 11},
    )
    conditions = _grid(2)

    specs = list(iter_run_specs(study, conditions))

    assert len(specs) == len(conditions) * 2
    first = specs[0]
    assert (first.agent_id, first.problem_id) == (None, None)
    assert first.agent_key == "" and first.problem_key == ""
    assert first.run_id == hash_identifier(
        "run",
        {
            "agent_id": None,
            "condition_id": first.condition_id,
            "problem_id": None,
            "replicate": 1,
            "study_id": "plan-test",
        },
    )
    assert first.seed == derive_seed(
        base_seed=11,
        strategy="condition_replicate",
        per_run_offset=9973,
        study_id="plan-test",
        condition_id=first.condition_id,
        replicate=1,
        salt="None:None",
    )


def test_standalone_can_be_forced_for_a_study_without_runner() -> None:
    """Given ``standalone=True`` (the API's ``condition_runner=``) on a study with agents and
    problems, then the same specs and counts as a study naming ``bindings.runner``."""
    fields: dict[str, Any] = {
        "agent_specs": ["a"],
        "problem_ids": ["p1", "p2"],
        "run_budget": {"replicates": 2},
    }
    plain = _study(**fields)
    with_runner = _study(bindings={"runner": "sims.model:run_condition"}, **fields)
    conditions = _grid(2)

    forced = list(iter_run_specs(plain, conditions, standalone=True))

    assert forced == list(iter_run_specs(with_runner, conditions))
    assert summarize(plain, conditions, standalone=True).by_agent == Counter({"": 8})
    assert len(list(iter_run_specs(plain, conditions))) == 16


def test_plan_order_is_condition_replicate_agent_problem_then_cut() -> None:
    """Given inadmissible conditions and a max_runs that cuts inside a replicate, then plan
    order skips the inadmissible ones and keeps exactly the first max_runs runs."""
    conditions = _grid(3)
    conditions[1].admissible = False
    study = _study(
        agent_specs=["a", "b"], problem_ids=["p", "q", "r"], run_budget={"replicates": 2}
    )
    full = list(iter_run_specs(study, conditions))
    cut_study = _study(
        agent_specs=["a", "b"],
        problem_ids=["p", "q", "r"],
        run_budget={"replicates": 2, "max_runs": 17},
    )

    cut = list(iter_run_specs(cut_study, conditions))

    assert len(full) == 8 * 2 * 2 * 3
    assert conditions[1].condition_id not in {spec.condition_id for spec in full}
    head = [(s.condition_id, s.replicate, s.agent_id, s.problem_id) for s in full[:7]]
    c0 = conditions[0].condition_id
    assert head == [
        (c0, 1, "a", "p"),
        (c0, 1, "a", "q"),
        (c0, 1, "a", "r"),
        (c0, 1, "b", "p"),
        (c0, 1, "b", "q"),
        (c0, 1, "b", "r"),
        (c0, 2, "a", "p"),
    ]
    assert [spec.run_id for spec in cut] == [spec.run_id for spec in full[:17]]


def test_unknown_order_is_refused() -> None:
    """Given an order name that does not exist, then iteration fails with the valid names."""
    with pytest.raises(ValueError, match="balanced"):
        list(iter_run_specs(_study(), _grid(2), order="random"))


# --- balanced dispatch order -----------------------------------------------------------------


def _balanced_study(base_seed: Any = 3, max_runs: int | None = None) -> Study:
    budget: dict[str, Any] = {"replicates": 4}
    if max_runs is not None:
        budget["max_runs"] = max_runs
    return _study(
        agent_specs=["a", "b"],
        problem_ids=["p", "q", "r"],
        run_budget=budget,
        seed_policy={"base_seed": base_seed},
    )


def _key(spec: RunSpec) -> tuple[Any, ...]:
    return (spec.index, spec.run_id, spec.seed, spec.replicate, spec.condition_id)


def test_balanced_is_a_permutation_of_plan_order_with_the_same_ids() -> None:
    """Given a study, then balanced order yields exactly the plan's specs (same ids, seeds and
    plan positions in ``index``), only in another order."""
    study, conditions = _balanced_study(), _grid(3)
    plan = list(iter_run_specs(study, conditions))

    balanced = list(iter_run_specs(study, conditions, order="balanced"))

    assert len(balanced) == len(plan) == 9 * 4 * 6
    assert sorted(balanced, key=lambda spec: spec.index) == plan
    assert [spec.index for spec in balanced] != [spec.index for spec in plan]


def test_balanced_emits_every_replicate_before_the_next() -> None:
    """Given 4 replicates, then all of replicate r is dispatched before any of r + 1, and each
    replicate holds every cell once."""
    study, conditions = _balanced_study(), _grid(3)

    balanced = list(iter_run_specs(study, conditions, order="balanced"))

    replicates = [spec.replicate for spec in balanced]
    assert replicates == sorted(replicates)
    per_replicate = Counter(replicates)
    assert set(per_replicate.values()) == {9 * 6}
    for replicate in range(1, 5):
        cells = {
            (spec.condition_id, spec.agent_id, spec.problem_id)
            for spec in balanced
            if spec.replicate == replicate
        }
        assert len(cells) == 9 * 6


@pytest.mark.parametrize("base_seed", [3, None, "7", {"k": [1, 2.5]}])
def test_balanced_is_deterministic(base_seed: Any) -> None:
    """Given the same study twice (even with ``base_seed: null``), then the same order."""
    conditions = _grid(3)
    first = [
        _key(spec)
        for spec in iter_run_specs(_balanced_study(base_seed), conditions, order="balanced")
    ]
    again = [
        _key(spec)
        for spec in iter_run_specs(_balanced_study(base_seed), conditions, order="balanced")
    ]

    assert first == again


def test_balanced_order_depends_on_base_seed() -> None:
    """Given two base seeds, then the dispatch orders (plan positions) differ."""
    conditions = _grid(3)
    orders = {
        tuple(
            spec.index
            for spec in iter_run_specs(_balanced_study(seed), conditions, order="balanced")
        )
        for seed in (1, 2, "1", None)
    }

    assert len(orders) == 4


@pytest.mark.parametrize("max_runs", [24, 25, 31, 54, 55, 100, 215, 216, 10_000])
def test_balanced_with_max_runs_keeps_exactly_the_plans_first_runs(max_runs: int) -> None:
    """Given max_runs (inside a cell, on a replicate edge, beyond the plan), then balanced
    dispatches exactly the runs plan order keeps, still replicate by replicate."""
    study, conditions = _balanced_study(max_runs=max_runs), _grid(3)
    plan = list(iter_run_specs(study, conditions))

    balanced = list(iter_run_specs(study, conditions, order="balanced"))

    assert len(plan) == min(max_runs, 216)
    assert sorted(map(_key, balanced)) == sorted(map(_key, plan))
    replicates = [spec.replicate for spec in balanced]
    assert replicates == sorted(replicates)


def test_dispatch_order_keeps_the_worked_example_ids() -> None:
    """Given the UPSTREAM.md 6.3 study, then its first plan run keeps its id and seed when
    dispatched in balanced order."""
    study = parse_study(
        {
            "study_id": "ff-3factor",
            "title": "Three-factor full factorial",
            "factors": [
                {
                    "name": "prompt_style",
                    "levels": [
                        {"name": "n", "value": "neutral"},
                        {"name": "p", "value": "persuasive"},
                    ],
                },
                {
                    "name": "temperature",
                    "levels": [{"name": "l", "value": 0.2}, {"name": "h", "value": 0.8}],
                },
                {
                    "name": "max_steps",
                    "levels": [{"name": "s", "value": 4}, {"name": "l", "value": 8}],
                },
            ],
            "problem_ids": ["beam-design"],
            "seed_policy": {"base_seed": 7},
        }
    )
    conditions = build_conditions(study)

    balanced = {spec.run_id: spec for spec in iter_run_specs(study, conditions, order="balanced")}

    example = balanced["run-6a65a0bce80f"]
    assert (example.index, example.condition_id, example.seed) == (
        0,
        "cond-d3c8e8a79055",
        750557790,
    )


# --- summarize -------------------------------------------------------------------------------


def _counted(specs: Sequence[RunSpec]) -> tuple[Counter[str], Counter[str], Counter[str]]:
    return (
        Counter(spec.condition_id for spec in specs),
        Counter("" if spec.agent_id is None else str(spec.agent_id) for spec in specs),
        Counter("" if spec.problem_id is None else str(spec.problem_id) for spec in specs),
    )


@pytest.mark.parametrize("max_runs", [None, 12, 13, 17, 23, 31, 33, 34, 1_000])
def test_summarize_counts_equal_the_specs(max_runs: int | None) -> None:
    """Given factor-bound and listed agents, inadmissible conditions, duplicate condition ids
    and a max_runs that cuts in the middle of a cell, then summarize's counts equal counts
    taken by iterating the specs, without iterating them."""
    conditions = [
        _condition({"agent": "solo", "x": 1}),
        _condition({"x": 2}),
        _condition({"x": 3}, admissible=False),
        _condition({"x": 2}),  # duplicate level values -> duplicate condition id
        _condition({"problem": 9, "x": 4}),
    ]
    budget: dict[str, Any] = {"replicates": 2}
    if max_runs is not None:
        budget["max_runs"] = max_runs
    study = _study(agent_specs=["a", 2], problem_ids=["p", "q", "r"], run_budget=budget)
    specs = list(iter_run_specs(study, conditions))

    summary = summarize(study, conditions)

    by_condition, by_agent, by_problem = _counted(specs)
    assert summary.planned == len(specs)
    assert summary.total_before_cut == 2 * (3 + 6 + 6 + 2)
    assert summary.cut == summary.total_before_cut - len(specs)
    assert (summary.conditions, summary.admissible) == (5, 4)
    assert summary.by_condition == by_condition
    assert summary.by_agent == by_agent
    assert summary.by_problem == by_problem


def test_summarize_standalone_counts_under_the_empty_name() -> None:
    """Given a condition runner, then runs are counted under agent "" and problem ""."""
    study = _study(bindings={"runner": "sims.model:run"}, run_budget={"replicates": 3})
    conditions = _grid(2)

    summary = summarize(study, conditions)

    assert summary.by_agent == Counter({"": 12})
    assert summary.by_problem == Counter({"": 12})
    assert summary.by_agent == _counted(list(iter_run_specs(study, conditions)))[1]


# --- streaming -------------------------------------------------------------------------------


def _planned(study: Study, conditions: Sequence[Condition]) -> int:
    cells = plan_cells(study, conditions)
    return sum(study.run_budget.replicates * cell.runs_per_replicate for cell in cells)


def test_first_runs_of_a_hundred_million_run_plan_come_instantly() -> None:
    """Given a 10^8-run study (1,000 conditions x 100 replicates x 10 agents x 100 problems),
    then the first 10 runs of plan order, and of balanced order on a 10^8-run study with
    10^5 replicates, arrive in well under a second: specs are generated, never collected."""
    conditions = _grid(10, factors=3)
    study = _study(
        agent_specs=[f"agent-{i}" for i in range(10)],
        problem_ids=[f"problem-{i}" for i in range(100)],
        run_budget={"replicates": 100},
    )
    assert _planned(study, conditions) == 10**8

    started = time.perf_counter()
    specs = iter_run_specs(study, conditions)
    first = list(itertools.islice(specs, 10))
    elapsed = time.perf_counter() - started

    assert inspect.isgenerator(specs)
    assert [spec.index for spec in first] == list(range(10))
    assert elapsed < 1.0

    balanced_study = _study(
        agent_specs=["a1", "a2"],
        problem_ids=["p1", "p2", "p3", "p4", "p5"],
        run_budget={"replicates": 100_000},
    )
    conditions_100 = _grid(10)
    assert _planned(balanced_study, conditions_100) == 10**8
    started = time.perf_counter()
    first = list(
        itertools.islice(iter_run_specs(balanced_study, conditions_100, order="balanced"), 10)
    )
    elapsed = time.perf_counter() - started

    assert {spec.replicate for spec in first} == {1}
    assert elapsed < 1.0
