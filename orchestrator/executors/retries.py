"""Retries by error class in the embedded executor (``studyq run``), as workers do them.

The worker side is :mod:`workers.transient` (``orchestrator`` never imports ``workers``, so
the few lines that decide are repeated here): the process that executed the run says whether
its exception is transient for the study (:func:`mark_transient`, on the result, in that
process: the exception itself never crosses a process boundary), and the coordinator
(:func:`orchestrator.embedded.run_embedded`) re-queues the run in the store
(:func:`~orchestrator.store.retries.requeue_transient`, the attempt closed as ``retried``)
and executes it again once :func:`retry_delay` has passed, after the runs of the sweep that
were not retried. ``RateLimited`` is ``workers.transient.RateLimited`` (matched by its
qualified name); import references are trusted as the study's bindings are (the embedded
executor imports them).
"""

from __future__ import annotations

import builtins
import importlib
import random
from collections.abc import Iterable
from functools import cache

from orchestrator.contracts.extensions import RATE_LIMITED, RetryPolicy
from orchestrator.contracts.results import RunResult, RunStatus

__all__ = ["MARK", "is_transient", "mark_transient", "retry_delay", "take_mark"]

MARK = "studyq_transient"
"""Provenance key the executing process sets on a transient failure (``{"retry_after_s":
...}``); the coordinator takes it off before anything is recorded."""

_RATE_LIMITED = "workers.transient.RateLimited"


@cache
def _classes(names: tuple[str, ...]) -> tuple[tuple[type[BaseException], ...], bool]:
    found: list[type[BaseException]] = []
    rate_limited = False
    for name in names:
        if name == RATE_LIMITED:
            rate_limited = True
            continue
        if ":" in name:
            module, _, path = name.partition(":")
            try:
                value: object = importlib.import_module(module)
                for attribute in path.split("."):
                    value = getattr(value, attribute)
            except Exception:  # a module may raise anything while it is imported
                continue
        else:
            value = getattr(builtins, name, None)
        if isinstance(value, type) and issubclass(value, BaseException):
            found.append(value)
    return tuple(found), rate_limited


def is_transient(error: BaseException, names: Iterable[str]) -> bool:
    """Whether ``error`` is one of the exceptions ``retry.on`` ``names``."""
    classes, rate_limited = _classes(tuple(names))
    if classes and isinstance(error, classes):
        return True
    return rate_limited and any(
        f"{cls.__module__}.{cls.__qualname__}" == _RATE_LIMITED for cls in type(error).__mro__
    )


def mark_transient(result: RunResult, error: BaseException, names: Iterable[str]) -> None:
    """Mark a failed ``result`` whose ``error`` is transient (see :data:`MARK`)."""
    if result.status is RunStatus.FAILED and is_transient(error, names):
        retry_after = getattr(error, "retry_after_s", None)
        result.provenance[MARK] = {
            "retry_after_s": float(retry_after) if isinstance(retry_after, int | float) else None
        }


def take_mark(result: RunResult) -> tuple[bool, float | None]:
    """Whether ``result`` was marked transient, and its ``retry_after_s``; the mark is
    removed (it is never recorded)."""
    mark = result.provenance.pop(MARK, None)
    if not isinstance(mark, dict):
        return False, None
    retry_after = mark.get("retry_after_s")
    return True, float(retry_after) if isinstance(retry_after, int | float) else None


_JITTER = random.Random()  # seeded from the OS, never by a run


def retry_delay(policy: RetryPolicy, failed_attempt: int, retry_after_s: float | None) -> float:
    """``workers.transient.retry_delay``: full jitter under ``min(max_backoff_s, backoff_s *
    2**(attempt-1))``, at least ``retry_after_s`` (even above ``max_backoff_s``)."""
    exponent = min(max(failed_attempt, 1) - 1, 60)
    delay = _JITTER.uniform(0.0, min(policy.max_backoff_s, policy.backoff_s * 2.0**exponent))
    return max(delay, retry_after_s) if retry_after_s is not None else delay
