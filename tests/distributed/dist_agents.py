"""Agents for the distributed tests, bound by the test studies' ``bindings`` section.

Worker subprocesses import them through ``PYTHONPATH``; in-process tests steer them through
the module-level ``calls``, ``gate`` and ``during`` values.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

calls: list[int] = []
"""Seeds of every call in this process, in order: how many times an agent really ran."""

gate = threading.Event()
"""What :func:`waiting` waits for."""

during: list[Callable[[], None]] = []
"""Hooks :func:`counting` calls while it runs (e.g. to cut the database link)."""


def counting(seed: int) -> dict[str, Any]:
    """Records the call, runs the hooks, returns the seed."""
    calls.append(seed)
    for hook in during:
        hook()
    return {"output": {"seed": seed}}


def waiting(seed: int) -> dict[str, Any]:
    """Records the call and waits until the test opens :data:`gate`."""
    calls.append(seed)
    if not gate.wait(30):
        raise RuntimeError("the test never opened the gate")
    return {"output": {"seed": seed}}


def hung_in_c(seed: int) -> dict[str, Any]:
    """Hangs inside one C call that holds the GIL: no signal handler and no other thread of
    the process runs until it returns (in about an hour), as with a stuck native library.
    Only killing the process ends it."""
    calls.append(seed)
    return {"output": {"total": sum(range(10**11))}}


def journal(seed: int, factors: dict[str, Any]) -> dict[str, Any]:
    """Appends one JSON line per call (seed and factors) to the file the ``journal`` factor
    names: how many times, and with what spec, an agent really ran in any process."""
    import json

    with open(factors["journal"], "a", encoding="utf-8") as out:
        out.write(json.dumps({"seed": seed, "factors": factors}, sort_keys=True) + "\n")
    return {"output": {"seed": seed}}
