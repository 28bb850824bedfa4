"""Which claimed runs an embedded sweep has started, in a file a SIGKILL cannot erase.

The embedded coordinator claims runs in batches, ahead of execution. When it is killed, the
next ``studyq run`` takes its claims back (:func:`orchestrator.store.recovery.take_back_orphans`)
and must charge an attempt only to the runs that had started: a run whose agent never began
cannot be what killed the sweep. Telling the store at the moment a run starts would cost a
write transaction per run from every pool process, against SQLite's single writer. Instead,
each executing process appends ``<plan index> <attempt>`` to this sweep's journal right before
it executes a run: one ``write(2)`` on an ``O_APPEND`` descriptor, atomic between processes,
and kept by the kernel's page cache when the writer is killed. Only a machine crash can lose
lines; a missing or unreadable journal makes the take-back charge every claim, as before
journals existed.

A journal lives in ``<tmp>/studyq-<uid>/`` (mode 0700; ``tmp`` is ``tempfile.gettempdir()``,
so a rerun must see the same ``TMPDIR``), named after the owner's host, PID and start time
and a hash of the store and the study. It is removed when its sweep ends with every claim
recorded or handed back, or when a later sweep has taken its dead owner's claims back.
"""

from __future__ import annotations

import hashlib
import os
import stat
import tempfile
from pathlib import Path

from orchestrator.executors.embedded_owner import EmbeddedOwner, process_alive

__all__ = ["StartJournal", "StartLog"]

_SUFFIX = ".starts"
_UNKNOWN_START = "none"


def _directory() -> Path | None:
    """This user's journal directory, created if needed; None when it is not safe to use
    (owned by someone else or open to others, as a planted ``/tmp`` entry would be)."""
    uid = os.getuid() if hasattr(os, "getuid") else None
    folder = Path(tempfile.gettempdir()) / f"studyq-{uid if uid is not None else 'user'}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_mode & 0o077:
        return None
    if uid is not None and info.st_uid != uid:
        return None
    return folder


def _sweep_key(store: str, study_id: str) -> str:
    return hashlib.sha256(f"{store}\n{study_id}".encode()).hexdigest()[:16]


class StartJournal:
    """The start journal of one owner's sweep of one study."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def for_owner(cls, owner: EmbeddedOwner, store: str, study_id: str) -> StartJournal | None:
        """The journal ``owner`` keeps (or kept) for its sweep of ``study_id`` in ``store``
        (one name per database, however its URL is spelled); None without a safe directory
        (then nothing is journaled, and a take-back charges every claim)."""
        folder = _directory()
        if folder is None:
            return None
        start = _UNKNOWN_START if owner.start is None else str(owner.start)
        name = f"{owner.host}-{owner.pid}-{start}-{_sweep_key(store, study_id)}{_SUFFIX}"
        return cls(folder / name)

    def create(self) -> None:
        """Start an empty journal (a stale one of the same name is emptied)."""
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | getattr(os, "O_NOFOLLOW", 0)
        os.close(os.open(self.path, flags, 0o600))

    def read(self) -> set[tuple[int, int]] | None:
        """The ``(plan index, attempt)`` of every run started; None without a journal."""
        try:
            text = self.path.read_text(encoding="ascii", errors="replace")
        except OSError:
            return None
        started: set[tuple[int, int]] = set()
        for line in text.splitlines():
            fields = line.split()
            if len(fields) == 2 and fields[0].isdigit() and fields[1].isdigit():
                started.add((int(fields[0]), int(fields[1])))
        return started

    def remove(self) -> None:
        """Delete the journal (nothing left to take back)."""
        self.path.unlink(missing_ok=True)

    def remove_stale(self) -> int:
        """Delete the journals of this sweep (same store and study) kept by processes on this
        host that are gone (their claims were taken back already); returns how many."""
        mine = _parse_name(self.path.name)
        if mine is None:
            return 0
        host, _, _, key = mine
        removed = 0
        for path in self.path.parent.glob(f"*-{key}{_SUFFIX}"):
            other = _parse_name(path.name)
            if path == self.path or other is None or other[0] != host:
                continue
            if not process_alive(other[1], other[2]):
                path.unlink(missing_ok=True)
                removed += 1
        return removed


def _parse_name(name: str) -> tuple[str, int, int | None, str] | None:
    """``(host, pid, start, sweep key)`` of a journal's file name (hosts may contain "-")."""
    parts = name.removesuffix(_SUFFIX).rsplit("-", 3)
    if len(parts) != 4 or not parts[1].isdigit():
        return None
    host, pid, start, key = parts
    if start != _UNKNOWN_START and not start.isdigit():
        return None
    return host, int(pid), None if start == _UNKNOWN_START else int(start), key


class StartLog:
    """An open journal for appending; one per process (the coordinator, each pool process)."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | getattr(os, "O_NOFOLLOW", 0))

    def started(self, index: int, attempt: int) -> None:
        """Note that attempt ``attempt`` of the run at ``index`` is about to execute."""
        os.write(self._fd, b"%d %d\n" % (index, attempt))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
