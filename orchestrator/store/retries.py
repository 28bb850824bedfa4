"""The end of an attempt that failed transiently: the run goes back to the queue.

:func:`requeue_transient` is the third way an attempt ends, next to a result
(:func:`~orchestrator.store.endings.finish`) and a hand-back
(:func:`~orchestrator.store.attempts.release`): ``running -> queued``, fenced on the claim
like a result (:data:`~orchestrator.store.predicates.FENCE`), only while the run has attempts
left, and in the same transaction its attempt is closed as ``retried`` with its error. The
attempt stays charged (``attempts_used``), so ``execution.max_attempts`` bounds the retries;
``attempt`` (the fencing token) stays too, so the next claim gets the next attempt number.
``queued_at`` is set to when the next attempt is due: the reconcile loop counts a queued
run's wait for a lost message from then (``queued_timeout_s``), not from now.
"""

from __future__ import annotations

from sqlalchemy import update
from sqlalchemy.engine import Connection

from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.store.endings import attempt_end, close_attempts
from orchestrator.store.models import RunRow
from orchestrator.store.predicates import FENCE, fence_params
from orchestrator.store.records import Claim
from orchestrator.store.sqltypes import db_now_plus

__all__ = ["RETRIED", "requeue_transient"]

RETRIED = "retried"
"""``run_attempts.outcome`` of an attempt that failed with a transient error and was
followed by another (``attempts.csv`` status)."""

_REQUEUE = (
    update(RunRow)
    .where(FENCE, RunRow.attempts_used < RunRow.max_attempts)
    .values(
        status=RunStatus.QUEUED.value,
        lease_owner=None,
        lease_expires_at=None,
        started_at=None,
        queued_at=db_now_plus(0.0, name="r_delay"),
    )
)


def requeue_transient(
    connection: Connection, claim: Claim, result: RunResult, delay_s: float
) -> bool:
    """``running -> queued`` for the claim's run, if the claim still holds and the run has
    attempts left, closing its attempt as :data:`RETRIED` with ``result``'s error; returns
    whether it did. False: record ``result`` as the run's end instead (its last attempt), or
    nothing (the claim was lost)."""
    params = {**fence_params(claim), "r_delay": float(max(delay_s, 0.0))}
    if connection.execute(_REQUEUE, params).rowcount != 1:
        return False
    close_attempts(
        connection,
        claim.study_id,
        [
            attempt_end(
                claim.index,
                claim.attempt,
                RETRIED,
                None if result.error_kind is None else str(result.error_kind),
                result.error_type,
                result.error_message,
            )
        ],
    )
    return True
