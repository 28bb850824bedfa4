"""What each broker under the Celery transport implements (:mod:`.redis`, :mod:`.amqp`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from orchestrator.contracts.deadletters import DeadLetter
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import Settings
from orchestrator.executors.celery.messages import MessageBuilder
from orchestrator.executors.transport import Publication

__all__ = ["BrokerDriver", "SizeCheck"]

SizeCheck = Callable[[str, RunSpec], None]
"""Raises :class:`~orchestrator.contracts.errors.StudyError` for an encoded message over
``STUDYQ_MAX_MESSAGE_BYTES``."""


class BrokerDriver:
    """The broker-specific half of :class:`~orchestrator.executors.celery.CeleryTransport`,
    on the coordinator's Celery app; errors propagate (the transport words them)."""

    def __init__(self, app: Any, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    def publish(
        self,
        builder: MessageBuilder,
        items: Iterable[Publication],
        *,
        events: bool,
        check_size: SizeCheck,
    ) -> int:
        """Publish one message per item to ``builder.queue``; returns how many."""
        raise NotImplementedError

    def backlog(self, queue: str, *, delivered_within_s: float | None) -> int:
        """The messages the broker holds for ``queue`` (see each broker for what counts)."""
        raise NotImplementedError

    def dead_letters(self, queue: str, *, limit: int | None) -> list[DeadLetter]:
        """``queue``'s dead letters, newest first."""
        raise NotImplementedError

    def dead_letter_count(self, queue: str) -> int:
        raise NotImplementedError

    def purge_dead_letters(self, queue: str) -> int:
        raise NotImplementedError
