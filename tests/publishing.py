"""Publishing run messages in tests, through the coordinator's transport (as `submit` does)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from orchestrator.contracts.runspec import RunSpec
from orchestrator.executors.celery import CeleryTransport
from orchestrator.executors.transport import Publication


def publish_runs(
    publisher: Any,
    items: Iterable[tuple[RunSpec, int, str]],
    *,
    queue: str,
    time_limit_s: float | None = None,
    sent_events: bool = True,
) -> int:
    """Publish ``(spec, attempt, label)`` items to ``queue`` on the broker of ``publisher``
    (anything with ``.settings``, e.g. a worker app, or a ``Settings``)."""
    settings = getattr(publisher, "settings", publisher)
    with CeleryTransport(settings, str(settings.broker_url)) as transport:
        return transport.publish(
            [Publication(*item) for item in items],
            queue=queue,
            timeout_s=time_limit_s,
            sent_events=sent_events,
        )
