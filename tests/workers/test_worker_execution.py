"""execute_run: the call contract, the result rows and their upstream defaults, failure and
timeout isolation, and condition-runner mode."""

from __future__ import annotations

import json
import pickle
import random
from collections.abc import Callable
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from orchestrator.contracts.canonical import hash_identifier
from orchestrator.contracts.errors import BindingError, RunTimeoutError
from orchestrator.contracts.extensions import Bindings
from orchestrator.contracts.results import (
    FAILED_PROVENANCE_KEYS,
    MESSAGE_LIMIT,
    TRACEBACK_LIMIT,
    ErrorKind,
    RunResult,
    RunStatus,
    failed_result,
)
from orchestrator.contracts.runspec import RunSpec
from workers.bindings import ProblemPacket, Resolver
from workers.execution import RunCondition, RunOutput, agent_result, execute_run

SpecFactory = Callable[..., RunSpec]

EVALUATION_COLUMNS = [
    "run_id",
    "evaluator_id",
    "metric_name",
    "metric_value",
    "metric_unit",
    "aggregation_level",
    "notes_json",
]
EVENT_COLUMNS = [
    "timestamp",
    "record_id",
    "text",
    "session_id",
    "actor_id",
    "event_type",
    "meta_json",
    "level",
    "study_id",
    "run_id",
    "condition_id",
    "trial_id",
    "step_id",
    "tool_name",
    "evaluation_id",
]


def _score_packet(evaluator: Callable[[Any], Any] | None = None, **fields: Any) -> ProblemPacket:
    return ProblemPacket(
        problem_id="p",
        family="toy",
        brief="say hi",
        evaluator=evaluator or (lambda candidate: {"score": 0.5, "higher_is_better": True}),
        **fields,
    )


def _run(spec: RunSpec, agent: Any, packet: ProblemPacket | None = None, **kw: Any) -> RunResult:
    resolver = Resolver(agents={"a": agent}, problems={"p": packet or _score_packet()})
    return execute_run(spec, resolver, **kw)


# --- the call contract ----------------------------------------------------------------------


def test_agents_receive_what_their_parameters_name(make_spec: SpecFactory) -> None:
    seen: dict[str, Any] = {}
    packet = _score_packet(payload={"problem_object": "the-object"})

    def agent(
        problem_packet: Any,
        problem: Any,
        brief: Any,
        run_spec: Any,
        condition: Any,
        factors: Any,
        seed: Any,
        rng: Any,
        prompt: Any,
        request_id: Any,
        dependencies: Any,
    ) -> dict[str, Any]:
        seen.update(locals())
        return agent_result("hi")

    spec = make_spec("a", "p", factors={"budget": 3})
    result = _run(spec, agent, packet)

    assert result.status is RunStatus.SUCCESS, result.traceback
    assert seen["problem_packet"] is packet
    assert seen["problem"] == seen["prompt"] == "the-object"
    assert seen["brief"] == "say hi"
    assert seen["run_spec"] is spec
    assert isinstance(seen["condition"], RunCondition)
    assert seen["condition"].condition_id == spec.condition_id
    assert seen["condition"].block_assignments == {"site": "a"}
    assert seen["condition"].metadata == {"fingerprint": spec.condition_fingerprint}
    assert seen["factors"] == {"budget": 3}
    assert seen["seed"] == spec.seed
    assert isinstance(seen["rng"], np.random.Generator)
    assert seen["request_id"] == spec.run_id
    assert set(seen["dependencies"]) == {
        "problem_packet",
        "run_spec",
        "condition",
        "seed",
        "problem",
    }


def test_the_rng_is_a_fresh_pcg64_of_the_seed(make_spec: SpecFactory) -> None:
    def agent(rng: np.random.Generator) -> dict[str, Any]:
        return {"output": {"x": rng.random()}}

    result = _run(make_spec("a", "p", seed=99), agent)
    assert result.outputs["x"] == np.random.Generator(np.random.PCG64(99)).random()


def test_problem_is_the_packet_when_there_is_no_problem_object(make_spec: SpecFactory) -> None:
    seen: list[tuple[Any, Any]] = []

    def agent(problem: Any, input: Any) -> dict[str, Any]:
        seen.append((problem, input))
        return {}

    _run(make_spec("a", "p"), agent)
    assert isinstance(seen[0][0], ProblemPacket)
    assert seen[0][1] == "say hi"


def test_kwargs_agents_receive_every_name(make_spec: SpecFactory) -> None:
    seen: dict[str, Any] = {}
    _run(make_spec("a", "p"), lambda **kwargs: seen.update(kwargs) or {})
    assert {"problem", "condition", "factors", "seed", "rng", "dependencies"} <= set(seen)


@pytest.mark.parametrize(
    ("agent", "expected"),
    [
        (lambda packet, rng_seed: {"text": f"{packet.problem_id}:{rng_seed}"}, "p:5"),
        (lambda *args: {"text": f"{len(args)}"}, "2"),
        (lambda: {"text": "none"}, "none"),
    ],
    ids=["packet-and-seed", "varargs", "no-parameters"],
)
def test_unnamed_parameters_are_called_positionally(
    make_spec: SpecFactory, agent: Any, expected: str
) -> None:
    assert _run(make_spec("a", "p", seed=5), agent).outputs == {"text": expected}


def test_a_required_parameter_studyq_cannot_fill_is_a_clear_failure(
    make_spec: SpecFactory,
) -> None:
    """Upstream would pass ``seed`` alone and fail; studyq fails too, saying why."""
    result = _run(make_spec("a", "p"), lambda packet, seed: {})
    assert (result.status, result.error_type) == (RunStatus.FAILED, "TypeError")
    assert "parameter 'packet'" in (result.error_message or "")
    assert "docs/agents.md" in (result.error_message or "")


def test_single_parameter_callables_are_condition_factories(make_spec: SpecFactory) -> None:
    """As upstream: ``f(condition) -> agent`` is called per run, then the agent is called."""

    def factory(cond: RunCondition) -> Callable[..., Any]:
        level = cond.factor_assignments["level"]
        return lambda seed: agent_result(f"level {level}, seed {seed}")

    result = _run(make_spec("a", "p", seed=4, factors={"level": "hi"}), factory)
    assert result.outputs == {"text": "level hi, seed 4"}


def test_objects_are_called_through_run(make_spec: SpecFactory) -> None:
    class Agent:
        def __init__(self) -> None:
            self.calls = 0

        def run(self, seed: int, condition: RunCondition) -> dict[str, Any]:
            self.calls += 1
            return agent_result(f"{seed}")

    agent = Agent()
    for _ in range(2):
        assert _run(make_spec("a", "p", seed=8), agent).outputs == {"text": "8"}
    assert agent.calls == 2


def test_callable_instances_are_called(make_spec: SpecFactory) -> None:
    class Agent:
        def __call__(self, seed: int) -> str:
            return f"plain {seed}"

    assert _run(make_spec("a", "p", seed=1), Agent()).outputs == {"text": "plain 1"}


# --- return shapes --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("returned", "output"),
    [
        (agent_result({"answer": 1}), {"answer": 1}),
        ({"outputs": {"answer": 2}}, {"answer": 2}),
        ({"text": "bare"}, {"text": "bare"}),
        ({"output": "wrapped"}, {"text": "wrapped"}),
        ({"answer": 3}, {}),  # as upstream: a mapping without output/outputs/text has none
        ("a string", {"text": "a string"}),
        (None, {"text": "None"}),
        (
            {"output": {"value": np.float64(1.5), "n": np.int64(2), "v": np.arange(2)}},
            {"value": 1.5, "n": 2, "v": [0, 1]},
        ),
    ],
)
def test_return_shapes_are_normalized(
    make_spec: SpecFactory, returned: Any, output: dict[str, Any]
) -> None:
    result = _run(make_spec("a", "p"), lambda seed: returned)
    assert result.outputs == output
    json.dumps(result.outputs)


def test_execution_result_objects_are_read_like_upstream(make_spec: SpecFactory) -> None:
    returned = SimpleNamespace(
        success=True,
        output={"final_output": "done", "metrics": {"cost_usd": 0.25}, "events": [{"text": "t"}]},
        metadata={"trace_path": "traces/a.jsonl", "agent_kind": "llm"},
        model_response=SimpleNamespace(
            model="gpt-x", provider="acme", usage={"prompt_tokens": 11, "completion_tokens": 7}
        ),
    )
    result = _run(make_spec("a", "p"), lambda seed: returned)
    assert result.outputs == {"text": "done"}
    assert result.metrics["cost_usd"] == 0.25
    assert (result.metrics["input_tokens"], result.metrics["output_tokens"]) == (11.0, 7.0)
    assert result.trace_refs == ["traces/a.jsonl"]
    assert result.provenance["model_name"] == "gpt-x"
    assert result.provenance["model_provider"] == "acme"
    assert result.provenance["agent_kind"] == "llm"
    assert [event["text"] for event in result.events] == ["t"]


# --- evaluations, events, metrics, provenance ----------------------------------------------


def test_success_rows_have_every_column_with_upstream_defaults(make_spec: SpecFactory) -> None:
    spec = make_spec("a", "p")
    result = _run(spec, lambda seed: agent_result("hello"))

    assert result.status is RunStatus.SUCCESS
    assert result.error_kind is None and result.error_info == ""
    assert result.evaluations == [
        {
            "run_id": spec.run_id,
            "evaluator_id": "problem_evaluator",
            "metric_name": "score",
            "metric_value": 0.5,
            "metric_unit": "unitless",
            "aggregation_level": "run",
            "notes_json": "{}",
        }
    ]  # higher_is_better is not a metric
    [event] = result.events
    assert list(event) == EVENT_COLUMNS
    assert event["record_id"] == hash_identifier("evt", {"run_id": spec.run_id, "index": 0})
    assert event["meta_json"] == '{"auto_generated":true}'
    assert (event["event_type"], event["actor_id"], event["level"]) == (
        "assistant_output",
        "agent",
        "step",
    )
    assert (event["text"], event["session_id"], event["study_id"], event["condition_id"]) == (
        "hello",
        spec.run_id,
        spec.study_id,
        spec.condition_id,
    )
    assert event["timestamp"].endswith("+00:00") and "." not in event["timestamp"]
    metrics = result.metrics
    assert metrics["primary_outcome"] == 0.5
    assert (metrics["cost_usd"], metrics["input_tokens"], metrics["output_tokens"]) == (0.0, 0, 0)
    assert (metrics["tool_call_count"], metrics["step_event_count"]) == (0, 1)
    assert metrics["unique_actor_count"] == 1
    assert 0 < metrics["latency_s"] <= result.latency_s + 1e-3
    assert result.started_at <= result.ended_at
    assert result.provenance["agent_id"] == "a"
    assert result.provenance["problem_family"] == "toy"
    assert result.provenance["model_name"] is None
    assert result.provenance["execution_mode"] == "agent"
    assert set(result.provenance) >= {"host", "pid", "worker", "python_version", "package_versions"}
    assert set(result.provenance["package_versions"]) == {"studyq", "numpy"}
    # and everything the store keeps is plain JSON, and the result pickles (process pools)
    for part in (result.outputs, result.metrics, result.evaluations, result.events):
        json.dumps(part)
    json.dumps(result.provenance)
    assert pickle.loads(pickle.dumps(result)) == result


def test_agent_events_metrics_and_rows(make_spec: SpecFactory) -> None:
    spec = make_spec("a", "p")
    events = [
        {"event_type": "tool_call", "tool_name": "search", "actor_id": "planner"},
        {"text": "thinking", "meta_json": {"b": 1, "a": [1, 2]}, "record_id": "evt-mine"},
        "not a mapping: skipped",
        {"event_type": "step", "level": "trial", "trial_id": "t1"},
    ]

    def agent(seed: int) -> dict[str, Any]:
        return {
            "output": {"candidate": [1, 2]},
            "metrics": {"input_tokens": 5, "output_tokens": "7", "cost_usd": 0.01, "extra": 3},
            "events": events,
            "metadata": {"model_name": "m-1"},
            "trace_refs": ["t.jsonl"],
        }

    rows = [
        {
            "metric_name": "quality",
            "metric_value": 0.9,
            "metric_unit": "pct",
            "notes_json": {"z": 1, "a": "é"},
        },
        {"value": 4, "evaluator_id": "judge", "aggregation_level": "trial"},
    ]
    seen: list[Any] = []

    def evaluator(candidate: Any) -> Any:
        seen.append(candidate)
        return rows

    packet = _score_packet(evaluator)
    result = _run(spec, agent, packet)

    assert seen == [[1, 2]]  # the evaluator gets the candidate, not the whole output
    assert [list(row) for row in result.evaluations] == [EVALUATION_COLUMNS] * 2
    first, second = result.evaluations
    assert (first["metric_name"], first["metric_unit"]) == ("quality", "pct")
    assert first["notes_json"] == json.dumps({"z": 1, "a": "é"}, sort_keys=True)
    assert (second["metric_name"], second["metric_value"], second["evaluator_id"]) == (
        "score",
        4,
        "judge",
    )
    assert second["aggregation_level"] == "trial"
    assert [event["record_id"] for event in result.events] == [
        hash_identifier("evt", {"run_id": spec.run_id, "index": 0, "event_type": "tool_call"}),
        "evt-mine",
        hash_identifier("evt", {"run_id": spec.run_id, "index": 3, "event_type": "step"}),
    ]
    assert result.events[1]["meta_json"] == '{"a":[1,2],"b":1}'
    assert result.events[2]["trial_id"] == "t1" and result.events[2]["level"] == "trial"
    metrics = result.metrics
    assert (metrics["tool_call_count"], metrics["step_event_count"]) == (1, 2)
    assert metrics["unique_actor_count"] == 2
    assert (metrics["input_tokens"], metrics["output_tokens"]) == (5.0, 7.0)
    assert (metrics["cost_usd"], metrics["extra"], metrics["primary_outcome"]) == (0.01, 3, 0.9)
    assert result.trace_refs == ["t.jsonl"]
    assert result.provenance["model_name"] == "m-1"


def test_an_agent_primary_outcome_wins_over_the_first_evaluation(make_spec: SpecFactory) -> None:
    result = _run(make_spec("a", "p"), lambda seed: agent_result(metrics={"primary_outcome": 7}))
    assert result.metrics["primary_outcome"] == 7


def test_no_evaluator_means_no_rows_and_no_primary_outcome(make_spec: SpecFactory) -> None:
    result = _run(make_spec("a", "p"), lambda seed: {}, ProblemPacket(problem_id="p"))
    assert result.evaluations == []
    assert "primary_outcome" not in result.metrics


def test_evaluator_payload_shapes(make_spec: SpecFactory) -> None:
    @dataclass
    class Score:
        accuracy: float
        label: str  # not a scalar metric: dropped

    class WithToDict:
        def to_dict(self) -> dict[str, Any]:
            return {"recall": 0.25}

    payload = [Score(0.75, "x"), WithToDict(), {"ok": True, "name": "skip"}]
    result = _run(make_spec("a", "p"), lambda seed: {}, _score_packet(lambda c: payload))
    assert [(r["metric_name"], r["metric_value"]) for r in result.evaluations] == [
        ("accuracy", 0.75),
        ("recall", 0.25),
        ("ok", True),
    ]


def test_output_evaluator_gets_the_whole_output(make_spec: SpecFactory) -> None:
    seen: list[Any] = []

    def output_evaluator(output: Any) -> Any:
        seen.append(output)
        return {"n": len(output)}

    packet = ProblemPacket(
        problem_id="p",
        evaluator=lambda candidate: pytest.fail("evaluator must not be used"),
        output_evaluator=output_evaluator,
    )
    result = _run(make_spec("a", "p"), lambda seed: agent_result({"candidate": 1, "x": 2}), packet)
    assert seen == [{"candidate": 1, "x": 2}]
    assert result.metrics["primary_outcome"] == 2


# --- failure isolation ----------------------------------------------------------------------


def _numpy_key() -> list[int]:
    state: Any = np.random.get_state()
    return list(state[1].tolist())


def _boom(seed: int) -> dict[str, Any]:
    raise ValueError("the agent broke")


def test_an_agent_exception_is_a_failed_result(make_spec: SpecFactory) -> None:
    # Given an agent that raises, when the run executes, then a failed result comes back
    np.random.seed(3)
    random.seed(3)
    before = (random.getstate(), _numpy_key())
    result = _run(make_spec("a", "p"), _boom)

    assert result.status is RunStatus.FAILED
    assert result.error_kind is ErrorKind.ERROR
    assert (result.error_type, result.error_message) == ("ValueError", "the agent broke")
    assert result.error_info == "ValueError: the agent broke"
    assert result.traceback is not None
    assert "in _boom" in result.traceback and "ValueError: the agent broke" in result.traceback
    assert result.evaluations == [] and result.events == [] and result.outputs == {}
    assert set(result.metrics) == {"latency_s"}
    assert result.provenance["agent_id"] == "a" and "host" in result.provenance
    # and the global RNG state is restored
    assert (random.getstate(), _numpy_key()) == before


def test_an_evaluator_exception_is_a_failed_result(make_spec: SpecFactory) -> None:
    def evaluator(candidate: Any) -> Any:
        raise KeyError("metric")

    result = _run(make_spec("a", "p"), lambda seed: {}, _score_packet(evaluator))
    assert (result.status, result.error_kind, result.error_type) == (
        RunStatus.FAILED,
        ErrorKind.ERROR,
        "KeyError",
    )


def test_huge_errors_are_bounded(make_spec: SpecFactory) -> None:
    def agent(seed: int) -> None:
        raise RuntimeError("x" * 100_000)

    result = _run(make_spec("a", "p"), agent)
    assert result.traceback is not None and result.error_message is not None
    assert len(result.traceback) <= TRACEBACK_LIMIT
    assert len(result.error_message) <= MESSAGE_LIMIT
    assert "characters cut" in result.traceback
    assert result.traceback.startswith("Traceback")
    assert result.traceback.rstrip().endswith("x")


def test_binding_failures_are_kind_binding(make_spec: SpecFactory) -> None:
    result = execute_run(make_spec("nobody-knows-me", "noop"), Resolver())
    assert (result.status, result.error_kind, result.error_type) == (
        RunStatus.FAILED,
        ErrorKind.BINDING,
        "BindingError",
    )
    assert "unknown agent 'nobody-knows-me'" in (result.error_message or "")


def test_a_refused_import_is_a_binding_failure(make_spec: SpecFactory) -> None:
    resolver = Resolver(Bindings(agents={"x": "os:system"}), trust_study=False)
    result = execute_run(make_spec("x", "noop"), resolver)
    assert result.error_kind is ErrorKind.BINDING
    assert "refused" in (result.error_message or "")


class SoftTimeLimitExceeded(Exception):
    """Named like Celery's soft-time-limit exception, which execution matches by name."""


@pytest.mark.parametrize(
    "error", [RunTimeoutError("alarm"), SoftTimeLimitExceeded("soft limit")], ids=type
)
def test_timeouts_raised_inside_the_run_are_kind_timeout(
    make_spec: SpecFactory, error: Exception
) -> None:
    def agent(seed: int) -> None:
        raise error

    result = _run(make_spec("a", "p"), agent)
    assert (result.status, result.error_kind) == (RunStatus.FAILED, ErrorKind.TIMEOUT)
    assert result.error_type == type(error).__name__


def test_a_run_over_its_limit_is_a_timeout_even_when_it_finishes(make_spec: SpecFactory) -> None:
    spec = make_spec("sleep", "noop", factors={"sleep_s": 0.02})
    slow = execute_run(spec, Resolver(), timeout_s=0.005)
    assert (slow.status, slow.error_kind, slow.error_type) == (
        RunStatus.FAILED,
        ErrorKind.TIMEOUT,
        "RunTimeoutError",
    )
    assert "over its limit of 0.005 s" in (slow.error_message or "")
    assert execute_run(spec, Resolver(), timeout_s=5.0).status is RunStatus.SUCCESS


def test_binding_errors_raised_by_an_agent_are_binding_failures(make_spec: SpecFactory) -> None:
    def agent(seed: int) -> None:
        raise BindingError("nested")

    assert _run(make_spec("a", "p"), agent).error_kind is ErrorKind.BINDING


# --- condition-runner mode ------------------------------------------------------------------


def test_runner_mode(make_spec: SpecFactory) -> None:
    seen = []

    def runner(run_spec: RunSpec, condition: RunCondition) -> RunOutput:
        seen.append((run_spec, condition.factor_assignments))
        return RunOutput(outputs={"value": np.float32(0.5)}, metrics={"primary_outcome": 1})

    spec = make_spec(None, None, factors={"k": 2})
    result = execute_run(spec, Resolver(runner=runner), worker="w1")
    assert result.status is RunStatus.SUCCESS, result.traceback
    assert seen == [(spec, {"k": 2})]
    assert result.outputs == {"value": 0.5}
    assert result.metrics["primary_outcome"] == 1 and result.metrics["latency_s"] > 0
    assert result.evaluations == [] and result.events == []
    assert result.provenance["execution_mode"] == "condition_runner"
    assert result.provenance["worker"] == "w1"


@pytest.mark.parametrize(
    "runner",
    [
        lambda spec, cond: {"outputs": {"seed": spec.seed}, "metrics": {"latency_s": 9.0}},
        lambda seed, rng: SimpleNamespace(outputs={"seed": seed}, metrics={"latency_s": 9.0}),
        lambda spec, condition: RunOutput({"seed": spec.seed}, {"latency_s": 9.0}),
    ],
    ids=["positional-mapping", "named-upstream-like", "unknown-first-name"],
)
def test_runner_signatures_and_return_shapes(make_spec: SpecFactory, runner: Any) -> None:
    result = execute_run(make_spec(None, None, seed=12), Resolver(runner=runner))
    assert result.status is RunStatus.SUCCESS, result.traceback
    assert result.outputs == {"seed": 12}
    assert result.metrics == {"latency_s": 9.0}  # a runner's own latency is kept, as upstream


def test_runner_returning_something_else_fails(make_spec: SpecFactory) -> None:
    result = execute_run(make_spec(None, None), Resolver(runner=lambda spec, cond: 42))
    assert (result.status, result.error_type) == (RunStatus.FAILED, "TypeError")
    assert "must return RunOutput" in (result.error_message or "")
    assert result.provenance["execution_mode"] == "condition_runner"


def test_runner_is_seeded(make_spec: SpecFactory) -> None:
    def runner(run_spec: RunSpec, condition: RunCondition) -> RunOutput:
        return RunOutput(outputs={"draw": random.random(), "np": float(np.random.random())})

    first = execute_run(make_spec(None, None, seed=21), Resolver(runner=runner))
    second = execute_run(make_spec(None, None, seed=21), Resolver(runner=runner))
    random.seed(21)
    np.random.seed(21)
    assert first.outputs == second.outputs == {"draw": random.random(), "np": np.random.random()}


def test_every_failed_result_has_the_same_provenance_keys(make_spec: SpecFactory) -> None:
    """Given a run that raises and a timeout built outside the run (the lease keeper's hard
    limit), when both are failed results, then they carry the same provenance keys."""

    def agent(seed: int) -> None:
        raise RuntimeError("boom")

    spec = make_spec("a", "p")
    raised = _run(spec, agent)
    timed_out = failed_result(
        spec,
        ErrorKind.TIMEOUT,
        error_type="RunTimeoutError",
        message="abandoned",
        started_at=raised.started_at,
        worker="w1",
    )
    assert tuple(raised.provenance) == FAILED_PROVENANCE_KEYS
    assert tuple(timed_out.provenance) == FAILED_PROVENANCE_KEYS
    assert raised.provenance["execution_mode"] == "agent"
    assert timed_out.provenance["execution_mode"] is None
    assert timed_out.provenance["agent_id"] == raised.provenance["agent_id"] == spec.agent_key
    assert timed_out.provenance["worker"] == "w1"
    assert timed_out.metrics["latency_s"] >= 0


def test_the_coordinators_entry_points_are_these_functions() -> None:
    """Given the installed metadata, when the embedded executor asks for the worker's entry
    points, then it gets the functions tested here (orchestrator/ never imports them)."""
    from orchestrator.contracts.worker_api import worker_entry

    assert worker_entry("execute_run") is execute_run
    assert worker_entry("resolver") is Resolver
