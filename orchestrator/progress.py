"""Progress for long work: counts, rate and ETA on a terminal, silence elsewhere.

Like the ancestor, progress shows by default only when stderr is a terminal; callers can
force it on or off.
"""

from __future__ import annotations

import sys
from types import TracebackType
from typing import Any

__all__ = ["Progress"]


class Progress:
    """A tqdm bar over a known number of runs, with success/failed counts in its postfix."""

    def __init__(self, total: int, *, desc: str, show: bool | None = None, initial: int = 0):
        self.succeeded = 0
        self.failed = 0
        enabled = sys.stderr.isatty() if show is None else show
        self._bar: Any = None
        if enabled and total > 0:
            from tqdm import tqdm

            self._bar = tqdm(
                total=total,
                initial=initial,
                desc=desc,
                unit="run",
                dynamic_ncols=True,
                smoothing=0.1,
                file=sys.stderr,
            )

    def update(self, succeeded: int = 0, failed: int = 0) -> None:
        self.succeeded += succeeded
        self.failed += failed
        if self._bar is not None:
            self._bar.set_postfix(ok=self.succeeded, failed=self.failed, refresh=False)
            self._bar.update(succeeded + failed)

    def set_counts(self, done: int, succeeded: int, failed: int) -> None:
        """Absolute update, for views that poll a store rather than count events."""
        self.succeeded, self.failed = succeeded, failed
        if self._bar is not None:
            self._bar.set_postfix(ok=succeeded, failed=failed, refresh=False)
            self._bar.update(done - self._bar.n)

    def write(self, message: str) -> None:
        """A line above the bar (or plain stderr when there is no bar)."""
        if self._bar is not None:
            self._bar.write(message, file=sys.stderr)
        else:
            print(message, file=sys.stderr)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()
