"""Conditions from a study's design: the eight design kinds, in the upstream's exact order.

Ported from design-research-experiments 0.4.0 (MIT), ``designs.py`` and ``conditions.py``
(UPSTREAM.md sections 4-5). Order and ids are the contract: factorial kinds hash
``{factors, blocks}``, row kinds also hash their row metadata; shuffles use
``random.Random(base_seed)`` exactly where the upstream does. Errors become
:class:`StudyValidationError` problems with the field that caused them.

One module per design family, each turning a study into its conditions::

    _factorial        full / constrained factorial, randomized block, repeated measures
    _latin_square     row x column x treatment
    _custom_matrix    rows from a .csv or .json file
    _latin_hypercube  stratified samples within bounds        } both through _rows:
    _fractional       two-level resolution III templates      } replicates, center points
    _checker          constraint admissibility of one assignment
    _common           errors, shuffles, blocks, the condition of one row
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

from orchestrator.contracts.conditions import Condition, condition_label
from orchestrator.study.design_spec import DesignKind
from orchestrator.study.designs._checker import ConstraintChecker
from orchestrator.study.designs._custom_matrix import custom_matrix_conditions
from orchestrator.study.designs._factorial import factorial_conditions
from orchestrator.study.designs._fractional import fractional_conditions
from orchestrator.study.designs._latin_hypercube import latin_hypercube_conditions
from orchestrator.study.designs._latin_square import latin_square_conditions
from orchestrator.study.model import Study

__all__ = ["Condition", "build_conditions", "condition_label"]

_FAMILIES: Final[dict[DesignKind, Callable[[Study, ConstraintChecker], list[Condition]]]] = {
    DesignKind.FULL_FACTORIAL: factorial_conditions,
    DesignKind.CONSTRAINED_FACTORIAL: factorial_conditions,
    DesignKind.RANDOMIZED_BLOCK: factorial_conditions,
    DesignKind.REPEATED_MEASURES: factorial_conditions,
    DesignKind.LATIN_SQUARE: latin_square_conditions,
    DesignKind.CUSTOM_MATRIX: custom_matrix_conditions,
    DesignKind.LATIN_HYPERCUBE: latin_hypercube_conditions,
    DesignKind.FRACTIONAL_FACTORIAL_2LEVEL: fractional_conditions,
}


def build_conditions(study: Study) -> list[Condition]:
    """Every condition of the study's design, admissible or not, in design order."""
    return _FAMILIES[study.design_spec.kind](study, ConstraintChecker(study.constraints))
