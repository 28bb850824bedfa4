"""Binding resolution: from the agent / problem / runner ids a study names to the code to call.

A study names agents and problems by id (DESIGN.md, "Agents and problems"). A worker turns an
id into code through, in order:

1. in-process objects (embedded mode: the upstream's ``agent_bindings`` / ``problem_registry``
   / ``condition_runner`` passed directly),
2. the study's ``bindings`` section (``id: "package.module:callable"``),
3. installed entry points (groups ``studyq.agents`` / ``studyq.problems``),
4. the design-research ecosystem packages (``design_research_agents.integration`` /
   ``design_research_problems.integration``) when they are installed.

Importing a module runs its code, and a study file may come from anyone who can submit to a
shared cluster, so every import reference is checked against an allow-list *before* anything
is imported. By default the list holds the study's own references (unless the worker does not
trust study files: ``STUDYQ_TRUST_STUDY_BINDINGS=false``) and the installed entry points'
references; ``allowed_imports`` adds module prefixes (``mylab.agents``) or exact references
(``mylab.agents:planner``), which is where ``STUDYQ_ALLOWED_IMPORTS`` goes.

Imports are cached per process, so a worker pays for an import once, not once per run.
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from functools import cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from orchestrator.contracts.errors import BindingError
from orchestrator.contracts.extensions import Bindings, check_reference

__all__ = ["AGENT_GROUP", "PROBLEM_GROUP", "ProblemPacket", "Resolver"]

AGENT_GROUP = "studyq.agents"
PROBLEM_GROUP = "studyq.problems"

_AGENTS_ECOSYSTEM = "design_research_agents"
_PROBLEMS_ECOSYSTEM = "design_research_problems"


@dataclass(slots=True)
class ProblemPacket:
    """A problem ready to hand to an agent and to evaluate its output.

    Field-compatible with the upstream ``ProblemPacket``, so upstream packets (and packet
    mappings) work unchanged. ``payload["problem_object"]`` is what agents receive as
    ``problem`` when present. ``evaluator`` receives the selected candidate of the agent's
    output (its ``candidate``, ``state``, ``answer``, ``solution``, ``final_answer`` or ``x``
    entry, else the whole output); ``output_evaluator``, a studyq addition, receives the whole
    output mapping and wins when both are set.
    """

    problem_id: str
    family: str = "unknown"
    brief: str = ""
    payload: dict[str, Any] = field(default_factory=dict)
    metadata: dict[str, Any] = field(default_factory=dict)
    evaluator: Callable[[Any], Any] | None = None
    output_evaluator: Callable[[Mapping[str, Any]], Any] | None = None

    @property
    def problem_object(self) -> Any:
        """The native problem object, or ``None`` when the packet has none."""
        return self.payload.get("problem_object")


class Resolver:
    """Turns a study's agent, problem and runner ids into code, importing only allowed code.

    Build one per study and process and reuse it: resolved ids are cached on the instance,
    imports in the process.

    Args:
        bindings: The study's ``bindings`` section.
        agents: In-process agents by id (objects, callables or condition-scoped factories).
        problems: In-process problems by id (packets, packet mappings or factories).
        runner: In-process condition runner; puts the study in condition-runner mode.
        allowed_imports: Extra module prefixes or exact ``module:attr`` references.
        trust_study: Whether the study's own references are allowed without being listed in
            ``allowed_imports``. Workers that execute study files from other people should
            pass ``False`` (``STUDYQ_TRUST_STUDY_BINDINGS``).
        registered_references: The study's own references as it was registered, trusted
            instead of what ``bindings`` names now (a worker reads the bindings from a row
            that may have been edited since). Default: the bindings' references.
    """

    def __init__(
        self,
        bindings: Bindings | None = None,
        *,
        agents: Mapping[Any, Any] | None = None,
        problems: Mapping[Any, Any] | None = None,
        runner: Callable[..., Any] | None = None,
        allowed_imports: Iterable[str] = (),
        trust_study: bool = True,
        registered_references: Iterable[str] | None = None,
    ) -> None:
        self._bindings = bindings or Bindings()
        self._agents_in_process = {str(key): value for key, value in (agents or {}).items()}
        self._problems_in_process = {str(key): value for key, value in (problems or {}).items()}
        self._runner_in_process = runner
        self._study_references = frozenset(
            self._bindings.references() if registered_references is None else registered_references
        )
        self._trust_study = trust_study
        exact: set[str] = set()
        prefixes: set[str] = set()
        trusted = self._study_references if trust_study else frozenset()
        for entry in (*allowed_imports, *trusted):
            entry = entry.strip()
            if not entry:
                continue
            (exact if ":" in entry else prefixes).add(entry)
        for group in (AGENT_GROUP, PROBLEM_GROUP):
            exact |= {_entry_point_reference(ep) for ep in _entry_points(group).values()}
        self._allowed_exact = frozenset(exact)
        self._allowed_prefixes = tuple(sorted(prefixes))
        self._agent_cache: dict[str, Any] = {}
        self._problem_cache: dict[str, ProblemPacket] = {}
        self._runner_cache: Callable[..., Any] | None = None

    @property
    def uses_runner(self) -> bool:
        """Whether the study runs a condition runner instead of agents on problems."""
        return self._runner_in_process is not None or self._bindings.runner is not None

    def is_allowed(self, reference: str) -> bool:
        """Whether ``reference`` (``module:attr``) may be imported by this resolver."""
        if reference in self._allowed_exact:
            return True
        module = reference.partition(":")[0]
        return any(
            module == prefix or module.startswith(prefix + ".") for prefix in self._allowed_prefixes
        )

    def load(self, reference: str) -> Any:
        """Import ``module:attr`` if the allow-list permits it; refuse before importing if not.

        Raises:
            BindingError: The reference is malformed, not allowed, or cannot be imported.
        """
        try:
            check_reference(reference)
        except ValueError as exc:
            raise BindingError(str(exc)) from None
        if not self.is_allowed(reference):
            if not self._trust_study and reference in self._study_references:
                raise BindingError(
                    f"import of '{reference}' refused: this worker does not trust the "
                    "references of study bindings (STUDYQ_TRUST_STUDY_BINDINGS=false), and it "
                    "is neither an installed entry point nor on STUDYQ_ALLOWED_IMPORTS. Fix: "
                    f"add '{reference.partition(':')[0]}' to STUDYQ_ALLOWED_IMPORTS on this "
                    "worker, install it as an entry point, or set "
                    "STUDYQ_TRUST_STUDY_BINDINGS=true if you trust whoever registers studies."
                )
            raise BindingError(
                f"import of '{reference}' refused: it is not on the worker's allow-list. "
                "Fix: install it as an entry point, or add its module to STUDYQ_ALLOWED_IMPORTS."
            )
        return _import_reference(reference)

    def agent(self, agent_id: Any) -> Any:
        """The agent bound to ``agent_id``: an executable, or a factory taking the condition.

        Raises:
            BindingError: No source knows the id, or its reference is refused or broken.
        """
        key = str(agent_id)
        if key in self._agent_cache:
            return self._agent_cache[key]
        binding = self._find_agent(key)
        if not (callable(binding) or callable(getattr(binding, "run", None))):
            raise BindingError(
                f"agent '{key}' resolved to {type(binding).__name__}, which is neither callable "
                "nor has a run() method."
            )
        self._agent_cache[key] = binding
        return binding

    def problem(self, problem_id: Any) -> ProblemPacket:
        """The problem packet for ``problem_id`` (built once per resolver; keep it stateless).

        Raises:
            BindingError: No source knows the id, or what it names is not a problem.
        """
        key = str(problem_id)
        cached = self._problem_cache.get(key)
        if cached is not None:
            return cached
        packet = self._find_problem(key)
        self._problem_cache[key] = packet
        return packet

    def runner(self) -> Callable[..., Any]:
        """The condition runner (in-process first, then ``bindings.runner``).

        Raises:
            BindingError: No runner is configured, or its reference is refused or broken.
        """
        if self._runner_cache is not None:
            return self._runner_cache
        runner = self._runner_in_process
        if runner is None and self._bindings.runner is not None:
            runner = self.load(self._bindings.runner)
        if runner is None:
            raise BindingError("no condition runner configured. Fix: set bindings.runner.")
        if not callable(runner):
            raise BindingError(f"condition runner {runner!r} is not callable.")
        self._runner_cache = runner
        return runner

    def _find_agent(self, key: str) -> Any:
        if key in self._agents_in_process:
            return self._agents_in_process[key]
        reference = self._bindings.agents.get(key)
        if reference is not None:
            return self.load(reference)
        entry_point = _entry_points(AGENT_GROUP).get(key)
        if entry_point is not None:
            return _load_entry_point(entry_point)
        integration = _ecosystem_integration(_AGENTS_ECOSYSTEM)
        if integration is not None:
            return _EcosystemAgent(integration=integration, agent_id=key)
        raise BindingError(
            f"unknown agent '{key}': it is not in bindings.agents, no installed package "
            f"provides it as a '{AGENT_GROUP}' entry point, and design-research-agents is not "
            f'installed. Fix: add `bindings: {{agents: {{"{key}": "package.module:callable"}}}}` '
            "to the study."
        )

    def _find_problem(self, key: str) -> ProblemPacket:
        if key in self._problems_in_process:
            return _to_packet(self._problems_in_process[key], key)
        reference = self._bindings.problems.get(key)
        if reference is not None:
            return _to_packet(self.load(reference), key)
        entry_point = _entry_points(PROBLEM_GROUP).get(key)
        if entry_point is not None:
            return _to_packet(_load_entry_point(entry_point), key)
        integration = _ecosystem_integration(_PROBLEMS_ECOSYSTEM)
        if integration is not None:
            return _ecosystem_problem(integration, key)
        raise BindingError(
            f"unknown problem '{key}': it is not in bindings.problems, no installed package "
            f"provides it as a '{PROBLEM_GROUP}' entry point, and design-research-problems is "
            f'not installed. Fix: add `bindings: {{problems: {{"{key}": '
            '"package.module:factory"}}` to the study.'
        )


@dataclass(frozen=True, slots=True)
class _EcosystemAgent:
    """An agent id served by ``design_research_agents.integration`` (as the upstream does)."""

    integration: Any
    agent_id: str

    def run(self, prompt: Any, request_id: str, dependencies: dict[str, Any]) -> Any:
        """Delegate one run to the ecosystem package; return its envelope as a result mapping."""
        envelope = self.integration.execute_agent_run(
            self.agent_id, prompt=prompt, request_id=request_id, dependencies=dependencies
        )
        return {
            "output": dict(getattr(envelope, "output", {}) or {}),
            "metrics": dict(getattr(envelope, "metrics", {}) or {}),
            "events": list(getattr(envelope, "events", []) or []),
            "trace_refs": list(getattr(envelope, "trace_refs", []) or []),
            "metadata": dict(getattr(envelope, "metadata", {}) or {}),
        }


def _ecosystem_problem(integration: Any, key: str) -> ProblemPacket:
    """A problem id served by ``design_research_problems.integration``."""
    try:
        binding = integration.resolve_problem_binding(key)
    except Exception as exc:
        raise BindingError(
            f"design-research-problems cannot resolve problem '{key}': {exc}"
        ) from exc

    def evaluate(output: Mapping[str, Any]) -> Any:
        return integration.evaluate_problem_output(binding, output)

    return ProblemPacket(
        problem_id=str(binding.problem_id),
        family=str(binding.family),
        brief=str(binding.brief),
        payload={"problem_object": binding.problem_object},
        metadata=dict(binding.metadata),
        output_evaluator=evaluate,
    )


def _to_packet(value: Any, key: str) -> ProblemPacket:
    """Normalize what a problem binding names: a packet, a mapping, or a zero-arg factory."""
    if isinstance(value, ProblemPacket):
        return value
    if isinstance(value, Mapping):
        return ProblemPacket(
            problem_id=str(value.get("problem_id", key)),
            family=str(value.get("family", "unknown")),
            brief=str(value.get("brief", "")),
            payload=dict(value.get("payload", {})),
            metadata=dict(value.get("metadata", {})),
            evaluator=value.get("evaluator"),
            output_evaluator=value.get("output_evaluator"),
        )
    is_packet_like = hasattr(value, "evaluator") and hasattr(value, "brief")
    if is_packet_like and not isinstance(value, type):  # e.g. the upstream ProblemPacket
        return ProblemPacket(
            problem_id=str(getattr(value, "problem_id", key)),
            family=str(getattr(value, "family", "unknown")),
            brief=str(value.brief),
            payload=dict(getattr(value, "payload", {}) or {}),
            metadata=dict(getattr(value, "metadata", {}) or {}),
            evaluator=value.evaluator,
        )
    if callable(value):
        try:
            built = value()
        except TypeError as exc:
            raise BindingError(
                f"problem '{key}': factory {value!r} must take no arguments ({exc})."
            ) from exc
        if not callable(built):
            return _to_packet(built, key)
    raise BindingError(
        f"problem '{key}' resolved to {type(value).__name__}; expected a ProblemPacket, a "
        "packet mapping, or a zero-argument factory returning one."
    )


# Per-process caches. Imports are process-wide anyway (sys.modules); these only skip the
# lookups and the entry-point scan on every run.
_imported: dict[str, Any] = {}


def _import_reference(reference: str) -> Any:
    """Import ``module:attr.attr`` once per process."""
    cached = _imported.get(reference, _imported)
    if cached is not _imported:
        return cached
    module_name, _, attribute_path = reference.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for attribute in attribute_path.split("."):
            value = getattr(value, attribute)
    except (ImportError, AttributeError) as exc:
        raise BindingError(f"cannot import '{reference}': {exc}") from exc
    _imported[reference] = value
    return value


def _load_entry_point(entry_point: EntryPoint) -> Any:
    """Load an entry point once per process."""
    reference = _entry_point_reference(entry_point)
    cached = _imported.get(reference, _imported)
    if cached is not _imported:
        return cached
    try:
        value = entry_point.load()
    except (ImportError, AttributeError) as exc:
        raise BindingError(
            f"cannot load entry point '{entry_point.name}' ({reference}): {exc}"
        ) from exc
    _imported[reference] = value
    return value


def _entry_point_reference(entry_point: EntryPoint) -> str:
    """``module:attr`` of an entry point, without extras."""
    return f"{entry_point.module}:{entry_point.attr}" if entry_point.attr else entry_point.module


@cache
def _entry_points(group: str) -> dict[str, EntryPoint]:
    """Installed entry points of ``group`` by name (first installed distribution wins)."""
    found: dict[str, EntryPoint] = {}
    for entry_point in entry_points(group=group):
        found.setdefault(entry_point.name, entry_point)
    return found


@cache
def _ecosystem_integration(package: str) -> Any | None:
    """``<package>.integration`` when ``package`` is installed, else ``None``."""
    if importlib.util.find_spec(package) is None:
        return None
    try:
        return importlib.import_module(f"{package}.integration")
    except ImportError as exc:
        raise BindingError(
            f"{package} is installed but has no usable `integration` module ({exc}). "
            "Fix: upgrade it to a release that provides one."
        ) from exc
