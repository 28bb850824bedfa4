"""The process pool's forkserver starts before the coordinator opens the store, and only when
a process pool will run: it loads NumPy and the execution module while the study registers."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import multiprocessing.forkserver as forkserver
from orchestrator.executors.embedded import EmbeddedExecutor

def pid():
    return forkserver._forkserver._forkserver_pid

EmbeddedExecutor.start_server(jobs=1)
EmbeddedExecutor.start_server(jobs=8, pool="thread")
print("threads-or-one", pid())
EmbeddedExecutor.start_server(jobs=2)
first = pid()
EmbeddedExecutor.start_server(jobs=8)
print("process", first is not None, pid() == first)
"""


@pytest.mark.timeout(60)
def test_only_a_process_pool_starts_the_server_and_only_once() -> None:
    """Given a fresh interpreter,
    when start_server is asked for one job or for threads, then no forkserver starts;
    when asked for a process pool twice, then one forkserver starts and is reused."""
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=50, check=True
    )
    assert done.stdout.splitlines() == ["threads-or-one None", "process True True"], done.stderr
