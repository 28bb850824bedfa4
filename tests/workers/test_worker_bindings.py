"""Binding resolution: the order of sources, the allow-list (checked before any import), and
what a problem reference may name."""

from __future__ import annotations

import itertools
import re
import sys
import textwrap
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from orchestrator.contracts.errors import BindingError
from orchestrator.contracts.extensions import Bindings
from orchestrator.contracts.results import RunStatus
from orchestrator.contracts.runspec import RunSpec
from workers import bindings
from workers.bindings import ProblemPacket, Resolver
from workers.demo import agents as demo_agents
from workers.demo import problems as demo_problems
from workers.execution import execute_run

_counter = itertools.count()

ModuleFactory = Callable[[str], str]


@pytest.fixture
def write_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[ModuleFactory]:
    """Write a uniquely named module into a directory on sys.path; forget it afterwards."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def write(source: str) -> str:
        name = f"studyq_test_mod_{next(_counter)}"
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        written.append(name)
        return name

    yield write
    for name in written:
        sys.modules.pop(name, None)
        bindings._imported.pop(f"{name}:agent", None)


@pytest.fixture
def fake_ecosystem(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A stand-in design_research_agents / design_research_problems with `integration`."""
    root = tmp_path / "eco"
    for package in ("design_research_agents", "design_research_problems"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "design_research_agents" / "integration.py").write_text(
        textwrap.dedent(
            """
            from types import SimpleNamespace

            def execute_agent_run(agent_id, *, prompt, request_id, dependencies):
                return SimpleNamespace(
                    output={"text": f"eco:{agent_id}:{dependencies['seed']}"},
                    metrics={"input_tokens": 3},
                    events=[],
                    trace_refs=["trace/eco.jsonl"],
                    metadata={"model_name": "eco-model"},
                )
            """
        )
    )
    (root / "design_research_problems" / "integration.py").write_text(
        textwrap.dedent(
            """
            from types import SimpleNamespace

            def resolve_problem_binding(problem_id):
                if problem_id != "eco-problem":
                    raise KeyError(problem_id)
                return SimpleNamespace(
                    problem_id=problem_id, family="eco", brief="an eco brief",
                    problem_object={"kind": "eco"}, metadata={"source": "eco"},
                )

            def evaluate_problem_output(binding, output):
                return [{"metric_name": "eco_score", "metric_value": len(output.get("text", ""))}]
            """
        )
    )
    monkeypatch.syspath_prepend(str(root))
    yield root
    for name in list(sys.modules):
        if name.startswith(("design_research_agents", "design_research_problems")):
            del sys.modules[name]


def _agent_module(write_module: ModuleFactory, text: str) -> str:
    return write_module(
        f"""
        def agent(seed):
            return {{"output": {{"text": "{text}"}}}}
        """
    )


# --- resolution order ----------------------------------------------------------------------


def test_agent_resolution_order(write_module: ModuleFactory, fake_ecosystem: Path) -> None:
    # Given "noop" available from every source
    module = _agent_module(write_module, "from-bindings")
    study = Bindings(agents={"noop": f"{module}:agent"})

    def in_process(seed: int) -> dict[str, Any]:
        return {"output": {}}

    # Then in-process objects win, then the study's bindings, then entry points
    assert Resolver(study, agents={"noop": in_process}).agent("noop") is in_process
    assert Resolver(study).agent("noop") is sys.modules[module].agent
    assert Resolver().agent("noop") is demo_agents.noop
    # and only ids nobody else knows reach the ecosystem package
    ecosystem_agent = Resolver().agent("only-in-ecosystem")
    assert type(ecosystem_agent).__name__ == "_EcosystemAgent"


def test_problem_resolution_order(fake_ecosystem: Path) -> None:
    packet = ProblemPacket(problem_id="noop", family="in-process")
    study = Bindings(problems={"noop": "workers.demo.problems:beam_design"})

    assert Resolver(problems={"noop": packet}).problem("noop") is packet
    assert Resolver(study, problems={"noop": packet}).problem("noop") is packet
    assert Resolver(study).problem("noop").problem_id == "beam-design"
    assert Resolver().problem("noop").family == "benchmark"
    eco = Resolver().problem("eco-problem")
    assert (eco.family, eco.brief, eco.problem_object) == ("eco", "an eco brief", {"kind": "eco"})
    assert eco.output_evaluator is not None
    assert eco.output_evaluator({"text": "abcd"}) == [
        {"metric_name": "eco_score", "metric_value": 4}
    ]


def test_ecosystem_agents_and_problems_run_end_to_end(
    fake_ecosystem: Path, make_spec: Callable[..., RunSpec]
) -> None:
    result = execute_run(make_spec("eco-agent", "eco-problem", seed=17), Resolver())
    assert result.status is RunStatus.SUCCESS, result.traceback
    assert result.outputs == {"text": "eco:eco-agent:17"}
    assert result.metrics["input_tokens"] == 3.0
    assert result.metrics["primary_outcome"] == len("eco:eco-agent:17")
    assert result.trace_refs == ["trace/eco.jsonl"]
    assert result.provenance["model_name"] == "eco-model"
    assert result.provenance["problem_family"] == "eco"


def test_ecosystem_problem_that_does_not_exist_is_a_binding_error(fake_ecosystem: Path) -> None:
    with pytest.raises(BindingError, match="cannot resolve problem 'nope'"):
        Resolver().problem("nope")


def test_unknown_ids_say_how_to_bind_them() -> None:
    with pytest.raises(BindingError, match=r"unknown agent 'mystery'.*bindings: \{agents"):
        Resolver().agent("mystery")
    with pytest.raises(BindingError, match=r"unknown problem 'mystery'.*bindings: \{problems"):
        Resolver().problem("mystery")


def test_demo_entry_points_are_installed() -> None:
    resolver = Resolver()
    for agent_id in ("random-search", "hill-climb", "annealing", "noop", "sleep", "flaky"):
        assert callable(resolver.agent(agent_id))
    for problem_id in ("beam-design", "spring-design", "noop"):
        assert resolver.problem(problem_id).problem_id == problem_id


def test_non_string_ids_resolve_by_their_text() -> None:
    packet = ProblemPacket(problem_id="2")
    assert Resolver(problems={"2": packet}).problem(2) is packet
    assert Resolver(problems={2: packet}).problem("2") is packet


def test_runner_resolution() -> None:
    def runner(run_spec: Any, condition: Any) -> Any:
        return None

    assert not Resolver().uses_runner
    assert Resolver(runner=runner).uses_runner
    assert Resolver(runner=runner).runner() is runner
    study = Bindings(runner="workers.demo.agents:noop")
    assert Resolver(study).uses_runner
    assert Resolver(study).runner() is demo_agents.noop
    with pytest.raises(BindingError, match="no condition runner"):
        Resolver().runner()


# --- the allow-list -------------------------------------------------------------------------


@pytest.fixture
def marker_module(write_module: ModuleFactory, tmp_path: Path) -> tuple[str, Path]:
    """A module whose import writes a marker file: proof that it was (not) imported."""
    marker = tmp_path / "imported.marker"
    name = write_module(
        f"""
        from pathlib import Path
        Path({str(marker)!r}).write_text("imported")

        def agent(seed):
            return {{"output": {{"text": "ran"}}}}
        """
    )
    return name, marker


def test_a_reference_not_on_the_allow_list_is_refused_without_importing(
    marker_module: tuple[str, Path],
) -> None:
    # Given a worker that does not trust study files, and a study naming an unlisted module
    name, marker = marker_module
    resolver = Resolver(Bindings(agents={"evil": f"{name}:agent"}), trust_study=False)
    # When the agent is resolved
    with pytest.raises(BindingError, match=r"refused.*STUDYQ_ALLOWED_IMPORTS"):
        resolver.agent("evil")
    # Then nothing was imported: no side effect, no module
    assert not marker.exists()
    assert name not in sys.modules


def test_load_refuses_unlisted_references_without_importing(
    marker_module: tuple[str, Path],
) -> None:
    name, marker = marker_module
    with pytest.raises(BindingError, match="refused"):
        Resolver().load(f"{name}:agent")
    assert not marker.exists()


@pytest.mark.parametrize("allowed", ["{name}", "{name}:agent"])
def test_allowed_imports_admit_prefixes_and_exact_references(
    marker_module: tuple[str, Path], allowed: str
) -> None:
    name, marker = marker_module
    study = Bindings(agents={"listed": f"{name}:agent"})
    resolver = Resolver(study, trust_study=False, allowed_imports=[allowed.format(name=name)])
    assert resolver.agent("listed")(seed=1) == {"output": {"text": "ran"}}
    assert marker.exists()


def test_prefixes_match_whole_module_names() -> None:
    resolver = Resolver(allowed_imports=["mylab.agents", " ", ""])
    assert resolver.is_allowed("mylab.agents:run")
    assert resolver.is_allowed("mylab.agents.llm:run")
    assert not resolver.is_allowed("mylab.agentsx:run")
    assert not resolver.is_allowed("mylab:run")


def test_default_allow_list_is_the_study_and_the_entry_points() -> None:
    study = Bindings(agents={"a": "mylab.agents:planner"}, runner="mylab.sim:run")
    trusting = Resolver(study)
    assert trusting.is_allowed("mylab.agents:planner")
    assert trusting.is_allowed("mylab.sim:run")
    assert trusting.is_allowed("workers.demo.agents:annealing")
    assert not trusting.is_allowed("os:system")
    cautious = Resolver(study, trust_study=False)
    assert not cautious.is_allowed("mylab.agents:planner")
    assert cautious.is_allowed("workers.demo.problems:beam_design")


def test_malformed_and_broken_references_are_binding_errors() -> None:
    resolver = Resolver(allowed_imports=["workers", "no_such_module_xyz"])
    with pytest.raises(BindingError, match="not an import reference"):
        resolver.load("workers.demo.agents")
    with pytest.raises(BindingError, match="cannot import 'no_such_module_xyz:f'"):
        resolver.load("no_such_module_xyz:f")
    with pytest.raises(
        BindingError, match=re.escape("cannot import 'workers.demo.agents:missing'")
    ):
        resolver.load("workers.demo.agents:missing")


def test_imports_are_cached_per_process(write_module: ModuleFactory, tmp_path: Path) -> None:
    counter = tmp_path / "count.txt"
    name = write_module(
        f"""
        from pathlib import Path
        _p = Path({str(counter)!r})
        _p.write_text(str(int(_p.read_text()) + 1) if _p.exists() else "1")

        def agent(seed):
            return {{}}
        """
    )
    study = Bindings(agents={"x": f"{name}:agent"})
    first = Resolver(study).agent("x")
    sys.modules.pop(name)  # even a fresh resolver, with the module gone, reuses the import
    assert Resolver(study).agent("x") is first
    assert counter.read_text() == "1"


def test_a_binding_that_is_not_callable_is_refused() -> None:
    with pytest.raises(BindingError, match="neither callable nor has a run"):
        Resolver(agents={"x": 42}).agent("x")


# --- what a problem reference may name ------------------------------------------------------


def _score(candidate: Any) -> dict[str, float]:
    return {"score": 1.0}


def test_problem_shapes_are_normalized() -> None:
    upstream_like = SimpleNamespace(
        problem_id="up",
        family="f",
        brief="b",
        payload={"problem_object": 1},
        metadata={},
        evaluator=_score,
    )
    mapping = {"family": "m", "brief": "mb", "evaluator": _score}
    resolver = Resolver(
        problems={
            "packet": ProblemPacket(problem_id="packet"),
            "mapping": mapping,
            "upstream": upstream_like,
            "factory": demo_problems.spring_design,
            "lambda-factory": lambda: mapping,
        }
    )
    assert resolver.problem("packet").problem_id == "packet"
    assert (resolver.problem("mapping").problem_id, resolver.problem("mapping").family) == (
        "mapping",
        "m",
    )
    upstream = resolver.problem("upstream")
    assert (upstream.problem_id, upstream.problem_object, upstream.evaluator) == ("up", 1, _score)
    assert resolver.problem("factory").family == "mechanical-design"
    assert resolver.problem("lambda-factory").brief == "mb"
    assert resolver.problem("factory") is resolver.problem("factory")  # built once


def test_problem_references_that_are_not_problems_are_refused() -> None:
    resolver = Resolver(problems={"number": 3, "needs-args": lambda x: x, "class": ProblemPacket})
    with pytest.raises(BindingError, match="expected a ProblemPacket"):
        resolver.problem("number")
    with pytest.raises(BindingError, match="must take no arguments"):
        resolver.problem("needs-args")
    with pytest.raises(BindingError, match="must take no arguments"):
        resolver.problem("class")
