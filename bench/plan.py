"""Benchmark: how fast studyq plans, against design-research-experiments 0.4.0 in the same run.

Run from the repository root::

    .venv/bin/python bench/plan.py               # 3 repeats of everything
    .venv/bin/python bench/plan.py --repeats 1   # quicker, noisier

What it measures (the machine is shared and noisy, so the upstream baseline is measured in
the same run, and each figure is the median of ``--repeats``):

1. ``studyq plan STUDY --format jsonl > /dev/null`` on a 1,000,000-run study, in a child
   process: wall time (interpreter start-up, imports and design included), run specs per
   second, and the child's peak RSS (``os.wait4``).
2. studyq's planner in-process without output: ``iter_run_specs`` over the same million,
   after the study is loaded and its design built.
3. The upstream planner (``build_design`` + ``runners._build_run_specs``, the code
   ``run_study`` plans with) on a 100,000-run study, in a child process of a Python 3.12 venv
   with ``design-research-experiments==0.4.0``; only planning is timed (imports and
   ``load_study`` excluded), peak RSS is the child's.

Both studies are the same shape: a 5 x 4 x 5 full factorial (100 conditions) x 10 agents x 20
problems, with 50 replicates (studyq) or 5 (upstream, which holds every spec in a list).

Goals (from the issue): studyq's rate at least the upstream's, and peak RSS under 200 MB for the
million. ``--check`` exits 1 when a goal is missed.

The upstream interpreter is, in order: ``$STUDYQ_UPSTREAM_PYTHON``,
``<repo>/.cache/upstream-venv`` (the venv ``tests/test_compat_upstream.py`` builds),
``/tmp/dre/bin/python``; if none has the package, a venv is built in ``.cache/upstream-venv``
from a Python 3.12 (``$STUDYQ_PY312``, ``python3.12`` on PATH, pyenv) unless ``--no-build``;
if that fails too, the upstream rows print ``upstream: not installed``.
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
from pathlib import Path

from _upstream import clean_env, find_upstream_python

REPO_ROOT = Path(__file__).resolve().parents[1]
RSS_GOAL_MB = 200.0

STUDYQ_RUNS = 1_000_000
UPSTREAM_RUNS = 100_000

_STUDY = """\
study_id: {study_id}
title: Planning benchmark
description: 5 prompt styles x 4 temperatures x 5 step budgets, 10 agents, 20 problems.
factors:
  - name: prompt_style
    levels:
      - {{name: neutral, value: neutral}}
      - {{name: persuasive, value: persuasive}}
      - {{name: terse, value: terse}}
      - {{name: socratic, value: socratic}}
      - {{name: stepwise, value: stepwise}}
  - name: temperature
    levels:
      - {{name: t00, value: 0.0}}
      - {{name: t03, value: 0.3}}
      - {{name: t07, value: 0.7}}
      - {{name: t10, value: 1.0}}
  - name: max_steps
    levels:
      - {{name: s4, value: 4}}
      - {{name: s8, value: 8}}
      - {{name: s16, value: 16}}
      - {{name: s32, value: 32}}
      - {{name: s64, value: 64}}
agent_specs: [{agents}]
problem_ids: [{problems}]
run_budget:
  replicates: {replicates}
seed_policy:
  base_seed: 20261129
"""

# Runs in the upstream venv; prints {"runs": N, "seconds": S} for planning only.
_UPSTREAM_CHILD = """\
import json, sys, time
from design_research_experiments.designs import build_design
from design_research_experiments.runners import _build_run_specs
from design_research_experiments.study import load_study

study = load_study(sys.argv[1])
started = time.perf_counter()
conditions = build_design(study)
specs = _build_run_specs(study=study, conditions=conditions)
elapsed = time.perf_counter() - started
print(json.dumps({"runs": len(specs), "seconds": elapsed}))
"""


def write_study(path: Path, study_id: str, replicates: int) -> Path:
    """A 100-condition x 10-agent x 20-problem study with ``replicates`` replicates."""
    agents = ", ".join(f"agent-{index}" for index in range(10))
    problems = ", ".join(f"problem-{index:02d}" for index in range(20))
    path.write_text(
        _STUDY.format(study_id=study_id, agents=agents, problems=problems, replicates=replicates),
        encoding="utf-8",
    )
    return path


@dataclass
class Sample:
    seconds: float
    runs: int
    rss_mb: float | None = None

    @property
    def rate(self) -> float:
        return self.runs / self.seconds


@dataclass
class Row:
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


def _wait(
    command: Sequence[str], *, env: dict[str, str] | None = None, keep_stdout: bool = True
) -> tuple[float, str, float]:
    """Run a child; return (wall seconds, stdout, peak RSS in MB of that child alone).

    ``os.wait4`` gives the child's own ``ru_maxrss`` (``RUSAGE_CHILDREN`` would be the
    maximum over every child so far). With ``keep_stdout=False`` stdout goes to /dev/null.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.perf_counter()
        process = subprocess.Popen(
            list(command),
            stdout=out if keep_stdout else subprocess.DEVNULL,
            stderr=err,
            env=env,
            cwd=REPO_ROOT,
        )
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - started
        process.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if process.returncode != 0:
            raise RuntimeError(
                f"{' '.join(command)} exited {process.returncode}:\n{err.read().decode()}"
            )
        return wall, out.read().decode(), usage.ru_maxrss / 1024  # Linux: kilobytes


def _studyq_command() -> list[str]:
    script = Path(sys.executable).parent / "studyq"
    return [str(script)] if script.exists() else [sys.executable, "-m", "orchestrator.cli"]


def bench_studyq_cli(study: Path) -> Sample:
    """``studyq plan STUDY --format jsonl > /dev/null`` in a child process."""
    command = [*_studyq_command(), "plan", str(study), "--format", "jsonl"]
    wall, _, rss = _wait(command, keep_stdout=False)
    return Sample(wall, STUDYQ_RUNS, rss)


def bench_studyq_inprocess(study: Path) -> Sample:
    """Iterate every run spec in this process, after loading and building the design."""
    from orchestrator.study.designs import build_conditions
    from orchestrator.study.model import load_study
    from orchestrator.study.plan import iter_run_specs

    loaded = load_study(study)
    conditions = build_conditions(loaded)
    count = 0
    started = time.perf_counter()
    for _ in iter_run_specs(loaded, conditions):
        count += 1
    return Sample(time.perf_counter() - started, count)


def bench_upstream(python: str, study: Path) -> Sample:
    _, stdout, rss = _wait([python, "-c", _UPSTREAM_CHILD, str(study)], env=clean_env())
    result = json.loads(stdout.strip().splitlines()[-1])
    if result["runs"] != UPSTREAM_RUNS:
        raise RuntimeError(f"upstream planned {result['runs']} runs, expected {UPSTREAM_RUNS}")
    return Sample(float(result["seconds"]), int(result["runs"]), rss)


def _repeat(what: str, repeats: int, measure: Callable[[], Sample]) -> Row:
    samples = []
    for attempt in range(1, repeats + 1):
        print(f"  {what} ({attempt}/{repeats}) ...", file=sys.stderr, flush=True)
        samples.append(measure())
    return Row(what, samples)


def _print_table(rows: Sequence[Row], upstream: Row | None) -> None:
    """A Markdown table: median [min-max] over the repeats."""
    print("| what | runs | seconds | runs/s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|")
    for row in rows:
        rss = row.spread(lambda s: s.rss_mb or 0.0, ".0f") if row.samples[0].rss_mb else "-"
        print(
            f"| {row.what} | {row.samples[0].runs:,} | {row.spread(lambda s: s.seconds, '.2f')} "
            f"| {row.spread(lambda s: s.rate, ',.0f')} | {rss} |"
        )
    if upstream is None:
        print("| upstream: not installed | - | - | - | - |")
        return
    print()
    base = upstream.median(lambda s: s.rate)
    for row in rows:
        if row is not upstream:
            ratio = row.median(lambda s: s.rate) / base
            print(f"ratio studyq/upstream (runs/s), {row.what}: {ratio:.2f}x")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--repeats", type=int, default=3, help="measurements per row (median)")
    parser.add_argument(
        "--no-build", action="store_true", help="never build the upstream venv (no network)"
    )
    parser.add_argument("--check", action="store_true", help="exit 1 if a goal is missed")
    args = parser.parse_args(argv)

    from orchestrator.study.plan import prepare

    with tempfile.TemporaryDirectory(prefix="studyq-bench-") as folder:
        million = write_study(Path(folder) / "million.yaml", "bench-million", replicates=50)
        hundred_k = write_study(Path(folder) / "hundred-k.yaml", "bench-upstream", replicates=5)
        planned = prepare(million, runnable=False).summary.planned
        if planned != STUDYQ_RUNS:
            raise SystemExit(f"the benchmark study plans {planned:,} runs, not {STUDYQ_RUNS:,}")

        upstream_python = find_upstream_python(build=not args.no_build)
        print(
            f"python {sys.version.split()[0]}; upstream: {upstream_python or 'not installed'}",
            file=sys.stderr,
        )
        rows = [
            _repeat(
                "studyq plan --format jsonl > /dev/null (child, incl. start-up)",
                args.repeats,
                lambda: bench_studyq_cli(million),
            ),
            _repeat(
                "studyq iter_run_specs in-process, no output",
                args.repeats,
                lambda: bench_studyq_inprocess(million),
            ),
        ]
        upstream = None
        if upstream_python is not None:
            python = upstream_python
            upstream = _repeat(
                "upstream build_design + _build_run_specs (child, planning only)",
                args.repeats,
                lambda: bench_upstream(python, hundred_k),
            )
            rows.append(upstream)

    print()
    _print_table(rows, upstream)

    cli = rows[0]
    rss = cli.median(lambda s: s.rss_mb or 0.0)
    goals = [(f"peak RSS of `studyq plan` on 1M runs < {RSS_GOAL_MB:.0f} MB", rss < RSS_GOAL_MB)]
    if upstream is not None:
        goals.append(
            (
                "`studyq plan --format jsonl` rate >= upstream planning rate",
                cli.median(lambda s: s.rate) >= upstream.median(lambda s: s.rate),
            )
        )
    print()
    for text, met in goals:
        print(f"goal: {text}: {'met' if met else 'MISSED'}")
    return 1 if args.check and not all(met for _, met in goals) else 0


if __name__ == "__main__":
    raise SystemExit(main())
