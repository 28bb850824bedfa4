"""The study: its file, its model, its validation, its designs and its plan of runs.

Reading order, as a study flows through it::

    studyfile    the file on disk -> a mapping (YAML or JSON, size-limited, clear errors)
    model        the mapping -> a validated ``Study`` (upstream 0.4.0's schema, exactly), of
      factors      factors and levels, blocks, constraints
      design_spec  the design kind and options, the run budget, the seed policy
      analysis     outcomes, hypotheses, analysis plans
    validation   cross-field checks that name the field and the fix
    constraints  the safe expression language of ``constraints:``
    designs      factors and levels -> conditions (full, fractional, latin square, LHS, custom)
    plan         conditions x agents x problems x replicates -> ``RunSpec`` s, ids and seeds

Nothing here touches the store, a broker or a worker: a plan is a pure function of the file.
``from orchestrator.study import Study, load_study`` is the public path of the model (it was
the module ``orchestrator/study.py`` before this package).
"""

from orchestrator.study.analysis import AnalysisPlan, Hypothesis, OutcomeSpec
from orchestrator.study.design_spec import DesignKind, DesignSpec, RunBudget, SeedPolicy
from orchestrator.study.factors import Block, Constraint, Factor, FactorKind, Level
from orchestrator.study.model import SCHEMA_VERSION, Study, load_study, parse_study

__all__ = [
    "SCHEMA_VERSION",
    "AnalysisPlan",
    "Block",
    "Constraint",
    "DesignKind",
    "DesignSpec",
    "Factor",
    "FactorKind",
    "Hypothesis",
    "Level",
    "OutcomeSpec",
    "RunBudget",
    "SeedPolicy",
    "Study",
    "load_study",
    "parse_study",
]
