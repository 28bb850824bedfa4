"""The check after results are recorded: pause a study whose budget is spent or whose failure
breaker trips (:func:`~orchestrator.store.pausing.check_study`).

Both executors call it right after a batch of results is committed: a worker's result writer
(``workers.writer``) and the embedded ``studyq run``'s recorder. Studies that declare neither
a budget nor a breaker cost nothing per result: their policy is read once per process and
study, and whether ``studyq budget`` gave them a budget since is read again at most every
:data:`OVERRIDE_RECHECK_S`. A study that declares one costs one short transaction per batch
of its results (a primary-key probe, one aggregate over its finished runs for a budget, and
after a failure the latest ``window`` finished runs by the ``(study_id, ended_at)`` index).

The check never fails the write it follows: an error is logged and the next batch checks
again. A worker records the results of a watched study synchronously (:func:`writes_through`),
so that a slot claims its next run only once its last result is recorded and checked: when
the study is paused, each slot has at most one run in flight.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass

from pydantic import ValidationError

from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.extensions import ExecutionPolicy
from orchestrator.contracts.results import RunResult, RunStatus
from orchestrator.store.engine import transaction
from orchestrator.store.pausing import Pause, budget_overrides, check_study, watches
from orchestrator.store.records import Claim
from orchestrator.store.store import ResultStore

__all__ = ["OVERRIDE_RECHECK_S", "BudgetGate", "after_results", "describe", "writes_through"]

log = logging.getLogger("studyq.budget")

OVERRIDE_RECHECK_S = 30.0
"""How often a study without a declared budget is asked again whether ``studyq budget``
gave it one."""


@dataclass(slots=True)
class _Watch:
    execution: ExecutionPolicy
    watched: bool
    checked_at: float


class BudgetGate:
    """The per-store check of :func:`after_results`, with its policy cache."""

    def __init__(self, store: ResultStore) -> None:
        self._store = store
        self._watches: dict[str, _Watch] = {}
        self._lock = threading.Lock()

    def _watch(self, study_id: str) -> _Watch | None:
        now = time.monotonic()
        with self._lock:
            watch = self._watches.get(study_id)
        if watch is not None and (watch.watched or now - watch.checked_at < OVERRIDE_RECHECK_S):
            return watch
        if watch is None:
            info = self._store.find_study(study_id)
            if info is None:
                return None
            try:
                execution = ExecutionPolicy.model_validate(info.definition.get("execution") or {})
            except ValidationError:
                execution = ExecutionPolicy()
        else:
            execution = watch.execution
        watched = watches(execution)
        if not watched:
            with transaction(self._store.engine, readonly=True) as connection:
                watched = any(value is not None for value in budget_overrides(connection, study_id))
        watch = _Watch(execution, watched, now)
        with self._lock:
            self._watches[study_id] = watch
        return watch

    def watched(self, study_id: str) -> bool:
        """Whether the study declares (or was given) a budget or a breaker."""
        try:
            watch = self._watch(study_id)
        except StoreError:
            return False
        return watch is not None and watch.watched

    def after_results(self, written: Iterable[tuple[Claim, RunResult]]) -> list[Pause]:
        """Check each study of the recorded ``written`` results; returns the pauses made."""
        failed: dict[str, bool] = {}
        for claim, result in written:
            failed[claim.study_id] = failed.get(claim.study_id, False) or (
                result.status is not RunStatus.SUCCESS
            )
        pauses = []
        for study_id, any_failed in failed.items():
            try:
                watch = self._watch(study_id)
                if watch is None or not watch.watched:
                    continue
                with transaction(self._store.engine) as connection:
                    made = check_study(connection, study_id, watch.execution, failed=any_failed)
            except StoreError as error:
                log.warning("could not check the budget/breaker of %s: %s", study_id, error)
                continue
            if made is not None:
                log.warning("study %s: %s", study_id, describe(made))
                pauses.append(made)
        return pauses


_GATES: dict[int, BudgetGate] = {}
_GATES_LOCK = threading.Lock()


def _gate(store: ResultStore) -> BudgetGate:
    with _GATES_LOCK:
        gate = _GATES.get(id(store))
        if gate is None or gate._store is not store:
            gate = _GATES[id(store)] = BudgetGate(store)
        return gate


def after_results(store: ResultStore, written: Iterable[tuple[Claim, RunResult]]) -> list[Pause]:
    """:meth:`BudgetGate.after_results` with this store's gate (one per store and process)."""
    return _gate(store).after_results(written)


def writes_through(store: ResultStore, study_id: str) -> bool:
    """Whether a worker slot must record a result of this study (and check it) before it
    takes its next run, instead of handing it to the writer thread: true for a study with a
    budget or a breaker, so that each slot has at most one run in flight when the study is
    paused (a result written behind would let the slot start another one meanwhile)."""
    return _gate(store).watched(study_id)


def describe(pause: Pause) -> str:
    """One line: why the study is paused and what continues it."""
    detail = pause.detail
    if pause.reason == "budget":
        parts = []
        if "max_cost_usd" in detail.get("reached", []):
            parts.append(f"spent ${detail['spent_usd']:.2f} of ${detail['max_cost_usd']:.2f}")
        if "max_tokens" in detail.get("reached", []):
            parts.append(f"{detail['spent_tokens']} of {detail['max_tokens']} tokens")
        return (
            f"stopped: budget ({', '.join(parts) or 'spent'}); raise it with `studyq budget "
            f"{pause.study_id} --max-cost-usd N` (or --max-tokens N) to continue"
        )
    error = detail.get("error_type") or "error"
    message = detail.get("error_message") or ""
    return (
        f"paused: breaker ({detail.get('failed')} of the last {detail.get('window')} runs "
        f"failed; top error: {error}: {message[:200]}); `studyq resume {pause.study_id}` "
        "to continue"
    )
