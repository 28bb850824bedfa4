"""The coordinator's Celery app: a broker connection, a control channel, no tasks.

It is configured from :func:`orchestrator.contracts.broker.celery_broker_conf`, as the
workers' app is (:mod:`workers.app`), so both declare a queue with the same arguments; it
registers no task and never consumes.
"""

from __future__ import annotations

from typing import Any

from celery import Celery

from orchestrator.contracts.broker import celery_broker_conf
from orchestrator.contracts.settings import Settings

__all__ = ["coordinator_app"]


def coordinator_app(settings: Settings, broker_url: str) -> Any:
    """A Celery app on ``broker_url`` that publishes run messages and events."""
    app = Celery("studyq", set_as_current=False)
    app.conf.update(
        celery_broker_conf(broker_url, visibility_timeout_s=settings.visibility_timeout_s),
        task_serializer="json",
        accept_content=["json"],
        event_serializer="json",
        task_send_sent_event=True,
        task_ignore_result=True,
        enable_utc=True,
        timezone="UTC",
    )
    return app
