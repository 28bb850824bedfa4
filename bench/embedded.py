"""Benchmark: the embedded sweep (``studyq run``) against design-research-experiments 0.4.0's
``run_study``, side by side in one invocation, plus exporting 100,000 runs.

Run from the repository root::

    .venv/bin/python bench/embedded.py                 # 3 repeats of everything (~10 min)
    .venv/bin/python bench/embedded.py --repeats 1     # quicker, noisier
    .venv/bin/python bench/embedded.py --profile noop  # where studyq's serial no-op time goes

What it measures (ANCHORS.md section 1's method; the machine is shared and noisy, so the
upstream baseline is measured in the same run, the configurations are measured in turn
(one sample of each, then the next round: A/B alternation, not three of A then three of B),
and each figure is the median of ``--repeats``, with [min-max]):

1. **No-op runs**: 2,000 runs of the ANCHORS "bindings" study (2 prompt conditions x 5
   agents x 20 problems x 10 replicates; ``--noop-replicates 100`` for 20,000) whose agents
   return at once and whose problems score
   ``{"score": 1.0}``. studyq: ``run_study`` (what ``studyq run`` calls) with
   ``--jobs 1`` (in-process), ``2`` and ``8`` (process pool), the agents and problems bound to
   the built-in ``noop`` demos through the study's ``bindings``, a fresh SQLite store each
   time, artifacts exported. Upstream: ``run_study`` with trivial callables through
   ``agent_bindings`` and ``ProblemPacket``s through ``problem_registry``, parallelism 1, 2, 8
   (a thread pool when > 1), checkpoints and artifacts as it writes them by default.
2. **Sleeping runs**: 200 runs of the same shape with one replicate whose agents sleep 20 ms
   (ideal: 4.0 s serial). studyq ``--jobs 1/2/8`` and ``--threads --jobs 32``; upstream
   parallelism 1/2/8/32.
3. **Export of 100,000 runs**: a 100,000-run study (the same shape, 500 replicates) is
   registered, each run executed in process and its result written through
   ``finish_runs_batch`` (set-up, not timed), then ``export_study`` runs in a child process:
   seconds, and the child's peak RSS (``ru_maxrss`` via ``os.wait4``; its RSS right after
   imports is printed for reference).

Every measured configuration runs in a fresh child process and is timed inside the child
around ``run_study`` / ``export_study`` only: interpreter start-up and imports are excluded
(studyq's children import ``workers.execution`` and NumPy before the clock starts, as a
worker process would have them). studyq's time includes planning, registering in the store,
starting the process pool, executing, recording and exporting; upstream's includes design,
specs, evidence and checkpoint files, execution and its artifact export.

Goals (issues 3 and 14): no-op runs/s of studyq (best of its configurations) >= 10x
upstream's serial runner, and ``--jobs 2`` / ``--jobs 8`` no slower than ``--jobs 1`` (no-op
runs, ratio of medians >= 0.95: the noise of one sample is larger than that); sleeping runs/s
of ``--threads --jobs 32`` >= 5x upstream at parallelism 32; peak RSS of the 100,000-run
export < 300 MB. ``--check`` exits 1 when a goal is missed.

Where the files go: each configuration works in a temporary directory of ``$TMPDIR``. On
this machine's root file system (ext4 without a journal) file creation slows down after
many recent deletions (``bench/file_creates.py``; docs/embedded.md, "What the disk was"),
so ``TMPDIR=/dev/shm`` measures the runners, not that allocator.

The upstream interpreter is, in order: ``$STUDYQ_UPSTREAM_PYTHON``,
``<repo>/.cache/upstream-venv`` (the venv ``tests/test_compat_upstream.py`` builds),
``/tmp/dre/bin/python``; if none has the package, a venv is built in ``.cache/upstream-venv``
from a Python 3.12 unless ``--no-build``; if that fails too, upstream rows are skipped.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from _upstream import find_upstream_python

REPO_ROOT = Path(__file__).resolve().parents[1]

NOOP_GOAL = 10.0  # x upstream serial
JOBS_GOAL = 0.95  # --jobs N / --jobs 1 on no-op runs: "never slower", within one sample's noise
SLEEP_GOAL = 5.0  # x upstream at parallelism 32
EXPORT_RSS_GOAL_MB = 300.0

AGENTS = [f"a{index}" for index in range(5)]
PROBLEMS = [f"p{index:02d}" for index in range(20)]
SLEEP_S = 0.02


def write_study(path: Path, study_id: str, *, replicates: int, agent: str) -> Path:
    """The ANCHORS "bindings" study: 2 prompt conditions x 5 agents x 20 problems x R.

    ``agent`` is the studyq demo agent every agent id is bound to (``noop`` or ``sleep``);
    design-research-experiments ignores the ``bindings`` section and gets callables instead.
    """
    agents = "\n".join(f'    {name}: "workers.demo.agents:{agent}"' for name in AGENTS)
    problems = "\n".join(f'    {name}: "workers.demo.problems:noop"' for name in PROBLEMS)
    path.write_text(
        f"""\
study_id: {study_id}
title: Embedded sweep benchmark
factors:
  - name: prompt
    levels:
      - {{name: terse, value: terse}}
      - {{name: verbose, value: verbose}}
  - name: sleep_s
    levels:
      - {{name: s, value: {SLEEP_S}}}
agent_specs: [{", ".join(AGENTS)}]
problem_ids: [{", ".join(PROBLEMS)}]
design_spec:
  kind: full_factorial
run_budget:
  replicates: {replicates}
seed_policy:
  base_seed: 20261129
bindings:
  agents:
{agents}
  problems:
{problems}
""",
        encoding="utf-8",
    )
    return path


# Runs in studyq's venv: prints {"runs", "ok", "seconds"} for run_study alone.
_STUDYQ_CHILD = """\
import json, sys, time

import numpy  # noqa: F401  (a worker process has it loaded)
import orchestrator.embedded, orchestrator.executors.embedded, orchestrator.export  # noqa
import workers.bindings, workers.demo.agents, workers.demo.problems, workers.execution  # noqa
from orchestrator.api import run_study

def main():
    study, db, out, jobs, threads, profile = sys.argv[1:7]
    call = lambda: run_study(
        study, jobs=int(jobs), threads=threads == "1", db=db, output_dir=out,
        show_progress=False,
    )
    if profile != "-":
        import cProfile, pstats
        profiler = cProfile.Profile()
        started = time.perf_counter()
        outcome = profiler.runcall(call)
        elapsed = time.perf_counter() - started
        stats = pstats.Stats(profiler, stream=sys.stderr)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(30)
    else:
        started = time.perf_counter()
        outcome = call()
        elapsed = time.perf_counter() - started
    print(json.dumps({"runs": outcome.executed, "ok": outcome.succeeded, "seconds": elapsed}))

if __name__ == "__main__":
    main()
"""

# Runs in the upstream venv (ANCHORS section 1): trivial callables, ProblemPackets.
_UPSTREAM_CHILD = """\
import json, os, sys, time

from design_research_experiments import ProblemPacket, run_study
from design_research_experiments.study import load_study

SLEEP_S = float(sys.argv[4])

def noop(seed):
    return {"output": {"seed": seed}}

def sleeper(seed):
    time.sleep(SLEEP_S)
    return {"output": {"seed": seed}}

def score(_output):
    return {"score": 1.0}

study = load_study(sys.argv[1])
parallelism = int(sys.argv[2])
os.chdir(sys.argv[3])
agent = sleeper if SLEEP_S > 0 else noop
agents = {f"a{i}": agent for i in range(5)}
problems = {
    f"p{i:02d}": ProblemPacket(problem_id=f"p{i:02d}", family="bench", brief="", evaluator=score)
    for i in range(20)
}
started = time.perf_counter()
results = run_study(
    study, agent_bindings=agents, problem_registry=problems, parallelism=parallelism,
    show_progress=False,
)
elapsed = time.perf_counter() - started
ok = sum(1 for r in results if str(getattr(r.status, "value", r.status)) == "success")
print(json.dumps({"runs": len(results), "ok": ok, "seconds": elapsed}))
"""

# Runs in studyq's venv: exports a stored study; prints seconds and RSS after imports.
_EXPORT_CHILD = """\
import json, resource, sys, time

from orchestrator.api import export_study
import orchestrator.export, orchestrator.store  # noqa: F401

rss_imports = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
started = time.perf_counter()
report = export_study(sys.argv[1], db=sys.argv[2], output_dir=sys.argv[3])
elapsed = time.perf_counter() - started
print(json.dumps({
    "runs": report.runs, "events": report.events, "evaluations": report.evaluations,
    "seconds": elapsed, "rss_after_imports_mb": rss_imports,
}))
"""


@dataclass
class Sample:
    seconds: float
    runs: int
    rss_mb: float
    extra: dict[str, Any]

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


@dataclass
class Row:
    section: str
    system: str
    what: str
    samples: list[Sample]

    def median(self, key: Callable[[Sample], float]) -> float:
        return statistics.median(key(sample) for sample in self.samples)

    def spread(self, key: Callable[[Sample], float], fmt: str) -> str:
        values = [key(sample) for sample in self.samples]
        middle = format(statistics.median(values), fmt)
        if len(values) == 1:
            return middle
        return f"{middle} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def _clean_env(*, keep_pythonpath: bool = False) -> dict[str, str]:
    hidden = {"PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    if not keep_pythonpath:
        hidden.add("PYTHONPATH")
    env = {key: value for key, value in os.environ.items() if key not in hidden}
    return {key: value for key, value in env.items() if not key.startswith("STUDYQ_")}


def _child(
    command: Sequence[str], *, cwd: Path, env: dict[str, str], stderr_to: int | None = None
) -> tuple[dict[str, Any], float]:
    """Run a child to completion; return its last stdout line as JSON and its own peak RSS
    in MB (``os.wait4``: this child only, not every child so far)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        process = subprocess.Popen(
            list(command),
            stdout=out,
            stderr=err if stderr_to is None else stderr_to,
            env=env,
            cwd=cwd,
        )
        _, status, usage = os.wait4(process.pid, 0)
        code = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if code != 0:
            raise RuntimeError(f"{' '.join(command[:3])} exited {code}:\n{err.read().decode()}")
        lines = out.read().decode().strip().splitlines()
        return json.loads(lines[-1]), usage.ru_maxrss / 1024


def bench_studyq(
    study: Path, *, jobs: int, threads: bool, expected: int, profile: bool = False
) -> Sample:
    with tempfile.TemporaryDirectory(prefix="studyq-bench-emb-") as folder:
        work = Path(folder)
        command = [
            sys.executable,
            "-c",
            _STUDYQ_CHILD,
            str(study),
            f"sqlite:///{work / 'studyq.db'}",
            str(work / "artifacts"),
            str(jobs),
            "1" if threads else "0",
            "profile" if profile else "-",
        ]
        result, rss = _child(
            command,
            cwd=work,
            env=_clean_env(keep_pythonpath=True),
            stderr_to=sys.stderr.fileno() if profile else None,
        )
    if (result["runs"], result["ok"]) != (expected, expected):
        raise RuntimeError(f"studyq ran {result}, expected {expected} successes")
    return Sample(float(result["seconds"]), expected, rss, {})


def bench_upstream(python: str, study: Path, *, parallelism: int, sleep_s: float) -> Sample:
    with tempfile.TemporaryDirectory(prefix="studyq-bench-emb-up-") as folder:
        command = [python, "-c", _UPSTREAM_CHILD, str(study), str(parallelism), folder]
        result, rss = _child([*command, str(sleep_s)], cwd=Path(folder), env=_clean_env())
    if result["ok"] != result["runs"]:
        raise RuntimeError(f"upstream: {result}")
    return Sample(float(result["seconds"]), int(result["runs"]), rss, {})


def fill_store(study: Path, url: str) -> tuple[str, int, float]:
    """Register ``study``, execute every run in process (no-op agent and problem: a real
    result with its evaluation and event) and record them through ``finish_runs_batch`` in
    batches of 2,000; returns (study_id, runs, seconds). Set-up, not the measured export."""
    from orchestrator.embedded import register
    from orchestrator.executors.embedded import ResolverSpec
    from orchestrator.store import ResultStore
    from orchestrator.study.plan import prepare
    from workers.execution import execute_run

    started = time.perf_counter()
    prepared = prepare(study)
    resolver = ResolverSpec(bindings=prepared.study.bindings).build()
    store = ResultStore.open(url)
    try:
        register(store, prepared)
        batch: list[Any] = []

        def record() -> None:
            claims = store.claim_runs(
                prepared.study.study_id,
                [spec.index for spec in batch],
                worker="bench:fill:1",
                lease_s=3600.0,
                allow_planned=True,
            )
            store.finish_runs_batch(
                [
                    (claim, execute_run(spec, resolver))
                    for claim, spec in zip(claims, batch, strict=True)
                ]
            )
            batch.clear()

        count = 0
        for spec in prepared.run_specs():
            batch.append(spec)
            count += 1
            if len(batch) == 2000:
                record()
        if batch:
            record()
    finally:
        store.close()
    return prepared.study.study_id, count, time.perf_counter() - started


def bench_export(study_id: str, url: str, runs: int) -> Sample:
    with tempfile.TemporaryDirectory(prefix="studyq-bench-emb-export-") as folder:
        command = [sys.executable, "-c", _EXPORT_CHILD, study_id, url, folder]
        result, rss = _child(command, cwd=Path(folder), env=_clean_env(keep_pythonpath=True))
    if result["runs"] != runs:
        raise RuntimeError(f"export wrote {result['runs']} runs, expected {runs}")
    return Sample(float(result["seconds"]), runs, rss, result)


# --- report -----------------------------------------------------------------------------


class Runner:
    """Measures rows ``repeats`` times each, in rounds (every pending row once, then again),
    and keeps them in order for the table: on a shared machine a load spike then hits every
    configuration of a round, not all samples of one."""

    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.rows: list[Row] = []
        self._pending: list[tuple[Row, Callable[[], Sample]]] = []

    def row(self, section: str, system: str, what: str, measure: Callable[[], Sample]) -> Row:
        """A row measured by the next :meth:`measure` (its samples are empty until then)."""
        row = Row(section, system, what, [])
        self.rows.append(row)
        self._pending.append((row, measure))
        return row

    def measure(self) -> None:
        """Take ``repeats`` samples of every pending row, alternating between them."""
        pending, self._pending = self._pending, []
        for attempt in range(1, self.repeats + 1):
            for row, measure in pending:
                progress = f"  {row.system}: {row.section}, {row.what} ({attempt}/{self.repeats})"
                print(f"{progress} ...", file=sys.stderr, flush=True)
                row.samples.append(measure())


def _print_rows(rows: Sequence[Row]) -> None:
    print("| section | system | configuration | runs | seconds | runs/s | peak RSS MB |")
    print("|---|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row.section} | {row.system} | {row.what} | {row.samples[0].runs:,} "
            f"| {row.spread(lambda s: s.seconds, '.2f')} "
            f"| {row.spread(lambda s: s.rate, ',.0f')} "
            f"| {row.spread(lambda s: s.rss_mb, '.0f')} |"
        )


def _ratio_lines(rows: Sequence[Row], base: Row | None, label: str) -> list[str]:
    if base is None:
        return []
    base_rate = base.median(lambda s: s.rate)
    return [
        f"| {label} | {row.what} | {row.median(lambda s: s.rate) / base_rate:.1f}x |"
        for row in rows
    ]


def _rate(row: Row) -> float:
    return row.median(lambda s: s.rate)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (median)")
    parser.add_argument(
        "--no-build", action="store_true", help="never build the upstream venv (no network)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    parser.add_argument(
        "--export-replicates",
        type=int,
        default=500,
        help="replicates of the export study (default 500: 100,000 runs)",
    )
    parser.add_argument("--skip-export", action="store_true", help="skip the export section")
    parser.add_argument("--skip-sleep", action="store_true", help="skip the sleeping runs")
    parser.add_argument(
        "--noop-replicates",
        type=int,
        default=10,
        help="replicates of the no-op study (default 10: 2,000 runs; 100: 20,000)",
    )
    parser.add_argument("--skip-upstream", action="store_true", help="studyq rows only")
    parser.add_argument(
        "--profile",
        choices=("noop", "sleep"),
        help="only run studyq's --jobs 1 study under cProfile and print where the time goes",
    )
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="studyq-bench-emb-") as folder:
        work = Path(folder)
        noop_runs = 200 * args.noop_replicates
        noop_study = write_study(
            work / "noop.yaml", "bench-noop", replicates=args.noop_replicates, agent="noop"
        )
        sleep_study = write_study(work / "sleep.yaml", "bench-sleep", replicates=1, agent="sleep")
        if args.profile:
            study, runs = (noop_study, noop_runs) if args.profile == "noop" else (sleep_study, 200)
            sample = bench_studyq(study, jobs=1, threads=False, expected=runs, profile=True)
            print(f"\nstudyq --jobs 1, {runs} runs: {sample.seconds:.2f} s ({sample.rate:,.0f}/s)")
            return 0

        upstream = None if args.skip_upstream else find_upstream_python(build=not args.no_build)
        print(
            f"python {sys.version.split()[0]}; cpus {os.cpu_count()}; "
            f"upstream: {upstream or 'not measured'}",
            file=sys.stderr,
        )
        bench = Runner(args.repeats)
        noop, sleep = f"{noop_runs:,} no-op", "200 x 20 ms sleep"
        noop_rows = []
        for jobs in (1, 2, 8):
            measure = partial(
                bench_studyq, noop_study, jobs=jobs, threads=False, expected=noop_runs
            )
            noop_rows.append(bench.row(noop, "studyq", f"--jobs {jobs}", measure))
        upstream_noop: list[Row] = []
        if upstream is not None:
            for par in (1, 2, 8):
                measure = partial(bench_upstream, upstream, noop_study, parallelism=par, sleep_s=0)
                upstream_noop.append(bench.row(noop, "upstream", f"parallelism={par}", measure))
        sleep_rows = []
        upstream_sleep: list[Row] = []
        if not args.skip_sleep:
            for jobs, threads in ((1, False), (2, False), (8, False), (32, True)):
                label = f"--threads --jobs {jobs}" if threads else f"--jobs {jobs}"
                measure = partial(
                    bench_studyq, sleep_study, jobs=jobs, threads=threads, expected=200
                )
                sleep_rows.append(bench.row(sleep, "studyq", label, measure))
            if upstream is not None:
                for par in (1, 2, 8, 32):
                    measure = partial(
                        bench_upstream, upstream, sleep_study, parallelism=par, sleep_s=SLEEP_S
                    )
                    row = bench.row(sleep, "upstream", f"parallelism={par}", measure)
                    upstream_sleep.append(row)
        bench.measure()

        export_row = None
        fill_note = ""
        if not args.skip_export:
            export_path = write_study(
                work / "export.yaml",
                "bench-export",
                replicates=args.export_replicates,
                agent="noop",
            )
            url = f"sqlite:///{work / 'export.db'}"
            print("  filling the export store (not timed) ...", file=sys.stderr, flush=True)
            study_id, runs, fill_s = fill_store(export_path, url)
            fill_note = f"store filled with {runs:,} no-op results in {fill_s:.0f} s (not timed)"
            measure = partial(bench_export, study_id, url, runs)
            export_row = bench.row(f"export {runs:,} runs", "studyq", "export_study", measure)
            bench.measure()

    print()
    _print_rows(bench.rows)
    if export_row is not None:
        after_imports = export_row.median(lambda s: s.extra["rss_after_imports_mb"])
        print(f"\nexport child: RSS right after imports {after_imports:.0f} MB; {fill_note}")

    upstream_serial = upstream_noop[0] if upstream_noop else None
    upstream_32 = upstream_sleep[-1] if upstream_sleep else None
    print("\n| ratio of runs/s | studyq configuration | studyq / upstream |")
    print("|---|---|---:|")
    for line in [
        *_ratio_lines(noop_rows, upstream_serial, "no-op vs upstream parallelism=1"),
        *_ratio_lines(noop_rows[1:], noop_rows[0], "no-op vs studyq --jobs 1"),
        *_ratio_lines(sleep_rows, upstream_32, "sleep vs upstream parallelism=32"),
    ]:
        print(line)

    goals: list[tuple[str, bool]] = []
    if upstream_serial is not None:
        ratio = max(_rate(row) for row in noop_rows) / _rate(upstream_serial)
        text = f"no-op runs >= {NOOP_GOAL:.0f}x upstream serial (best: {ratio:.1f}x)"
        goals.append((text, ratio >= NOOP_GOAL))
    slowest = min(_rate(row) for row in noop_rows[1:]) / _rate(noop_rows[0])
    text = f"no-op runs, --jobs 2 and 8 >= {JOBS_GOAL:.2f}x --jobs 1 (slowest: {slowest:.2f}x)"
    goals.append((text, slowest >= JOBS_GOAL))
    if upstream_32 is not None:
        ratio = _rate(sleep_rows[-1]) / _rate(upstream_32)
        text = (
            f"sleeping runs, --threads --jobs 32 >= {SLEEP_GOAL:.0f}x upstream at "
            f"parallelism 32 ({ratio:.1f}x)"
        )
        goals.append((text, ratio >= SLEEP_GOAL))
    if export_row is not None:
        rss = export_row.median(lambda s: s.rss_mb)
        text = (
            f"export of {export_row.samples[0].runs:,} runs: peak RSS < "
            f"{EXPORT_RSS_GOAL_MB:.0f} MB ({rss:.0f} MB)"
        )
        goals.append((text, rss < EXPORT_RSS_GOAL_MB))
    print()
    for text, met in goals:
        print(f"goal: {text}: {'met' if met else 'MISSED'}")
    return 1 if args.check and not all(met for _, met in goals) else 0


if __name__ == "__main__":
    raise SystemExit(main())
