"""``studyq validate``, ``studyq plan`` and ``studyq schema``: look at a study before running it."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Iterable, Iterator
from itertools import islice
from typing import IO, Any

from orchestrator.cli import EXIT_OK, add_command, positive_int
from orchestrator.contracts.canonical import to_jsonable
from orchestrator.contracts.errors import StudyValidationError
from orchestrator.contracts.runspec import RunSpec
from orchestrator.contracts.settings import load_settings
from orchestrator.study.model import Study
from orchestrator.study.plan import DISPATCH_ORDERS, PlanRow, PreparedStudy, iter_plan_rows, prepare

__all__ = ["check_bindings", "register"]


def register(subparsers: Any) -> None:
    parser = add_command(
        subparsers,
        "validate",
        help="Check a study file and report every problem at once (exit 2 on any), "
        "including every agent, problem and runner it names that does not resolve here "
        "(found without running them; --import imports them as a run does).",
        example="studyq validate study.yaml",
        handler=_validate,
    )
    parser.add_argument("study", help="study file (.yaml, .yml or .json)")
    resolving = parser.add_mutually_exclusive_group()
    resolving.add_argument(
        "--import",
        dest="import_code",
        action="store_true",
        help="also import the study's modules and build its agents, problems and runner, as a "
        "run does (their module-level code runs); by default each reference is checked "
        "without running it: its module is found and defines the name",
    )
    resolving.add_argument(
        "--no-resolve",
        dest="resolve",
        action="store_false",
        help="check the file only, without looking for the study's agents, problems and runner "
        "(for a coordinator that only submits to workers that have other code installed)",
    )

    parser = add_command(
        subparsers,
        "plan",
        help="Show the runs a study plans: ids, seeds and assignments, or a summary table.",
        example="studyq plan study.yaml --format jsonl --limit 5",
        handler=_plan,
    )
    parser.add_argument("study", help="study file (.yaml, .yml or .json)")
    parser.add_argument(
        "--format",
        choices=("table", "jsonl", "csv"),
        default="table",
        help="table: human summary (default); jsonl / csv: one record per run",
    )
    parser.add_argument(
        "--limit", type=positive_int, default=None, help="show at most N runs (or conditions)"
    )
    parser.add_argument(
        "--order",
        choices=DISPATCH_ORDERS,
        default=None,
        help="run order: plan (design order, the default) or balanced (replicate by "
        "replicate, shuffled inside each); defaults to the study's execution.order",
    )
    parser.add_argument(
        "--forecast",
        action="store_true",
        help="estimate the study's cost and duration (median, 90th percentile) from earlier "
        "successful runs of the same agents and problems in --db. Example: studyq plan "
        "study.yaml --forecast --db postgresql://studyq@db/studyq --slots 32",
    )
    parser.add_argument("--db", default=None, help="--forecast: result store URL")
    parser.add_argument(
        "--slots",
        type=positive_int,
        default=1,
        help="--forecast: worker slots running at once, for the duration (default: 1)",
    )

    add_command(
        subparsers,
        "schema",
        help="Print the JSON Schema of study files, for editor completion.",
        example="studyq schema > study.schema.json",
        handler=_schema,
    )


def _validate(args: argparse.Namespace) -> int:
    prepared = prepare(args.study)
    if args.resolve:
        check_bindings(prepared, import_code=args.import_code)
    study, summary = prepared.study, prepared.summary
    print(f"{args.study}: valid")
    print(f"  study      {study.study_id} - {study.title}")
    print(
        f"  design     {study.design_spec.kind.value}: {summary.conditions} conditions, "
        f"{summary.admissible} admissible"
    )
    print(f"  runs       {summary.planned:,}{_cut_note(prepared)}")
    from orchestrator.study.bindings_check import study_folder_notes

    for note in study_folder_notes(prepared):
        print(f"  note       {note}")
    return EXIT_OK


def check_bindings(prepared: PreparedStudy, *, import_code: bool = True) -> None:
    """Refuse a study whose agents, problems or runner do not resolve on this machine
    (``import_code``: by importing them, as a run does; else without running their code).

    Raises:
        StudyValidationError: one problem per id that does not resolve, with its fix.
    """
    from orchestrator.study.bindings_check import binding_problems

    problems = binding_problems(
        prepared, allowed_imports=load_settings().allowed_imports, import_code=import_code
    )
    if problems:
        raise StudyValidationError(problems, prepared.source)


def _cut_note(prepared: PreparedStudy) -> str:
    summary = prepared.summary
    if not summary.cut:
        return ""
    return (
        f" (run_budget.max_runs {prepared.study.run_budget.max_runs} cut "
        f"{summary.cut:,} of {summary.total_before_cut:,})"
    )


def _plan(args: argparse.Namespace) -> int:
    if args.forecast:  # orchestrator/budget.py
        from orchestrator.budget import forecast
        from orchestrator.cli.llm_commands import print_forecast

        print_forecast(forecast(args.study, db=args.db), slots=args.slots)
        return EXIT_OK
    prepared = prepare(args.study, runnable=False)
    order = args.order or prepared.study.execution.order
    out = sys.stdout
    if args.format == "table":
        _print_table(prepared, out, limit=args.limit or 20)
        return EXIT_OK
    rows = iter_plan_rows(
        prepared.study, prepared.conditions, order=order, standalone=prepared.standalone
    )
    limited = _take(rows, args.limit)
    if args.format == "jsonl":
        _write_jsonl(limited, out)
    else:
        study_id = prepared.study.study_id
        _write_csv(prepared.study, (row.spec(study_id) for row in limited), out)
    return EXIT_OK


def _take(rows: Iterable[PlanRow], limit: int | None) -> Iterator[PlanRow]:
    return iter(rows) if limit is None else islice(rows, limit)


def _write_jsonl(rows: Iterable[PlanRow], out: IO[str]) -> None:
    """One JSON object per run. Everything but the ids is the same for every run of a cell,
    so it is serialized once per cell; a line is then one f-string."""
    dumps = json.JSONEncoder(ensure_ascii=False).encode
    fragments: dict[int, tuple[str, list[str], list[str], str]] = {}
    buffer: list[str] = []
    for row in rows:
        cell = row.cell
        cached = fragments.get(id(cell))
        if cached is None:
            condition = cell.condition
            cached = fragments[id(cell)] = (
                dumps(condition.condition_id),
                [dumps(to_jsonable(agent)) for agent in cell.agents],
                [dumps(to_jsonable(problem)) for problem in cell.problems],
                f'"factor_assignments": {dumps(to_jsonable(condition.factor_assignments))}, '
                f'"block_assignments": {dumps(to_jsonable(condition.block_assignments))}}}',
            )
        condition_json, agents, problems, tail = cached
        buffer.append(
            f'{{"index": {row.plan_index}, "run_id": "{row.run_id}", '
            f'"condition_id": {condition_json}, '
            f'"replicate": {row.replicate}, "seed": {row.seed}, '
            f'"agent_id": {agents[row.agent_index]}, "problem_id": {problems[row.problem_index]}, '
            f"{tail}"
        )
        if len(buffer) >= 4096:
            out.write("\n".join(buffer) + "\n")
            buffer.clear()
    if buffer:
        out.write("\n".join(buffer) + "\n")


def _write_csv(study: Study, specs: Iterable[RunSpec], out: IO[str]) -> None:
    factor_names = [factor.name for factor in study.factors]
    block_names = [block.name for block in study.blocks]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(
        ["index", "run_id", "condition_id", "replicate", "seed", "agent_id", "problem_id"]
        + factor_names
        + [f"block_{name}" for name in block_names]
    )
    for spec in specs:
        writer.writerow(
            [
                spec.index,
                spec.run_id,
                spec.condition_id,
                spec.replicate,
                spec.seed,
                "" if spec.agent_id is None else spec.agent_id,
                "" if spec.problem_id is None else spec.problem_id,
            ]
            + [spec.factor_assignments.get(name, "") for name in factor_names]
            + [spec.block_assignments.get(name, "") for name in block_names]
        )


def _print_table(prepared: PreparedStudy, out: IO[str], *, limit: int) -> None:
    study, summary = prepared.study, prepared.summary
    write = out.write
    write(f"study    {study.study_id} - {study.title}\n")
    write(
        f"design   {study.design_spec.kind.value}: {summary.conditions} conditions, "
        f"{summary.admissible} admissible, {summary.replicates} replicate(s) each\n"
    )
    write(f"runs     {summary.planned:,}\n")
    if study.run_budget.max_runs is None:
        write("max_runs not set\n")
    elif summary.cut:
        write(
            f"max_runs {study.run_budget.max_runs:,}: cut {summary.cut:,} of "
            f"{summary.total_before_cut:,} runs; the first {summary.planned:,} in plan order "
            "(condition, replicate, agent, problem) are kept, so later conditions and "
            "replicates are dropped entirely\n"
        )
    else:
        write(f"max_runs {study.run_budget.max_runs:,}: nothing cut\n")
    for title, counts in (("agent", summary.by_agent), ("problem", summary.by_problem)):
        write(f"\nruns per {title}\n")
        for name, count in counts.most_common():
            write(f"  {name or '(none: condition runner)':<40} {count:>10,}\n")
    write("\nruns per condition\n")
    for shown, (condition_id, count) in enumerate(summary.by_condition.items()):
        if shown >= limit:
            write(f"  ... {len(summary.by_condition) - limit:,} more (use --limit)\n")
            break
        label = summary.labels.get(condition_id, "")
        write(f"  {condition_id}  {count:>8,}  {label}\n")
    write(f"\ntotal    {summary.planned:,} runs\n")


def _schema(args: argparse.Namespace) -> int:
    schema = Study.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "studyq / design-research-experiments study file"
    json.dump(schema, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return EXIT_OK
