"""How studyq calls an agent or a condition runner: the call contract of docs/agents.md.

Agents and runners receive keyword arguments by parameter name, exactly the names below that
their signature declares (all of them when it takes ``**kwargs``):

=================  ===================================================================
``problem_packet``  the :class:`~workers.bindings.ProblemPacket`
``problem``         ``packet.payload["problem_object"]`` when present, else the packet
``brief``           ``packet.brief``
``run_spec``        the :class:`~orchestrator.contracts.runspec.RunSpec`
``condition``       a :class:`~workers.execution.RunCondition` (``condition_id``, ...)
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
condition for every run and returns the agent to call. How to call a callable is worked out
once from its signature (:func:`plan_call`) and cached.
"""

from __future__ import annotations

import inspect
import types
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

from orchestrator.contracts.conditions import Condition
from orchestrator.contracts.runspec import RunSpec
from workers.bindings import ProblemPacket
from workers.seeding import make_rng

__all__ = ["AgentCall", "Plan", "RunnerCall", "plan_call"]

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


@dataclass(frozen=True, slots=True)
class Plan:
    """How to call one callable, worked out once from its signature."""

    keywords: tuple[str, ...] = ()
    positional: int = 0  # when no keywords: how many of the call's positional arguments
    is_factory: bool = False


class AgentCall:
    """The values an agent can ask for by name, built only when asked for."""

    __slots__ = ("condition", "packet", "spec")
    names: ClassVar[tuple[str, ...]] = _AGENT_PARAMETERS

    def __init__(self, spec: RunSpec, condition: Condition, packet: ProblemPacket) -> None:
        self.spec = spec
        self.condition = condition
        self.packet = packet

    def invoke(self, target: Callable[..., Any], plan: Plan) -> Any:
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


class RunnerCall(AgentCall):
    """Runners get the run's names; positionally they get ``(run_spec, condition)``."""

    __slots__ = ()
    names: ClassVar[tuple[str, ...]] = _RUNNER_PARAMETERS

    def invoke(self, target: Callable[..., Any], plan: Plan) -> Any:
        """Call ``target`` as ``plan`` says."""
        if plan.keywords:
            return target(**{name: self.value(name) for name in plan.keywords})
        if plan.positional < 0:
            return target(self.spec, self.condition)
        return target(*(self.spec, self.condition)[: plan.positional])


_plans: dict[Any, Plan] = {}


def plan_call(executable: Any, call: type[AgentCall]) -> tuple[Callable[..., Any], Plan]:
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


def _plan_key(target: Any, call: type[AgentCall], *, uses_run: bool) -> Any:
    """Signatures belong to functions, not bound objects; key plans so they are shared."""
    if isinstance(target, types.FunctionType):
        return (target, call, uses_run)
    if isinstance(target, types.MethodType):
        return (target.__func__, call, uses_run, "bound")
    call_method = inspect.getattr_static(type(target), "__call__", None)
    if isinstance(call_method, types.FunctionType) and not isinstance(target, type):
        return (call_method, call, uses_run, "instance")
    return None  # builtins, partials, classes: not worth caching, and easy to get wrong


def _build_plan(target: Callable[..., Any], call: type[AgentCall], *, uses_run: bool) -> Plan:
    """Keyword names the signature asks for; else the upstream's positional convention."""
    try:
        parameters = inspect.signature(target).parameters
    except (TypeError, ValueError):
        return Plan(positional=-1)
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
    if named and call is AgentCall and required_unknown:
        unknown = next(
            p.name for p in positional if p.default is kinds.empty and p.name not in call.names
        )
        raise TypeError(
            f"agent parameter '{unknown}' is not one studyq passes; name it after what it "
            f"receives ({', '.join(call.names)}), see docs/agents.md"
        )
    if named and not required_unknown:
        return Plan(keywords=named)
    is_factory = (
        call is AgentCall
        and not uses_run
        and len(parameters) == 1
        and len(positional) == 1
        and positional[0].name not in _UPSTREAM_PARAMETERS
    )
    count = 2 if takes_args else min(len(positional), 2)
    return Plan(positional=count, is_factory=is_factory)
