"""What a worker does with one delivered run message, as a plain function tested without Celery.

:func:`run_delivery` is the whole life of one delivery::

    parse ─► study context ─┬─► not in this database: return it to the broker (back-off)
                            └─► verified claim (lease) ─┬─► not claimable: acknowledge, count
                                                        ├─► disagrees with the store: refuse
                                                        └─► supervise ─► execute_run ─► record

* **Study context.** A message of a study this worker's database does not hold (another
  deployment's study on a shared queue, or one deleted since) is never acknowledged away:
  :func:`run_delivery` schedules a copy to be published to the same queue after a short,
  bounded back-off (:func:`workers.transient.publish_later`) and returns ``RETURNED``, for a
  worker of the deployment that holds it; outside a Celery task it returns ``NOT_OURS``
  after the back-off and the caller gives the message back (``Reject(requeue=True)``). A
  process that keeps being handed the same such message
  (:data:`~workers.foreign.DEAD_LETTER_MIN_RETURNS` times over
  :data:`~workers.foreign.DEAD_LETTER_AFTER_S` seconds) dead-letters it as
  ``unknown_study`` instead (:class:`UnknownStudy`); see :mod:`workers.foreign`.
* **Claim.** ``store.claim_runs`` moves the run ``queued -> running`` with a lease (together
  with the claims of concurrent deliveries: :mod:`workers.claims`), and only for a message
  that carries the registered spec: the claim's own ``WHERE`` compares the digest of the
  message's spec with the stored ``runs.spec_digest`` and refuses an attempt number ahead of
  the run's claims. So the store, not the broker, decides what runs: a message whose seed,
  assignments, agent, problem, run id, study id or index were changed claims nothing, changes
  nothing, and is refused as :class:`MessageMismatch` (the task logs it once and dead-letters
  it, reason ``mismatch``). A run that
  is finished, cancelled, running under a live lease or out of attempts is not claimable: the
  delivery is a duplicate (a redelivery after a lost worker, a republish by the reconcile
  loop, a second ``submit``). It is acknowledged, logged at INFO and counted, never executed.
* **Supervise.** The process's lease keeper (:mod:`workers.heartbeat`) extends the lease
  every ``heartbeat_s`` while the agent works, records a run that overstays its hard limit
  as a timeout, and hands the run back on a warm shutdown.
* **Execute.** :func:`~workers.execution.execute_run`, the function both executors call. On
  the main thread (prefork child, solo pool) the run is interruptible: the soft limit
  (``execution.timeout_s``) raises inside the agent and the run fails as ``timeout``.
* **Record.** The result is written fenced on the claim's attempt (one statement on
  PostgreSQL). Through a database outage the write is retried with capped exponential
  backoff for ``result_retry_s`` (each retry logged). The agent is never called again
  because a write failed: the result, not the run, is retried. A refused write (the lease
  was lost and the run re-claimed: a stale attempt) writes nothing and is counted. Under
  Celery the write happens behind the run, on the process's writer thread
  (:mod:`workers.writer`), so the task returns (and its message is acknowledged) while the
  result is being written; called directly, :func:`run_delivery` writes before it returns,
  with ``SIGTERM`` held back so a shutdown cannot roll the write back.

What a process keeps between deliveries (store, study contexts, counters) is its
:class:`~workers.runtime.WorkerRuntime`.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Mapping
from contextlib import nullcontext, suppress
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any, ClassVar

from orchestrator.contracts.deadletters import Reason
from orchestrator.contracts.errors import RunTimeoutError, StoreError, StudyqError
from orchestrator.contracts.results import ErrorKind, RunResult, RunStatus, failed_result
from orchestrator.contracts.runspec import RunSpec, spec_digest
from orchestrator.store import Claim, mask_url
from orchestrator.store.budget_gate import after_results, writes_through
from orchestrator.store.registration import describe_difference
from workers import limits as provider_limits
from workers.execution import execute_run
from workers.failures import note_result
from workers.foreign import ForeignMessages
from workers.heartbeat import Ending, RunSupervisor
from workers.interrupt import HandBack, LeaseLost, deferred_termination
from workers.retrying import retry_unavailable
from workers.runtime import StudyContext, WorkerRuntime
from workers.transient import ErrorCatch, publish_later, retry_if_transient

__all__ = [
    "InvalidRunMessage",
    "MessageMismatch",
    "Outcome",
    "UnknownStudy",
    "foreign_messages",
    "mismatch_reason",
    "parse_delivery",
    "record_hard_kill",
    "run_delivery",
]

log = logging.getLogger("studyq.worker")


class Outcome(StrEnum):
    """What one delivery came to; the task returns it (Flower shows it as the result)."""

    SUCCESS = "success"
    FAILED = "failed"
    DUPLICATE = "duplicate"  # not claimable: finished, live-leased, cancelled, out of attempts
    REFUSED = "refused"  # executed, but the write was refused: a stale attempt
    LEASE_LOST = "lease_lost"  # stopped mid-run: cancelled or re-queued elsewhere
    HANDED_BACK = "handed_back"  # warm shutdown: released, attempt refunded; requeue it
    TIMED_OUT = "timed_out"  # over the hard limit; recorded as failed/timeout
    NOT_OURS = "not_ours"  # its study is not in this database: returned to the broker
    RETURNED = "returned"  # not ours: acknowledged, published again after the back-off
    UNKNOWN_STUDY = "unknown_study"  # returned too often, too long (deleted?): dead-lettered
    MISMATCH = "mismatch"  # disagrees with the registered run (forged, or a stale message)
    NOT_RECORDED = "not_recorded"  # the database stayed unreachable for result_retry_s
    RETRYING = "retrying"  # a transient error (retry.on): re-queued, next attempt scheduled


class InvalidRunMessage(StudyqError):
    """A message for the run task that does not carry a run spec; it is dropped."""

    reason: ClassVar[Reason] = Reason.INVALID_RUN
    """The dead-letter reason the task files the message under."""


class MessageMismatch(InvalidRunMessage):
    """A well-formed run message that disagrees with the store: its spec is not the
    registered spec of the run it names (tampered on the broker, or left from an earlier
    registration of the study), it names a run the study does not have, or it claims an
    attempt the run has not reached. Nothing was executed and nothing was written."""

    reason: ClassVar[Reason] = Reason.MISMATCH


class UnknownStudy(InvalidRunMessage):
    """A run message of a study this worker's database does not hold, which this process has
    returned to the broker too often for too long (:mod:`workers.foreign`): the study was
    most likely deleted. It is dead-lettered as ``unknown_study``; nothing was executed."""

    reason: ClassVar[Reason] = Reason.UNKNOWN_STUDY


_FOREIGN: weakref.WeakKeyDictionary[WorkerRuntime, ForeignMessages] = weakref.WeakKeyDictionary()


class _QuietReturns(logging.Filter):
    """Celery logs every ``Reject`` at WARNING with a traceback (``celery.app.trace``). A
    returned foreign message is routine on a shared queue and logged by :func:`_not_ours`,
    so Celery's line for it (the task's ``Reject("not_ours: ...")``) is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        return not str(getattr(error, "reason", "")).startswith(f"{Outcome.NOT_OURS.value}: ")


logging.getLogger("celery.app.trace").addFilter(_QuietReturns())


def foreign_messages(runtime: WorkerRuntime) -> ForeignMessages:
    """The foreign deliveries ``runtime``'s process has had (created on first use)."""
    tracker = _FOREIGN.get(runtime)
    if tracker is None:
        tracker = _FOREIGN.setdefault(runtime, ForeignMessages())
    return tracker


def parse_delivery(spec: Any, attempt: Any) -> tuple[RunSpec, int]:
    """The run spec and publish-time attempt of a delivered message.

    Raises:
        InvalidRunMessage: the message is not a run message of this version.
    """
    if not isinstance(spec, Mapping):
        raise InvalidRunMessage(f"run message carries no spec mapping (got {type(spec).__name__})")
    try:
        return RunSpec.from_message(dict(spec)), int(attempt or 0)
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidRunMessage(f"run message is malformed: {error!r}") from None


def run_delivery(runtime: WorkerRuntime, message: Mapping[str, Any], attempt: int) -> Outcome:
    """Claim, execute and record one delivered run; see the module docstring.

    Args:
        runtime: This process's runtime.
        message: ``RunSpec.to_message()`` as published.
        attempt: The attempt number at publish time (informational; the claim decides the
            real attempt, which is the fencing token).

    Returns:
        What the delivery came to. ``HANDED_BACK`` and ``NOT_OURS`` mean the message must be
        requeued (``NOT_OURS`` after the back-off of :mod:`workers.foreign`, already waited).

    Raises:
        InvalidRunMessage: the message is not a run message (:class:`UnknownStudy`: of a
            study this database has not held for a long time).
        StoreUnavailableError: the database stayed unreachable for ``result_retry_s`` before
            the run was claimed (nothing executed; redeliver the message).
        StoreError: the store refused the claim for a reason retrying cannot fix.
    """
    spec, published_attempt = parse_delivery(message, attempt)
    if runtime.shutting_down:
        return Outcome.HANDED_BACK
    study = runtime.study(spec.study_id)
    if study is None:
        return _not_ours(runtime, spec, published_attempt)
    foreign_messages(runtime).own()
    settings = runtime.settings
    digest = spec_digest(dict(message))
    durable = settings.at_most_once or study.at_most_once
    with deferred_termination() as stop_requested:
        claim = retry_unavailable(
            lambda: runtime.claims.claim(
                spec.study_id, spec.index, digest, published_attempt, durable=durable
            ),
            what=f"claiming run {spec.run_id} (index {spec.index}) of {spec.study_id}",
            budget_s=settings.result_retry_s,
            log=log,
        )
        if claim is not None and stop_requested:
            # Told to stop while claiming: give the run straight back (the signal is
            # re-raised when this block ends).
            _release(runtime, claim)
            return Outcome.HANDED_BACK
    if claim is None:
        _refuse_mismatch(runtime, spec, dict(message), digest, published_attempt)
        count = runtime.count(Outcome.DUPLICATE)
        log.info(
            "run %s (index %d) of %s is not claimable (finished, running elsewhere, cancelled "
            "or out of attempts); delivery of attempt %d acknowledged, not executed [%d so far]",
            spec.run_id,
            spec.index,
            spec.study_id,
            published_attempt,
            count,
        )
        return Outcome.DUPLICATE
    if study.problem is not None:
        # Cannot be executed as registered: a failed ``binding`` result, attempt charged.
        unrunnable = failed_result(
            spec,
            ErrorKind.BINDING,
            error_type="InvalidRunMessage",
            message=study.problem,
            started_at=datetime.now(UTC),
            worker=claim.worker,
        )
        return _record(runtime, claim, unrunnable)
    return _execute(runtime, study, spec, claim)


def _not_ours(runtime: WorkerRuntime, spec: RunSpec, attempt: int) -> Outcome:
    """A message of a study this database does not hold: wait the back-off and return
    ``NOT_OURS`` (the task requeues it), or raise :class:`UnknownStudy` to dead-letter it."""
    verdict = foreign_messages(runtime).returned(
        spec.study_id, (spec.study_id, spec.index, spec.run_id, attempt)
    )
    database = mask_url(runtime.store.engine.url)
    if verdict.dead_letter:
        runtime.count(Outcome.UNKNOWN_STUDY)
        raise UnknownStudy(
            f"run {spec.run_id} (index {spec.index}) of study {spec.study_id}: the study is not "
            f"in this worker's database {database}, and this worker has been handed the message "
            f"back {verdict.returns} times (deleted study?)"
        )
    count = runtime.count(Outcome.NOT_OURS)
    log.log(
        logging.INFO if verdict.first_of_study else logging.DEBUG,
        "returning run %s (index %d) to the broker: study %s is not in this worker's database "
        "%s (another deployment's study on a shared queue, or deleted) [%d so far]",
        spec.run_id,
        spec.index,
        spec.study_id,
        database,
        count,
    )
    # Given back without holding it: a copy goes to the queue after the back-off and this
    # delivery is acknowledged, so this worker's slot is free while the message waits. (A
    # held message fills the slot the other deployment's returns would land in: two
    # deployments each holding the other's last messages took their own back, for minutes.)
    if publish_later(spec, attempt, verdict.backoff_s):
        return Outcome.RETURNED
    if verdict.backoff_s:  # outside a Celery task: the caller requeues it
        time.sleep(verdict.backoff_s)
    return Outcome.NOT_OURS


def _release(runtime: WorkerRuntime, claim: Claim) -> bool:
    """Give a claim back without charging its attempt."""
    return retry_unavailable(
        lambda: runtime.store.release_run(claim),
        what=f"releasing run {claim.run_id} (index {claim.index}) of {claim.study_id}",
        budget_s=runtime.settings.result_retry_s,
        log=log,
    )


def mismatch_reason(
    stored: RunSpec | None, message: dict[str, Any], digest: str, attempt: int, claims: int
) -> str | None:
    """Why a message that claimed nothing disagrees with the store, or None when it agrees
    (then the run simply was not claimable: a duplicate). ``claims``: the run's attempt."""
    if stored is None:
        return "it names a run the study does not have"
    registered = stored.to_message()
    if spec_digest(registered) != digest:
        fields = describe_difference(registered, message)
        return "its spec differs from the registered run at " + (", ".join(fields) or "?")
    if attempt > claims:
        return f"it was published for attempt {attempt}, but the run has had {claims} claim(s)"
    return None


def _refuse_mismatch(
    runtime: WorkerRuntime, spec: RunSpec, message: dict[str, Any], digest: str, attempt: int
) -> None:
    """A claim that won nothing: raise :class:`MessageMismatch` when the message disagrees
    with the store (a lookup on this rare path only), return when it is a duplicate."""
    row = retry_unavailable(
        lambda: runtime.store.find_run(spec.study_id, spec.index),
        what=f"checking run {spec.run_id} (index {spec.index}) of {spec.study_id}",
        budget_s=runtime.settings.result_retry_s,
        log=log,
    )
    reason = mismatch_reason(
        None if row is None else row.spec,
        message,
        digest,
        attempt,
        0 if row is None else row.attempt,
    )
    if reason is None:
        return
    runtime.count(Outcome.MISMATCH)  # the task logs and dead-letters it, once
    raise MessageMismatch(
        f"message for run {spec.run_id} (index {spec.index}) of study {spec.study_id} "
        f"disagrees with the store: {reason}"
    )


def _execute(runtime: WorkerRuntime, study: StudyContext, spec: RunSpec, claim: Claim) -> Outcome:
    settings = runtime.settings
    try:  # the provider's cluster-wide limits (workers.limits): a slot, the first request
        admitted = provider_limits.admit(runtime, spec)
    except provider_limits.NoSlot:  # waited a bounded time: requeued, attempt not charged
        runtime.count("no_provider_slot")
        _release(runtime, claim)
        return Outcome.HANDED_BACK
    except provider_limits.LimitsUnavailable as error:
        return _record(
            runtime,
            claim,
            failed_result(
                spec,
                ErrorKind.BINDING,
                error_type=type(error).__name__,
                message=str(error),
                started_at=datetime.now(UTC),
                worker=claim.worker,
            ),
        )
    except BaseException:
        # SystemExit (a prefork child's SIGTERM) while waiting for a slot: give the claim back
        # uncharged, as a hand-back of an executing run does, instead of leaving it running.
        with suppress(StoreError):
            _release(runtime, claim)
        raise
    if runtime.shutting_down:
        # The warm shutdown handed back the executing runs while this one waited for a slot.
        with admitted:
            pass  # frees the slot just taken
        _release(runtime, claim)
        runtime.count(Outcome.HANDED_BACK)
        return Outcome.HANDED_BACK
    interruptible = runtime.interrupt.usable
    supervisor = RunSupervisor(
        runtime.store,
        claim,
        spec,
        keeper=runtime.keeper,
        heartbeat_s=settings.heartbeat_s,
        lease_s=settings.lease_s,
        timeout_s=study.timeout_s,
        grace_s=settings.time_limit_grace_s,
        retry_s=settings.result_retry_s,
        interrupt=runtime.interrupt if interruptible else None,
    )
    result: RunResult | None = None
    caught = ErrorCatch()
    armed = runtime.interrupt.armed(study.timeout_s) if interruptible else nullcontext()
    try:
        with runtime.executing(supervisor), armed, admitted:
            supervisor.start()
            result = execute_run(
                spec,
                study.resolver,
                timeout_s=study.timeout_s,
                worker=runtime.worker,
                on_error=caught,
            )
    except RunTimeoutError as error:  # the alarm fired between the run's return and disarm
        result = failed_result(
            spec,
            ErrorKind.TIMEOUT,
            error_type=type(error).__name__,
            message=str(error),
            started_at=supervisor.started_at,
            worker=runtime.worker,
            execution_mode=_execution_mode(study),
        )
    except (HandBack, LeaseLost):
        pass  # the supervisor decided and acted; see its ending below
    except BaseException:
        # SystemExit from a prefork child's SIGTERM (the parent ending a warm shutdown's
        # grace, or a signal to the whole process group), KeyboardInterrupt: hand back.
        supervisor.stop()
        supervisor.hand_back()
        raise
    finally:
        supervisor.stop()
    ending = supervisor.ending
    if ending is Ending.HANDED_BACK:
        runtime.count(Outcome.HANDED_BACK)
        return Outcome.HANDED_BACK
    if ending is Ending.TIMED_OUT:
        supervisor.wait_timeout_recorded(settings.result_retry_s)  # written and checked
        runtime.count(Outcome.TIMED_OUT)
        return Outcome.TIMED_OUT
    if ending is Ending.LEASE_LOST or result is None:
        runtime.count(Outcome.LEASE_LOST)
        return Outcome.LEASE_LOST
    if not supervisor.begin_result():  # pragma: no cover - lost a race decided above
        return Outcome.LEASE_LOST
    if retry_if_transient(runtime, spec, claim, result, caught.error) is not None:
        runtime.count(Outcome.RETRYING)  # workers.transient: back in the queue, not failed
        return Outcome.RETRYING
    return _record(runtime, claim, result)


def _record(runtime: WorkerRuntime, claim: Claim, result: RunResult) -> Outcome:
    """Write the result (retrying through an outage; the run is never re-executed), or hand
    it to the process's writer thread (:mod:`workers.writer`) and return the run's own
    status: under Celery the write then overlaps the delivery of the next run."""
    note_result(result)  # the task reports a failed run as a failure (workers.failures)
    # A study with a budget or a breaker is written (and checked) before the slot's next run.
    if runtime.write_behind and not writes_through(runtime.store, claim.study_id):
        runtime.writer.submit(claim, result)
        return Outcome.SUCCESS if result.status is RunStatus.SUCCESS else Outcome.FAILED
    with deferred_termination():
        [outcome] = runtime.writer.write([(claim, result)])
    return Outcome(outcome)


def _execution_mode(study: StudyContext) -> str:
    return "condition_runner" if study.resolver.uses_runner else "agent"


def record_hard_kill(
    runtime: WorkerRuntime, message: Mapping[str, Any], worker: str, limit_s: float
) -> bool:
    """Record a run whose process was killed at its hard time limit as failed (``timeout``).

    Called in the prefork parent, which killed the child: the child cannot write anything any
    more. The run is only recorded while it is still ``running`` under the killed child's
    lease (``worker``); the write is fenced on that attempt like any other, so it can never
    overwrite a result the child, or anyone else, recorded first. Returns whether it wrote.
    """
    spec, _ = parse_delivery(message, 0)
    what = f"recording the hard time limit of run {spec.run_id} (index {spec.index})"
    budget = runtime.settings.result_retry_s
    try:
        row = retry_unavailable(
            lambda: runtime.store.find_run(spec.study_id, spec.index),
            what=what,
            budget_s=budget,
            log=log,
        )
        if row is None or row.status != RunStatus.RUNNING.value or row.lease_owner != worker:
            return False
        now = datetime.now(UTC)
        expires = row.lease_expires_at or now
        claim = Claim(row.study_id, row.index, row.run_id, row.attempt, worker, expires)
        started_at = row.started_at or now
        result = failed_result(
            spec,
            ErrorKind.TIMEOUT,
            error_type="TimeLimitExceeded",
            message=f"killed at its hard time limit of {limit_s} s (the run did not stop at "
            "its soft limit)",
            started_at=started_at,
            worker=worker,
        )
        won = retry_unavailable(
            lambda: runtime.store.finish_run(claim, result), what=what, budget_s=budget, log=log
        )
    except StoreError as error:
        log.error("could not record the hard time limit of run %s: %s", spec.run_id, error)
        return False
    finally:
        _release_killed_slot(runtime, spec, worker)
    if won:
        after_results(runtime.store, [(claim, result)])  # a timeout counts for the breaker
        runtime.count(Outcome.TIMED_OUT)
        log.warning(
            "run %s (index %d) of %s killed at its hard time limit (%s s); recorded as timeout",
            spec.run_id,
            spec.index,
            spec.study_id,
            limit_s,
        )
    return won


def _release_killed_slot(runtime: WorkerRuntime, spec: RunSpec, worker: str) -> None:
    """The killed child's provider slot for the run (:mod:`workers.limits`), given back."""
    try:
        provider_limits.release_killed(runtime, spec, worker)
    except StoreError as error:
        log.error("could not release the provider slot of killed run %s: %s", spec.run_id, error)
