"""How a failed run shows in Celery and Flower: its task raises :class:`RunFailed`.

The store is the source of truth for what a run came to; Celery only hears about it. A run
task that returned ``'failed'`` would be a ``SUCCESS`` in Celery's task state, and Flower's
Failed filter would never find it. So the run task (:mod:`workers.tasks`) raises
:class:`RunFailed` once the run's failed result is recorded (or handed to the process's
writer thread, :mod:`workers.writer`, which records it behind the run): the task's state is
``FAILURE``, the worker's ``task-failed`` event carries
``RunFailed('FlakyAgentError: flaky agent failed on purpose ...')`` (the run's error class
and message: Flower's exception column), and nothing else changes:

* the message is acknowledged as for a success (``acks_late`` with Celery's default
  ``task_acks_on_failure_or_timeout``), never requeued and never retried (the task has no
  ``autoretry_for``; a failed run is retried by the coordinator, if at all, as a new
  attempt with a new message);
* the exception is declared in the task's ``throws``, so the worker logs it at INFO, one
  line without a traceback (``raised expected: RunFailed(...)``);
* no result backend is involved (``task_ignore_result``): the failure goes to Flower as an
  event only.

The run's error is passed from where the result is recorded (:func:`note_result`, in
:func:`workers.runtask.run_delivery`) to the task (:func:`take_failure`) on the thread that
executed the run: a prefork child, the solo pool's main thread, or one thread of the
``threads`` pool.
"""

from __future__ import annotations

import threading

from orchestrator.contracts.errors import StudyqError
from orchestrator.contracts.results import RunResult, RunStatus

__all__ = ["RunFailed", "note_result", "take_failure"]

_recorded = threading.local()


class RunFailed(StudyqError):
    """The run failed; its result, with the full error, is in the store.

    ``str()`` is ``"<error class>: <message>"``, the run's ``error_info``. Picklable (a
    prefork child sends it to the worker's main process): its arguments are its state.
    """

    def __init__(self, error_type: str, message: str) -> None:
        super().__init__(f"{error_type}: {message}")
        self.error_type = error_type
        self.message = message

    def __reduce__(self) -> tuple[type[RunFailed], tuple[str, str]]:
        return type(self), (self.error_type, self.message)


def note_result(result: RunResult) -> None:
    """Remember the result this thread just recorded (or queued to be written)."""
    _recorded.result = result


def take_failure(run_id: str) -> RunFailed | None:
    """The :class:`RunFailed` of the failed result this thread noted last for ``run_id``
    (None when there is none), and forget it."""
    result: RunResult | None = getattr(_recorded, "result", None)
    _recorded.result = None
    if result is None or result.run_id != run_id or result.status is not RunStatus.FAILED:
        return None
    return RunFailed(result.error_type or "RunFailed", result.error_message or "")
