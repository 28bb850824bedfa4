"""Benchmark: what cluster-wide provider limits (workers/limits.py) cost. Results:
docs/benchmarks.md ("Provider limits"). (Not named limits.py: with bench/ on sys.path, as
bench/distributed.py puts it for its workers, it would shadow the ``limits`` package.)

Run from the repository root (Redis on 127.0.0.1:6379, PostgreSQL on 127.0.0.1:5432)::

    .venv/bin/python bench/provider_limits.py                 # both parts, 3 repeats (~2 min)
    .venv/bin/python bench/provider_limits.py --runs 2000 --repeats 1 --only cost

(cost) **The limiter's cost per run**, in this process, on a real Redis: ``admit()`` and
    leaving the run's scope (what the run path adds around every run of an agent bound to a
    provider), ``--calls`` times one after the other, for a study declaring
    ``max_concurrency`` + ``requests_per_minute`` (slot + window), each alone, and no limits
    at all (the cost every other study pays: one dictionary look-up); plus one
    ``request(provider, tokens=...)`` call past the first (``tokens_per_minute``). Redis
    round trips are counted at the socket (``Connection.send_packed_command``: one per
    command or script sent and answered), latency is wall time per run (median of the
    repeats). The limits never bind here (caps far above what one thread can reach), so
    this is the bookkeeping alone, never a wait.
(e2e) **bench/distributed.py's (b) figure with limits declared, side by side with limits
    absent**: ``--runs`` no-op runs pre-enqueued by ``submit_study`` and drained by one
    ``celery worker -P prefork -c 2``, clock from ``worker_ready`` to the last run recorded
    (bench/distributed.py's ``measure_studyq_drain``, unchanged); the "declared" study binds
    its agent to provider ``bench`` with ``max_concurrency: 1000, requests_per_minute:
    10000000`` (never binding), the limits in the broker's Redis. The two go back to back,
    their order alternating between repeats. The provider's epoch key is set before the
    clock starts, as in any deployment that has run once since Redis started (a deployment's
    very first run waits RESTART_GRACE_S, 1.25 s, once: see workers/limits.py).

Isolation: as bench/distributed.py (Redis database ``--redis-db``, default 12, only this
run's keys deleted; a throwaway PostgreSQL database, dropped at the end); the limits' keys of
the throwaway database's deployment are deleted at the end.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR.parent))
sys.path.insert(0, str(BENCH_DIR))

import distributed  # noqa: E402  (bench/distributed.py)

LIMITS_YAML = """\
bindings:
  providers: {noop: bench}
execution:
  queue: QUEUE
  limits:
    bench: {max_concurrency: 1000, requests_per_minute: 10000000}
"""


# -- (cost) -------------------------------------------------------------------------------


class RoundTrips:
    """Counts what redis-py sends (one packed command = one round trip)."""

    def __init__(self) -> None:
        from redis.connection import Connection

        self.count = 0
        self._cls = Connection
        self._original = Connection.send_packed_command
        counter = self

        def counted(self: Any, command: Any, check_health: bool = True) -> Any:
            counter.count += 1
            return counter._original(self, command, check_health)

        Connection.send_packed_command = counted  # type: ignore[method-assign]

    def close(self) -> None:
        self._cls.send_packed_command = self._original  # type: ignore[method-assign]


def _runtime(redis_url: str, tmp: Path, limits: dict[str, Any] | None) -> tuple[Any, list[Any]]:
    """A worker runtime on a fresh SQLite store holding one study of the ``noop`` agent
    (bound to provider ``bench`` with ``limits``; None: no limits)."""
    from orchestrator.embedded import register
    from orchestrator.store import ResultStore
    from orchestrator.study.model import parse_study
    from orchestrator.study.plan import prepare
    from workers.config import WorkerSettings
    from workers.runtime import WorkerRuntime

    payload: dict[str, Any] = {
        "study_id": f"bench-limits-{uuid.uuid4().hex[:8]}",
        "title": "limiter cost",
        "agent_specs": ["noop"],
        "problem_ids": ["noop"],
        "run_budget": {"replicates": 1},
    }
    if limits is not None:
        payload["bindings"] = {"providers": {"noop": "bench"}}
        payload["execution"] = {"limits": {"bench": limits}}
    prepared = prepare(parse_study(payload))
    url = f"sqlite:///{tmp / (uuid.uuid4().hex[:8] + '.db')}"
    store = ResultStore.open(url)
    register(store, prepared)
    settings = WorkerSettings(database_url=url, limits_url=redis_url, lease_s=60, heartbeat_s=10)
    return WorkerRuntime(settings, worker="bench@host:1", store=store), list(prepared.run_specs())


def measure_cost(redis_url: str, calls: int) -> dict[str, dict[str, float]]:
    from workers import limits as provider_limits
    from workers.limits import admit, deployment_id, request

    cases: dict[str, dict[str, Any] | None] = {
        "no limits declared": None,
        "max_concurrency": {"max_concurrency": 10**6},
        "requests_per_minute": {"requests_per_minute": 10**9},
        "max_concurrency + requests_per_minute": {
            "max_concurrency": 10**6,
            "requests_per_minute": 10**9,
        },
    }
    results: dict[str, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="studyq-bench-limits-") as tmp:
        for label, limits in cases.items():
            runtime, specs = _runtime(redis_url, Path(tmp), limits)
            spec = specs[0]
            namespace = deployment_id(runtime.store.engine.url)
            limiter = provider_limits.limiter_for(redis_url, namespace, 60.0)
            limiter.client.set(limiter.keys("bench")[1], "0")  # an old epoch: no grace
            with admit(runtime, spec):  # warm: the study's limits read, scripts loaded
                pass
            counter = RoundTrips()
            try:
                started = time.perf_counter()
                for _ in range(calls):
                    with admit(runtime, spec):
                        pass
                elapsed = time.perf_counter() - started
            finally:
                counter.close()
            results[label] = {"us": elapsed / calls * 1e6, "trips": counter.count / calls}
            if label == "no limits declared":
                _forget(limiter)
                runtime.store.close()
                continue
            if label == "max_concurrency + requests_per_minute":
                tokens_runtime, tokens_specs = _runtime(
                    redis_url, Path(tmp), {"tokens_per_minute": 10**12}
                )
                tokens_limiter = provider_limits.limiter_for(
                    redis_url, deployment_id(tokens_runtime.store.engine.url), 60.0
                )
                counter = RoundTrips()
                try:
                    with admit(tokens_runtime, tokens_specs[0]):
                        started = time.perf_counter()
                        for _ in range(calls):
                            with request("bench", tokens=1000):
                                pass
                        elapsed = time.perf_counter() - started
                finally:
                    counter.close()
                results["request(tokens=...) (tokens_per_minute)"] = {
                    "us": elapsed / calls * 1e6,
                    "trips": counter.count / calls,
                }
                _forget(tokens_limiter)
                tokens_runtime.store.close()
            _forget(limiter)
            runtime.store.close()
    return results


def _forget(limiter: Any) -> None:
    for key in limiter.client.scan_iter(f"{limiter.prefix}:*"):
        limiter.client.delete(key)


# -- (e2e) --------------------------------------------------------------------------------


def provider_limits_item() -> Any:
    from workers.limits import _window_item

    return _window_item(10_000_000)


def measure_e2e(svc: Any, runs: int, declared: bool) -> dict[str, float]:
    original = distributed.write_study

    def write_study(path: Path, study_id: str, *, agent: str, runs: int, queue: str) -> Path:
        written = original(path, study_id, agent=agent, runs=runs, queue=queue)
        if declared:
            text = written.read_text(encoding="utf-8").replace(
                f"execution:\n  queue: {queue}\n", ""
            )
            written.write_text(text + LIMITS_YAML.replace("QUEUE", queue), encoding="utf-8")
        return written

    distributed.write_study = write_study
    try:
        if declared:
            from workers.limits import Limiter, deployment_id

            limiter = Limiter(svc.broker, deployment_id(svc.db_url), lease_s=60)
            limiter.client.set(limiter.keys("bench")[1], "0")  # a deployment that has run
        broker = svc.brokers["redis"]
        figures = distributed.measure_studyq_drain(
            svc, broker, agent="noop", n=runs, pool="prefork", concurrency=distributed.PREFORK
        )
        if declared:  # every run was counted in the provider's requests window
            window = limiter.requests_window.get_window_stats(
                provider_limits_item(), "bench", "requests"
            )
            counted = 10_000_000 - window.remaining
            if counted < runs:
                raise RuntimeError(f"only {counted} of {runs} runs went through the limiter")
            _forget(limiter)
        return figures
    finally:
        distributed.write_study = original


def run(args: argparse.Namespace) -> int:
    only = set(args.only or ["cost", "e2e"])
    lines: list[str] = []
    if "cost" in only:
        redis_url = f"redis://{distributed.HOST}:6379/{args.redis_db}"
        series: dict[str, list[dict[str, float]]] = {}
        for _ in range(args.repeats):
            for label, figures in measure_cost(redis_url, args.calls).items():
                series.setdefault(label, []).append(figures)
        lines += [
            f"(cost) the limiter per run, {args.calls:,} runs in one thread, "
            f"median of {args.repeats}",
            "",
            "| study declares | latency added per run | Redis round trips per run |",
            "| --- | ---: | ---: |",
        ]
        for label, values in series.items():
            us = statistics.median(v["us"] for v in values)
            low, high = min(v["us"] for v in values), max(v["us"] for v in values)
            trips = statistics.median(v["trips"] for v in values)
            lines.append(f"| {label} | {us:,.1f} µs [{low:,.1f}-{high:,.1f}] | {trips:.2f} |")
        lines.append("")
    if "e2e" in only:
        absent: list[dict[str, float]] = []
        declared: list[dict[str, float]] = []
        with distributed.services(args.redis_db, False) as svc:
            try:
                for repeat in range(args.repeats):
                    order = (False, True) if repeat % 2 == 0 else (True, False)
                    for with_limits in order:
                        figures = measure_e2e(svc, args.runs, with_limits)
                        (declared if with_limits else absent).append(figures)
                        print(
                            f"# e2e repeat {repeat + 1}: limits "
                            f"{'declared' if with_limits else 'absent'}: "
                            f"{figures['rate']:,.0f} runs/s",
                            file=sys.stderr,
                            flush=True,
                        )
            finally:
                from workers.limits import Limiter, deployment_id

                _forget(Limiter(svc.broker, deployment_id(svc.db_url), lease_s=60))

        def cell(values: list[dict[str, float]], key: str, scale: float = 1.0) -> str:
            figures = [v[key] * scale for v in values]
            return f"{statistics.median(figures):,.0f} [{min(figures):,.0f}-{max(figures):,.0f}]"

        ratios = [d["rate"] / a["rate"] for a, d in zip(absent, declared, strict=True)]
        lines += [
            f"(e2e) bench/distributed.py (b): {args.runs:,} no-op runs, one prefork -c 2 worker, "
            f"Redis, median [min-max] of {args.repeats}",
            "",
            "| | runs/s | worker CPU per run (ms) |",
            "| --- | ---: | ---: |",
            f"| limits absent | {cell(absent, 'rate')} | "
            f"{statistics.median(v['worker_cpu_ms'] for v in absent):.2f} |",
            f"| limits declared (max_concurrency + requests_per_minute) | "
            f"{cell(declared, 'rate')} | "
            f"{statistics.median(v['worker_cpu_ms'] for v in declared):.2f} |",
            f"| declared / absent | {statistics.median(ratios):.2f} | |",
            "",
        ]
    print("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", action="append", choices=["cost", "e2e"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--calls", type=int, default=2000, help="runs admitted in (cost)")
    parser.add_argument("--runs", type=int, default=3000, help="no-op runs drained in (e2e)")
    parser.add_argument("--redis-db", type=int, default=12)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
