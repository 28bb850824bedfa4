"""Demo agents: search strategies for the demo problems, plus benchmark and failure helpers.

The search agents read their settings from the condition's factor levels, so a study can vary
them: ``budget`` (objective evaluations, default 200), ``step_size`` (in the unit cube,
default 0.1) and, for annealing, ``temperature`` (default 1.0, relative to the starting
objective). They search the unit cube and return ``{"candidate": [...]}`` for the problem's
evaluator.

:func:`random_search` draws from Python's ``random`` and NumPy's global state on purpose, as
much research code does: it is deterministic only because the run seeds both and restores
them afterwards. :func:`hill_climb` and :func:`annealing` draw from the ``rng`` they are
handed (or build the same generator from ``seed`` when a runner does not hand one over).

Only parameter names that the upstream runner passes too are required (``problem``,
``condition``, ``seed``), so these functions also run under design-research-experiments.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import numpy as np

from workers.demo.problems import DesignProblem
from workers.execution import RunCondition, agent_result

__all__ = ["FlakyAgentError", "annealing", "flaky", "hill_climb", "noop", "random_search", "sleep"]

_T = TypeVar("_T", int, float)
_MAX_EVENTS = 20


class FlakyAgentError(RuntimeError):
    """Raised by :func:`flaky` on purpose."""


def random_search(problem: DesignProblem, condition: RunCondition) -> dict[str, Any]:
    """Half the budget on uniform samples from NumPy's global RNG, the other half on Gaussian
    jumps around the best design so far, drawn from Python's global ``random``."""
    budget = _factor(condition, "budget", 200, int)
    step = _factor(condition, "step_size", 0.1, float)
    explore = max(budget // 2, 1)
    best_unit: list[float] = []
    best = math.inf
    for unit in np.random.random((explore, problem.dimension)).tolist():
        score = problem.penalized(problem.from_unit(unit))
        if score < best:
            best, best_unit = score, unit
    for _ in range(budget - explore):
        unit = [_clip(value + random.gauss(0.0, step)) for value in best_unit]
        score = problem.penalized(problem.from_unit(unit))
        if score < best:
            best, best_unit = score, unit
    return _result(problem, best_unit, best, budget, "random-search", [])


def hill_climb(
    problem: DesignProblem,
    condition: RunCondition,
    seed: int,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Gaussian steps from a random start, keeping improvements; the step halves after 25
    failures in a row. Emits a ``step`` event for each of its first improvements."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    budget = _factor(condition, "budget", 200, int)
    step = _factor(condition, "step_size", 0.1, float)
    current = rng.random(problem.dimension).tolist()
    best = problem.penalized(problem.from_unit(current))
    noise = rng.normal(0.0, 1.0, (max(budget - 1, 0), problem.dimension)).tolist()
    events: list[dict[str, Any]] = []
    failures = 0
    for evaluation, direction in enumerate(noise, start=2):
        candidate = [_clip(c + step * d) for c, d in zip(current, direction, strict=True)]
        score = problem.penalized(problem.from_unit(candidate))
        if score < best:
            current, best, failures = candidate, score, 0
            if len(events) < _MAX_EVENTS:
                events.append(
                    {
                        "event_type": "step",
                        "text": f"improved to {best:.6g}",
                        "meta_json": {"evaluation": evaluation, "objective": best},
                    }
                )
        else:
            failures += 1
            if failures >= 25:
                step, failures = step / 2.0, 0
    return _result(problem, current, best, budget, "hill-climb", events)


def annealing(
    problem: DesignProblem,
    condition: RunCondition,
    seed: int,
    rng: np.random.Generator | None = None,
) -> dict[str, Any]:
    """Simulated annealing with a geometric schedule from ``temperature`` down a thousandfold;
    worse moves are accepted with probability ``exp(-relative loss / T)``."""
    rng = rng if rng is not None else np.random.default_rng(seed)
    budget = _factor(condition, "budget", 200, int)
    step = _factor(condition, "step_size", 0.1, float)
    temperature = _factor(condition, "temperature", 1.0, float)
    moves = max(budget - 1, 1)
    cooling = 1e-3 ** (1.0 / moves)
    current = rng.random(problem.dimension).tolist()
    current_score = problem.penalized(problem.from_unit(current))
    scale = abs(current_score) or 1.0
    best_unit, best = current, current_score
    noise = rng.normal(0.0, 1.0, (budget - 1 if budget > 1 else 0, problem.dimension)).tolist()
    draws = rng.random(len(noise)).tolist()
    for direction, draw in zip(noise, draws, strict=True):
        candidate = [_clip(c + step * d) for c, d in zip(current, direction, strict=True)]
        score = problem.penalized(problem.from_unit(candidate))
        loss = (score - current_score) / scale
        if loss <= 0.0 or (temperature > 0.0 and draw < math.exp(-loss / temperature)):
            current, current_score = candidate, score
            if score < best:
                best_unit, best = candidate, score
        temperature *= cooling
    return _result(problem, best_unit, best, budget, "annealing", [])


def noop(seed: int) -> dict[str, Any]:
    """Does nothing: measures studyq's own per-run overhead."""
    return {"output": {"seed": seed}}


def sleep(condition: RunCondition) -> dict[str, Any]:
    """Sleeps ``sleep_s`` seconds (factor, default 0.02): a stand-in for a model call."""
    seconds = _factor(condition, "sleep_s", 0.02, float)
    time.sleep(seconds)
    return {"output": {"text": f"slept {seconds} s"}}


def flaky(condition: RunCondition, seed: int) -> dict[str, Any]:
    """Fails when the factor ``fail`` is true, or with probability ``fail_rate`` (per seed).

    Raises:
        FlakyAgentError: On purpose, to exercise failure handling.
    """
    factors = condition.factor_assignments
    if _truthy(factors.get("fail", False)):
        raise FlakyAgentError(f"flaky agent failed on purpose (fail={factors.get('fail')!r})")
    fail_rate = _factor(condition, "fail_rate", 0.0, float)
    if fail_rate > 0.0 and random.Random(seed).random() < fail_rate:
        raise FlakyAgentError(f"flaky agent failed on purpose (fail_rate={fail_rate})")
    return {"output": {"text": "ok"}}


def _result(
    problem: DesignProblem,
    unit: list[float],
    best: float,
    budget: int,
    pattern: str,
    events: list[dict[str, Any]],
) -> dict[str, Any]:
    design = problem.from_unit(unit)
    summary = ", ".join(
        f"{name}={value:.4g}" for name, value in zip(problem.variables, design, strict=True)
    )
    return agent_result(
        {"candidate": design, "text": f"{pattern}: {summary} (penalized objective {best:.6g})"},
        metrics={"evaluations_used": budget},
        events=events,
        metadata={"agent_kind": "search", "pattern_name": pattern},
    )


def _factor(condition: RunCondition, name: str, default: _T, convert: Callable[[Any], _T]) -> _T:
    """A factor's level converted to the setting's type, or the default when not a factor."""
    factors: Mapping[str, Any] = condition.factor_assignments
    value = factors.get(name)
    return default if value is None else convert(value)


def _truthy(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in {"1", "true", "yes", "on"}
    return bool(value)


def _clip(value: float) -> float:
    return 0.0 if value < 0.0 else 1.0 if value > 1.0 else value
