"""Run messages of studies this worker's database does not hold: given back, never lost.

Two deployments (two databases) that share one broker queue (the default queue name
``studyq`` on one Redis database, say) see each other's messages. A worker cannot run a
study its database does not hold, and it must not just acknowledge the message either: that
would lose the other deployment's run. So such a delivery is *given back*: a copy of the
message is published to the same queue after a short back-off (the worker's timer
thread, :func:`workers.transient.publish_later`) and the delivery is acknowledged, for a
worker of the deployment that holds the study.
(Should the worker die in the back-off, that deployment's ``studyq wait`` publishes the run
again once it finds its message missing.)

Two things keep that from going wrong:

* **No hot loop.** A worker set that sees only foreign messages (the other deployment's
  workers are down) would take and return the same messages as fast as the broker hands
  them out. Each process counts the foreign deliveries it has had in a row (any delivery
  of a study it holds resets the count) and delays the copy: nothing for the first, then
  :data:`FIRST_BACKOFF_S` doubling up to :data:`MAX_BACKOFF_S`, each wait times a random
  factor between 0.5 and 1. The message is not held during the wait: a held message
  fills the worker's slot, and when each deployment's workers held only the other's last
  messages, every returned message went straight back to the only consumer with a free
  slot, its returner, for minutes. Acknowledged at once, both sides' slots stay free, and
  the copy goes to whichever worker waits for it.
* **No message bouncing forever.** A study deleted from the database while its messages
  are still on the broker is foreign to every worker. A process that has returned the same
  message at least :data:`DEAD_LETTER_MIN_RETURNS` times over at least
  :data:`DEAD_LETTER_AFTER_S` seconds dead-letters it instead, reason ``unknown_study``
  (``studyq dead-letters`` lists it). Both bounds must hold, so a message of another
  deployment whose workers are merely restarting, or one that waits behind a long backlog,
  is never dead-lettered: while the other deployment's workers consume the queue, the same
  process is handed the same message 20 times only by a one-in-a-million chance. Should it
  happen anyway (the other deployment's workers down for longer than
  :data:`DEAD_LETTER_AFTER_S`), the run is still queued in its own store, and that
  deployment's ``studyq wait`` publishes it again once it finds the message missing.

The memory of returned messages is per process, bounded to :data:`TRACKED` messages (the
oldest are forgotten first).
"""

from __future__ import annotations

import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable
from dataclasses import dataclass

__all__ = [
    "DEAD_LETTER_AFTER_S",
    "DEAD_LETTER_MIN_RETURNS",
    "FIRST_BACKOFF_S",
    "MAX_BACKOFF_S",
    "TRACKED",
    "ForeignMessages",
    "Verdict",
]

FIRST_BACKOFF_S = 0.05
"""The wait before returning the second foreign delivery in a row; it doubles from there."""
MAX_BACKOFF_S = 0.3
"""The longest wait before returning a foreign delivery."""
DEAD_LETTER_AFTER_S = 600.0
"""A message is dead-lettered only after this process has been returning it this long..."""
DEAD_LETTER_MIN_RETURNS = 20
"""...and at least this many times."""
TRACKED = 10_000
"""Returned messages one process remembers."""


@dataclass(frozen=True, slots=True)
class Verdict:
    """What to do with one foreign delivery."""

    backoff_s: float
    """Wait this long, then return it (0: at once)."""
    returns: int
    """Deliveries of this message this process has had, this one included."""
    dead_letter: bool
    """Dead-letter it instead of returning it."""
    first_of_study: bool
    """The first foreign delivery of its study in this process (worth a log line)."""


@dataclass(slots=True)
class _Seen:
    first: float
    returns: int


class ForeignMessages:
    """One process's foreign deliveries: the back-off streak and the messages returned.

    Safe to share between the threads of the ``threads`` pool.
    """

    def __init__(
        self,
        *,
        dead_letter_after_s: float = DEAD_LETTER_AFTER_S,
        dead_letter_min_returns: int = DEAD_LETTER_MIN_RETURNS,
        first_backoff_s: float = FIRST_BACKOFF_S,
        max_backoff_s: float = MAX_BACKOFF_S,
        tracked: int = TRACKED,
        clock: Callable[[], float] = time.monotonic,
        jitter: Callable[[], float] = random.random,
    ) -> None:
        self.dead_letter_after_s = dead_letter_after_s
        self.dead_letter_min_returns = dead_letter_min_returns
        self.first_backoff_s = first_backoff_s
        self.max_backoff_s = max_backoff_s
        self._tracked = tracked
        self._clock = clock
        self._jitter = jitter
        self._lock = threading.Lock()
        self._streak = 0
        self._seen: OrderedDict[Hashable, _Seen] = OrderedDict()
        self._studies: set[str] = set()

    def own(self) -> None:
        """A delivery of a study this database holds: the back-off starts over."""
        if self._streak:
            with self._lock:
                self._streak = 0

    def returned(self, study_id: str, message: Hashable) -> Verdict:
        """Record a foreign delivery of ``message`` (a key naming the message: study, index,
        run id, attempt) and say how to give it back."""
        now = self._clock()
        with self._lock:
            self._streak += 1
            streak = self._streak
            seen = self._seen.pop(message, None) or _Seen(now, 0)
            seen.returns += 1
            dead = (
                seen.returns >= self.dead_letter_min_returns
                and now - seen.first >= self.dead_letter_after_s
            )
            if not dead:
                self._seen[message] = seen  # most recent last
                while len(self._seen) > self._tracked:
                    self._seen.popitem(last=False)
            first_of_study = study_id not in self._studies
            if first_of_study:
                if len(self._studies) >= self._tracked:
                    self._studies.clear()
                self._studies.add(study_id)
        ceiling = (
            0.0
            if streak < 2
            else min(self.max_backoff_s, self.first_backoff_s * 2 ** min(streak - 2, 30))
        )
        backoff = ceiling * (0.5 + 0.5 * self._jitter())  # jitter: see the module docstring
        return Verdict(0.0 if dead else backoff, seen.returns, dead, first_of_study)
