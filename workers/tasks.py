"""The run task (thin: it calls :func:`~workers.runtask.run_delivery`).

The message format is :mod:`orchestrator.contracts.wire`; the coordinator publishes it
(:mod:`orchestrator.executors.celery`).

Task ``studyq.run`` receives ``spec`` (``RunSpec.to_message()``) and ``attempt`` (the
attempt the run was published for). It is ``acks_late`` with ``reject_on_worker_lost``: a
message is acknowledged only after its run is recorded (or found not claimable), and a message
whose worker process died is requeued; a duplicate delivery costs one claim query.

Its outcome (``success``, ``duplicate``, ...; see :class:`~workers.runtask.Outcome`) is the
task's return value, which Flower shows; results themselves live in the store
(``task_ignore_result``). A run that failed (its result is ``failed``, a timeout included)
raises :class:`~workers.failures.RunFailed` instead, once its result is recorded (or queued
on the writer thread): the task's state is ``FAILURE`` and Flower's exception column shows
the run's error class and message; the message is acknowledged as for a success, never
retried, and the worker logs it at INFO (``throws``). A duplicate delivery of a failed run
is a success (``duplicate``): it changed nothing. A run handed back by a warm shutdown
raises ``Reject(requeue=True)`` so its message goes back on the queue.

Time limits (prefork): the message's hard limit is ``execution.timeout_s +
time_limit_grace_s``. At the soft limit the run is interrupted in its own process (see
:mod:`workers.interrupt`); if it is still going at the hard limit Celery kills the child, and
:class:`RunRequest` (in the parent) records the run as failed with error kind ``timeout``,
fenced on the killed child's lease, so a hung run fails as a timeout instead of coming back
until it is failed as ``lost``.
"""

from __future__ import annotations

import json
import logging
import threading
from typing import TYPE_CHECKING, Any

from celery.exceptions import Ignore, Reject
from celery.worker import state as worker_state
from celery.worker.request import Request

from orchestrator.contracts.deadletters import Reason
from orchestrator.contracts.errors import StoreUnavailableError
from orchestrator.contracts.wire import RUN_ARGUMENTS, TASK_NAME, WIRE_HEADER, WIRE_VERSION
from workers.failures import RunFailed, take_failure
from workers.poison import Poison
from workers.quarantine import quarantine
from workers.runtask import (
    InvalidRunMessage,
    Outcome,
    record_hard_kill,
    run_delivery,
)
from workers.runtime import worker_name

if TYPE_CHECKING:
    from workers.app import StudyqCelery

__all__ = ["TASK_NAME", "Quarantined", "RunRequest", "register_run_task"]

log = logging.getLogger("studyq.worker")


class RunRequest(Request):  # type: ignore[misc]  # Celery ships no type hints
    """The run task's request in the worker's main process: records hard-limit kills, and
    dead-letters messages the task found are not run messages."""

    def on_failure(
        self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False
    ) -> Any:
        """A :class:`Quarantined` run: dead-letter the message as it arrived, tell Flower the
        task failed, then let Celery acknowledge it (an ``Ignore``)."""
        error = getattr(exc_info, "exception", None)
        error = getattr(error, "exc", error)  # Celery's ExceptionWithTraceback wrapper
        if isinstance(error, Quarantined):
            self._quarantine(error)
        return super().on_failure(
            exc_info, send_failed_event=send_failed_event, return_ok=return_ok
        )

    def _quarantine(self, error: Quarantined) -> None:
        message = self._message
        raw = getattr(message, "_raw", None)
        info = getattr(message, "delivery_info", None) or {}
        try:
            quarantine(
                message.channel,
                Poison(error.reason, error.detail, self.id),
                queue=str(info.get("routing_key") or "unknown"),
                raw=json.dumps(raw, default=str) if raw is not None else str(message.body),
                worker=worker_name(self.hostname),
            )
        except Exception:  # the broker failed: the message is acknowledged all the same
            log.exception("could not write the dead letter of message %s", self.id)
        self.send_event("task-failed", exception=f"quarantined: {error.reason}: {error.detail}")

    def on_timeout(self, soft: bool, timeout: float) -> None:
        """Let Celery fail the task, then record the killed run as a timeout in the store.

        The write runs on a thread: this is called from the worker's event loop, and the
        write may retry through a database outage.
        """
        super().on_timeout(soft, timeout)
        if soft or worker_state.should_terminate or not self.worker_pid:
            return
        app: StudyqCelery = self.task.app
        message = self.kwargs.get("spec") if isinstance(self.kwargs, dict) else None
        if not isinstance(message, dict):
            return
        worker = worker_name(self.hostname, self.worker_pid)
        threading.Thread(
            target=_record_hard_kill,
            args=(app, message, worker, float(timeout)),
            name="studyq-hard-limit",
            daemon=True,
        ).start()


class Quarantined(Ignore):  # type: ignore[misc]  # Celery ships no type hints
    """Raised by the run task for a message that is not a run message. An ``Ignore``, so
    Celery logs it at INFO without a traceback and acknowledges it; :class:`RunRequest`
    dead-letters the message first, in the worker's main process, which holds it as it
    arrived. (Picklable: its arguments are its state.)"""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(reason, detail)
        self.reason = Reason(reason)
        self.detail = detail


def _run_arguments(
    args: tuple[Any, ...], kwargs: dict[str, Any], wire: Any = None
) -> tuple[Any, Any]:
    """``(spec, attempt)`` of a run message: ``[[], {"spec": ..., "attempt": ...}]``, of wire
    version ``wire`` (the message's ``studyq_wire`` header; None: version 1).

    Raises:
        InvalidRunMessage: other arguments (positional ones, unknown or missing keywords),
            or a wire version this worker does not know.
    """
    if wire is not None and (not isinstance(wire, int) or not 1 <= wire <= WIRE_VERSION):
        raise InvalidRunMessage(
            f"run message of wire version {str(wire)[:20]}; this worker reads versions 1 to "
            f"{WIRE_VERSION}: upgrade the worker"
        )
    if args:
        raise InvalidRunMessage(
            f"run message has {len(args)} positional argument(s); expected none"
        )
    unknown = sorted(set(kwargs) - RUN_ARGUMENTS)
    if unknown:
        raise InvalidRunMessage(f"run message has unknown argument(s) {', '.join(unknown)[:200]}")
    if "spec" not in kwargs:
        raise InvalidRunMessage("run message has no spec argument")
    return kwargs["spec"], kwargs.get("attempt", 0)


def _record_hard_kill(
    app: StudyqCelery, message: dict[str, Any], worker: str, limit: float
) -> None:
    try:
        record_hard_kill(app.runtime(), message, worker, limit)
    except Exception:  # a thread's error would otherwise vanish
        log.exception("recording the hard time limit of a run failed")


def _run_failed(outcome: Outcome, spec: Any) -> RunFailed | None:
    """What the task of a run that failed raises (see :mod:`workers.failures`): the run's
    own error class and message; None for every other outcome (a duplicate delivery of a
    failed run included: it changed nothing)."""
    noted = take_failure(str(spec.get("run_id", ""))) if isinstance(spec, dict) else None
    if outcome is Outcome.TIMED_OUT:
        return RunFailed("RunTimeoutError", "over its time limit; recorded as failed (timeout)")
    if outcome is not Outcome.FAILED:
        return None
    return noted or RunFailed("RunFailed", "the run failed; its error is in the store")


def register_run_task(app: StudyqCelery) -> Any:
    """Register ``studyq.run`` on ``app`` and return the task."""

    @app.task(  # type: ignore[untyped-decorator]
        name=TASK_NAME,
        shared=False,  # the task belongs to this app; a shared task would join every app
        bind=True,
        acks_late=True,
        reject_on_worker_lost=True,
        ignore_result=True,
        Request=RunRequest,
        throws=(RunFailed,),  # a failed run: logged at INFO, no traceback
    )
    def run(self: Any, *args: Any, **kwargs: Any) -> str:
        """Claim, execute and record one run (workers.runtask.run_delivery)."""
        try:
            wire = getattr(self.request, WIRE_HEADER, None)
            spec, attempt = _run_arguments(args, kwargs, wire)
            outcome = run_delivery(app.runtime(self.request.hostname), spec, attempt)
        except InvalidRunMessage as error:
            # The main process dead-letters it (RunRequest.on_failure) and acknowledges it.
            # Reason: invalid_run, mismatch (MessageMismatch), unknown_study (UnknownStudy).
            raise Quarantined(error.reason, str(error)) from None
        except StoreUnavailableError as error:
            # Nothing ran (the claim never happened): put the message back for later.
            raise Reject(f"result store unavailable: {error}", requeue=True) from None
        if outcome is Outcome.HANDED_BACK:
            # A warm shutdown, or no provider slot within the bounded wait (workers.limits).
            raise Reject("handed back: warm shutdown, or its provider's limits", requeue=True)
        if outcome is Outcome.NOT_OURS:
            # Another deployment's study (shared queue): back to the broker, never acked.
            raise Reject(f"{outcome.value}: study not in this worker's database", requeue=True)
        failure = _run_failed(outcome, spec)
        if failure is not None:
            raise failure  # FAILURE in Celery and Flower; acknowledged all the same
        return outcome.value

    return run
