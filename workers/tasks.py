"""The run task (thin: it calls :func:`~workers.runtask.run_delivery`) and its publisher.

Task ``studyq.run`` receives ``spec`` (``RunSpec.to_message()``) and ``attempt`` (the
attempt the run was published for). It is ``acks_late`` with ``reject_on_worker_lost``: a
message is acknowledged only after its run is recorded (or found not claimable), and a message
whose worker process died is requeued; a duplicate delivery costs one claim query.

Its outcome (``success``, ``failed``, ``duplicate``, ...; see
:class:`~workers.runtask.Outcome`) is the task's return value, which Flower shows; results
themselves live in the store (``task_ignore_result``). A run handed back by a warm shutdown
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
import os
import socket
import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from celery.events.event import get_exchange
from celery.exceptions import Ignore, Reject
from celery.utils.nodenames import anon_nodename
from celery.utils.time import utcoffset
from celery.worker import state as worker_state
from celery.worker.request import Request

from orchestrator.contracts.deadletters import Reason
from orchestrator.contracts.errors import BrokerUnavailableError, StoreUnavailableError, StudyError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.store import mask_url
from workers.messages import (
    CONTENT_ENCODING,
    CONTENT_TYPE,
    TASK_NAME,
    DeliveryTags,
    MessageBuilder,
    RunMessage,
)
from workers.poison import Poison
from workers.quarantine import quarantine
from workers.runtask import (
    InvalidRunMessage,
    MessageMismatch,
    Outcome,
    record_hard_kill,
    run_delivery,
)
from workers.runtime import worker_name

if TYPE_CHECKING:
    from workers.app import StudyqCelery

__all__ = ["TASK_NAME", "Quarantined", "RunRequest", "publish_runs", "register_run_task"]

log = logging.getLogger("studyq.worker")

PUBLISH_BATCH = 500
"""Messages per Redis pipeline round trip when publishing."""

SENT_EVENTS_PER_MESSAGE = 100
"""``task-sent`` events per ``task.multi`` event message."""


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


_RUN_KWARGS = frozenset({"spec", "attempt"})


def _run_arguments(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """``(spec, attempt)`` of a run message: ``[[], {"spec": ..., "attempt": ...}]``.

    Raises:
        InvalidRunMessage: other arguments (positional ones, unknown or missing keywords).
    """
    if args:
        raise InvalidRunMessage(
            f"run message has {len(args)} positional argument(s); expected none"
        )
    unknown = sorted(set(kwargs) - _RUN_KWARGS)
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
    )
    def run(self: Any, *args: Any, **kwargs: Any) -> str:
        """Claim, execute and record one run (workers.runtask.run_delivery)."""
        try:
            spec, attempt = _run_arguments(args, kwargs)
            outcome = run_delivery(app.runtime(self.request.hostname), spec, attempt)
        except InvalidRunMessage as error:
            # The main process dead-letters it (RunRequest.on_failure) and acknowledges it.
            reason = Reason.MISMATCH if isinstance(error, MessageMismatch) else Reason.INVALID_RUN
            raise Quarantined(reason, str(error)) from None
        except StoreUnavailableError as error:
            # Nothing ran (the claim never happened): put the message back for later.
            raise Reject(f"result store unavailable: {error}", requeue=True) from None
        if outcome is Outcome.HANDED_BACK:
            raise Reject("handed back on warm shutdown", requeue=True)
        return outcome.value

    return run


def publish_runs(
    app: StudyqCelery,
    specs_with_attempts: Iterable[tuple[RunSpec, int, str]],
    *,
    queue: str,
    time_limit_s: float | None = None,
    sent_events: bool | None = None,
) -> int:
    """Publish one ``studyq.run`` message per run, through one connection and producer.

    Messages are pre-encoded JSON in kombu's Redis envelope (see :mod:`workers.messages`),
    pushed through a Redis pipeline of :data:`PUBLISH_BATCH` per round trip, on the
    connection of the app's producer; no ETA or countdown is ever set. Mark the runs queued
    in the store first: a worker refuses a run that is not queued.

    Args:
        app: From :func:`workers.app.create_app`.
        specs_with_attempts: ``(spec, attempt, condition label)`` per run; ``attempt`` is the
            run's attempt count at publish time (it only makes the task id unique).
        queue: The study's ``execution.queue``.
        time_limit_s: The study's ``execution.timeout_s``; the prefork parent kills a run
            still going ``time_limit_grace_s`` after it and records a timeout.
        sent_events: Send a ``task-sent`` event per run (Flower then lists queued runs);
            defaults to the app's ``task_send_sent_event``.

    Returns:
        How many messages were published.

    Raises:
        BrokerUnavailableError: the broker cannot be reached. Runs published before the
            failure stay published; the reconcile loop republishes the others
            (``queued_timeout_s``).
        StudyError: a message is over ``STUDYQ_MAX_MESSAGE_BYTES``, which workers would
            quarantine; none of this batch's unsent messages is published.
    """
    settings = app.settings
    limit = settings.max_message_bytes
    hard_limit = None if time_limit_s is None else time_limit_s + settings.time_limit_grace_s
    if hard_limit is not None and hard_limit >= settings.visibility_timeout_s:
        log.warning(
            "runs may take up to %.0f s but the broker redelivers unacknowledged messages "
            "after %.0f s (STUDYQ_VISIBILITY_TIMEOUT_S); long runs will get duplicate "
            "deliveries, which workers acknowledge without executing",
            hard_limit,
            settings.visibility_timeout_s,
        )
    builder = MessageBuilder(
        queue=queue, origin=f"{os.getpid()}@{socket.gethostname()}", hard_limit_s=hard_limit
    )
    with_events = app.conf.task_send_sent_event if sent_events is None else sent_events
    published = 0
    tags = DeliveryTags()
    try:
        with app.producer_or_acquire() as producer:
            events = _SentEvents(app, producer) if with_events else None
            with producer.channel.conn_or_acquire() as client:
                pipe = client.pipeline(transaction=False)
                for spec, attempt, label in specs_with_attempts:
                    message = builder.build(spec, attempt, label)
                    envelope = builder.envelope(message, tags())
                    if len(envelope) * 4 > limit:  # utf-8 is at most 4 bytes a character
                        _check_size(envelope, limit, spec)
                    pipe.lpush(queue, envelope)
                    if events is not None:
                        events.add(message)
                    published += 1
                    if len(pipe) >= PUBLISH_BATCH:
                        pipe.execute()
                pipe.execute()
            if events is not None:
                events.flush()
    except app.connection_for_write().connection_errors as error:
        raise BrokerUnavailableError(
            f"broker {mask_url(str(app.conf.broker_url))} failed while publishing run "
            f"messages (at most {published} were sent): {error}. Check that Redis is running; "
            "queued runs without a message are republished by the reconcile loop."
        ) from error
    return published


def _check_size(envelope: str, limit: int, spec: RunSpec) -> None:
    """Refuse to publish a message every worker would quarantine as too large."""
    size = len(envelope.encode())
    if size > limit:
        raise StudyError(
            f"the run message of {spec.run_id} (index {spec.index}) is {size:,} bytes, over "
            f"STUDYQ_MAX_MESSAGE_BYTES ({limit:,}): workers would quarantine it. Fix: make the "
            "study's factor values smaller, or raise STUDYQ_MAX_MESSAGE_BYTES for the "
            "coordinator and every worker."
        )


class _SentEvents:
    """``task-sent`` events, as Celery's ``EventDispatcher`` fills them, sent in batches of
    :data:`SENT_EVENTS_PER_MESSAGE` per ``task.multi`` message: the form Celery's own worker
    uses for buffered task events, which Flower and ``celery events`` read like single
    events. One event message per run would cost as much as the run message itself."""

    def __init__(self, app: StudyqCelery, producer: Any) -> None:
        self.producer = producer
        self.exchange = get_exchange(producer.connection, name=app.conf.event_exchange)
        self.hostname = anon_nodename()
        self.headers = {"hostname": self.hostname}
        self.pid = os.getpid()
        self.clock = app.clock
        self.utcoffset = utcoffset()
        self.declare: list[Any] | None = [self.exchange]
        self.buffer: list[dict[str, Any]] = []

    def add(self, message: RunMessage) -> None:
        self.buffer.append(
            MessageBuilder.sent_event(
                message,
                hostname=self.hostname,
                pid=self.pid,
                clock=self.clock.forward(),
                utcoffset=self.utcoffset,
            )
        )
        if len(self.buffer) >= SENT_EVENTS_PER_MESSAGE:
            self.flush()

    def flush(self) -> None:
        if not self.buffer:
            return
        self.producer.publish(
            MessageBuilder.encode(self.buffer),
            exchange=self.exchange.name,
            routing_key="task.multi",
            headers=self.headers,
            content_type=CONTENT_TYPE,
            content_encoding=CONTENT_ENCODING,
            delivery_mode=1,
            declare=self.declare,
        )
        self.declare = None  # declared once per publish call
        self.buffer = []
