"""Imported once by the process pool's forkserver, so that every pool process starts warm.

A pool process is a fork of the forkserver. What the server imported and cached, each
process has from its first instruction; what it did not, each process pays for itself, on a
machine whose cores the coordinator and the other processes share. Looking up the worker's
entry points and the installed agent and problem plugins scans the metadata of every
installed distribution, and so does each package version a result records: 22 of a
process's 29 ms before its first eight no-op runs were done, measured here. The lookups
are cached per process (``functools.cache``): done here, once, they are done for every
process of the pool.

The cache is as fresh as the coordinator's own: a plugin installed while the coordinator
runs is seen by neither.
"""

from __future__ import annotations

from orchestrator.contracts.results import process_provenance
from orchestrator.contracts.worker_api import worker_entry

worker_entry("execute_run")
worker_entry("resolver")()  # a resolver scans the agent and problem entry points
process_provenance("")  # the package versions every result records
