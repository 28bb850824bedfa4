"""Executing one run: the one function both executors call.

:func:`execute_run` resolves the run's agent and problem (or the study's condition runner),
calls the agent under the run's seed (:mod:`workers.seeding`) as the call contract says
(:mod:`workers.calling`), normalizes what it returned (:mod:`workers.returns`), evaluates
its output with the problem's evaluator and composes metrics, evaluation rows and event rows
(:mod:`workers.evaluation`) and provenance the way design-research-experiments'
``_execute_single_run`` does, so a run's outputs are the same whichever executor ran it, and
the same as upstream's. A failing run is a
:class:`~orchestrator.contracts.results.RunResult` with status ``failed``, never an exception.

What agents import from here (docs/agents.md): :func:`agent_result`, :data:`RunCondition`
and :class:`RunOutput`.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from orchestrator.contracts.conditions import Condition
from orchestrator.contracts.errors import BindingError, RunTimeoutError
from orchestrator.contracts.results import (
    ErrorKind,
    RunResult,
    RunStatus,
    failed_result,
    process_provenance,
)
from orchestrator.contracts.runspec import RunSpec
from workers.bindings import ProblemPacket, Resolver
from workers.calling import AgentCall, RunnerCall, plan_call
from workers.evaluation import compose_metrics, evaluate, event_rows, jsonable
from workers.returns import normalize_agent_return
from workers.seeding import global_seed
from workers.traces import store_traces

__all__ = ["RunCondition", "RunOutput", "agent_result", "execute_run"]

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
    on_error: Callable[[BaseException], None] | None = None,
) -> RunResult:
    """Execute one run with seed and failure isolation; never raises for a run's failure.

    Args:
        spec: The run.
        resolver: Resolves the study's agent, problem and runner ids.
        timeout_s: The run's time limit. Executors enforce it by killing the run; here a run
            that finishes but took longer is recorded as a timeout too, so every executor
            reports the same outcome for a slow run.
        worker: Name of the executing worker, recorded in provenance.
        on_error: Called with the exception of a run that failed, before its failed result
            is built (retries by error class classify it: :mod:`workers.transient`).
    """
    started_at = datetime.now(UTC)
    start = time.perf_counter()
    runner_mode = resolver.uses_runner
    try:
        if runner_mode:
            result = _execute_runner(spec, resolver, started_at, start)
        else:
            result = _execute_agent(spec, resolver, started_at, start)
        result.provenance.update(process_provenance(worker))
        if result.trace_refs:
            # imported here: pydantic-settings is a tenth of every pool process's start
            from orchestrator.contracts.settings import load_settings

            trace_dir = load_settings().trace_dir
            if trace_dir is not None:
                result.trace_refs = store_traces(result.trace_refs, spec, trace_dir)
        elapsed = time.perf_counter() - start
        if timeout_s is not None and elapsed > timeout_s:
            raise RunTimeoutError(f"run took {elapsed:.3f} s, over its limit of {timeout_s} s")
    except Exception as exc:
        if on_error is not None:
            on_error(exc)
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
        target, plan = plan_call(binding, AgentCall)
        if plan.is_factory:
            target, plan = plan_call(target(condition), AgentCall)
        raw = AgentCall(spec, condition, packet).invoke(target, plan)
        returned = normalize_agent_return(raw)
        evaluations = evaluate(packet, returned.output, spec.run_id)
    latency_s = time.perf_counter() - start
    events = event_rows(returned.events, returned.output, spec)
    cost_usd = float(returned.metrics.get("cost_usd", 0.0) or 0.0)
    metrics = compose_metrics(returned.metrics, evaluations, events, latency_s, cost_usd)
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
        provenance[key] = None if value in (None, "") else jsonable(value)
    return RunResult(
        run_id=spec.run_id,
        status=RunStatus.SUCCESS,
        started_at=started_at,
        ended_at=datetime.now(UTC),
        outputs=jsonable(returned.output),
        metrics=jsonable(metrics),
        evaluations=evaluations,
        events=events,
        trace_refs=returned.trace_refs,
        provenance=provenance,
    )


# --- runner mode ---------------------------------------------------------------------------


def _execute_runner(
    spec: RunSpec, resolver: Resolver, started_at: datetime, start: float
) -> RunResult:
    runner = resolver.runner()
    condition = _condition(spec)
    call = RunnerCall(spec, condition, ProblemPacket(problem_id=spec.problem_key))
    with global_seed(spec.seed):
        raw = call.invoke(*plan_call(runner, RunnerCall))
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
        outputs=jsonable(dict(outputs)),
        metrics=jsonable(run_metrics),
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
    """A failed result carrying the error's class, message and traceback."""
    if isinstance(exc, BindingError):
        kind = ErrorKind.BINDING
    elif any(cls.__name__ in _TIMEOUT_TYPE_NAMES for cls in type(exc).__mro__):
        kind = ErrorKind.TIMEOUT
    else:
        kind = ErrorKind.ERROR
    return failed_result(
        spec,
        kind,
        error_type=type(exc).__name__,
        message=str(exc),
        started_at=started_at,
        worker=worker,
        execution_mode="condition_runner" if runner_mode else "agent",
        latency_s=time.perf_counter() - start,
        traceback="".join(traceback.format_exception(exc)),
    )
