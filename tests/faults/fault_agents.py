"""The agent of the fault studies: the demo ``sleep`` agent, with a tally of its calls.

Each call appends the run's seed to ``$STUDYQ_FAULTS_CALLS_DIR/calls-<pid>.txt`` when that
variable is set (the test sets it for its worker processes only), so a test can count how
many times each run was really executed, independently of what the store says.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from workers.demo.agents import sleep
from workers.execution import RunCondition

CALLS_DIR_ENV = "STUDYQ_FAULTS_CALLS_DIR"


def counted_sleep(condition: RunCondition, seed: int) -> dict[str, Any]:
    """``workers.demo.agents.sleep``, after recording the call."""
    directory = os.environ.get(CALLS_DIR_ENV)
    if directory:
        path = Path(directory) / f"calls-{os.getpid()}.txt"
        # One short O_APPEND write per call: lines from concurrent processes never interleave.
        descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(descriptor, f"{seed}\n".encode())
        finally:
            os.close(descriptor)
    return sleep(condition)


def read_calls(directory: Path) -> list[int]:
    """Every recorded call's seed, from all processes."""
    seeds: list[int] = []
    for path in sorted(directory.glob("calls-*.txt")):
        seeds.extend(int(line) for line in path.read_text().split())
    return seeds
