"""The result store: studies, run specs, run state and results in SQLite or PostgreSQL.

Public surface (everything else is an implementation module)::

    ResultStore.open(url)          connect, and create/upgrade (SQLite) or check (PostgreSQL)
    create_engine_for, mask_url    engines with studyq's settings; URLs safe to print
    upgrade, current_revision,     schema migrations for `studyq db upgrade` / `studyq check`
    is_current, head_revision
    Claim, RegisterReport, ...     the values the store returns
"""

from orchestrator.store.engine import DEFAULT_URL, create_engine_for, mask_url, normalize_url
from orchestrator.store.records import (
    AttemptRecord,
    Claim,
    ConditionRecord,
    ErrorSummary,
    EvaluationRecord,
    EventRecord,
    ProgressStats,
    ReconcileReport,
    RegisterReport,
    RunRecord,
    StudyInfo,
)
from orchestrator.store.schema import current_revision, head_revision, is_current, upgrade
from orchestrator.store.store import DEFAULT_MAX_ATTEMPTS, ResultStore

__all__ = [
    "DEFAULT_MAX_ATTEMPTS",
    "DEFAULT_URL",
    "AttemptRecord",
    "Claim",
    "ConditionRecord",
    "ErrorSummary",
    "EvaluationRecord",
    "EventRecord",
    "ProgressStats",
    "ReconcileReport",
    "RegisterReport",
    "ResultStore",
    "RunRecord",
    "StudyInfo",
    "create_engine_for",
    "current_revision",
    "head_revision",
    "is_current",
    "mask_url",
    "normalize_url",
    "upgrade",
]
