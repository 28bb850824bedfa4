"""Executing one run: the one function both executors call.

:func:`execute_run` resolves the run's agent and problem (or the study's condition runner),
calls the agent under the run's seed (:mod:`workers.seeding`), evaluates its output with the
problem's evaluator, and composes metrics, evaluation rows, event rows and provenance the way
design-research-experiments' ``_execute_single_run`` does, so a run's outputs are the same
whichever executor ran it, and the same as upstream's. A failing run is a
:class:`~orchestrator.contracts.results.RunResult` with status ``failed``, never an exception.

The call contract (docs/agents.md): agents and runners receive keyword arguments by
parameter name, exactly the names below that their signature declares (all of them when it
takes ``**kwargs``):

=================  ===================================================================
``problem_packet``  the :class:`~workers.bindings.ProblemPacket`
``problem``         ``packet.payload["problem_object"]`` when present, else the packet
``brief``           ``packet.brief``
``run_spec``        the :class:`~orchestrator.contracts.runspec.RunSpec`
``condition``       a :class:`RunCondition` (``condition_id``, ``factor_assignments``, ...)
``factors``         the condition's factor assignments (studyq addition)
``seed``            the run seed (``int``)
``rng``             a fresh ``numpy.random.Generator(PCG64(seed))`` (studyq addition)
``prompt``/``input``  the problem object, else the brief (skipped when positional-only)
``request_id``      the run id
``dependencies``    ``{"problem_packet", "run_spec", "condition", "seed"[, "problem"]}``
=================  ===================================================================

A callable declaring none of them is called positionally, as upstream does: agents with
``(problem_packet, seed)`` or ``(problem_packet)``, runners with ``(run_spec, condition)``. An
object with a ``run`` method is called through ``run``. A callable with exactly one
positional parameter of another name is, as upstream, a *factory*: it is called with the
condition for every run and returns the agent to call.
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import socket
import time
import traceback
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields, is_dataclass
from datetime import UTC, datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Any, ClassVar

import numpy as np

from orchestrator.contracts.canonical import canonical_json, hash_identifier, to_jsonable
from orchestrator.contracts.conditions import Condition
from orchestrator.contracts.errors import BindingError, RunTimeoutError
from orchestrator.contracts.results import ErrorKind, RunResult, RunStatus
from orchestrator.contracts.runspec import RunSpec
from workers.bindings import ProblemPacket, Resolver
from workers.seeding import global_seed, make_rng

__all__ = ["RunCondition", "RunOutput", "agent_result", "execute_run"]

TRACEBACK_LIMIT = 8192
MESSAGE_LIMIT = 2048

_AGENT_PARAMETERS = (
    "problem_packet",
    "problem",
    "brief",
    "run_spec",
    "condition",
    "factors",
    "seed",
    "rng",
    "prompt",
    "input",
    "request_id",
    "dependencies",
)
_RUNNER_PARAMETERS = ("run_spec", "condition", "factors", "seed", "rng", "request_id")
# The upstream's names; a one-parameter callable using none of them is a condition factory.
_UPSTREAM_PARAMETERS = frozenset(_AGENT_PARAMETERS) - {"factors", "rng"}
_EVALUATOR_INPUT_KEYS = ("candidate", "state", "answer", "solution", "final_answer", "x")
_AUTO_EVENT_META = canonical_json({"auto_generated": True})
# Celery raises this inside the task when a soft time limit passes; matched by name so this
# module does not import Celery.
_TIMEOUT_TYPE_NAMES = frozenset({"RunTimeoutError", "SoftTimeLimitExceeded"})


RunCondition = Condition
"""The condition a run belongs to: the planner's own type, under the name agents import."""


@dataclass(slots=True)
class RunOutput:
    """What a condition runner returns (the upstream ``RunOutput``; it is accepted too)."""

    outputs: Mapping[str, Any]
    metrics: Mapping[str, Any] = field(default_factory=dict)


def agent_result(
    output: Mapping[str, Any] | str | None = None,
    *,
    metrics: Mapping[str, Any] | None = None,
    events: Sequence[Mapping[str, Any]] | None = None,
    metadata: Mapping[str, Any] | None = None,
    trace_refs: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The return value an agent should build; identical to the upstream ``agent_result``.

    Strings are wrapped as ``{"text": output}``. ``metadata`` may carry ``model_name``,
    ``model_provider``, ``agent_kind``, ``pattern_name``, ``trace_path``.
    """
    if output is None:
        normalized: dict[str, Any] = {}
    elif isinstance(output, str):
        normalized = {"text": output}
    else:
        normalized = dict(output)
    return {
        "output": normalized,
        "metrics": dict(metrics or {}),
        "events": [dict(event) for event in events or ()],
        "metadata": dict(metadata or {}),
        "trace_refs": [str(ref) for ref in trace_refs or ()],
    }


def execute_run(
    spec: RunSpec,
    resolver: Resolver,
    *,
    timeout_s: float | None = None,
    worker: str = "",
) -> RunResult:
    """Execute one run with seed and failure isolation; never raises for a run's failure.

    Args:
        spec: The run.
        resolver: Resolves the study's agent, problem and runner ids.
        timeout_s: The run's time limit. Executors enforce it by killing the run; here a run
            that finishes but took longer is recorded as a timeout too, so every executor
            reports the same outcome for a slow run.
        worker: Name of the executing worker, recorded in provenance.
    """
    started_at = datetime.now(UTC)
    start = time.perf_counter()
    runner_mode = resolver.uses_runner
    try:
        if runner_mode:
            result = _execute_runner(spec, resolver, started_at, start)
        else:
            result = _execute_agent(spec, resolver, started_at, start)
        result.provenance.update(_process_provenance(worker))
        elapsed = time.perf_counter() - start
        if timeout_s is not None and elapsed > timeout_s:
            raise RunTimeoutError(f"run took {elapsed:.3f} s, over its limit of {timeout_s} s")
    except Exception as exc:
        return _failed(spec, exc, started_at, start, worker=worker, runner_mode=runner_mode)
    return result


# --- agent mode -------------------------------------------------------------------------


def _execute_agent(
    spec: RunSpec, resolver: Resolver, started_at: datetime, start: float
) -> RunResult:
    packet = resolver.problem(spec.problem_id)
    binding = resolver.agent(spec.agent_id)
    condition = _condition(spec)
    with global_seed(spec.seed):
        target, plan = _plan(binding, _AgentCall)
        if plan.is_factory:
            target, plan = _plan(target(condition), _AgentCall)
        raw = _AgentCall(spec, condition, packet).invoke(target, plan)
        returned = _normalize_agent_return(raw)
        evaluations = _evaluate(packet, returned.output, spec.run_id)
    latency_s = time.perf_counter() - start
    events = _event_rows(returned.events, returned.output, spec)
    cost_usd = float(returned.metrics.get("cost_usd", 0.0) or 0.0)
    metrics = _compose_metrics(returned.metrics, evaluations, events, latency_s, cost_usd)
    metadata = returned.metadata
    provenance: dict[str, Any] = {
        "execution_mode": "agent",
        "agent_id": spec.agent_key,
        "problem_id": spec.problem_key,
        "problem_family": packet.family,
    }
    for key in (
        "model_name",
        "model_provider",
        "agent_kind",
        "pattern_name",
        "request_id",
        "trace_dir",
        "trace_path",
    ):
        value = metadata.get(key)
        provenance[key] = None if value in (None, "") else _jsonable(value)
    return RunResult(
        run_id=spec.run_id,
        status=RunStatus.SUCCESS,
        started_at=started_at,
        ended_at=datetime.now(UTC),
        outputs=_jsonable(returned.output),
        metrics=_jsonable(metrics),
        evaluations=evaluations,
        events=events,
        trace_refs=returned.trace_refs,
        provenance=provenance,
    )


@dataclass(frozen=True, slots=True)
class _Plan:
    """How to call one callable, worked out once from its signature."""

    keywords: tuple[str, ...] = ()
    positional: int = 0  # when no keywords: how many of the call's positional arguments
    is_factory: bool = False


class _AgentCall:
    """The values an agent can ask for by name, built only when asked for."""

    __slots__ = ("condition", "packet", "spec")
    names: ClassVar[tuple[str, ...]] = _AGENT_PARAMETERS

    def __init__(self, spec: RunSpec, condition: RunCondition, packet: ProblemPacket) -> None:
        self.spec = spec
        self.condition = condition
        self.packet = packet

    def invoke(self, target: Callable[..., Any], plan: _Plan) -> Any:
        """Call ``target`` as ``plan`` says."""
        if plan.keywords:
            return target(**{name: self.value(name) for name in plan.keywords})
        if plan.positional < 0:  # signature unknown: the upstream's two tries
            try:
                return target(self.packet, self.spec.seed)
            except TypeError:
                return target(self.packet)
        return target(*(self.packet, self.spec.seed)[: plan.positional])

    def value(self, name: str) -> Any:
        """The value of the parameter called ``name``."""
        spec, packet = self.spec, self.packet
        problem_object = packet.problem_object
        if name == "problem_packet":
            return packet
        if name == "problem":
            return packet if problem_object is None else problem_object
        if name == "brief":
            return packet.brief
        if name == "run_spec":
            return spec
        if name == "condition":
            return self.condition
        if name == "factors":
            return self.condition.factor_assignments
        if name == "seed":
            return spec.seed
        if name == "rng":
            return make_rng(spec.seed)
        if name in ("prompt", "input"):
            return packet.brief if problem_object is None else problem_object
        if name == "request_id":
            return spec.run_id
        dependencies: dict[str, Any] = {
            "problem_packet": packet,
            "run_spec": spec,
            "condition": self.condition,
            "seed": spec.seed,
        }
        if problem_object is not None:
            dependencies["problem"] = problem_object
        return dependencies


class _RunnerCall(_AgentCall):
    """Runners get the run's names; positionally they get ``(run_spec, condition)``."""

    __slots__ = ()
    names: ClassVar[tuple[str, ...]] = _RUNNER_PARAMETERS

    def invoke(self, target: Callable[..., Any], plan: _Plan) -> Any:
        """Call ``target`` as ``plan`` says."""
        if plan.keywords:
            return target(**{name: self.value(name) for name in plan.keywords})
        if plan.positional < 0:
            return target(self.spec, self.condition)
        return target(*(self.spec, self.condition)[: plan.positional])


_plans: dict[Any, _Plan] = {}


def _plan(executable: Any, call: type[_AgentCall]) -> tuple[Callable[..., Any], _Plan]:
    """What to call for ``executable`` (its ``run`` method, or itself) and how (cached)."""
    run = getattr(executable, "run", None)
    target = run if callable(run) else executable
    if not callable(target):
        raise TypeError(f"{executable!r} is neither callable nor has a run() method")
    uses_run = target is not executable
    key = _plan_key(target, call, uses_run=uses_run)
    plan = _plans.get(key) if key is not None else None
    if plan is None:
        plan = _build_plan(target, call, uses_run=uses_run)
        if key is not None:
            if len(_plans) > 4096:
                _plans.clear()
            _plans[key] = plan
    return target, plan


def _plan_key(target: Any, call: type[_AgentCall], *, uses_run: bool) -> Any:
    """Signatures belong to functions, not bound objects; key plans so they are shared."""
    if isinstance(target, types.FunctionType):
        return (target, call, uses_run)
    if isinstance(target, types.MethodType):
        return (target.__func__, call, uses_run, "bound")
    call_method = inspect.getattr_static(type(target), "__call__", None)
    if isinstance(call_method, types.FunctionType) and not isinstance(target, type):
        return (call_method, call, uses_run, "instance")
    return None  # builtins, partials, classes: not worth caching, and easy to get wrong


def _build_plan(target: Callable[..., Any], call: type[_AgentCall], *, uses_run: bool) -> _Plan:
    """Keyword names the signature asks for; else the upstream's positional convention."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return _Plan(positional=-1)
    kinds = inspect.Parameter
    takes_kwargs = any(p.kind is kinds.VAR_KEYWORD for p in parameters.values())
    takes_args = any(p.kind is kinds.VAR_POSITIONAL for p in parameters.values())
    positional = [
        p
        for p in parameters.values()
        if p.kind in (kinds.POSITIONAL_ONLY, kinds.POSITIONAL_OR_KEYWORD)
    ]
    named = tuple(
        name
        for name in call.names
        if (takes_kwargs and name not in parameters)
        or (name in parameters and parameters[name].kind is not kinds.POSITIONAL_ONLY)
    )
    # Upstream always calls a runner as runner(run_spec, condition): keep that for runners
    # whose required parameters have other names.
    required_unknown = any(
        p.default is kinds.empty and p.name not in call.names for p in positional
    )
    if named and call is _AgentCall and required_unknown:
        unknown = next(
            p.name for p in positional if p.default is kinds.empty and p.name not in call.names
        )
        raise TypeError(
            f"agent parameter '{unknown}' is not one studyq passes; name it after what it "
            f"receives ({', '.join(call.names)}), see docs/agents.md"
        )
    if named and not required_unknown:
        return _Plan(keywords=named)
    is_factory = (
        call is _AgentCall
        and not uses_run
        and len(parameters) == 1
        and len(positional) == 1
        and positional[0].name not in _UPSTREAM_PARAMETERS
    )
    count = 2 if takes_args else min(len(positional), 2)
    return _Plan(positional=count, is_factory=is_factory)


@dataclass(slots=True)
class _Returned:
    """An agent's return value, normalized as the upstream's ``AgentExecution``."""

    output: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    trace_refs: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def _normalize_agent_return(raw: Any) -> _Returned:
    """Accept the upstream's return shapes: an ``agent_result`` mapping, an
    ``ExecutionResult``-like object, or anything else as text."""
    if isinstance(raw, Mapping):
        output_value = raw.get("output", raw.get("outputs", {}))
        output = {"text": output_value} if isinstance(output_value, str) else dict(output_value)
        if not output and "text" in raw:
            output = {"text": raw["text"]}
        return _Returned(
            output=output,
            metrics=dict(raw.get("metrics", {})),
            events=list(raw.get("events", [])),
            trace_refs=[str(ref) for ref in raw.get("trace_refs", [])],
            metadata=dict(raw.get("metadata", {})),
        )
    if raw is not None and all(hasattr(raw, name) for name in ("success", "output", "metadata")):
        return _normalize_execution_result(raw)
    return _Returned(output={"text": str(raw)})


def _normalize_execution_result(raw: Any) -> _Returned:
    """A design-research-agents ``ExecutionResult`` (as the upstream reads it)."""
    mapping = dict(raw.output) if isinstance(raw.output, Mapping) else {}
    final = mapping.get("final_output")
    if isinstance(final, Mapping):
        output = dict(final)
    elif isinstance(final, str):
        output = {"text": final}
    elif final is not None:
        output = {"final_output": final}
    elif "text" in mapping:
        output = {"text": str(mapping["text"])}
    elif "model_text" in mapping:
        output = {"text": str(mapping["model_text"])}
    else:
        output = dict(mapping)
    metadata = dict(raw.metadata) if isinstance(raw.metadata, Mapping) else {}
    response = getattr(raw, "model_response", None)
    for attribute, key in (("model", "model_name"), ("provider", "model_provider")):
        value = getattr(response, attribute, None)
        if isinstance(value, str) and value.strip():
            metadata[key] = value
    metrics = dict(mapping["metrics"]) if isinstance(mapping.get("metrics"), Mapping) else {}
    usage = getattr(response, "usage", None)
    for usage_key, metric in (
        ("prompt_tokens", "input_tokens"),
        ("completion_tokens", "output_tokens"),
        ("total_tokens", "total_tokens"),
    ):
        count = (
            usage.get(usage_key) if isinstance(usage, Mapping) else getattr(usage, usage_key, None)
        )
        if isinstance(count, int):
            metrics.setdefault(metric, count)
    trace_refs: list[str] = []
    for ref in [metadata.get("trace_path"), *(metadata.get("trace_refs") or ())]:
        if isinstance(ref, str) and ref.strip() and ref not in trace_refs:
            trace_refs.append(ref)
    events = mapping.get("events", [])
    if not isinstance(events, Sequence) or isinstance(events, str | bytes):
        events = []
    return _Returned(output, metrics, list(events), trace_refs, metadata)


# --- evaluation, events, metrics -----------------------------------------------------------


def _evaluate(
    packet: ProblemPacket, output: Mapping[str, Any], run_id: str
) -> list[dict[str, Any]]:
    """Evaluation rows with every evaluations.csv column, upstream defaults filled in."""
    if packet.output_evaluator is not None:
        raw = packet.output_evaluator(output)
    elif packet.evaluator is not None:
        selected: Any = output
        for key in _EVALUATOR_INPUT_KEYS:
            if key in output:
                selected = output[key]
                break
        raw = packet.evaluator(selected)
    else:
        return []
    rows = []
    for row in _evaluation_payload(raw):
        notes = row.get("notes_json", {})
        rows.append(
            {
                "run_id": run_id,
                "evaluator_id": str(row.get("evaluator_id", "problem_evaluator")),
                "metric_name": str(row.get("metric_name", "score")),
                "metric_value": _jsonable(row.get("metric_value", row.get("value"))),
                "metric_unit": str(row.get("metric_unit", "unitless")),
                "aggregation_level": str(row.get("aggregation_level", "run")),
                "notes_json": _notes_json(notes)
                if isinstance(notes, Mapping)
                else _jsonable(notes),
            }
        )
    return rows


def _notes_json(notes: Mapping[str, Any]) -> str:
    """``notes_json`` as the upstream writes it (``json.dumps(sort_keys=True)``)."""
    if not notes:
        return "{}"
    return json.dumps(to_jsonable(dict(notes)), sort_keys=True)


def _evaluation_payload(raw: Any) -> list[Mapping[str, Any]]:
    """Evaluator output as rows: a row, a metric mapping, a sequence of either, or an object."""
    if isinstance(raw, Mapping):
        if any(key in raw for key in ("metric_name", "metric_value", "value")):
            return [raw]
        return _metric_rows(raw)
    if isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
        rows: list[Mapping[str, Any]] = []
        for item in raw:
            rows.extend(_evaluation_payload(item))
        return rows
    if raw is None:
        return []
    if is_dataclass(raw) and not isinstance(raw, type):
        return _metric_rows({f.name: getattr(raw, f.name) for f in fields(raw)})
    to_dict = getattr(raw, "to_dict", None)
    if callable(to_dict):
        try:
            candidate = to_dict()
        except Exception:
            candidate = None
        if isinstance(candidate, Mapping):
            return _metric_rows(candidate)
    if hasattr(raw, "__dict__"):
        return _metric_rows(vars(raw))
    return []


def _metric_rows(metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        {"metric_name": str(name), "metric_value": value}
        for name, value in metrics.items()
        if str(name) != "higher_is_better" and isinstance(value, bool | int | float)
    ]


def _event_rows(
    raw_events: Sequence[Any], output: Mapping[str, Any], spec: RunSpec
) -> list[dict[str, Any]]:
    """Event rows with every events.csv column; one ``assistant_output`` row if none."""
    timestamp = datetime.now(UTC).replace(microsecond=0).isoformat()
    rows: list[dict[str, Any]] = []
    for index, event in enumerate(raw_events):
        if not isinstance(event, Mapping):
            continue
        event_type = str(event.get("event_type", "event"))
        record_id = event.get("record_id")
        if record_id is None:
            record_id = hash_identifier(
                "evt",
                {
                    "run_id": spec.run_id,
                    "index": index,
                    "event_type": event.get("event_type", "event"),
                },
            )
        meta = event.get("meta_json", {})
        rows.append(
            {
                "timestamp": str(event.get("timestamp", timestamp)),
                "record_id": str(record_id),
                "text": str(event.get("text", "")),
                "session_id": str(event.get("session_id", spec.run_id)),
                "actor_id": str(event.get("actor_id", "agent")),
                "event_type": event_type,
                "meta_json": canonical_json(meta) if isinstance(meta, Mapping) else str(meta),
                "level": str(event.get("level", "step")),
                "study_id": spec.study_id,
                "run_id": spec.run_id,
                "condition_id": spec.condition_id,
                "trial_id": _jsonable(event.get("trial_id")),
                "step_id": _jsonable(event.get("step_id")),
                "tool_name": _jsonable(event.get("tool_name")),
                "evaluation_id": _jsonable(event.get("evaluation_id")),
            }
        )
    if rows:
        return rows
    return [
        {
            "timestamp": timestamp,
            "record_id": hash_identifier("evt", {"run_id": spec.run_id, "index": 0}),
            "text": str(output.get("text", "")),
            "session_id": spec.run_id,
            "actor_id": "agent",
            "event_type": "assistant_output",
            "meta_json": _AUTO_EVENT_META,
            "level": "step",
            "study_id": spec.study_id,
            "run_id": spec.run_id,
            "condition_id": spec.condition_id,
            "trial_id": None,
            "step_id": None,
            "tool_name": None,
            "evaluation_id": None,
        }
    ]


def _compose_metrics(
    agent_metrics: Mapping[str, Any],
    evaluations: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    latency_s: float,
    cost_usd: float,
) -> dict[str, Any]:
    """The upstream's ``compose_metrics``: agent metrics, process metrics, then the fixed ones."""
    tool_calls = sum(1 for event in events if event["event_type"] == "tool_call")
    steps = sum(
        1 for event in events if event["event_type"] in ("step", "tool_call", "assistant_output")
    )
    metrics = dict(agent_metrics)
    metrics["tool_call_count"] = tool_calls
    metrics["step_event_count"] = steps
    metrics["unique_actor_count"] = len({event["actor_id"] for event in events})
    metrics["latency_s"] = latency_s
    metrics["cost_usd"] = cost_usd
    metrics["input_tokens"] = _number_or(agent_metrics.get("input_tokens"), 0)
    metrics["output_tokens"] = _number_or(agent_metrics.get("output_tokens"), 0)
    if evaluations:
        metrics.setdefault("primary_outcome", evaluations[0]["metric_value"])
    return metrics


def _number_or(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


# --- runner mode ---------------------------------------------------------------------------


def _execute_runner(
    spec: RunSpec, resolver: Resolver, started_at: datetime, start: float
) -> RunResult:
    runner = resolver.runner()
    condition = _condition(spec)
    call = _RunnerCall(spec, condition, ProblemPacket(problem_id=spec.problem_key))
    with global_seed(spec.seed):
        raw = call.invoke(*_plan(runner, _RunnerCall))
    if isinstance(raw, Mapping) and "outputs" in raw:
        outputs, metrics = raw["outputs"], raw.get("metrics", {})
    elif hasattr(raw, "outputs") and hasattr(raw, "metrics"):
        outputs, metrics = raw.outputs, raw.metrics
    else:
        raise TypeError(
            f"condition runner returned {type(raw).__name__}; it must return RunOutput "
            "(or a mapping with 'outputs' and 'metrics')."
        )
    latency_s = time.perf_counter() - start
    run_metrics = dict(metrics)
    run_metrics.setdefault("latency_s", latency_s)
    return RunResult(
        run_id=spec.run_id,
        status=RunStatus.SUCCESS,
        started_at=started_at,
        ended_at=datetime.now(UTC),
        outputs=_jsonable(dict(outputs)),
        metrics=_jsonable(run_metrics),
        provenance={"execution_mode": "condition_runner"},
    )


# --- shared helpers --------------------------------------------------------------------------


def _condition(spec: RunSpec) -> RunCondition:
    return RunCondition(
        condition_id=spec.condition_id,
        factor_assignments=dict(spec.factor_assignments),
        block_assignments=dict(spec.block_assignments),
        metadata={"fingerprint": spec.condition_fingerprint},
    )


def _failed(
    spec: RunSpec,
    exc: BaseException,
    started_at: datetime,
    start: float,
    *,
    worker: str,
    runner_mode: bool,
) -> RunResult:
    """A failed result carrying the error's class, message and a bounded traceback."""
    latency_s = time.perf_counter() - start
    if isinstance(exc, BindingError):
        kind = ErrorKind.BINDING
    elif any(cls.__name__ in _TIMEOUT_TYPE_NAMES for cls in type(exc).__mro__):
        kind = ErrorKind.TIMEOUT
    else:
        kind = ErrorKind.ERROR
    provenance: dict[str, Any] = {
        "execution_mode": "condition_runner" if runner_mode else "agent",
        "agent_id": spec.agent_key,
    }
    provenance.update(_process_provenance(worker))
    return RunResult(
        run_id=spec.run_id,
        status=RunStatus.FAILED,
        started_at=started_at,
        ended_at=datetime.now(UTC),
        metrics={"latency_s": latency_s},
        provenance=provenance,
        error_kind=kind,
        error_type=type(exc).__name__,
        error_message=_bounded(str(exc), MESSAGE_LIMIT),
        traceback=_bounded("".join(traceback.format_exception(exc)), TRACEBACK_LIMIT),
    )


def _bounded(text: str, limit: int) -> str:
    """``text`` cut to about ``limit`` characters, keeping its start and its end."""
    if len(text) <= limit:
        return text
    head = limit // 8
    tail = limit - head - 64
    cut = len(text) - head - tail
    return f"{text[:head]}\n... [{cut} characters cut] ...\n{text[-tail:]}"


def _jsonable(value: Any) -> Any:
    """JSON types for the store: NumPy scalars and arrays become Python values first."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(item) for item in value]
    return to_jsonable(value)


_process_info: dict[str, Any] = {}


def _process_provenance(worker: str) -> dict[str, Any]:
    """Where the run executed; computed once per process (and again after a fork)."""
    pid = os.getpid()
    if _process_info.get("pid") != pid:
        _process_info.clear()
        _process_info.update(
            host=socket.gethostname(),
            pid=pid,
            python_version=platform.python_version(),
            package_versions={"studyq": _version("studyq"), "numpy": np.__version__},
        )
    return {**_process_info, "worker": worker}


def _version(distribution: str) -> str:
    try:
        return version(distribution)
    except PackageNotFoundError:
        return "not-installed"
