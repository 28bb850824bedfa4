"""Benchmark: ``studyq export`` of 100,000 and 1,000,000 runs, from SQLite and PostgreSQL,
against design-research-experiments 0.4.0's ``export_canonical_artifacts`` measured in the
same invocation.

Run from the repository root::

    .venv/bin/python bench/export.py                       # 100k, both backends, 3 repeats
    .venv/bin/python bench/export.py --runs 1000000 --repeats 3 --no-upstream
    .venv/bin/python bench/export.py --runs 100000 --profile sqlite   # cProfile of one export
    TMPDIR=/dev/shm .venv/bin/python bench/export.py --runs 20000 --backends sqlite --jobs 2
                                                      # per-run files in 2 writer processes
    TMPDIR=/dev/shm .venv/bin/python bench/export.py --no-run-files --jobs 2
                                                      # the side tables from a forked child

What is compared (like for like): upstream's export writes study.yaml, manifest.json, the
four CSV tables and the two JSON files from run results it holds in memory; it writes no
per-run files (its checkpoints are written while the runs execute). So the peer of
upstream is studyq's ``export_artifacts(..., run_files=False)`` (``studyq export
--no-run-files``), which reads everything from the store. studyq's full export (with each
run's checkpoint and evidence record, three small files per run) is measured too and shown
beside it. Upstream's results are made in its child before the clock starts: 200 runs
executed by its ``run_study`` (no-op callables), copied to ``--runs`` results with new run
ids and replicates.

The store is filled fast, not through the normal path (which takes minutes for 1M runs):
the study is registered through the store (``orchestrator.embedded.register``), the first
``TEMPLATE_RUNS`` runs are executed in process and recorded through ``claim_runs`` /
``finish_runs_batch`` (the product's path), then a few set-based SQL statements copy those
runs' result columns, attempts, evaluations and events to every other run (run
``i`` gets run ``i % TEMPLATE_RUNS``'s). The rows have the shape the product writes.

Each configuration runs in a fresh child process, timed inside the child around the export
only; peak RSS is the child's own VmHWM (``/proc/self/status``, read at its end), plus,
with ``jobs``, the VmHWM of the process the export forks for the side tables (read there
as it ends: a sum that is an upper bound, the pages the two share since the fork count
twice). ``ru_maxrss`` of the waited-for children would not do: it keeps the high-water
mark of every forked copy from before its ``exec`` (``git rev-parse`` of the provenance
showed the export's own ~100 MB). The per-run files' writers are the forkserver's
children and are not counted. The
configurations are measured in rounds (one sample of each, then the next round), and each
ratio against upstream is taken within a round; the tables show medians with [min-max] over rounds.
studyq's rows are its default (the side tables written by a forked process beside the one
writing runs.csv), ``jobs=1`` (one process), and each of ``--jobs``.
Goals (issue 14): studyq's runs/s without run files >= upstream's (median of the per-round
ratios >= 1.0), peak RSS < 300 MB at 1,000,000 runs.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from _upstream import find_upstream_python
from embedded import Sample, _child, _clean_env, write_study

REPO_ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
TEMPLATE_RUNS = 2000
REPLICATE_RUNS = 200  # runs per replicate of the bench study (2 x 5 agents x 20 problems)
RSS_GOAL_MB = 300.0

# The child's own peak RSS: VmHWM belongs to the address space exec made, while ru_maxrss
# (getrusage or wait4) keeps the high-water mark of the forked parent's copy before exec.
_PEAK = """
def peak_mb():
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
"""

_STUDYQ_CHILD = """\
import json, os, sys, time

import orchestrator.export
from orchestrator.export import export_artifacts
from orchestrator.store import ResultStore

study_id, url, out, run_files, profile, jobs = sys.argv[1:7]
side_peaks = []  # the VmHWM of each child forked for the side tables (with jobs)


if hasattr(orchestrator.export, "ForkedCall"):  # not in trees before it (--before)
    class MeasuredFork(orchestrator.export.ForkedCall):
        def __init__(self, call, *, name):
            read, write = os.pipe()

            def measured():
                try:
                    return call()
                finally:
                    os.write(write, f"{peak_mb()}\\n".encode())

            super().__init__(measured, name=name)
            os.close(write)
            self._peak = read

        def result(self):
            try:
                return super().result()
            finally:
                side_peaks.append(float(os.read(self._peak, 64) or 0))
                os.close(self._peak)


    orchestrator.export.ForkedCall = MeasuredFork
with ResultStore.open(url) as store:
    chosen = {} if jobs == "default" else {"jobs": int(jobs)}
    call = lambda: export_artifacts(store, study_id, out, run_files=run_files == "1", **chosen)
    started = time.perf_counter()
    if profile == "1":
        import cProfile, pstats
        profiler = cProfile.Profile()
        report = profiler.runcall(call)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("cumulative").print_stats(35)
        pstats.Stats(profiler, stream=sys.stderr).sort_stats("tottime").print_stats(25)
    else:
        report = call()
    elapsed = time.perf_counter() - started
hwm = peak_mb() + sum(side_peaks)
print(json.dumps({"runs": report.runs, "seconds": elapsed, "hwm_mb": hwm, "side_mb": side_peaks}))
"""

_UPSTREAM_CHILD = """\
import dataclasses, json, os, sys, time

from design_research_experiments import ProblemPacket, run_study
from design_research_experiments.artifacts import export_canonical_artifacts
from design_research_experiments.designs import build_design
from design_research_experiments.study import load_study

study_path, runs, work = sys.argv[1], int(sys.argv[2]), sys.argv[3]
study = load_study(study_path)
os.chdir(work)
agents = {f"a{i}": (lambda seed: {"output": {"seed": seed}}) for i in range(5)}
problems = {
    f"p{i:02d}": ProblemPacket(
        problem_id=f"p{i:02d}", family="bench", brief="", evaluator=lambda _o: {"score": 1.0}
    )
    for i in range(20)
}
seeds = run_study(
    study, agent_bindings=agents, problem_registry=problems, parallelism=1,
    show_progress=False,
)
results = []
for n in range(runs):
    base = seeds[n % len(seeds)]
    run_id = f"{base.run_id}-{n}"
    spec = dataclasses.replace(base.run_spec, run_id=run_id, replicate=n // len(seeds) + 1)
    results.append(dataclasses.replace(base, run_id=run_id, run_spec=spec))
conditions = build_design(study)
started = time.perf_counter()
export_canonical_artifacts(
    study=study, conditions=conditions, run_results=results, output_dir=os.path.join(work, "out")
)
elapsed = time.perf_counter() - started
print(json.dumps({"runs": len(results), "seconds": elapsed, "hwm_mb": peak_mb()}))
"""


def _copy_children(conn: Any, table: Any, study_id: str, template: int) -> None:
    """Give every run past the template the child rows of run ``plan_index % template``."""
    from sqlalchemy import text

    from_run = {"study_id", "plan_index", "run_id"}
    names = [column.name for column in table.c]
    cells = ", ".join(f"r.{name}" if name in from_run else f"c.{name}" for name in names)
    conn.execute(
        text(
            f"INSERT INTO {table.name} ({', '.join(names)}) SELECT {cells} "
            f"FROM runs r JOIN {table.name} c ON c.study_id = r.study_id "
            "AND c.plan_index = r.plan_index % :k "
            "WHERE r.study_id = :s AND r.plan_index >= :k"
        ),
        {"s": study_id, "k": template},
    )


def fast_fill(study: Path, url: str) -> tuple[str, int, float]:
    """Register ``study`` through the store, record ``TEMPLATE_RUNS`` runs through the
    product's path, and copy them to every other run with set-based SQL (see the module
    docstring); returns (study_id, runs, seconds). Set-up, not measured."""
    from sqlalchemy import text

    from orchestrator.embedded import register
    from orchestrator.executors.embedded import ResolverSpec
    from orchestrator.store import ResultStore
    from orchestrator.store.columns import RESULT_COLUMNS
    from orchestrator.store.models import Base
    from orchestrator.study.plan import prepare
    from workers.execution import execute_run

    started = time.perf_counter()
    prepared = prepare(study)
    study_id = prepared.study.study_id
    r = ResolverSpec(bindings=prepared.study.bindings).build()
    with ResultStore.open(url) as store:
        report = register(store, prepared)
        specs: list[Any] = []
        for spec in prepared.run_specs():
            specs.append(spec)
            if len(specs) == TEMPLATE_RUNS:
                break
        claims = store.claim_runs(
            study_id,
            [spec.index for spec in specs],
            worker="bench:fill:1",
            lease_s=3600.0,
            allow_planned=True,
        )
        store.finish_runs_batch(
            [(claim, execute_run(spec, r)) for claim, spec in zip(claims, specs, strict=True)]
        )
        copied = [
            "status", "attempt", "attempts_used", "lease_owner", "lease_expires_at",
            "queued_at", "started_at", "ended_at", *(spec.name for spec in RESULT_COLUMNS),
        ]  # fmt: skip
        with store.engine.begin() as conn:
            conn.execute(
                text(
                    f"UPDATE runs SET ({', '.join(copied)}) = (SELECT "
                    f"{', '.join('t.' + name for name in copied)} FROM runs t "
                    "WHERE t.study_id = runs.study_id AND t.plan_index = runs.plan_index % :k) "
                    "WHERE study_id = :s AND plan_index >= :k"
                ),
                {"s": study_id, "k": TEMPLATE_RUNS},
            )
            for name in ("run_attempts", "evaluations", "events"):
                _copy_children(conn, Base.metadata.tables[name], study_id, TEMPLATE_RUNS)
    return study_id, report.run_count, time.perf_counter() - started


@contextmanager
def backend(kind: str, work: Path) -> Iterator[str]:
    """A throwaway store URL: a SQLite file in ``work``, or a PostgreSQL database of this
    process's own, dropped afterwards."""
    if kind == "sqlite":
        yield f"sqlite:///{work / 'export.db'}"
        return
    import psycopg

    name = f"studyq_bench_export_{os.getpid()}"
    with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
        admin.execute(f"DROP DATABASE IF EXISTS {name}")
        admin.execute(f"CREATE DATABASE {name}")
    try:
        url = f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
        from orchestrator.store import upgrade

        upgrade(url)
        yield url
    finally:
        with psycopg.connect(PG_ADMIN, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def measure_studyq(
    study_id: str,
    url: str,
    runs: int,
    *,
    run_files: bool,
    tree: Path | None = None,
    jobs: int | None = None,
) -> Sample:
    """One export in a fresh child; ``tree``: a checkout of another studyq version whose
    ``orchestrator`` package the child imports instead (``--before``); ``jobs``: the
    export's ``jobs`` (None: its default)."""
    env = _clean_env(keep_pythonpath=True)
    if tree is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(tree), env.get("PYTHONPATH")]))
    with tempfile.TemporaryDirectory(prefix="studyq-bench-export-") as folder:
        command = [
            sys.executable, "-c", _PEAK + _STUDYQ_CHILD, study_id, url, folder,
            "1" if run_files else "0", "0", "default" if jobs is None else str(jobs),
        ]  # fmt: skip
        result, _ = _child(command, cwd=Path(folder), env=env)
    if result["runs"] != runs:
        raise RuntimeError(f"export wrote {result['runs']} runs, expected {runs}")
    return Sample(float(result["seconds"]), runs, float(result["hwm_mb"]), result)


def measure_upstream(python: str, study: Path, runs: int) -> Sample:
    with tempfile.TemporaryDirectory(prefix="studyq-bench-export-up-") as folder:
        command = [python, "-c", _PEAK + _UPSTREAM_CHILD, str(study), str(runs), folder]
        result, _ = _child(command, cwd=Path(folder), env=_clean_env())
    return Sample(float(result["seconds"]), int(result["runs"]), float(result["hwm_mb"]), result)


@dataclass
class Config:
    label: str
    measure: Callable[[], Sample]
    samples: list[Sample] = field(default_factory=list)


def _spread(values: Sequence[float], fmt: str) -> str:
    middle = format(statistics.median(values), fmt)
    if len(values) == 1:
        return middle
    return f"{middle} [{format(min(values), fmt)}-{format(max(values), fmt)}]"


def _report(configs: Sequence[Config], base: Config | None, runs: int) -> list[str]:
    lines = [
        f"| configuration ({runs:,} runs) | seconds | runs/s | peak RSS MB | x upstream |",
        "|---|---:|---:|---:|---:|",
    ]
    for config in configs:
        ratio = "—"
        if base is not None and config is not base:
            ratios = [
                ours.rate / theirs.rate
                for ours, theirs in zip(config.samples, base.samples, strict=True)
            ]
            ratio = _spread(ratios, ".2f")
        lines.append(
            f"| {config.label} | {_spread([s.seconds for s in config.samples], '.2f')} "
            f"| {_spread([s.rate for s in config.samples], ',.0f')} "
            f"| {_spread([s.rss_mb for s in config.samples], '.0f')} | {ratio} |"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100_000, help="multiple of 200")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backends", default="sqlite,postgresql")
    parser.add_argument("--no-upstream", action="store_true", help="skip upstream's export")
    parser.add_argument("--no-run-files", action="store_true", help="skip the full export")
    parser.add_argument(
        "--before",
        metavar="COMMIT",
        help="also measure the export of this commit (its orchestrator/, from git archive)",
    )
    parser.add_argument("--profile", choices=("sqlite", "postgresql"), help="cProfile once")
    parser.add_argument(
        "--jobs",
        type=int,
        nargs="*",
        default=[],
        help="also export with these jobs: the side tables from a forked child, and the "
        "per-run files (unless --no-run-files) written by that many processes",
    )
    args = parser.parse_args(argv)
    if args.runs <= 0 or args.runs % REPLICATE_RUNS:
        print(f"--runs must be a positive multiple of {REPLICATE_RUNS}", file=sys.stderr)
        return 2
    kinds = [kind.strip() for kind in args.backends.split(",") if kind.strip()]
    if args.profile:
        kinds = [args.profile]
    if not kinds or set(kinds) - {"sqlite", "postgresql"}:
        print("--backends takes sqlite and/or postgresql", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="studyq-bench-export-work-") as folder:
        work = Path(folder)
        study = write_study(
            work / "export.yaml",
            "bench-export",
            replicates=args.runs // REPLICATE_RUNS,
            agent="noop",
        )
        before = _checkout(args.before, work) if args.before else None
        with contextmanager_stack(kinds, work) as urls:
            configs: list[Config] = []
            for kind, url in urls.items():
                print(f"filling {kind} with {args.runs:,} runs (not timed) ...", file=sys.stderr)
                study_id, runs, seconds = fast_fill(study, url)
                print(f"  filled in {seconds:.0f} s", file=sys.stderr, flush=True)
                if args.profile:
                    with tempfile.TemporaryDirectory(prefix="studyq-bench-export-") as out:
                        command = [sys.executable, "-c", _PEAK + _STUDYQ_CHILD, study_id, url, out,
                                   "0" if args.no_run_files else "1", "1", "1"]  # fmt: skip
                        result, _ = _child(command, cwd=Path(out),
                                             env=_clean_env(keep_pythonpath=True),
                                             stderr_to=sys.stderr.fileno())  # fmt: skip
                    seconds, peak = result["seconds"], result["hwm_mb"]
                    print(f"{seconds:.2f} s, peak RSS {peak:.0f} MB (under cProfile)")
                    return 0
                export = partial(measure_studyq, study_id, url, runs)
                if before is not None:
                    label = f"studyq {args.before[:7]} {kind}, --no-run-files"
                    configs.append(Config(label, partial(export, run_files=False, tree=before)))
                configs.append(
                    Config(f"studyq {kind}, --no-run-files", partial(export, run_files=False))
                )
                label = f"studyq {kind}, --no-run-files, jobs=1 (one process)"
                configs.append(Config(label, partial(export, run_files=False, jobs=1)))
                for jobs in args.jobs:
                    label = f"studyq {kind}, --no-run-files, jobs={jobs}"
                    configs.append(Config(label, partial(export, run_files=False, jobs=jobs)))
                if not args.no_run_files:
                    configs.append(
                        Config(f"studyq {kind}, with run files", partial(export, run_files=True))
                    )
                    for jobs in args.jobs:
                        label = f"studyq {kind}, with run files, jobs={jobs}"
                        configs.append(Config(label, partial(export, run_files=True, jobs=jobs)))
            base = None
            if not args.no_upstream:
                python = find_upstream_python(build=False)
                if python is None:
                    print("no upstream interpreter: upstream row skipped", file=sys.stderr)
                else:
                    seeds = write_study(  # upstream executes one replicate, copied to --runs
                        work / "upstream-seeds.yaml", "bench-export", replicates=1, agent="noop"
                    )
                    base = Config(
                        "upstream export_canonical_artifacts (in-memory results)",
                        lambda: measure_upstream(python, seeds, args.runs),
                    )
                    configs.insert(0, base)
            for round_ in range(1, args.repeats + 1):
                for config in configs:
                    print(f"  {config.label} ({round_}/{args.repeats}) ...", file=sys.stderr)
                    config.samples.append(config.measure())
    print("\n".join(_report(configs, base, args.runs)))
    ours = [config for config in configs if config is not base]
    worst_rss = max(statistics.median(s.rss_mb for s in config.samples) for config in ours)
    print(f"\nlargest median peak RSS of studyq's exports: {worst_rss:.0f} MB "
          f"(goal at 1,000,000 runs: < {RSS_GOAL_MB:.0f} MB)")  # fmt: skip
    return 0


def _checkout(commit: str, work: Path) -> Path:
    """``orchestrator/`` and ``workers/`` of ``commit``, extracted under ``work``."""
    tree = work / f"tree-{commit[:12]}"
    tree.mkdir()
    archive = subprocess.run(
        ["git", "-C", str(REPO_ROOT), "archive", commit, "orchestrator", "workers"],
        capture_output=True,
        check=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(tree)], input=archive, check=True)
    return tree


@contextmanager
def contextmanager_stack(kinds: Sequence[str], work: Path) -> Iterator[dict[str, str]]:
    """The URL of each backend in ``kinds``, all alive until the block ends."""
    from contextlib import ExitStack

    with ExitStack() as stack:
        yield {kind: stack.enter_context(backend(kind, work)) for kind in kinds}


if __name__ == "__main__":
    sys.exit(main())
