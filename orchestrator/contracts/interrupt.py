"""Stopping the run that executes on a process's main thread: its time limit, and interrupts
sent from other threads.

Python code can only be interrupted from outside by a signal, and only on the main thread.
Both executors execute runs there when they can (the embedded executor in-process and in its
pool processes; the prefork and solo pools of a Celery worker), and share this one timer:

* the soft time limit: ``SIGALRM`` from an interval timer raises
  :class:`~orchestrator.contracts.errors.RunTimeoutError` inside the agent, which
  ``execute_run`` records as a failed run of kind ``timeout``;
* an interrupt from another thread (:meth:`MainThreadInterrupt.interrupt`): the worker's
  lease keeper stops a run whose lease is gone or that a warm shutdown hands back, by
  sending ``SIGALRM`` to the main thread with the exception to raise there.

The handler stays installed until :meth:`MainThreadInterrupt.close` and ignores signals that
arrive when no run is armed, so a late ``SIGALRM`` can never reach the default action (which
would kill the process).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from orchestrator.contracts.errors import RunTimeoutError

__all__ = ["MainThreadInterrupt", "on_main_thread"]


def on_main_thread() -> bool:
    """Whether the caller runs on the main thread, the only one signals can interrupt."""
    return threading.current_thread() is threading.main_thread()


class MainThreadInterrupt:
    """A process's one way to interrupt the run executing on its main thread.

    Use :meth:`armed` around the run (on the main thread); other threads call
    :meth:`interrupt`. Only one run at a time can execute on the main thread, so one instance
    per process is enough.
    """

    def __init__(self) -> None:
        self._previous: Any = None
        self._installed = False
        self._armed = False
        self._raise: type[BaseException] | None = None
        self._timeout_s: float | None = None

    @property
    def usable(self) -> bool:
        """Whether the caller can arm it: on the main thread of a POSIX process."""
        return on_main_thread() and hasattr(signal, "setitimer") and hasattr(signal, "pthread_kill")

    @contextmanager
    def armed(self, timeout_s: float | None) -> Iterator[None]:
        """Make the run executing in the block interruptible, with a soft time limit.

        Must be entered on the main thread (check :attr:`usable`).
        """
        if not self._installed:
            self._previous = signal.signal(signal.SIGALRM, self._handle)
            self._installed = True
        self._raise = None
        self._timeout_s = timeout_s
        self._armed = True
        if timeout_s is not None:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            yield
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._raise = None

    def interrupt(self, exception: type[BaseException]) -> bool:
        """Raise ``exception`` inside the main thread's run (from any thread); False when no
        run is armed."""
        if not self._armed:
            return False
        self._raise = exception
        ident = threading.main_thread().ident
        if ident is None:
            return False
        signal.pthread_kill(ident, signal.SIGALRM)
        return True

    def close(self) -> None:
        """Put back the ``SIGALRM`` handler found on the first :meth:`armed` (main thread);
        for a process that lends its main thread, such as a program calling ``run_study``."""
        if self._installed:
            signal.signal(signal.SIGALRM, self._previous)
            self._installed = False

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:
            return  # a late alarm after the run ended: nothing to stop
        self._armed = False  # one interruption per run; the hard limit handles the rest
        if self._raise is not None:
            raise self._raise()
        raise RunTimeoutError(f"run exceeded its time limit of {self._timeout_s} s")
