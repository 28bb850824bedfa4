"""The writer side of ``bench/store.py``: one process, told by the bench what to write.

Each writer is a forked process (forked before the bench creates any engine) that serves
cells over a pipe: for each cell it opens its own connection(s), reports ``ready``, then
runs the cell's phases one ``go`` at a time, so the bench times each phase across all
writers at once and reads the PostgreSQL backends' CPU between phases. Store modes call the
store exactly as a worker does (``ClaimBatcher``, ``ResultStore.claim_runs`` with the
message's ``verify``, ``ResultStore.heartbeat``, ``ResultWriter.write``); nothing here holds
SQL of its own except the floor's UPSERT, which is the baseline and not studyq's.

Not part of studyq: only the benchmark imports it.
"""

from __future__ import annotations

import time
import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

from orchestrator.contracts.results import RunResult
from orchestrator.store import Claim, ResultStore
from orchestrator.store.budget_gate import writes_through
from workers.claims import ClaimBatcher
from workers.writer import ResultWriter

APP_NAME = "studyq-bench-store"
"""``application_name`` of the writers' connections, so their backends can be found."""

LEASE_S = 600.0
FLOOR_UPSERT = (
    "INSERT INTO bench_floor (i, payload, n) VALUES (%s, %s, 1) "
    "ON CONFLICT (i) DO UPDATE SET n = bench_floor.n + 1"
)
"""ANCHORS' "stack floor" statement, as ``bench/_raw_app.py``'s ``bench.upsert`` task sends it."""

Item = tuple[int, str, int, RunResult | None]
"""One run a writer handles: plan index, the message's spec digest, its attempt, its result
(None for the floor, which writes no result)."""


@dataclass(frozen=True)
class Cell:
    """What one writer does in one cell.

    ``mode``: ``prefork`` (one claim, then one result, per run), ``batched`` (claims of
    ``batch`` runs per statement, results ``batch`` per transaction, as the threads pool's
    ``ClaimBatcher`` and ``ResultWriter`` group them) or ``floor`` (one UPSERT per run).
    ``heartbeat``: renew each claim once between the claim and result phases.
    """

    mode: str
    url: str
    study_id: str
    items: Sequence[Item]
    batch: int
    heartbeat: bool
    worker: str


def _chunks(items: Sequence[Item], size: int) -> list[Sequence[Item]]:
    return [items[start : start + size] for start in range(0, len(items), size)]


class _StoreJob:
    """A store mode's phases on this process's own ``ResultStore``."""

    def __init__(self, cell: Cell) -> None:
        self.cell = cell
        url = f"{cell.url}?application_name={APP_NAME}"
        self.store = ResultStore.open(url)
        self.counts: Counter[str] = Counter()
        self.writer = ResultWriter(self.store, retry_s=5.0, count=self._count)
        self.claims: list[Claim] = []
        # Open the connections the phases use now, not inside a timed phase: the lane keeps
        # one checked out, a heartbeat takes another from the pool.
        with self.store.engine.connect() as first:
            if cell.heartbeat:
                with self.store.engine.connect():
                    pass
            first.exec_driver_sql("SELECT 1")
        writes_through(self.store, cell.study_id)  # the budget gate reads the policy once
        self.phases: list[Callable[[], int]] = [self.claim]
        if cell.heartbeat:
            self.phases.append(self.renew)
        self.phases.append(self.finish)

    def _count(self, what: str) -> int:
        self.counts[what] += 1
        return self.counts[what]

    def claim(self) -> int:
        cell = self.cell
        if cell.mode == "prefork":
            batcher = ClaimBatcher(self.store, worker=cell.worker, lease_s=LEASE_S)
            for index, digest, attempt, _ in cell.items:
                claim = batcher.claim(cell.study_id, index, digest, attempt)
                if claim is not None:
                    self.claims.append(claim)
            return len(self.claims)
        for chunk in _chunks(cell.items, cell.batch):
            self.claims.extend(
                self.store.claim_runs(
                    cell.study_id,
                    [],
                    worker=cell.worker,
                    lease_s=LEASE_S,
                    verify={index: (digest, attempt) for index, digest, attempt, _ in chunk},
                )
            )
        return len(self.claims)

    def renew(self) -> int:
        return sum(self.store.heartbeat(claim, LEASE_S) for claim in self.claims)

    def finish(self) -> int:
        results = {index: result for index, _, _, result in self.cell.items if result is not None}
        size = 1 if self.cell.mode == "prefork" else self.cell.batch
        written = 0
        for start in range(0, len(self.claims), size):
            batch = [(c, results[c.index]) for c in self.claims[start : start + size]]
            outcomes = self.writer.write(batch)
            written += sum(outcome in ("success", "failed") for outcome in outcomes)
        return written

    def close(self) -> None:
        self.store.close()


class _FloorJob:
    """The baseline: one autocommit UPSERT per run on a plain psycopg connection."""

    def __init__(self, cell: Cell) -> None:
        import psycopg

        self.cell = cell
        dsn = cell.url.replace("postgresql+psycopg://", "postgresql://")
        self.connection: Any = psycopg.connect(dsn, autocommit=True, application_name=APP_NAME)
        self.phases: list[Callable[[], int]] = [self.upsert]

    def upsert(self) -> int:
        for index, _, _, _ in self.cell.items:
            self.connection.execute(FLOOR_UPSERT, (index, f"result {index}"))
        return len(self.cell.items)

    def close(self) -> None:
        self.connection.close()


def serve(pipe: Connection) -> None:
    """Serve cells until told ``None``: per cell ``ready``, then per phase ``go`` -> ``done``
    (count, CPU seconds of this process, wall seconds), then ``close`` -> ``closed``."""
    while True:
        cell: Cell | None = pipe.recv()
        if cell is None:
            return
        job: _StoreJob | _FloorJob | None = None
        try:
            job = _FloorJob(cell) if cell.mode == "floor" else _StoreJob(cell)
            pipe.send(("ready", len(job.phases)))
            for phase in job.phases:
                pipe.recv()
                cpu, wall = time.process_time(), time.monotonic()
                count = phase()
                pipe.send(("done", count, time.process_time() - cpu, time.monotonic() - wall))
            pipe.recv()
        except Exception:
            pipe.send(("error", traceback.format_exc()))
            pipe.recv()
        finally:
            if job is not None:
                job.close()
        pipe.send(("closed",))
