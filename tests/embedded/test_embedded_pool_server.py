"""The process pool's forkserver starts before the coordinator opens the store, and only when
a process pool will run: it loads NumPy and the execution module while the study registers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


WARM_PROBE = """
from concurrent.futures import ProcessPoolExecutor

from orchestrator.executors.embedded import _forkserver_context

def caches():
    from orchestrator.contracts.worker_api import _load
    from workers.bindings import _entry_points

    return _load.cache_info().currsize, _entry_points.cache_info().currsize

if __name__ == "__main__":
    with ProcessPoolExecutor(1, mp_context=_forkserver_context()) as pool:
        print(*pool.submit(caches).result())
"""


@pytest.mark.timeout(60)
def test_pool_processes_start_with_the_entry_points_looked_up(tmp_path: Path) -> None:
    """Given a fresh interpreter, when a process of the pool's context runs its first task,
    then the worker's two entry points and the agent and problem plugin groups are in its
    caches already: the forkserver looked them up once (pool_preload), not each process."""
    script = tmp_path / "probe.py"
    script.write_text(WARM_PROBE, encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=50, check=True
    )
    assert done.stdout.split() == ["2", "2"], done.stderr
