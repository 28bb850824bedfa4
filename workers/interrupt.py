"""Stopping a run that executes on a process's main thread, and protecting a result write.

The prefork pool's children and the solo pool execute runs on the main thread, where the
timer both executors share (:class:`~orchestrator.contracts.interrupt.MainThreadInterrupt`,
re-exported here) enforces the soft time limit and lets the supervisor thread stop a run whose
lease is gone (:class:`LeaseLost`) or that a warm shutdown hands back (:class:`HandBack`). Both
derive from ``BaseException`` so :func:`~workers.execution.execute_run` (which turns every
``Exception`` into a failed result) lets them through.

The threads pool executes runs on other threads, which nothing can interrupt: there the soft
limit is not enforced (a run over it is recorded as a timeout when it returns) and the
supervisor records the hard limit without stopping the thread.

:func:`deferred_termination` holds back ``SIGTERM``/``SIGINT`` while a result is written, so a
shutdown never rolls back a finished run's only copy.
"""

from __future__ import annotations

import signal
from collections.abc import Iterator
from contextlib import contextmanager
from types import FrameType
from typing import Any

from orchestrator.contracts.interrupt import MainThreadInterrupt, on_main_thread

__all__ = ["HandBack", "LeaseLost", "MainThreadInterrupt", "deferred_termination", "on_main_thread"]


class HandBack(BaseException):
    """Raised inside a run that a warm shutdown hands back; its lease is already released."""


class LeaseLost(BaseException):
    """Raised inside a run that is no longer this worker's (cancelled, or its lease expired
    and the run was re-queued): its result would be refused, so stop spending on it."""


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
