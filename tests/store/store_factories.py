"""Builders shared by the store tests: a small study, results, and clock manipulation."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, update

from orchestrator.contracts.results import ErrorKind, RunResult, RunStatus
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import Claim, RegisterReport, ResultStore
from orchestrator.store.models import RunRow
from orchestrator.store.sqltypes import db_now_plus

STUDY_ID = "study-a"
DEFINITION: dict[str, Any] = {
    "study_id": STUDY_ID,
    "title": "A small study",
    "factors": [{"name": "temperature", "levels": [0.2, 0.7]}],
    "run_budget": {"replicates": 1},
}
CONDITIONS = ["cond-aaaa", "cond-bbbb"]
AGENTS = ["agent-x", "agent-y"]


def make_specs(n: int, study_id: str = STUDY_ID) -> Iterator[RunSpec]:
    """``n`` specs in plan order over two conditions, two agents and a temperature factor."""
    for index in range(n):
        yield RunSpec(
            study_id=study_id,
            run_id=f"run-{index:04d}",
            condition_id=CONDITIONS[index % 2],
            replicate=1 + index // 4,
            seed=1000 + index,
            agent_id=AGENTS[(index // 2) % 2],
            problem_id="beam-design",
            factor_assignments={"temperature": [0.2, 0.7][index % 2], "prompt": "short"},
            block_assignments={},
            index=index,
            condition_fingerprint=f"fp-{index % 2}",
        )


def make_conditions() -> list[dict[str, Any]]:
    return [
        {
            "condition_id": condition_id,
            "admissible": True,
            "constraint_messages": [],
            "factor_assignments": {"temperature": level, "prompt": "short"},
            "block_assignments": {},
            "metadata": {"fingerprint": f"fp-{position}"},
        }
        for position, (condition_id, level) in enumerate(zip(CONDITIONS, [0.2, 0.7], strict=True))
    ]


def register(
    store: ResultStore,
    n: int = 10,
    *,
    study_id: str = STUDY_ID,
    max_attempts: int = 3,
    definition: dict[str, Any] | None = None,
    definition_hash: str = "hash-1",
) -> RegisterReport:
    return store.register_study(
        study_id,
        definition or {**DEFINITION, "study_id": study_id},
        definition_hash,
        "plan-fp",
        make_conditions(),
        make_specs(n, study_id),
        submitted_by="tester",
        max_attempts=max_attempts,
        references=["workers.demo.agents:noop"],
    )


def queue_all(store: ResultStore, study_id: str = STUDY_ID) -> int:
    moved = 0
    while page := store.queue_next(study_id):
        moved += len(page)
    return moved


def claim(store: ResultStore, index: int, worker: str = "w1", lease_s: float = 60.0) -> Claim:
    won = store.claim_run(STUDY_ID, index, worker=worker, lease_s=lease_s)
    assert won is not None, f"claim of run {index} by {worker} unexpectedly lost"
    return won


def make_result(
    claim: Claim,
    status: RunStatus = RunStatus.SUCCESS,
    *,
    error_type: str | None = None,
    error_message: str | None = None,
    error_kind: ErrorKind | None = None,
    traceback: str | None = None,
    score: float = 0.5,
) -> RunResult:
    started = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    return RunResult(
        run_id=claim.run_id,
        status=status,
        started_at=started,
        ended_at=started + timedelta(seconds=1.5),
        outputs={"text": f"answer {claim.index}"},
        metrics={"primary_outcome": score, "cost_usd": 0.01, "input_tokens": 10},
        evaluations=[
            {"evaluator_id": "ev", "metric_name": "score", "metric_value": score, "zeta": 1},
            {"evaluator_id": "ev", "metric_name": "len", "metric_value": 3, "alpha": 2},
        ],
        events=[
            {"event_type": "assistant_output", "text": "hi", "meta_json": {"b": 1, "a": 2}},
        ],
        trace_refs=["traces/a.json"],
        provenance={"model_name": "demo", "host": "h"},
        error_kind=error_kind,
        error_type=error_type,
        error_message=error_message,
        traceback=traceback,
    )


def expire_lease(store: ResultStore, claim: Claim, seconds_ago: float = 5.0) -> None:
    """Move the claim's lease into the past by the database clock (no sleeping)."""
    with store.engine.begin() as connection:
        connection.execute(
            update(RunRow)
            .where(RunRow.study_id == claim.study_id, RunRow.plan_index == claim.index)
            .values(lease_expires_at=db_now_plus(-seconds_ago))
        )


def true_counts(store: ResultStore, study_id: str = STUDY_ID) -> dict[str, int]:
    """Runs per status counted from ``runs`` itself (what ``study_counts`` must agree with)."""
    with store.engine.connect() as connection:
        rows = connection.execute(
            select(RunRow.status, func.count())
            .where(RunRow.study_id == study_id)
            .group_by(RunRow.status)
        ).all()
    return {status.value: 0 for status in RunStatus} | {status: n for status, n in rows}
