"""Who holds an embedded claim, and whether that process is still alive.

An embedded coordinator claims runs as ``embedded:<host>:<pid>:<start>``, where ``<start>`` is
the process's start time in clock ticks after boot (``/proc/<pid>/stat`` field 22). A later
``studyq run`` on the same host takes the claims of a dead owner back at once instead of
waiting 24 hours for their leases; it must therefore never mistake a live coordinator for a
dead one, nor a dead one for a live one:

* a killed coordinator whose parent has not reaped it yet is a zombie: ``kill(pid, 0)``
  succeeds on it, but it holds nothing (state ``Z``/``X`` in ``/proc/<pid>/stat``);
* a PID can be reused by another process: the start time recorded in the owner tells them
  apart.

Elsewhere than Linux (no ``/proc``) the owner has no ``<start>`` and liveness falls back to
``kill(pid, 0)``: a zombie then counts as alive until its parent reaps it (a shell does so at
once), and a reused PID keeps the claims held until their lease expires. Owners written
before start times were recorded (``embedded:<host>:<pid>``) are judged the same way.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from pathlib import Path

__all__ = ["EmbeddedOwner", "is_dead_embedded_owner", "process_alive", "process_start"]

_PREFIX = "embedded"
_PROC = Path("/proc")
_EXITED_STATES = frozenset("ZXx")  # zombie, dead (``x`` on kernels before 3.13 too)


@dataclass(frozen=True, slots=True)
class EmbeddedOwner:
    """An embedded coordinator process, as named in ``runs.lease_owner``."""

    host: str
    pid: int
    start: int | None = None
    """Start time in clock ticks after boot; None where unknown (not Linux, older owners)."""

    @classmethod
    def current(cls) -> EmbeddedOwner:
        """This process."""
        pid = os.getpid()
        return cls(socket.gethostname(), pid, process_start(pid))

    @classmethod
    def parse(cls, owner: str) -> EmbeddedOwner | None:
        """The owner named by ``owner``, or None when it is not an embedded owner's name."""
        parts = owner.split(":")
        if len(parts) not in (3, 4) or parts[0] != _PREFIX or not parts[1]:
            return None
        try:
            pid = int(parts[2])
            start = int(parts[3]) if len(parts) == 4 else None
        except ValueError:
            return None
        return cls(parts[1], pid, start)

    def __str__(self) -> str:
        name = f"{_PREFIX}:{self.host}:{self.pid}"
        return name if self.start is None else f"{name}:{self.start}"


def _proc_stat(pid: int, proc: Path) -> tuple[str, int] | None:
    """``(state, start ticks)`` of ``pid`` from ``/proc``, or None when there is no entry."""
    try:
        stat = (proc / str(pid) / "stat").read_text(encoding="ascii", errors="replace")
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may itself contain ")" or spaces.
    fields = stat.rsplit(")", 1)[-1].split()
    try:
        return fields[0], int(fields[19])
    except (IndexError, ValueError):
        return None


def process_start(pid: int, *, proc: Path = _PROC) -> int | None:
    """When ``pid`` started, in clock ticks after boot; None without ``/proc``."""
    stat = _proc_stat(pid, proc)
    return None if stat is None else stat[1]


def process_alive(pid: int, start: int | None = None, *, proc: Path = _PROC) -> bool:
    """Whether process ``pid`` (started at ``start`` ticks, when given) still runs.

    False for a process that is gone, a zombie, or a PID now used by a process that started
    at another time. Without a ``/proc`` entry (not Linux, or ``hidepid`` hiding another
    user's process) the kernel is asked with ``kill(pid, 0)``: there a zombie counts as alive.
    """
    stat = _proc_stat(pid, proc)
    if stat is not None:
        state, started = stat
        if state in _EXITED_STATES:
            return False
        return start is None or started == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, but belongs to another user
        return True
    return True


def is_dead_embedded_owner(owner: str) -> bool:
    """Whether ``owner`` names an embedded coordinator on this host that no longer runs
    (SIGKILL, crash, reboot). Owners on other hosts and other kinds of owners are never dead
    by this test: their claims are taken back when their lease expires."""
    parsed = EmbeddedOwner.parse(owner)
    if parsed is None or parsed.host != socket.gethostname():
        return False
    if parsed.pid == os.getpid():
        # Our own PID at start-up is a dead predecessor's (a restarted container reusing the
        # PID, or an earlier sweep of this process that could not hand its runs back): this
        # sweep holds no claims yet.
        return True
    return not process_alive(parsed.pid, parsed.start)
