"""The Celery transport: the only module in ``orchestrator/`` that touches Celery.

It publishes run messages through the worker package's publisher (one connection, one
producer, pre-encoded JSON) and revokes running tasks for ``cancel --terminate``. The store,
not Celery, knows what ran: no result backend is used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any

from orchestrator.errors import BrokerUnavailableError
from orchestrator.runspec import RunSpec
from orchestrator.settings import Settings

__all__ = ["CeleryTransport"]


class CeleryTransport:
    """Publishes runs to the study's queue on ``broker_url``; use as a context manager."""

    def __init__(self, settings: Settings, broker_url: str) -> None:
        self._settings = settings.model_copy(update={"broker_url": broker_url})
        self._app: Any = None

    def __enter__(self) -> CeleryTransport:
        from orchestrator.store import mask_url
        from workers.app import create_app

        self._app = create_app(self._settings)
        try:
            with self._app.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=5)
        except Exception as exc:
            self._app.close()
            raise BrokerUnavailableError(
                f"broker {mask_url(str(self._settings.broker_url))} is unreachable "
                f"({type(exc).__name__}). Fix: start Redis or check STUDYQ_BROKER_URL; "
                "nothing was registered or enqueued."
            ) from None
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

    def publish(
        self,
        items: Iterable[tuple[RunSpec, int, str]],
        *,
        queue: str,
        timeout_s: float | None,
    ) -> int:
        """Publish ``(spec, attempt, condition label)`` items; returns how many."""
        from workers.tasks import publish_runs

        return int(publish_runs(self._app, items, queue=queue, time_limit_s=timeout_s))

    def revoke(self, running: Sequence[tuple[RunSpec, int]]) -> None:
        """Terminate the tasks executing these runs (``attempt`` as stored when claimed)."""
        from workers.messages import task_id_for

        task_ids = [task_id_for(spec, max(attempt - 1, 0)) for spec, attempt in running]
        if task_ids:
            self._app.control.revoke(task_ids, terminate=True, signal="SIGTERM")
