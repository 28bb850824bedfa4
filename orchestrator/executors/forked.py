"""One call run in a forked child process, its value or its error returned to the caller.

The export writes runs.csv in its own process and the other large tables (evaluations,
events, attempts) in a child at the same time, on a second core. A fork is the cheapest
such child: it starts in about 10 ms with every module the caller imported, where a process
of the forkserver would import SQLAlchemy and the store's models first (0.5 s measured
here) and a spawned one the whole package. A fork is safe only without other threads (a
lock another thread held stays held in the child): :func:`can_fork` checks that, and where
it fails the call runs in the calling process instead. The child must not use, close or
collect the database connections it inherited (they are the parent's sessions): the
export's call gives its engine a pool of its own first (``export._own_connections``).

The child ends with ``os._exit`` (multiprocessing's fork start method), so nothing it
inherited is finalized or flushed twice.
"""

from __future__ import annotations

import multiprocessing
import sys
import threading
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any, Generic, TypeVar

from orchestrator.contracts.errors import StudyqError

__all__ = ["ForkedCall", "can_fork"]

T = TypeVar("T")


def can_fork() -> bool:
    """Whether this process may fork a child for a call: Linux (macOS's system libraries
    are not fork-safe, and multiprocessing stopped forking there by default), and no
    thread but this one."""
    return (
        sys.platform.startswith("linux")
        and "fork" in multiprocessing.get_all_start_methods()
        and threading.active_count() == 1
    )


def _child(call: Callable[[], Any], reply: Connection) -> None:
    try:
        value: tuple[str, Any] = ("value", call())
    except BaseException as error:
        value = ("error", error)
    try:
        reply.send(value)
    except Exception as error:
        reply.send(("error", StudyqError(f"{type(error).__name__}: {error}")))
    reply.close()


class ForkedCall(Generic[T]):
    """``call()`` started in a forked child (see the module docstring); :meth:`result` waits
    for it. Use :func:`can_fork` first."""

    def __init__(self, call: Callable[[], T], *, name: str) -> None:
        self._name = name
        context = multiprocessing.get_context("fork")
        self._reply, sending = context.Pipe(duplex=False)
        for stream in (sys.stdout, sys.stderr):  # or the child writes their buffers again
            if stream is not None:
                stream.flush()
        self._process = context.Process(target=_child, args=(call, sending), name=name)
        self._process.start()
        sending.close()

    def result(self) -> T:
        """The call's value; its error is raised here. A child that died without replying
        (killed, out of memory) raises :class:`StudyqError` with its exit code."""
        try:
            kind, value = self._reply.recv()
        except EOFError:
            self._process.join()
            raise StudyqError(
                f"the {self._name} process ended without a result "
                f"(exit code {self._process.exitcode})."
            ) from None
        finally:
            self._reply.close()
        self._process.join()
        if kind == "error":
            raise value
        return value  # type: ignore[no-any-return]

    def cancel(self) -> None:
        """Stop the child (the caller failed and will not read its result)."""
        if self._process.is_alive():
            self._process.terminate()
        self._process.join()
        self._reply.close()
