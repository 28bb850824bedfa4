"""The built-in demo agents and problems: valid designs, seeds that matter, determinism across
processes (including the agent that draws from the global RNGs), and the helper agents."""

from __future__ import annotations

import json
import random
import sys
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from orchestrator.contracts.results import ErrorKind, RunStatus
from orchestrator.contracts.runspec import RunSpec
from workers.bindings import Resolver
from workers.demo import agents
from workers.demo.problems import DesignProblem, beam_design, spring_design
from workers.execution import execute_run

SpecFactory = Callable[..., RunSpec]
SEARCH_AGENTS = ["random-search", "hill-climb", "annealing"]
DESIGN_PROBLEMS = ["beam-design", "spring-design"]


@pytest.fixture(scope="module")
def resolver() -> Resolver:
    return Resolver()


@pytest.mark.parametrize("problem_id", DESIGN_PROBLEMS)
@pytest.mark.parametrize("agent_id", SEARCH_AGENTS)
def test_search_agents_return_designs_within_bounds(
    make_spec: SpecFactory, resolver: Resolver, agent_id: str, problem_id: str
) -> None:
    result = execute_run(make_spec(agent_id, problem_id, factors={"budget": 60}), resolver)

    assert result.status is RunStatus.SUCCESS, result.traceback
    problem: DesignProblem = resolver.problem(problem_id).problem_object
    candidate = result.outputs["candidate"]
    assert all(
        lo <= value <= hi
        for value, lo, hi in zip(candidate, problem.lower, problem.upper, strict=True)
    )
    names = [row["metric_name"] for row in result.evaluations]
    assert names == ["objective", problem.objective_name, "feasible", "constraint_violation"]
    assert result.metrics["primary_outcome"] == pytest.approx(problem.penalized(candidate))
    assert result.metrics["evaluations_used"] == 60
    assert result.provenance["pattern_name"] == agent_id
    assert json.loads(result.evaluations[0]["notes_json"])["candidate"].keys() == set(
        problem.variables
    )


@pytest.mark.parametrize("agent_id", SEARCH_AGENTS)
def test_seeds_matter_and_equal_seeds_agree(
    make_spec: SpecFactory, resolver: Resolver, agent_id: str
) -> None:
    def outputs(seed: int) -> Any:
        spec = make_spec(agent_id, "spring-design", seed=seed, factors={"budget": 50})
        return execute_run(spec, resolver).outputs

    assert outputs(1) == outputs(1)
    assert outputs(1) != outputs(2)


def test_budget_is_a_factor(make_spec: SpecFactory, resolver: Resolver) -> None:
    """More evaluations never end worse for the same seed in hill climbing's first steps;
    here it is enough that the level reaches the agent and changes the result."""
    small = execute_run(make_spec("hill-climb", "beam-design", factors={"budget": 10}), resolver)
    large = execute_run(make_spec("hill-climb", "beam-design", factors={"budget": 300}), resolver)
    assert small.metrics["evaluations_used"] == 10
    assert large.metrics["primary_outcome"] < small.metrics["primary_outcome"]


def test_hill_climb_reports_its_improvements(make_spec: SpecFactory, resolver: Resolver) -> None:
    result = execute_run(make_spec("hill-climb", "beam-design", factors={"budget": 200}), resolver)
    assert 1 <= len(result.events) <= 20
    assert {event["event_type"] for event in result.events} == {"step"}
    assert result.metrics["step_event_count"] == len(result.events)


def test_random_search_draws_from_the_global_rngs() -> None:
    """Seeding only ``random`` or only ``np.random`` is not enough: it uses both."""
    problem = spring_design().problem_object
    condition = SimpleNamespace(factor_assignments={"budget": 200})

    def run(python_seed: int, numpy_seed: int) -> Any:
        random.seed(python_seed)
        np.random.seed(numpy_seed)
        return agents.random_search(problem, condition)["output"]  # type: ignore[arg-type]

    assert run(1, 1) == run(1, 1)
    assert run(1, 1) != run(2, 1)
    assert run(1, 1) != run(1, 2)


def test_rng_agents_match_their_upstream_call(make_spec: SpecFactory, resolver: Resolver) -> None:
    """Upstream passes no ``rng``; the agents then build the same generator from ``seed``."""
    spec = make_spec("annealing", "beam-design", seed=31, factors={"budget": 80})
    studyq = execute_run(spec, resolver).outputs
    condition = SimpleNamespace(factor_assignments={"budget": 80})
    upstream = agents.annealing(beam_design().problem_object, condition, seed=31)  # type: ignore[arg-type]
    assert studyq == upstream["output"]


def test_noop_agent_and_problem(make_spec: SpecFactory, resolver: Resolver) -> None:
    result = execute_run(make_spec("noop", "noop", seed=5), resolver)
    assert result.status is RunStatus.SUCCESS
    assert result.outputs == {"seed": 5}
    assert result.metrics["primary_outcome"] == 1.0


def test_sleep_agent_sleeps_for_its_factor(make_spec: SpecFactory, resolver: Resolver) -> None:
    result = execute_run(make_spec("sleep", "noop", factors={"sleep_s": 0.01}), resolver)
    assert result.status is RunStatus.SUCCESS
    assert result.metrics["latency_s"] >= 0.01
    assert result.outputs == {"text": "slept 0.01 s"}


@pytest.mark.parametrize("fail", [True, "true", 1])
def test_flaky_agent_fails_for_its_failing_level(
    make_spec: SpecFactory, resolver: Resolver, fail: Any
) -> None:
    result = execute_run(make_spec("flaky", "noop", factors={"fail": fail}), resolver)
    assert (result.status, result.error_kind, result.error_type) == (
        RunStatus.FAILED,
        ErrorKind.ERROR,
        "FlakyAgentError",
    )
    assert "failed on purpose" in (result.error_message or "")


@pytest.mark.parametrize("fail", [False, "false", 0])
def test_flaky_agent_succeeds_otherwise(
    make_spec: SpecFactory, resolver: Resolver, fail: Any
) -> None:
    result = execute_run(make_spec("flaky", "noop", factors={"fail": fail}), resolver)
    assert result.status is RunStatus.SUCCESS


def test_flaky_fail_rate_is_per_seed(make_spec: SpecFactory, resolver: Resolver) -> None:
    statuses = [
        execute_run(make_spec("flaky", "noop", seed=s, factors={"fail_rate": 0.5}), resolver).status
        for s in range(40)
    ]
    assert 5 < statuses.count(RunStatus.FAILED) < 35
    again = [
        execute_run(make_spec("flaky", "noop", seed=s, factors={"fail_rate": 0.5}), resolver).status
        for s in range(40)
    ]
    assert statuses == again


@pytest.mark.parametrize(
    ("candidate", "message"),
    [
        ([0.05], "has 1 values, expected 2"),
        ([0.001, 0.1], "outside"),
        ([float("nan"), 0.1], "outside"),
    ],
)
def test_problem_evaluators_reject_bad_candidates(candidate: list[float], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        beam_design().problem_object.evaluate(candidate)


def test_known_designs_score_as_expected() -> None:
    beam = beam_design().problem_object
    # A generous beam is feasible; a thin one breaks the stress limit.
    assert beam.violation([0.05, 0.2]) == 0.0
    assert beam.violation([0.005, 0.05]) > 0.0
    rows = beam.evaluate({"width_m": 0.05, "height_m": 0.2})
    assert rows[1]["metric_value"] == pytest.approx(7850 * 0.05 * 0.2)
    assert rows[2]["metric_value"] is True
    # The best known spring is (just about) feasible and weighs ~0.012665.
    spring = spring_design().problem_object
    best = [0.051690, 0.356750, 11.287126]
    assert spring.objective(best) == pytest.approx(0.012665, rel=1e-3)
    assert spring.violation(best) < 1e-4
    assert spring.violation([1.0, 1.0, 5.0]) > 0  # wire as thick as the coil


def _outputs_of(message: dict[str, Any]) -> Any:
    """Executed in a pool worker: one run, its outputs."""
    return execute_run(RunSpec.from_message(message), Resolver()).outputs


def _quick_specs(make_spec: SpecFactory, agent_id: str) -> list[RunSpec]:
    return [
        make_spec(agent_id, problem, seed=seed, factors={"budget": 120}, run_id=f"run-{seed}")
        for seed in range(6)
        for problem in DESIGN_PROBLEMS
    ]


@pytest.mark.parametrize("agent_id", ["hill-climb", "annealing"])
def test_rng_agents_are_deterministic_in_a_thread_pool(
    make_spec: SpecFactory, resolver: Resolver, agent_id: str
) -> None:
    """Threads share the global RNGs; agents drawing from the handed ``rng`` do not care."""
    from concurrent.futures import ThreadPoolExecutor

    specs = _quick_specs(make_spec, agent_id)
    serial = [execute_run(spec, resolver).outputs for spec in specs]
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # interleave the threads as much as possible
    try:
        with ThreadPoolExecutor(max_workers=6) as pool:
            threaded = list(pool.map(lambda spec: execute_run(spec, resolver).outputs, specs))
    finally:
        sys.setswitchinterval(interval)
    assert threaded == serial


def test_global_rng_agents_are_deterministic_in_a_process_pool(
    make_spec: SpecFactory, resolver: Resolver
) -> None:
    """One run per process at a time keeps agents on the global RNGs deterministic, whatever
    the process drew before."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    # Given the agent that draws from Python's and NumPy's global RNGs, run here after other
    # draws, and in fresh interpreters
    specs = _quick_specs(make_spec, "random-search")
    random.random()
    np.random.random(7)
    serial = [execute_run(spec, resolver).outputs for spec in specs]
    context = multiprocessing.get_context("forkserver")
    with ProcessPoolExecutor(max_workers=2, mp_context=context) as pool:
        pooled = list(pool.map(_outputs_of, [spec.to_message() for spec in specs]))
    assert pooled == serial
