"""How many runs go to a pool process in one message.

A message to a process pool costs the coordinator about as much as a no-op run (pickling,
a pipe write, a wake-up of the pool's manager thread, a future): with one run per message the
coordinator, not the pool, is the bottleneck, and more processes only make it slower. Large
fixed chunks would fix that but leave processes idle at the end of a sweep of slow runs, and
make Ctrl-C or ``fail_fast`` wait for the runs in hand. So a chunk is sized to take about
:data:`TARGET_S` to execute, from the run times measured so far: one run per message for runs
of that length or more, hundreds for no-op runs.
"""

from __future__ import annotations

__all__ = ["TARGET_S", "ChunkSizer"]

TARGET_S = 0.02
"""Execution time a chunk aims at: per-message cost (~0.1 ms) stays under 1 % of it, and the
last chunks of a sweep end within it of each other."""

_MOST = 512  # bounds a message's size, and the runs a killed coordinator's pool has in hand
_WEIGHT = 0.3  # of the newest measurement in the running mean


class ChunkSizer:
    """The chunk size to submit next, from the execution times of the chunks so far.

    Starts at ``first`` (nothing measured yet: the first runs may be slow) and grows at most
    fourfold per measurement, so one fast outlier cannot hand a process hundreds of slow runs.
    """

    def __init__(self, *, first: int = 1, most: int = _MOST, target_s: float = TARGET_S) -> None:
        self._size = max(1, first)
        self._most = max(1, most)
        self._target_s = target_s
        self._per_run_s: float | None = None

    @property
    def size(self) -> int:
        """Runs in the next chunk."""
        return self._size

    def observe(self, runs: int, seconds: float) -> None:
        """A chunk of ``runs`` runs took ``seconds`` to execute in its process."""
        if runs < 1:
            return
        per_run = max(seconds, 0.0) / runs
        mean = self._per_run_s
        self._per_run_s = per_run if mean is None else mean + _WEIGHT * (per_run - mean)
        wanted = self._target_s / self._per_run_s if self._per_run_s > 0 else float(self._most)
        self._size = max(1, min(self._most, self._size * 4, int(wanted)))
