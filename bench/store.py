"""The store's ceiling: claims, heartbeats and results per second one PostgreSQL sustains.

Run from the repository root (PostgreSQL on 127.0.0.1:5432, trust auth for ``postgres``)::

    .venv/bin/python bench/store.py --save store.json      # 1..64 writers, 3 repeats (~10 min here)
    .venv/bin/python bench/store.py --quick                # 1, 4, 16, 64 writers, 1 repeat
    .venv/bin/python bench/store.py --writers 8 --runs 8000 --repeats 5
    .venv/bin/python bench/store.py --from store.json      # print a saved run's tables

No Celery and no broker: ``--writers`` forked processes (forked before any engine exists),
each with its own ``ResultStore``, make exactly the calls a worker makes for its share of
the runs of a study of ``--runs`` ``noop`` runs, registered and queued through the store
(``orchestrator.embedded.register``, ``ResultStore.queue_next``: what submit does) with
results executed beforehand by ``workers.execution.execute_run``; set-up, not timed. Each
cell runs in phases that every writer starts together, timed from the first ``go`` to the
last ``done``:

* **prefork** (a prefork child: one delivery at a time): *claim* phase, one
  ``ClaimBatcher.claim`` per run (a lone caller: one ``claim_runs`` statement, verified on
  the message's digest and attempt); *heartbeat* phase, one ``ResultStore.heartbeat`` per
  claim (``workers/heartbeat.py`` renews each running run every ``heartbeat_s``; skipped at
  writer counts whose two connections per writer would not fit in ``max_connections``);
  *result* phase, one ``ResultWriter.write`` of one result per run (one transaction each).
* **batched** (the threads pool): ``claim_runs`` for ``--batch`` runs per statement (what
  ``ClaimBatcher`` makes of that many concurrent deliveries), then ``ResultWriter.write`` of
  ``--batch`` results per transaction (the writer thread's batches, ``MAX_BATCH`` = 64 at
  most).
* **floor** (the baseline, ANCHORS.md section 3 / ``bench/_raw_app.py``'s stack floor): one
  autocommit ``INSERT ... ON CONFLICT DO UPDATE`` per run on a plain psycopg connection, the
  table truncated before each cell.

A real worker interleaves claim, execution and result per run; the phases split the same
statements so each rate is measured alone; runs/s is ``runs / (claim s + result s)``. After
each store cell every run must be ``success``, or the bench stops. Reported per cell: rates,
the ratio to the floor's UPSERT/s at the same writer count in the same repeat (median of the
per-repeat ratios), CPU of the writers' PostgreSQL backends (``pg_stat_activity`` by
``application_name``, ``/proc/<pid>/schedstat``) and of the writers, per run, and how busy the
whole machine was (``/proc/stat``). Cells alternate: modes rotate and the writer counts run
up then down between repeats. Figures are medians of ``--repeats`` with [min-max].

PostgreSQL runs on the same cores as the writers: the figures are a 2-core machine shared by
both sides (and by whatever else runs); docs/scaling.md turns them into a capacity model.

Isolation: a throwaway database ``studyq_bench_store_<pid>``, upgraded with
``orchestrator.store.upgrade`` (whatever the current schema is) and dropped at the end; only
the writer processes this script forked are stopped, by PID.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _store_tables import tables  # bench/ is not a package
from _store_writer import APP_NAME, Cell, Item, serve
from distributed import REPO_ROOT, Services, _cpu_s, write_study

from orchestrator.contracts.runspec import spec_digest
from orchestrator.contracts.worker_api import worker_entry
from orchestrator.embedded import register
from orchestrator.executors.embedded import ResolverSpec
from orchestrator.store import ResultStore
from orchestrator.study.plan import prepare
from workers.writer import MAX_BATCH

WRITERS = (1, 2, 4, 8, 16, 32, 64)
MODES = ("floor", "prefork", "batched")
SPARE_CONNECTIONS = 8
"""Connections left free for the bench itself and everyone else on the server."""


# -- writer processes --------------------------------------------------------------------------


class Writers:
    """The forked writer processes and the pipes that drive them."""

    def __init__(self, count: int) -> None:
        context = multiprocessing.get_context("fork")
        self.pipes: list[Connection] = []
        self.processes: list[BaseProcess] = []
        for _ in range(count):
            ours, theirs = context.Pipe()
            process = context.Process(target=serve, args=(theirs,), daemon=True)
            process.start()
            theirs.close()
            self.pipes.append(ours)
            self.processes.append(process)

    def ask(self, pipes: Sequence[Connection], message: Any) -> list[tuple[Any, ...]]:
        for pipe in pipes:
            pipe.send(message)
        return [_answer(pipe) for pipe in pipes]

    def stop(self) -> None:
        for pipe in self.pipes:
            with contextlib.suppress(OSError):
                pipe.send(None)
        for process in self.processes:
            process.join(timeout=10)
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, 9)  # only a writer this script forked


def _answer(pipe: Connection) -> tuple[Any, ...]:
    answer: tuple[Any, ...] = pipe.recv()
    if answer[0] == "error":
        raise RuntimeError(f"a writer failed:\n{answer[1]}")
    return answer


# -- measurements --------------------------------------------------------------------------------


class Server:
    """The bench's own connection to its database: truncation, connection counts, backend CPU."""

    def __init__(self, svc: Services) -> None:
        import psycopg

        self.db_name = svc.db_name
        dsn = svc.db_url.replace("postgresql+psycopg://", "postgresql://")
        self.connection: Any = psycopg.connect(dsn, autocommit=True)

    def scalar(self, sql: str, *params: Any) -> Any:
        return self.connection.execute(sql, params).fetchone()[0]

    def free_connections(self) -> int:
        limit = int(self.scalar("SHOW max_connections")) - int(
            self.scalar("SHOW superuser_reserved_connections")
        )
        used = int(
            self.scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'client backend'"
            )
        )
        return limit - used - SPARE_CONNECTIONS

    def backend_cpu(self) -> dict[int, float]:
        rows = self.connection.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name = %s",
            (self.db_name, APP_NAME),
        ).fetchall()
        return {pid: _run_time_s(pid) for (pid,) in rows}

    def version(self) -> str:
        return str(self.scalar("SHOW server_version"))


def _run_time_s(pid: int) -> float:
    """CPU seconds a process ran, from the scheduler's own clock (``/proc/<pid>/schedstat``).

    ``/proc/<pid>/stat`` counts 10 ms ticks: a backend that runs in 50 us bursts between them
    is charged almost nothing (the floor read 0 ms per UPSERT at 64 writers)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0]) / 1e9
    except (OSError, ValueError, IndexError):
        return _cpu_s(pid)


def _machine_ticks() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


def run_cell(
    writers: Writers, server: Server, cells: Sequence[Cell], phase_names: Sequence[str]
) -> dict[str, dict[str, float]]:
    """Run one cell on the first ``len(cells)`` writers; per phase: count, wall seconds,
    CPU seconds of the backends and of the writers, machine busy share."""
    pipes = writers.pipes[: len(cells)]
    for pipe, cell in zip(pipes, cells, strict=True):
        pipe.send(cell)
    readies = [_answer(pipe) for pipe in pipes]
    assert all(ready[1] == len(phase_names) for ready in readies), readies
    measured: dict[str, dict[str, float]] = {}
    for name in phase_names:
        cpu_before, ticks_before = server.backend_cpu(), _machine_ticks()
        started = time.monotonic()
        done = writers.ask(pipes, "go")
        seconds = time.monotonic() - started
        cpu_after, ticks_after = server.backend_cpu(), _machine_ticks()
        busy = (ticks_after[0] - ticks_before[0]) / max(1, ticks_after[1] - ticks_before[1])
        measured[name] = {
            "count": float(sum(answer[1] for answer in done)),
            "seconds": seconds,
            "pg_cpu_s": sum(cpu - cpu_before.get(pid, 0.0) for pid, cpu in cpu_after.items()),
            "writer_cpu_s": sum(answer[2] for answer in done),
            "busy": busy,
        }
    writers.ask(pipes, "close")
    return measured


def _shares(items: Sequence[Item], writers: int) -> list[Sequence[Item]]:
    size, extra = divmod(len(items), writers)
    shares, start = [], 0
    for index in range(writers):
        end = start + size + (index < extra)
        shares.append(items[start:end])
        start = end
    return shares


class Studies:
    """Registers and queues one fresh study per store cell, as submit does, and checks it."""

    def __init__(self, svc: Services, tmp: Path) -> None:
        self.svc = svc
        self.tmp = tmp
        self.store = ResultStore.open(svc.db_url)
        self.serial = 0

    def create(self, runs: int) -> tuple[str, list[Item]]:
        self.serial += 1
        study_id = f"bench-store-{os.getpid()}-{self.serial}"
        path = write_study(
            self.tmp / f"{study_id}.yaml", study_id, agent="noop", runs=runs, queue="studyq-bench"
        )
        prepared = prepare(path)
        register(self.store, prepared)
        resolver = ResolverSpec(bindings=prepared.study.bindings).build()
        execute_run = worker_entry("execute_run")
        items: list[Item] = []
        while page := self.store.queue_next(study_id):
            for spec, attempt in page:
                digest = spec_digest(spec.to_message())
                items.append((spec.index, digest, attempt, execute_run(spec, resolver)))
        if len(items) != runs:
            raise RuntimeError(f"{study_id}: queued {len(items)} runs, expected {runs}")
        return study_id, items

    def finish(self, study_id: str, runs: int) -> None:
        counts = {k: v for k, v in self.store.count_by_status(study_id).items() if v}
        if counts != {"success": runs}:
            raise RuntimeError(f"{study_id}: expected {runs} successful runs, found {counts}")
        self.store.delete_study(study_id)

    def close(self) -> None:
        self.store.close()


def one_cell(
    writers: Writers,
    server: Server,
    studies: Studies,
    *,
    mode: str,
    count: int,
    runs: int,
    batch: int,
) -> dict[str, Any] | None:
    """One (mode, writer count) measurement, or None if its connections would not fit."""
    free = server.free_connections()
    heartbeat = mode == "prefork" and 2 * count <= free
    if count > free:
        print(f"# skipped {mode} x {count}: {free} connections free", file=sys.stderr)
        return None
    worker = f"bench-store@{os.uname().nodename}"
    items: list[Item]
    if mode == "floor":
        server.connection.execute("TRUNCATE bench_floor")
        study_id, items = "", [(i, "", 0, None) for i in range(runs)]
        phases = ["upsert"]
    else:
        study_id, items = studies.create(runs)
        phases = ["claim", "heartbeat", "result"] if heartbeat else ["claim", "result"]
    cells = [
        Cell(mode, studies.svc.db_url, study_id, share, batch, heartbeat, f"{worker}:{n}")
        for n, share in enumerate(_shares(items, count))
    ]
    measured = run_cell(writers, server, cells, phases)
    if mode != "floor":
        studies.finish(study_id, runs)
    return {"mode": mode, "writers": count, "runs": runs, "phases": measured}


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every cell of every repeat; the saved document."""
    counts: list[int] = args.writers
    writers = Writers(max(counts))  # forked before this process creates any engine
    tmp = Path(tempfile.mkdtemp(prefix="studyq-bench-store-"))
    svc = Services(0, tmp, db_name=f"studyq_bench_store_{os.getpid()}")
    samples: list[dict[str, Any]] = []
    try:
        svc.create_db()
        server, studies = Server(svc), Studies(svc, tmp)
        meta = _meta(args, server)
        try:
            for repeat in range(args.repeats):
                order = counts if repeat % 2 == 0 else counts[::-1]
                for step, count in enumerate(order):
                    modes: list[str] = args.modes
                    shift = (repeat + step) % len(modes)
                    for mode in modes[shift:] + modes[:shift]:
                        sample = one_cell(
                            writers,
                            server,
                            studies,
                            mode=mode,
                            count=count,
                            runs=args.runs,
                            batch=args.batch,
                        )
                        if sample is None:
                            continue
                        sample["repeat"] = repeat
                        samples.append(sample)
                        _progress(sample)
                        if args.save:
                            _save(args.save, meta, samples)
        finally:
            studies.close()
            server.connection.close()
    finally:
        writers.stop()
        svc.drop_db()
        for path in tmp.iterdir():
            path.unlink()
        tmp.rmdir()
    return {"meta": meta, "samples": samples}


def _meta(args: argparse.Namespace, server: Server) -> dict[str, Any]:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "argv": sys.argv[1:],
        "cpus": os.cpu_count(),
        "postgresql": server.version(),
        "commit": commit,
        "runs": args.runs,
        "batch": args.batch,
    }


def _save(path: str, meta: dict[str, Any], samples: list[dict[str, Any]]) -> None:
    Path(path).write_text(json.dumps({"meta": meta, "samples": samples}, indent=1))


def _progress(sample: dict[str, Any]) -> None:
    phases = sample["phases"]
    rates = ", ".join(f"{name} {p['count'] / p['seconds']:,.0f}/s" for name, p in phases.items())
    print(f"# {sample['mode']} x {sample['writers']}: {rates}", file=sys.stderr, flush=True)


# -- command line --------------------------------------------------------------------------------


def _writer_counts(text: str) -> list[int]:
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not a list of integers: {text!r} (e.g. 1,4,16)"
        ) from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"writer counts must be >= 1, got {text!r}")
    return counts


def _modes(text: str) -> list[str]:
    modes = [part.strip() for part in text.split(",") if part.strip()]
    unknown = sorted(set(modes) - set(MODES))
    if not modes or unknown:
        raise argparse.ArgumentTypeError(
            f"unknown mode(s) {', '.join(unknown) or '(none)'}: choose from {','.join(MODES)}"
        )
    return modes


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=(__doc__ or "").split("\n\n")[0],
        epilog="example: .venv/bin/python bench/store.py --quick --save store.json",
    )
    parser.add_argument("--runs", type=int, default=2000, help="runs per cell (2000)")
    parser.add_argument(
        "--writers",
        type=_writer_counts,
        default=list(WRITERS),
        help="writer processes, comma-separated (1,2,4,8,16,32,64)",
    )
    parser.add_argument(
        "--modes",
        type=_modes,
        default=list(MODES),
        help="modes, comma-separated (floor,prefork,batched); x floor needs floor",
    )
    parser.add_argument("--repeats", type=int, default=3, help="repeats of every cell (3)")
    parser.add_argument("--batch", type=int, default=16, help="batched mode: runs per statement")
    parser.add_argument(
        "--quick", action="store_true", help="1,4,16,64 writers, 1000 runs, 1 repeat"
    )
    parser.add_argument("--save", help="write the measurements as JSON to this file")
    parser.add_argument("--from", dest="saved", help="print the tables of a saved file")
    args = parser.parse_args(argv)
    if args.saved:
        try:
            document = json.loads(Path(args.saved).read_text())
        except (OSError, ValueError) as error:
            parser.error(f"cannot read {args.saved}: {error}")
        print(tables(document))
        return 0
    if args.quick:
        args.writers, args.runs, args.repeats = [1, 4, 16, 64], 1000, 1
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if not 1 <= args.batch <= MAX_BATCH:
        parser.error(f"--batch must be 1..{MAX_BATCH} (the writer's MAX_BATCH), got {args.batch}")
    if args.runs < 2 * max(args.writers) or args.runs % 2:
        parser.error(
            f"--runs must be even and >= 2 x the most writers ({2 * max(args.writers)}), "
            f"got {args.runs}"
        )
    document = measure(args)
    if args.save:
        _save(args.save, document["meta"], document["samples"])
    print(tables(document))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
