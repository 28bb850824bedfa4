"""Retries by error class: which exceptions are transient, how long to wait, and the re-queue.

A study lists its transient exceptions in ``execution.retry.on``
(:class:`~orchestrator.contracts.extensions.RetryPolicy`): built-in names (``TimeoutError``,
``ConnectionError``: matched with ``isinstance`` against the builtin class, so subclasses
count), ``RateLimited`` (studyq's own :class:`RateLimited`, re-exported as
``workers.limits.RateLimited``) and import references (``lab.errors:Transient``). A run whose
exception is one of them, with attempts left (``execution.max_attempts``), is not failed:

1. the attempt is recorded as ended (``run_attempts.outcome = 'retried'`` with the error's
   kind, class and message) and the run goes back to ``queued`` in the same transaction,
   fenced on the claim like a result (:func:`orchestrator.store.retries.requeue_transient`);
   its ``queued_at`` is set to when the next attempt is due, so the reconcile loop does not
   take the wait for a lost message;
2. after the delay (:func:`retry_delay`: exponential backoff with full jitter, at least the
   error's ``retry_after_s``) this process publishes the run's next message
   (:class:`Redeliveries`, one timer thread per process); the claim of that message is the
   next attempt.

Every other exception, and a transient one on the run's last attempt, fails the run at once
with its real error. A run that succeeded is never executed again: its claim refuses it.

Why a timer in the worker and not a Celery ETA (``countdown``) message: studyq's run messages
never carry an ETA (workers quarantine one, :mod:`workers.poison`, and RabbitMQ's delayed
delivery is off, :mod:`workers.consumer`); on Redis an ETA message is handed to a worker at
once and held unacknowledged in its memory until due, taking a prefetch slot. The store is
the source of truth instead: if the process dies before the timer fires, the run is
``queued`` without a message, and the reconcile loop republishes it ``queued_timeout_s``
after it was due, like any lost message.

Import references in ``retry.on`` are trusted as the study's own bindings are: imported when
the worker trusts study bindings (``STUDYQ_TRUST_STUDY_BINDINGS``, the default), otherwise
only when on the worker's allow-list. A reference that does not import matches nothing (the
error then fails the run; ``studyq validate`` reports such a reference before submit).
"""

from __future__ import annotations

import builtins
import heapq
import importlib
import itertools
import logging
import os
import random
import socket
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from celery import signals
from pydantic import ValidationError

from orchestrator.contracts import wire
from orchestrator.contracts.errors import StoreError
from orchestrator.contracts.extensions import RATE_LIMITED, ExecutionPolicy, RetryPolicy
from orchestrator.contracts.results import RunResult
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.wire import CONTENT_ENCODING, CONTENT_TYPE
from orchestrator.store import Claim
from orchestrator.store.engine import transaction
from orchestrator.store.retries import requeue_transient
from workers.retrying import retry_unavailable

__all__ = [
    "ErrorCatch",
    "RateLimited",
    "Redeliveries",
    "RetryRules",
    "error_classes",
    "is_transient",
    "retry_delay",
    "retry_if_transient",
    "run_message",
]

log = logging.getLogger("studyq.worker")


class RateLimited(Exception):  # the contract's name (issue 12)
    """A provider refused a request for its rate (an HTTP 429), or studyq found a provider's
    window full. Raise it from an agent; list ``RateLimited`` in ``execution.retry.on`` to
    retry such runs. ``retry_after_s``: what the provider asked to wait (``Retry-After``);
    the next attempt waits at least that long. Picklable: its arguments are its state."""

    def __init__(self, message: str = "rate limited", retry_after_s: float | None = None):
        super().__init__(message, retry_after_s)
        self.message = message
        self.retry_after_s = None if retry_after_s is None else float(retry_after_s)

    def __str__(self) -> str:
        if self.retry_after_s is None:
            return self.message
        return f"{self.message} (retry after {self.retry_after_s:g} s)"


# --- classifying -------------------------------------------------------------------------


def _import_class(reference: str) -> type[BaseException] | None:
    module_name, _, path = reference.partition(":")
    try:
        value: Any = importlib.import_module(module_name)
        for attribute in path.split("."):
            value = getattr(value, attribute)
    except Exception:  # a module may raise anything while it is imported
        return None
    return value if isinstance(value, type) and issubclass(value, BaseException) else None


def error_classes(
    names: Iterable[str], *, allowed: Callable[[str], bool] = lambda _reference: True
) -> tuple[type[BaseException], ...]:
    """The exception classes ``retry.on`` names: builtin names, ``RateLimited``, and import
    references that ``allowed`` permits and that import (others are skipped, logged)."""
    classes: list[type[BaseException]] = []
    for name in names:
        if name == RATE_LIMITED:
            classes.append(RateLimited)
        elif ":" in name:
            found = _import_class(name) if allowed(name) else None
            if found is None:
                log.warning(
                    "retry.on names %s, which %s; errors of that class fail their runs",
                    name,
                    "does not import as an exception class"
                    if allowed(name)
                    else "this worker "
                    "may not import (not trusted: STUDYQ_TRUST_STUDY_BINDINGS / "
                    "STUDYQ_ALLOWED_IMPORTS)",
                )
            else:
                classes.append(found)
        else:
            builtin = getattr(builtins, name, None)
            if isinstance(builtin, type) and issubclass(builtin, BaseException):
                classes.append(builtin)
    return tuple(classes)


def is_transient(error: BaseException, classes: tuple[type[BaseException], ...]) -> bool:
    """Whether ``error`` is an instance of one of the transient ``classes``."""
    return bool(classes) and isinstance(error, classes)


def retry_delay(
    policy: RetryPolicy,
    failed_attempt: int,
    retry_after_s: float | None = None,
    *,
    rng: random.Random | None = None,
) -> float:
    """Seconds before the attempt after ``failed_attempt`` (1-based): full jitter,
    ``uniform(0, min(max_backoff_s, backoff_s * 2 ** (failed_attempt - 1)))``, but never less
    than ``retry_after_s``, even above ``max_backoff_s`` (the provider said when it will
    answer; an earlier attempt would only be refused again).

    The jitter draws from its own generator (``rng``, default: a process-wide one), never
    from the run's seeded random state: the wait is not part of a run's result."""
    exponent = min(max(failed_attempt, 1) - 1, 60)
    ceiling = min(policy.max_backoff_s, policy.backoff_s * 2.0**exponent)
    delay = (rng or _JITTER).uniform(0.0, ceiling)
    if retry_after_s is not None and retry_after_s > delay:
        delay = float(retry_after_s)
    return delay


_JITTER = random.Random()  # seeded from the OS, not by any run


@dataclass(frozen=True, slots=True)
class RetryRules:
    """A study's retry policy as one worker process applies it."""

    policy: RetryPolicy
    classes: tuple[type[BaseException], ...]
    queue: str
    hard_limit_s: float | None
    """The Celery hard time limit its messages carry (``timeout_s + time_limit_grace_s``)."""

    @classmethod
    def from_definition(
        cls,
        definition: dict[str, Any],
        *,
        allowed: Callable[[str], bool],
        grace_s: float,
    ) -> RetryRules | None:
        """The rules of a stored study definition; None when it retries nothing."""
        try:
            execution = ExecutionPolicy.model_validate(definition.get("execution") or {})
        except ValidationError:
            return None
        if execution.retry is None or not execution.retry.on:
            return None
        classes = error_classes(execution.retry.on, allowed=allowed)
        hard = None if execution.timeout_s is None else execution.timeout_s + grace_s
        return cls(execution.retry, classes, execution.queue, hard)


class ErrorCatch:
    """Keeps the exception a run raised (``execute_run(..., on_error=catch)``)."""

    __slots__ = ("error",)

    def __init__(self) -> None:
        self.error: BaseException | None = None

    def __call__(self, error: BaseException) -> None:
        self.error = error


# --- the worker side ---------------------------------------------------------------------

_NO_RULES: Any = object()
_RULES: weakref.WeakKeyDictionary[Any, dict[str, Any]] = weakref.WeakKeyDictionary()
_RULES_LOCK = threading.Lock()


def _rules(runtime: Any, study_id: str) -> RetryRules | None:
    """The study's rules in ``runtime``'s process, read from the store once per study."""
    with _RULES_LOCK:
        cached = _RULES.setdefault(runtime, {}).get(study_id)
    if cached is not None:
        return None if cached is _NO_RULES else cached
    info = retry_unavailable(
        lambda: runtime.store.find_study(study_id),
        what=f"loading the retry policy of {study_id}",
        budget_s=runtime.settings.result_retry_s,
        log=log,
    )
    if info is None:
        return None
    context = runtime.study(study_id)
    trust = bool(runtime.settings.trust_study_bindings)

    def allowed(reference: str) -> bool:
        # retry.on is the study's own, trusted as its bindings are (docs/security.md)
        return trust or (context is not None and context.resolver.is_allowed(reference))

    rules = RetryRules.from_definition(
        dict(info.definition), allowed=allowed, grace_s=runtime.settings.time_limit_grace_s
    )
    with _RULES_LOCK:
        _RULES[runtime][study_id] = _NO_RULES if rules is None else rules
    return rules


def retry_if_transient(
    runtime: Any,
    spec: RunSpec,
    claim: Claim,
    result: RunResult,
    error: BaseException | None,
) -> float | None:
    """Re-queue a run whose ``error`` is transient for its study and that has attempts left,
    and schedule its next message; returns the delay, or None when the run is to be recorded
    as failed (a permanent error, no retry policy, its last attempt, or the claim lost).

    ``runtime`` is the process's :class:`~workers.runtime.WorkerRuntime`."""
    if error is None:
        return None
    try:
        rules = _rules(runtime, spec.study_id)
    except StoreError as failure:  # the run executed: record it as failed (that write retries)
        log.error("could not load the retry policy of %s: %s", spec.study_id, failure)
        return None
    if rules is None or not is_transient(error, rules.classes):
        return None
    retry_after = getattr(error, "retry_after_s", None)
    delay = retry_delay(
        rules.policy,
        claim.attempt,
        float(retry_after) if isinstance(retry_after, int | float) else None,
    )

    def requeue() -> bool:
        with transaction(runtime.store.engine) as connection:
            return requeue_transient(connection, claim, result, delay)

    try:
        requeued = retry_unavailable(
            requeue,
            what=f"re-queueing run {spec.run_id} (index {spec.index}) of {spec.study_id}",
            budget_s=runtime.settings.result_retry_s,
            log=log,
        )
    except StoreError as failure:  # recorded as failed instead (that write retries too)
        log.error("could not re-queue run %s for a retry: %s", spec.run_id, failure)
        return None
    if not requeued:
        return None  # last attempt (or the claim no longer holds): recorded as usual
    log.info(
        "run %s (index %d, attempt %d) of %s raised %s, transient for its study: re-queued, "
        "next attempt in %.2f s",
        spec.run_id,
        spec.index,
        claim.attempt,
        spec.study_id,
        type(error).__name__,
        delay,
    )
    app, queue = _current_delivery()
    if app is None:
        log.info(
            "no Celery app in this process: run %s waits for the reconcile loop to publish it",
            spec.run_id,
        )
    else:
        redeliveries().schedule(
            delay, app, queue or rules.queue, rules.hard_limit_s, spec, claim.attempt
        )
    return delay


def publish_later(spec: RunSpec, attempt: int, delay_s: float) -> bool:
    """Publish the delivered run message of ``spec`` for ``attempt`` again, to the queue it
    came from, in ``delay_s`` seconds (the timer thread of :class:`Redeliveries`); False
    outside a Celery task (nothing scheduled). Used to give another deployment's message
    back to a shared queue (:mod:`workers.foreign`)."""
    from celery import current_task

    app, queue = _current_delivery()
    if app is None or queue is None:
        return False
    limits = getattr(current_task.request, "timelimit", None) or (None, None)
    hard = limits[0] if isinstance(limits, list | tuple) and limits else None
    redeliveries().schedule(delay_s, app, queue, float(hard) if hard else None, spec, attempt)
    return True


def _current_delivery() -> tuple[Any, str | None]:
    """The Celery app of the task executing this run, and the queue its message came from
    (the next message goes there: the queue these workers consume, whatever the study's
    ``execution.queue`` says); ``(None, None)`` outside a Celery task."""
    from celery import current_task

    task = current_task._get_current_object() if current_task else None
    if task is None:
        return None, None
    info = getattr(task.request, "delivery_info", None) or {}
    routing_key = info.get("routing_key") if isinstance(info, dict) else None
    return task.app, routing_key if isinstance(routing_key, str) and routing_key else None


class Redeliveries:
    """One timer thread per process that publishes run messages when they are due."""

    def __init__(self) -> None:
        self._due: list[tuple[float, int, Any, str, float | None, RunSpec, int]] = []
        self._order = itertools.count()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()

    @property
    def pending(self) -> int:
        """Messages waiting for their time."""
        with self._changed:
            return len(self._due)

    def schedule(
        self,
        delay_s: float,
        app: Any,
        queue: str,
        hard_limit_s: float | None,
        spec: RunSpec,
        attempt: int,
    ) -> None:
        """Publish ``spec``'s message for ``attempt`` (hard time limit ``hard_limit_s``) to
        ``queue`` through ``app`` in ``delay_s`` seconds."""
        with self._changed:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._loop, name="studyq-redeliveries", daemon=True
                )
                self._thread.start()
            heapq.heappush(
                self._due,
                (
                    time.monotonic() + delay_s,
                    next(self._order),
                    app,
                    queue,
                    hard_limit_s,
                    spec,
                    attempt,
                ),
            )
            self._changed.notify_all()

    def _loop(self) -> None:
        while True:
            with self._changed:
                while not self._due or self._due[0][0] > time.monotonic():
                    wait = None if not self._due else self._due[0][0] - time.monotonic()
                    self._changed.wait(wait)
                _, _, app, queue, hard_limit_s, spec, attempt = heapq.heappop(self._due)
            self._publish(app, queue, hard_limit_s, spec, attempt)

    def flush(self) -> int:
        """Publish every waiting message now, before its time; returns how many. Called when
        this process stops: a message left in a dead process's memory would wait for the
        reconcile loop (``queued_timeout_s`` after it was due), so the next attempt comes
        early instead (at worst it meets the same error again, and waits again)."""
        with self._changed:
            due, self._due = self._due, []
        for _, _, app, queue, hard_limit_s, spec, attempt in sorted(due, key=lambda d: d[:2]):
            self._publish(app, queue, hard_limit_s, spec, attempt)
        if due:
            log.info(
                "published %d waiting retr%s early: this process is stopping",
                len(due),
                "y" if len(due) == 1 else "ies",
            )
        return len(due)

    @staticmethod
    def _publish(
        app: Any, queue: str, hard_limit_s: float | None, spec: RunSpec, attempt: int
    ) -> None:
        try:
            publish_run(app, queue, hard_limit_s, spec, attempt)
        except Exception:  # the run stays queued: the reconcile loop republishes it
            log.exception(
                "could not publish the next attempt of run %s (index %d) of %s; the "
                "reconcile loop will republish it",
                spec.run_id,
                spec.index,
                spec.study_id,
            )


_REDELIVERIES: Redeliveries | None = None
_REDELIVERIES_LOCK = threading.Lock()


def redeliveries() -> Redeliveries:
    """This process's :class:`Redeliveries` (a new one in a forked child)."""
    global _REDELIVERIES
    with _REDELIVERIES_LOCK:
        if _REDELIVERIES is None or _REDELIVERIES._pid != os.getpid():
            _REDELIVERIES = Redeliveries()
        return _REDELIVERIES


def run_message(
    spec: RunSpec, attempt: int, *, origin: str, hard_limit_s: float | None
) -> tuple[str, str, dict[str, Any]]:
    """``(task id, body, headers)`` of the run message of ``spec`` for ``attempt``: the
    message the coordinator publishes (``orchestrator.executors.celery.messages``, which
    workers do not import; a test keeps the two equal), so a worker reads it as any other."""
    parts = wire.run_message(
        spec, attempt, label="", origin=origin, time_limit=[hard_limit_s, None]
    )
    return parts.task_id, parts.body, parts.headers


def _flush_on_shutdown(**_: Any) -> None:
    """A worker process stopping (a prefork child, or the main process of a solo/threads
    worker): publish its waiting retries (:meth:`Redeliveries.flush`)."""
    pending = _REDELIVERIES
    if pending is not None and pending._pid == os.getpid():
        pending.flush()


signals.worker_process_shutdown.connect(
    _flush_on_shutdown, weak=False, dispatch_uid="studyq-retries-process-down"
)
signals.worker_shutdown.connect(_flush_on_shutdown, weak=False, dispatch_uid="studyq-retries-down")


def publish_run(
    app: Any, queue: str, hard_limit_s: float | None, spec: RunSpec, attempt: int
) -> None:
    """Publish the run message of ``spec`` for ``attempt`` to ``queue`` (:func:`run_message`)
    through ``app``'s producer pool (the worker's own broker connection settings)."""
    task_id, body, headers = run_message(
        spec,
        attempt,
        origin=f"{os.getpid()}@{socket.gethostname()}",
        hard_limit_s=hard_limit_s,
    )
    with app.producer_or_acquire() as producer:
        producer.publish(
            body,
            exchange="",
            routing_key=queue,
            headers=headers,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            correlation_id=task_id,
            delivery_mode=2,
            retry=True,
            retry_policy={"max_retries": 5, "interval_start": 0.5, "interval_step": 1.0},
        )
