"""Agents for the retry tests (tests/distributed/test_retries.py), bound by import reference.

Each call appends one line to ``<journal>/<run_id>.<index>`` (the ``journal`` factor names the
folder): the line count is the attempt, across worker processes, and the file says how many
times a run really executed.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from workers.transient import RateLimited


class Transient(Exception):
    """A study's own transient error class (``retry.on: ["retry_agents:Transient"]``)."""


NOT_AN_EXCEPTION = 42
"""What a wrong ``retry.on`` reference names (validate must refuse it)."""


def _attempt(run_spec: Any, factors: dict[str, Any]) -> int:
    path = Path(factors["journal"]) / f"{run_spec.run_id}.{run_spec.index}"
    with path.open("a", encoding="utf-8") as out:
        out.write(json.dumps({"t": time.time()}) + "\n")
    return len(path.read_text(encoding="utf-8").splitlines())


def flaky_timeout(run_spec: Any, factors: dict[str, Any]) -> dict[str, Any]:
    """Times out on attempts 1 and 2, succeeds on attempt 3."""
    attempt = _attempt(run_spec, factors)
    if attempt <= 2:
        raise TimeoutError(f"provider timed out on attempt {attempt}")
    return {"output": {"attempt": attempt}}


def rate_limited_once(run_spec: Any, factors: dict[str, Any]) -> dict[str, Any]:
    """A 429 with Retry-After (the ``retry_after`` factor) on attempt 1, then succeeds."""
    attempt = _attempt(run_spec, factors)
    if attempt == 1:
        raise RateLimited("429 Too Many Requests", retry_after_s=float(factors["retry_after"]))
    return {"output": {"attempt": attempt}}


def own_transient_once(run_spec: Any, factors: dict[str, Any]) -> dict[str, Any]:
    """The study's own transient class on attempt 1, then succeeds."""
    attempt = _attempt(run_spec, factors)
    if attempt == 1:
        raise Transient("lab service restarting")
    return {"output": {"attempt": attempt}}


def permanent(run_spec: Any, factors: dict[str, Any]) -> dict[str, Any]:
    """Always a ValueError: not transient."""
    attempt = _attempt(run_spec, factors)
    raise ValueError(f"bad prompt template (attempt {attempt})")


def always_timeout(run_spec: Any, factors: dict[str, Any]) -> dict[str, Any]:
    """Always a TimeoutError: transient, until the attempts run out."""
    attempt = _attempt(run_spec, factors)
    raise TimeoutError(f"provider timed out on attempt {attempt}")
