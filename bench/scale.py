"""Scale of one study: how each cost of a sweep grows from 10,000 to 1,000,000 runs.

For each size the script runs one study of ``noop`` runs end to end on this machine's Redis
and PostgreSQL, the way a user does: ``studyq submit`` (a child process), drained by one
real ``celery worker``, then ``studyq status`` and ``studyq export``. It measures

* ``submit``: wall seconds and peak RSS of the whole command (``os.wait4``'s rusage);
* the database: bytes per run of studyq's tables with their indexes and TOAST
  (``pg_total_relation_size``) after submit and after the drain, and WAL bytes per run
  written by submit and by the drain (``pg_current_wal_lsn``; other activity on the server
  counts too, so run it on a quiet machine);
* the drain: runs per second from the worker's ``worker_ready`` to the last run recorded,
  and the share of ``runs`` updates PostgreSQL made HOT (``pg_stat_user_tables``);
* ``wait``'s reconcile tick (:class:`orchestrator.reconcile.Reconciler`, the loop behind
  ``studyq wait``), in this process: milliseconds and SQL statements per tick with no run
  finished (after submit) and with every run finished (after the drain). Neither may grow
  with finished runs;
* ``studyq status STUDY`` (a child process): wall seconds, and the in-process time of the
  per-status count it makes;
* ``studyq export STUDY --no-run-files`` (a child process): wall seconds and peak RSS.

``--drain-only 5000,50000`` measures just the drain rate at several sizes, alternating the
order between repeats, and prints each rate as a ratio of the smallest size's (issue 14: a
drain of 50,000 runs within 10 % of the rate at 5,000).

    .venv/bin/python bench/scale.py --sizes 10000,100000 --save scale.json
    .venv/bin/python bench/scale.py --sizes 1000000 --save scale-1m.json   # ~40 min here
    .venv/bin/python bench/scale.py --sizes 1000000 --no-drain               # submit side only
    .venv/bin/python bench/scale.py --drain-only 5000,50000 --repeats 3
    .venv/bin/python bench/scale.py --from scale.json scale-1m.json        # tables again

It uses Redis database 12 (``--redis-db``) and a throwaway PostgreSQL database per size,
dropped at the end; it signals only the workers it started, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from distributed import (  # bench/ is not a package
    REPO_ROOT,
    Broker,
    Services,
    Worker,
    _clean_env,
    _wait_until,
    services,
    write_study,
)

TO = "\u2013"  # en dash, for the ranges
STUDYQ = str(Path(sys.executable).with_name("studyq"))
TABLES = (
    "studies",
    "conditions",
    "runs",
    "run_attempts",
    "evaluations",
    "events",
    "study_pauses",
)


def _cli(args: list[str], env: dict[str, str], *, cwd: Path) -> dict[str, float]:
    """Run ``studyq ARGS`` to completion: wall seconds and peak RSS (MB) of the command."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [STUDYQ, *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    assert process.stderr is not None
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    err = process.stderr.read().decode(errors="replace")
    process.stderr.close()
    process.returncode = os.waitstatus_to_exitcode(status)
    if process.returncode != 0:
        raise RuntimeError(f"studyq {' '.join(args)} exited {process.returncode}:\n{err[-3000:]}")
    return {"seconds": seconds, "rss_mb": usage.ru_maxrss / 1024}


def _scalar(svc: Services, sql: str, **params: Any) -> Any:
    from sqlalchemy import create_engine, text

    engine = create_engine(svc.db_url)
    try:
        with engine.connect() as connection:
            return connection.execute(text(sql), params).scalar_one()
    finally:
        engine.dispose()


def _wal_lsn(svc: Services) -> str:
    return str(_scalar(svc, "SELECT pg_current_wal_lsn()::text"))


def _wal_bytes(svc: Services, since: str) -> int:
    return int(
        _scalar(svc, "SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), CAST(:s AS pg_lsn))", s=since)
    )


def _db_bytes(svc: Services) -> int:
    names = ", ".join(f"'{name}'" for name in TABLES)
    return int(
        _scalar(
            svc,
            f"SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c "
            f"WHERE c.relname IN ({names}) AND c.relkind = 'r'",
        )
    )


def _hot_share(svc: Services) -> tuple[int, int]:
    """(updates, HOT updates) of ``runs`` so far (the statistics collector lags a little)."""
    from sqlalchemy import create_engine, text

    engine = create_engine(svc.db_url)
    try:
        with engine.connect() as connection:
            connection.execute(text("SELECT pg_stat_force_next_flush()"))
            row = connection.execute(
                text(
                    "SELECT n_tup_upd, n_tup_hot_upd FROM pg_stat_user_tables "
                    "WHERE relname = 'runs'"
                )
            ).one()
            return int(row[0]), int(row[1])
    finally:
        engine.dispose()


def measure_tick(svc: Services, broker: Broker, study_id: str, queue: str) -> dict[str, float]:
    """One reconcile tick of ``studyq wait`` on the study as it is: ms and statements (the
    median of 5 ticks, after one warm-up tick)."""
    from sqlalchemy import event

    from orchestrator.contracts.settings import load_settings
    from orchestrator.distributed import _labels
    from orchestrator.executors.transport import open_transport
    from orchestrator.progress import Progress
    from orchestrator.reconcile import Reconciler
    from orchestrator.store import ResultStore

    settings = load_settings(database_url=svc.db_url, broker_url=broker.url)
    statements = 0

    def count(*_: Any) -> None:
        nonlocal statements
        statements += 1

    with (
        ResultStore.open(svc.db_url) as store,
        open_transport(settings, broker.url) as transport,
        Progress(0, desc=study_id, show=False) as progress,
    ):
        reconciler = Reconciler(
            store,
            transport,
            study_id,
            queue=queue,
            run_timeout_s=None,
            labels=_labels(store.iter_conditions(study_id)),
            settings=settings,
            progress=progress,
        )
        reconciler.tick()
        event.listen(store.engine, "before_cursor_execute", count)
        times, counts = [], []
        for _ in range(5):
            statements = 0
            start = time.perf_counter()
            reconciler.tick()
            times.append(time.perf_counter() - start)
            counts.append(statements)
        event.remove(store.engine, "before_cursor_execute", count)
    return {"tick_ms": statistics.median(times) * 1e3, "tick_statements": statistics.median(counts)}


def measure_count(svc: Services, study_id: str) -> float:
    """Milliseconds of the per-status count ``status`` and every tick make (median of 5)."""
    from orchestrator.store import ResultStore

    with ResultStore.open(svc.db_url) as store:
        store.count_by_status(study_id)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            store.count_by_status(study_id)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def drain(
    svc: Services, broker: Broker, study_id: str, queue: str, n: int, *, pool: str, concurrency: int
) -> dict[str, float]:
    """Start one worker on ``queue`` and wait until all ``n`` runs succeeded: rate from
    ``worker_ready`` to the last ``ended_at``."""
    from sqlalchemy import text

    from orchestrator.store import ResultStore

    worker = Worker(
        svc,
        app="workers.app",
        queue=queue,
        pool=pool,
        concurrency=concurrency,
        env={"STUDYQ_BROKER_URL": broker.url, "STUDYQ_DATABASE_URL": svc.db_url},
        name=f"scale-{pool}-{uuid.uuid4().hex[:6]}",
    )
    try:
        ready = worker.wait_ready()
        with ResultStore.open(svc.db_url) as store:

            def finished() -> bool:
                counts = store.count_by_status(study_id)
                return counts["success"] + counts["failed"] >= n

            _wait_until(finished, timeout=max(600.0, n / 50), what=f"{n} runs", interval=1.0)
            counts = store.count_by_status(study_id)
            if counts["success"] != n:
                raise RuntimeError(f"drain of {n}: {counts}")
            with store.engine.connect() as connection:
                last = connection.execute(
                    text("SELECT max(ended_at) FROM runs WHERE study_id = :s"), {"s": study_id}
                ).scalar_one()
    finally:
        worker.stop()
    seconds = last.timestamp() - ready
    return {"drain_s": seconds, "drain_rate": n / seconds}


def one_size(
    svc: Services, n: int, *, pool: str, concurrency: int, drained: bool = True
) -> dict[str, float]:
    broker = svc.brokers["redis"]
    queue = broker.queue("scale")
    study_id = f"scale-{n}-{uuid.uuid4().hex[:6]}"
    path = write_study(svc.tmp / f"{study_id}.yaml", study_id, agent="noop", runs=n, queue=queue)
    env = _clean_env(STUDYQ_DATABASE_URL=svc.db_url, STUDYQ_BROKER_URL=broker.url)
    row: dict[str, float] = {"runs": n}
    bytes0, wal0 = _db_bytes(svc), _wal_lsn(svc)
    submit = _cli(["submit", str(path), "--no-progress"], env, cwd=svc.tmp)
    row.update(submit_s=submit["seconds"], submit_rss_mb=submit["rss_mb"])
    row["submit_wal_b"] = _wal_bytes(svc, wal0) / n
    row["db_b_submitted"] = (_db_bytes(svc) - bytes0) / n
    print(f"# {n:,}: submitted in {submit['seconds']:.1f} s", file=sys.stderr, flush=True)
    row.update({f"{k}_0": v for k, v in measure_tick(svc, broker, study_id, queue).items()})
    if not drained:  # --no-drain: the submit side only
        row["count_ms"] = measure_count(svc, study_id)
        broker.drop(queue)
        return row
    updates0, hot0 = _hot_share(svc)
    wal1 = _wal_lsn(svc)
    row.update(drain(svc, broker, study_id, queue, n, pool=pool, concurrency=concurrency))
    updates1, hot1 = _hot_share(svc)
    row["drain_wal_b"] = _wal_bytes(svc, wal1) / n
    row["hot_share"] = (hot1 - hot0) / max(1, updates1 - updates0)
    row["db_b_finished"] = (_db_bytes(svc) - bytes0) / n
    print(f"# {n:,}: drained at {row['drain_rate']:.0f} runs/s", file=sys.stderr, flush=True)
    row.update({f"{k}_done": v for k, v in measure_tick(svc, broker, study_id, queue).items()})
    row["count_ms"] = measure_count(svc, study_id)
    row["status_s"] = _cli(["status", study_id], env, cwd=svc.tmp)["seconds"]
    export = _cli(
        ["export", study_id, "--out", str(svc.tmp / f"out-{n}"), "--no-run-files"],
        env,
        cwd=svc.tmp,
    )
    row.update(export_s=export["seconds"], export_rss_mb=export["rss_mb"])
    broker.drop(queue)
    return row


def drain_only(
    svc: Services, sizes: list[int], repeats: int, *, pool: str, concurrency: int
) -> list[dict[str, float]]:
    """Drain rates at each size, the order alternating between repeats; each study is
    submitted before its worker starts and deleted afterwards."""
    broker = svc.brokers["redis"]
    rows = []
    for repeat in range(repeats):
        order = sizes if repeat % 2 == 0 else list(reversed(sizes))
        for n in order:
            queue = broker.queue("drain")
            study_id = f"drain-{n}-{uuid.uuid4().hex[:6]}"
            path = write_study(
                svc.tmp / f"{study_id}.yaml", study_id, agent="noop", runs=n, queue=queue
            )
            env = _clean_env(STUDYQ_DATABASE_URL=svc.db_url, STUDYQ_BROKER_URL=broker.url)
            _cli(["submit", str(path), "--no-progress"], env, cwd=svc.tmp)
            updates0, hot0 = _hot_share(svc)
            measured = drain(svc, broker, study_id, queue, n, pool=pool, concurrency=concurrency)
            updates1, hot1 = _hot_share(svc)
            rows.append(
                {
                    "runs": n,
                    "repeat": repeat,
                    **measured,
                    "hot_share": (hot1 - hot0) / max(1, updates1 - updates0),
                }
            )
            print(f"# drain {n:,}: {measured['drain_rate']:.0f} runs/s", file=sys.stderr)
            broker.drop(queue)
            _cli(["delete", study_id, "--yes"], env, cwd=svc.tmp)
    return rows


# -- tables -------------------------------------------------------------------------------------

COLUMNS: list[tuple[str, str, Callable[[float], str]]] = [
    ("runs", "runs", lambda v: f"{v:,.0f}"),
    ("submit_s", "submit s", lambda v: f"{v:.1f}"),
    ("submit_rss_mb", "submit peak RSS MB", lambda v: f"{v:.0f}"),
    ("db_b_submitted", "DB bytes/run submitted", lambda v: f"{v:,.0f}"),
    ("db_b_finished", "DB bytes/run finished", lambda v: f"{v:,.0f}"),
    ("submit_wal_b", "WAL bytes/run submit", lambda v: f"{v:,.0f}"),
    ("drain_wal_b", "WAL bytes/run drain", lambda v: f"{v:,.0f}"),
    ("drain_rate", "drain runs/s", lambda v: f"{v:,.0f}"),
    ("hot_share", "HOT updates", lambda v: f"{v:.0%}"),
    ("tick_ms_0", "tick ms (0 done)", lambda v: f"{v:.1f}"),
    ("tick_statements_0", "stmts/tick (0 done)", lambda v: f"{v:.0f}"),
    ("tick_ms_done", "tick ms (all done)", lambda v: f"{v:.1f}"),
    ("tick_statements_done", "stmts/tick (all done)", lambda v: f"{v:.0f}"),
    ("count_ms", "status count ms", lambda v: f"{v:.1f}"),
    ("status_s", "`studyq status` s", lambda v: f"{v:.2f}"),
    ("export_s", "export s", lambda v: f"{v:.1f}"),
    ("export_rss_mb", "export peak RSS MB", lambda v: f"{v:.0f}"),
]


def table(rows: list[dict[str, float]]) -> str:
    rows = sorted(rows, key=lambda row: row["runs"])
    lines = ["| what | " + " | ".join(f"{row['runs']:,.0f} runs" for row in rows) + " |"]
    lines.append("| --- |" + " --- |" * len(rows))
    for key, label, fmt in COLUMNS[1:]:
        cells = [fmt(row[key]) if key in row else "" for row in rows]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def drain_table(rows: list[dict[str, float]]) -> str:
    sizes = sorted({int(row["runs"]) for row in rows})
    base = sizes[0]
    lines = [
        f"| runs | drain runs/s (median [min{TO}max]) | vs {base:,} (median of per-repeat "
        "ratios) | HOT updates |",
        "| --- | --- | --- | --- |",
    ]
    by_repeat: dict[int, dict[int, float]] = {}
    for row in rows:
        by_repeat.setdefault(int(row["repeat"]), {})[int(row["runs"])] = row["drain_rate"]
    for n in sizes:
        rates = [row["drain_rate"] for row in rows if row["runs"] == n]
        hot = [row["hot_share"] for row in rows if row["runs"] == n]
        ratios = [r[n] / r[base] for r in by_repeat.values() if n in r and base in r]
        ratio = (
            f"{statistics.median(ratios):.2f} [{min(ratios):.2f}{TO}{max(ratios):.2f}]"
            if ratios
            else ""
        )
        lines.append(
            f"| {n:,} | {statistics.median(rates):,.0f} [{min(rates):,.0f}{TO}{max(rates):,.0f}] "
            f"| {ratio} | {statistics.median(hot):.0%} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="10000,100000", help="runs per study, comma-separated")
    parser.add_argument("--drain-only", default="", help="only drain rates at these sizes")
    parser.add_argument("--repeats", type=int, default=3, help="--drain-only: repeats (3)")
    parser.add_argument(
        "--no-drain", action="store_true", help="submit, tick and count only (no workers)"
    )
    parser.add_argument("--pool", default="prefork", choices=("prefork", "threads"))
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--redis-db", type=int, default=12)
    parser.add_argument("--save", help="write the rows as JSON to this file")
    parser.add_argument("--from", dest="saved", nargs="+", help="print saved runs' tables")
    args = parser.parse_args(argv)
    if args.saved:
        rows = [row for path in args.saved for row in json.loads(Path(path).read_text())["rows"]]
        drains = [row for row in rows if "repeat" in row]
        print(drain_table(drains) if drains else table(rows))
        return 0
    os.chdir(REPO_ROOT)
    rows: list[dict[str, float]] = []
    with services(args.redis_db, False) as svc:
        if args.drain_only:
            sizes = [int(size) for size in args.drain_only.split(",")]
            rows = drain_only(
                svc, sizes, args.repeats, pool=args.pool, concurrency=args.concurrency
            )
            output = drain_table(rows)
        else:
            for n in (int(size) for size in args.sizes.split(",")):
                rows.append(
                    one_size(
                        svc,
                        n,
                        pool=args.pool,
                        concurrency=args.concurrency,
                        drained=not args.no_drain,
                    )
                )
                if args.save:
                    Path(args.save).write_text(json.dumps({"rows": rows}, indent=1))
            output = table(rows)
    if args.save:
        Path(args.save).write_text(json.dumps({"rows": rows, "argv": sys.argv[1:]}, indent=1))
    print(output)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
