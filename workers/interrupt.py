"""Stopping a run that executes on a process's main thread, and protecting a result write.

Python code can only be interrupted from outside by a signal, and only on the main thread. The
prefork pool's children and the solo pool execute runs there, so a worker can:

* enforce the soft time limit: ``SIGALRM`` from an interval timer raises
  :class:`~orchestrator.contracts.errors.RunTimeoutError` inside the agent, which
  :func:`~workers.execution.execute_run` records as a failed run of kind ``timeout``;
* stop a run whose lease is gone (:class:`LeaseLost`) or that a warm shutdown hands back
  (:class:`HandBack`): the supervisor thread sends ``SIGALRM`` to the main thread with a
  reason. Both derive from ``BaseException`` so ``execute_run`` (which turns every
  ``Exception`` into a failed result) lets them through.

The threads pool executes runs on other threads, which nothing can interrupt: there the soft
limit is not enforced (a run over it is recorded as a timeout when it returns) and the
supervisor records the hard limit without stopping the thread.

The handler stays installed for the life of the process and ignores signals that arrive when
no run is armed, so a late ``SIGALRM`` can never reach the default action (which would kill the
process). :func:`deferred_termination` holds back ``SIGTERM``/``SIGINT`` while a result is
written, so a shutdown never rolls back a finished run's only copy.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from orchestrator.contracts.errors import RunTimeoutError

__all__ = ["HandBack", "LeaseLost", "MainThreadInterrupt", "deferred_termination", "on_main_thread"]


class HandBack(BaseException):
    """Raised inside a run that a warm shutdown hands back; its lease is already released."""


class LeaseLost(BaseException):
    """Raised inside a run that is no longer this worker's (cancelled, or its lease expired
    and the run was re-queued): its result would be refused, so stop spending on it."""


def on_main_thread() -> bool:
    """Whether the caller runs on the main thread, the only one signals can interrupt."""
    return threading.current_thread() is threading.main_thread()


class MainThreadInterrupt:
    """The process's one way to interrupt the run executing on its main thread.

    Use :meth:`armed` around the run (on the main thread); other threads call
    :meth:`interrupt`. Only one run at a time can execute on the main thread, so one instance
    per process is enough.
    """

    def __init__(self) -> None:
        self._installed = False
        self._armed = False
        self._reason: str | None = None
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
            signal.signal(signal.SIGALRM, self._handle)
            self._installed = True
        self._reason = None
        self._timeout_s = timeout_s
        self._armed = True
        if timeout_s is not None:
            signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            yield
        finally:
            self._armed = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            self._reason = None

    def interrupt(self, reason: str) -> bool:
        """Ask the main thread's run to stop with ``reason`` (``"hand_back"`` or
        ``"lease_lost"``); False when no run is armed."""
        if not self._armed:
            return False
        self._reason = reason
        ident = threading.main_thread().ident
        if ident is None:
            return False
        signal.pthread_kill(ident, signal.SIGALRM)
        return True

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if not self._armed:
            return  # a late alarm after the run ended: nothing to stop
        self._armed = False  # one interruption per run; the hard limit handles the rest
        reason = self._reason
        if reason == "hand_back":
            raise HandBack()
        if reason == "lease_lost":
            raise LeaseLost()
        raise RunTimeoutError(f"run exceeded its time limit of {self._timeout_s} s")


@contextmanager
def deferred_termination() -> Iterator[list[int]]:
    """Hold back ``SIGTERM`` and ``SIGINT`` for the duration of the block (main thread only).

    A prefork child turns ``SIGTERM`` into ``SystemExit`` at whatever line is executing; in
    the middle of a claim or a result write that would roll the transaction back, or leave a
    claim nobody releases. Signals that arrive meanwhile are listed in the value the block
    receives (so it can act on them) and re-raised, to their original handlers, when it ends.
    """
    received: list[int] = []
    if not on_main_thread():
        yield received
        return

    def hold(signum: int, frame: FrameType | None) -> None:
        received.append(signum)

    previous: dict[int, Any] = {}
    for signum in (int(signal.SIGTERM), int(signal.SIGINT)):
        current = signal.getsignal(signum)
        if current in (signal.SIG_IGN, None):
            continue
        previous[signum] = current
        signal.signal(signum, hold)
    try:
        yield received
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            signal.raise_signal(signum)
