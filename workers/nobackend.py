"""The workers' Celery result backend: none, and quiet about it.

Results live in the store (``task_ignore_result``); Celery is configured without a result
backend. Celery's own stand-in for that, ``DisabledBackend``, raises ``No result backend is
configured`` from every read. The worker's ``revoke`` control command reads a task's state
for every revoked id it does not execute itself (to mark it revoked in the backend), and
logs that error as a warning: ``studyq cancel --terminate`` broadcasts the revoke to every
worker, so each worker not running a cancelled run logged one warning per run.

:class:`NoResultBackend` answers that read with ``PENDING``, Celery's state for a task it
knows nothing about (true: it keeps nothing), and like ``DisabledBackend`` stores nothing;
every other read still raises. The workers' app uses it (``result_backend`` in
:func:`workers.app.create_app`).
"""

from __future__ import annotations

from typing import Any

from celery import states
from celery.backends.base import DisabledBackend

__all__ = ["NoResultBackend"]


class NoResultBackend(DisabledBackend):  # type: ignore[misc]  # Celery ships no type hints
    """``DisabledBackend`` whose task state is always ``PENDING`` (unknown)."""

    def get_state(self, task_id: Any) -> str:
        return str(states.PENDING)

    get_status = get_state
