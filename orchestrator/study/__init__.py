"""The study: its file, its model, its validation, its designs and its plan of runs.

Reading order, as a study flows through it::

    studyfile    the file on disk -> a mapping (YAML or JSON, size-limited, clear errors)
    model        the mapping -> a validated ``Study`` (upstream 0.4.0's schema, exactly)
    validation   cross-field checks that name the field and the fix
    constraints  the safe expression language of ``constraints:``
    designs      factors and levels -> conditions (full, fractional, latin square, LHS, custom)
    plan         conditions x agents x problems x replicates -> ``RunSpec`` s, ids and seeds

Nothing here touches the store, a broker or a worker: a plan is a pure function of the file.
``from orchestrator.study import Study`` is the public path of the model.
"""

from orchestrator.study.model import (
    SCHEMA_VERSION,
    AnalysisPlan,
    Block,
    Constraint,
    DesignKind,
    DesignSpec,
    Factor,
    FactorKind,
    Hypothesis,
    Level,
    OutcomeSpec,
    RunBudget,
    SeedPolicy,
    Study,
)

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
]
