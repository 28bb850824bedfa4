"""Demo problems: small constrained design problems with a known good answer.

Each problem is a :class:`DesignProblem` (box bounds, an objective to minimize, constraints
``g(x) <= 0``) wrapped in a :class:`~workers.bindings.ProblemPacket` whose evaluator scores the
agent's ``candidate``. Agents receive the :class:`DesignProblem` as ``problem``.

The evaluation rows are, in order: ``objective`` (the penalized objective, so the first row,
and therefore ``primary_outcome``, ranks infeasible designs behind feasible ones), the raw
objective with its unit, ``feasible``, and ``constraint_violation``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from workers.bindings import ProblemPacket

__all__ = ["DesignProblem", "beam_design", "noop", "spring_design"]


@dataclass(frozen=True, slots=True)
class DesignProblem:
    """Minimize ``objective(x)`` over a box subject to ``constraints(x) <= 0``.

    ``penalty`` weighs the summed constraint violation in :meth:`penalized`; it is large
    enough that no infeasible design beats the best feasible one.
    """

    name: str
    variables: tuple[str, ...]
    lower: tuple[float, ...]
    upper: tuple[float, ...]
    objective_name: str
    objective_unit: str
    objective: Callable[[Sequence[float]], float]
    constraints: Callable[[Sequence[float]], tuple[float, ...]]
    penalty: float

    @property
    def dimension(self) -> int:
        """Number of design variables."""
        return len(self.variables)

    def from_unit(self, unit: Sequence[float]) -> list[float]:
        """Map a point of the unit cube to the design box (agents search the unit cube)."""
        return [
            lo + min(max(u, 0.0), 1.0) * (hi - lo)
            for u, lo, hi in zip(unit, self.lower, self.upper, strict=True)
        ]

    def violation(self, x: Sequence[float]) -> float:
        """Summed constraint violation; 0 for a feasible design."""
        return sum(g for g in self.constraints(x) if g > 0.0)

    def penalized(self, x: Sequence[float]) -> float:
        """The objective plus the weighted violation: what the demo agents minimize."""
        return self.objective(x) + self.penalty * self.violation(x)

    def evaluate(self, candidate: Any) -> list[dict[str, Any]]:
        """Evaluation rows for an agent's candidate (a sequence, or a mapping by variable).

        Raises:
            ValueError: The candidate has the wrong size or a value outside the bounds.
        """
        x = self._as_point(candidate)
        violation = self.violation(x)
        objective = self.objective(x)
        notes = {"candidate": dict(zip(self.variables, x, strict=True))}
        return [
            {
                "metric_name": "objective",
                "metric_value": objective + self.penalty * violation,
                "metric_unit": self.objective_unit,
                "notes_json": notes,
            },
            {
                "metric_name": self.objective_name,
                "metric_value": objective,
                "metric_unit": self.objective_unit,
            },
            {"metric_name": "feasible", "metric_value": violation <= 0.0},
            {"metric_name": "constraint_violation", "metric_value": violation},
        ]

    def _as_point(self, candidate: Any) -> list[float]:
        if isinstance(candidate, Mapping):
            candidate = [candidate[name] for name in self.variables]
        point = [float(value) for value in candidate]
        if len(point) != self.dimension:
            raise ValueError(
                f"{self.name}: candidate has {len(point)} values, expected {self.dimension} "
                f"({', '.join(self.variables)})"
            )
        for name, value, lo, hi in zip(self.variables, point, self.lower, self.upper, strict=True):
            if not lo <= value <= hi or math.isnan(value):
                raise ValueError(f"{self.name}: {name}={value} is outside [{lo}, {hi}]")
        return point


# Cantilever beam with a rectangular section (width b, height h, metres), steel, tip load.
_BEAM_LENGTH = 1.0  # m
_BEAM_LOAD = 5_000.0  # N
_STEEL_E = 200e9  # Pa
_STEEL_DENSITY = 7_850.0  # kg/m^3
_ALLOWED_STRESS = 150e6  # Pa
_ALLOWED_DEFLECTION = _BEAM_LENGTH / 250  # m
_MAX_ASPECT = 10.0  # h/b, a rule of thumb against lateral-torsional buckling


def _beam_mass(x: Sequence[float]) -> float:
    b, h = x
    return _STEEL_DENSITY * b * h * _BEAM_LENGTH


def _beam_constraints(x: Sequence[float]) -> tuple[float, ...]:
    b, h = x
    stress = 6.0 * _BEAM_LOAD * _BEAM_LENGTH / (b * h * h)
    deflection = 4.0 * _BEAM_LOAD * _BEAM_LENGTH**3 / (_STEEL_E * b * h**3)
    return (
        stress / _ALLOWED_STRESS - 1.0,
        deflection / _ALLOWED_DEFLECTION - 1.0,
        h / (_MAX_ASPECT * b) - 1.0,
    )


_BEAM = DesignProblem(
    name="beam-design",
    variables=("width_m", "height_m"),
    lower=(0.005, 0.01),
    upper=(0.1, 0.3),
    objective_name="mass",
    objective_unit="kg",
    objective=_beam_mass,
    constraints=_beam_constraints,
    penalty=1_000.0,
)


# Tension/compression spring (Arora 1989): wire diameter d, mean coil diameter D, active
# coils N; minimize (N + 2) D d^2 subject to deflection, shear stress, surge frequency and
# outer-diameter limits. Best known objective ~0.012665.
def _spring_weight(x: Sequence[float]) -> float:
    d, coil, n = x
    return (n + 2.0) * coil * d * d


def _spring_constraints(x: Sequence[float]) -> tuple[float, ...]:
    d, coil, n = x
    if coil > d:
        shear = (4.0 * coil * coil - d * coil) / (12_566.0 * (coil * d**3 - d**4))
        shear += 1.0 / (5_108.0 * d * d) - 1.0
    else:  # the wire is as thick as the coil: no spring at all
        shear = 1_000.0
    return (
        1.0 - coil**3 * n / (71_785.0 * d**4),
        shear,
        1.0 - 140.45 * d / (coil * coil * n),
        (coil + d) / 1.5 - 1.0,
    )


_SPRING = DesignProblem(
    name="spring-design",
    variables=("wire_diameter", "coil_diameter", "active_coils"),
    lower=(0.05, 0.25, 2.0),
    upper=(2.0, 1.3, 15.0),
    objective_name="weight",
    objective_unit="unitless",
    objective=_spring_weight,
    constraints=_spring_constraints,
    penalty=10.0,
)


def beam_design() -> ProblemPacket:
    """Size a steel cantilever beam: least mass under stress, deflection and aspect limits."""
    return ProblemPacket(
        problem_id="beam-design",
        family="structural-sizing",
        brief=(
            "Choose the width and height (m) of a 1 m steel cantilever carrying 5 kN at its tip "
            "so that its mass is minimal, bending stress stays under 150 MPa, tip deflection "
            "under 4 mm, and height/width under 10. Return {'candidate': [width_m, height_m]}."
        ),
        payload={"problem_object": _BEAM},
        metadata={"objective": "minimize", "dimension": _BEAM.dimension},
        evaluator=_BEAM.evaluate,
    )


def spring_design() -> ProblemPacket:
    """The classic tension/compression spring weight minimization (4 constraints)."""
    return ProblemPacket(
        problem_id="spring-design",
        family="mechanical-design",
        brief=(
            "Choose wire diameter, mean coil diameter and number of active coils of a spring "
            "of minimal weight that meets deflection, shear stress, surge frequency and "
            "outer diameter limits. Return {'candidate': [d, D, N]}."
        ),
        payload={"problem_object": _SPRING},
        metadata={"objective": "minimize", "dimension": _SPRING.dimension},
        evaluator=_SPRING.evaluate,
    )


def _noop_score(_candidate: Any) -> dict[str, float]:
    return {"score": 1.0}


def noop() -> ProblemPacket:
    """A problem that costs nothing to evaluate, for measuring studyq's own overhead."""
    return ProblemPacket(problem_id="noop", family="benchmark", brief="", evaluator=_noop_score)
