"""Agents of the budget and breaker tests (tests/distributed/test_budget_breaker.py), bound
by the test studies' ``bindings`` section; worker subprocesses import them through
``PYTHONPATH``.

Each appends one line per call to the file its ``journal`` factor names: how many times, and
which runs, really executed in any worker process.
"""

from __future__ import annotations

import time
from typing import Any

COST_USD = 0.01


def _note(seed: int, factors: dict[str, Any]) -> None:
    with open(factors["journal"], "a", encoding="utf-8") as out:
        out.write(f"{seed}\n")


def costly(seed: int, factors: dict[str, Any]) -> dict[str, Any]:
    """A paid call: takes a moment and reports ``cost_usd`` 0.01 and 30 tokens."""
    _note(seed, factors)
    time.sleep(0.03)
    return {
        "output": {"seed": seed},
        "metrics": {"cost_usd": COST_USD, "input_tokens": 20, "output_tokens": 10},
    }


class AuthenticationError(RuntimeError):
    """What a provider answers to a broken API key."""


def broken(seed: int, factors: dict[str, Any]) -> dict[str, Any]:
    """A broken key: every call fails, after a moment."""
    _note(seed, factors)
    time.sleep(0.01)
    raise AuthenticationError("401: invalid API key")
