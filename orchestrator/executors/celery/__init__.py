"""The Celery transport: the only place in ``orchestrator/`` that imports Celery or kombu.

:class:`CeleryTransport` implements :class:`~orchestrator.executors.transport.Transport` on
either broker (:mod:`orchestrator.contracts.broker`): what differs between Redis and RabbitMQ
(how a page of messages is published, how a queue's backlog is counted, where dead letters
are kept) is in :mod:`.redis` and :mod:`.amqp`; the message itself (:mod:`.messages`, the
contract in :mod:`orchestrator.contracts.wire`), the ``task-sent`` events, revoking and the
error messages are shared. The store, not Celery, knows what ran: no result backend is used.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Callable, Iterable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from orchestrator.contracts.broker import BrokerKind, broker_kind
from orchestrator.contracts.deadletters import DeadLetter
from orchestrator.contracts.errors import (
    BrokerUnavailableError,
    SettingsError,
    StudyError,
    StudyqError,
)
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings
from orchestrator.contracts.wire import task_id_for
from orchestrator.executors.celery.amqp import RabbitBroker
from orchestrator.executors.celery.app import coordinator_app
from orchestrator.executors.celery.driver import BrokerDriver
from orchestrator.executors.celery.messages import MessageBuilder
from orchestrator.executors.celery.redis import RedisBroker, authentication_failure
from orchestrator.executors.transport import Publication

__all__ = ["CeleryTransport", "check_broker", "run_flower"]

_T = TypeVar("_T")


def check_broker(broker_url: str, *, timeout_s: float = 3.0) -> None:
    """Connect to the broker once (``studyq check``).

    Raises:
        SettingsError: the broker refused the URL's credentials (a wrong or missing
            password): retrying cannot help.
        BrokerUnavailableError: the broker cannot be reached.
    """
    from kombu import Connection  # type: ignore[attr-defined]

    try:
        with Connection(broker_url, connect_timeout=timeout_s) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1)
    except Exception as exc:
        raise _connect_error(broker_url, exc, consequence="") from None


def _connect_error(broker_url: str, exc: BaseException, *, consequence: str) -> StudyqError:
    """What a failed connection to ``broker_url`` means for the user: a password the broker
    refused (:class:`SettingsError`) or a broker that is not there
    (:class:`BrokerUnavailableError`); the URL is masked."""
    from orchestrator.store import mask_url

    where = f"broker {mask_url(broker_url)}"
    rabbit = broker_kind(broker_url) is BrokerKind.RABBITMQ
    refused = _amqp_refusal(exc) if rabbit else authentication_failure(exc)
    if refused is not None:
        example = (
            "amqp://USER:PASSWORD@HOST:5672/VHOST" if rabbit else "redis://:PASSWORD@HOST:6379/0"
        )
        return SettingsError(
            f"{where}: authentication failed ({refused}). Fix: check the user, password and "
            f"vhost in STUDYQ_BROKER_URL (or --broker), as in {example}{consequence}."
        )
    return BrokerUnavailableError(
        f"{where}: UNREACHABLE ({type(exc).__name__}). Fix: start "
        f"{'RabbitMQ' if rabbit else 'Redis'} or check STUDYQ_BROKER_URL{consequence}."
    )


def _amqp_refusal(exc: BaseException) -> str | None:
    """RabbitMQ's reason when ``exc`` (or what it wraps) refused the login or the vhost."""
    from amqp.exceptions import AccessRefused, NotAllowed

    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, AccessRefused | NotAllowed):
            return str(current).strip().splitlines()[0][:200] or type(current).__name__
        current = current.__cause__ or current.__context__
    return None


class CeleryTransport:
    """Publishes runs to the study's queue on ``broker_url``; use as a context manager.

    Raises:
        SettingsError: the URL names no broker studyq supports.
    """

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self._settings = settings
        self._url = broker_url
        self._kind = broker_kind(broker_url)
        self._app: Any = None
        self._broker: BrokerDriver | None = None

    def __enter__(self) -> CeleryTransport:
        self._app = coordinator_app(self._settings, self._url)
        try:
            with self._app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            self._app.close()
            raise _connect_error(
                self._url, exc, consequence="; nothing was registered or enqueued"
            ) from None
        driver = RedisBroker if self._kind is BrokerKind.REDIS else RabbitBroker
        self._broker = driver(self._app, self._settings)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._app is not None:
            self._app.close()
            self._app = None
            self._broker = None

    @property
    def kind(self) -> BrokerKind:
        """The broker this transport publishes to."""
        return self._kind

    def _active(self) -> BrokerDriver:
        if self._broker is None:
            raise RuntimeError("CeleryTransport used outside its `with` block")
        return self._broker

    def publish(
        self,
        items: Iterable[Publication],
        *,
        queue: str,
        timeout_s: float | None,
        sent_events: bool | None = None,
    ) -> int:
        """Publish one ``studyq.run`` message per item, through one connection; no ETA or
        countdown is ever set. Mark the runs queued in the store first: a worker refuses a
        run that is not queued.

        Args:
            items: ``(spec, attempt, condition label)`` per run.
            queue: The study's ``execution.queue``.
            timeout_s: The study's ``execution.timeout_s``; the prefork parent kills a run
                still going ``time_limit_grace_s`` after it and records a timeout.
            sent_events: Send a ``task-sent`` event per run (Flower then lists queued runs);
                default ``STUDYQ_TASK_SENT_EVENTS`` (off).

        Raises:
            BrokerUnavailableError: the broker failed. Runs published before the failure
                stay published; reconcile republishes the others (``queued_timeout_s``).
            StudyError: a message is over ``STUDYQ_MAX_MESSAGE_BYTES``, which workers would
                quarantine; none of this page's unsent messages is published.
        """
        from orchestrator.store import mask_url

        grace = self._settings.time_limit_grace_s
        builder = MessageBuilder(
            queue=queue,
            origin=f"{os.getpid()}@{socket.gethostname()}",
            hard_limit_s=None if timeout_s is None else timeout_s + grace,
        )
        broker = self._active()
        sent = [0]

        def counted(source: Iterable[Publication]) -> Iterable[Publication]:
            for item in source:
                yield item
                sent[0] += 1

        try:
            return broker.publish(
                builder,
                counted(items),
                events=self._settings.task_sent_events if sent_events is None else sent_events,
                check_size=self._check_size,
            )
        except (StudyError, BrokerUnavailableError):
            raise
        except self._app.connection_for_write().connection_errors as error:
            raise BrokerUnavailableError(
                f"broker {mask_url(self._url)} failed while publishing run messages (at most "
                f"{sent[0]} were sent): {error}. Check that the broker is running; queued "
                "runs without a message are republished by the reconcile loop."
            ) from error

    def _check_size(self, encoded: str, spec: RunSpec) -> None:
        """Refuse to publish a message every worker would quarantine as too large."""
        limit = self._settings.max_message_bytes
        size = len(encoded.encode())
        if size > limit:
            raise StudyError(
                f"the run message of {spec.run_id} (index {spec.index}) is {size:,} bytes, "
                f"over STUDYQ_MAX_MESSAGE_BYTES ({limit:,}): workers would quarantine it. Fix: "
                "make the study's factor values smaller, or raise STUDYQ_MAX_MESSAGE_BYTES for "
                "the coordinator and every worker."
            )

    def queue_backlog(self, queue: str, *, delivered_within_s: float | None = None) -> int:
        """How many messages the broker holds for ``queue`` (see
        :meth:`.redis.RedisBroker.backlog` and :meth:`.amqp.RabbitBroker.backlog`: Redis
        counts the unacknowledged deliveries too, RabbitMQ the ready messages only)."""
        broker = self._active()
        return self._read(
            f"cannot count the messages for queue '{queue}'",
            lambda: broker.backlog(queue, delivered_within_s=delivered_within_s),
        )

    def revoke(self, running: Sequence[tuple[RunSpec, int]]) -> None:
        """Terminate the tasks executing these runs (``attempt`` as stored when claimed)."""
        task_ids = [task_id_for(spec, max(attempt - 1, 0)) for spec, attempt in running]
        if task_ids:
            self._app.control.revoke(task_ids, terminate=True, signal="SIGTERM")

    def dead_letters(self, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
        """The messages workers quarantined from ``queue``, newest first (at most ``limit``)."""
        broker = self._active()
        return self._read(
            f"cannot read the dead letters of queue '{queue}'",
            lambda: broker.dead_letters(queue, limit=limit),
        )

    def dead_letter_count(self, queue: str) -> int:
        """How many messages workers quarantined from ``queue`` (kept: at most
        ``DEAD_LETTER_LIMIT``)."""
        broker = self._active()
        return self._read(
            f"cannot read the dead letters of queue '{queue}'",
            lambda: broker.dead_letter_count(queue),
        )

    def purge_dead_letters(self, queue: str) -> int:
        """Delete ``queue``'s dead letters; returns how many there were."""
        broker = self._active()
        return self._read(
            f"cannot purge the dead letters of queue '{queue}'",
            lambda: broker.purge_dead_letters(queue),
        )

    def _read(self, what: str, call: Callable[[], _T]) -> _T:
        from orchestrator.store import mask_url

        try:
            return call()
        except Exception as exc:  # kombu and the clients raise many types; all mean "unknown"
            raise BrokerUnavailableError(
                f"{what} on broker {mask_url(self._url)} ({_describe(exc)})"
            ) from exc


def run_flower(argv: list[str]) -> int:
    """Run Celery's ``flower`` command with ``argv`` (``celery --broker URL flower ...``) in
    this process; returns its exit code."""
    from celery.bin.celery import main as celery_main

    sys.argv = argv
    try:
        celery_main()
    except SystemExit as exc:
        return int(exc.code or 0)
    return 0


def _describe(exc: BaseException) -> str:
    """``Type: first line of the message``, short enough for one progress line."""
    lines = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {lines[0][:200]}" if lines else type(exc).__name__
