"""The seam between the coordinator and a broker: what a distributed sweep asks of one.

:mod:`orchestrator.distributed` and the CLI talk to a broker only through
:class:`Transport`; :func:`open_transport` picks the implementation from the URL. There is
one, Celery (:mod:`orchestrator.executors.celery`), on two brokers (Redis, RabbitMQ: see
:mod:`orchestrator.contracts.broker`). The store, not the broker, knows what ran: a
transport only carries messages, counts them, stops them, and keeps the poison ones.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import NamedTuple, Protocol, Self

from orchestrator.contracts.deadletters import DeadLetter
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings

__all__ = ["Publication", "Transport", "open_transport"]


class Publication(NamedTuple):
    """One run to publish: its spec, its attempt count at publish time (it makes the task id
    unique) and its condition's readable label (shown in Flower)."""

    spec: RunSpec
    attempt: int
    label: str


class Transport(Protocol):
    """A connection to the broker of a distributed sweep; use as a context manager.

    Every method raises :class:`~orchestrator.contracts.errors.BrokerUnavailableError` when
    the broker cannot be reached or read.
    """

    def __enter__(self) -> Self: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

    def publish(self, items: Iterable[Publication], *, queue: str, timeout_s: float | None) -> int:
        """Publish one run message per item to ``queue``; returns how many were published.
        The runs must be marked queued in the store first: a worker refuses any other."""
        ...

    def queue_backlog(self, queue: str, *, delivered_within_s: float | None = None) -> int:
        """How many of ``queue``'s messages the broker still holds: waiting, plus (where the
        broker tells) delivered in the last ``delivered_within_s`` and not acknowledged.
        Reconcile compares it with the queued runs to tell a backlog from lost messages."""
        ...

    def revoke(self, running: Sequence[tuple[RunSpec, int]]) -> None:
        """Stop the tasks executing these runs (``attempt`` as stored when claimed)."""
        ...

    def dead_letters(self, queue: str, *, limit: int | None = None) -> list[DeadLetter]:
        """The messages workers quarantined from ``queue``, newest first."""
        ...

    def dead_letter_count(self, queue: str) -> int:
        """How many messages workers quarantined from ``queue``."""
        ...

    def purge_dead_letters(self, queue: str) -> int:
        """Delete ``queue``'s dead letters; returns how many there were."""
        ...


def open_transport(settings: Settings, broker_url: str) -> Transport:
    """The transport of ``broker_url`` (not connected until entered).

    Raises:
        SettingsError: the URL names no broker studyq supports.
    """
    from orchestrator.executors.celery import CeleryTransport

    return CeleryTransport(settings, broker_url)
