"""Retrying a store call through a database outage, with capped exponential backoff.

Only :class:`~orchestrator.contracts.errors.StoreUnavailableError` is retried: the store raises it
when the database cannot be reached, is locked or aborted the transaction, i.e. when the same call
can succeed later. Every other error is a bug or a refusal and is raised at once. Each retry is
logged with what was being done, the try number, the wait and the time left, so an operator
watching the worker log sees an outage and its end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from orchestrator.contracts.errors import StoreUnavailableError

__all__ = ["FIRST_DELAY_S", "MAX_DELAY_S", "retry_unavailable"]

_T = TypeVar("_T")

FIRST_DELAY_S = 0.25
"""Wait before the first retry: most outages seen by a worker are a pooled connection that
died (database restart, failover), which a reconnect fixes at once."""

MAX_DELAY_S = 10.0
"""Longest wait between tries. Kept short because a worker that reaches the database again
should record its result before the coordinator's reconcile loop judges its lease (which
stopped being extended during the outage)."""


def retry_unavailable(
    call: Callable[[], _T],
    *,
    what: str,
    budget_s: float,
    log: logging.Logger,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> _T:
    """``call()``, retried while it raises ``StoreUnavailableError``, for up to ``budget_s``.

    Args:
        call: The store call.
        what: What the call does, for the log ("recording the result of run ...").
        budget_s: Total time to keep trying; 0 tries once.
        log: Where each retry is logged (WARNING) and the recovery (INFO).
        sleep: Injected for tests.
        clock: Injected for tests.

    Raises:
        StoreUnavailableError: the database was still unreachable when the budget ran out.
    """
    deadline = clock() + budget_s
    delay = FIRST_DELAY_S
    tries = 0
    while True:
        tries += 1
        try:
            value = call()
        except StoreUnavailableError as error:
            left = deadline - clock()
            if left <= 0:
                log.error(
                    "database still unavailable after %d tries while %s; giving up: %s",
                    tries,
                    what,
                    error,
                )
                raise
            wait = min(delay, left)
            log.warning(
                "database unavailable while %s (try %d); retrying in %.2f s, %.0f s left: %s",
                what,
                tries,
                wait,
                left,
                error,
            )
            sleep(wait)
            delay = min(delay * 2, MAX_DELAY_S)
            continue
        if tries > 1:
            log.info("database reachable again: %s succeeded after %d tries", what, tries)
        return value
