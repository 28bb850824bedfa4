"""``studyq validate``, ``plan`` and ``schema``, called in-process through ``main(argv)``.

Output is read with ``capsys``; exit codes are the return values (``--help`` and argparse
usage errors raise ``SystemExit``, as argparse does).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import shlex
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator.cli import EXIT_OK, EXIT_USAGE, build_parser, main
from orchestrator.study.model import load_study
from orchestrator.study.plan import iter_run_specs

STUDY = """\
study_id: cli-study
title: CLI study
factors:
  - name: prompt_style
    levels:
      - {name: neutral, value: neutral}
      - {name: terse, value: terse}
  - name: temperature
    levels:
      - {name: low, value: 0.2}
      - {name: high, value: 0.8}
blocks:
  - name: site
    levels: [lab-a]
agent_specs: [agent-a, agent-b]
problem_ids: [p1, p2, p3]
run_budget:
  replicates: 2
  max_runs: 30
seed_policy:
  base_seed: 5
"""
# 4 conditions x 2 replicates x 2 agents x 3 problems = 48 runs, cut to 30 by max_runs.

REQUIRED_KEYS = {
    "run_id",
    "condition_id",
    "replicate",
    "seed",
    "agent_id",
    "problem_id",
    "factor_assignments",
    "block_assignments",
}


@pytest.fixture
def study_file(tmp_path: Path) -> Path:
    path = tmp_path / "study.yaml"
    path.write_text(STUDY, encoding="utf-8")
    return path


def _jsonl(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


# --- validate --------------------------------------------------------------------------------


def test_validate_accepts_a_good_study(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given a valid study, then exit 0 with the run count and the max_runs cut."""
    rc = main(["validate", "--no-resolve", str(study_file)])  # its ids are placeholders

    out, err = capsys.readouterr()
    assert rc == EXIT_OK
    assert f"{study_file}: valid" in out
    assert "cli-study - CLI study" in out
    assert "30 (run_budget.max_runs 30 cut 18 of 48)" in out
    assert err == ""


def test_validate_reports_every_problem_and_exits_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given a study with three defects, then exit 2, one line per problem naming the file
    and the field, a count, nothing on stdout and no traceback."""
    path = tmp_path / "bad.yaml"
    path.write_text(
        STUDY.replace("replicates: 2", "replicates: 0")
        .replace("title: CLI study", "title: ' '")
        .replace("base_seed: 5", "base_sead: 5"),
        encoding="utf-8",
    )

    rc = main(["validate", str(path)])

    out, err = capsys.readouterr()
    assert rc == EXIT_USAGE
    assert out == ""
    lines = err.splitlines()
    assert lines[:3] == [
        f"{path}: title: Study.title must be non-empty. Fix: give `title` a non-blank value.",
        f"{path}: run_budget.replicates: RunBudget.replicates must be >= 1. Fix: set it to 1 "
        "or more.",
        f"{path}: seed_policy.base_sead: is not a known key here. Fix: remove it or fix its "
        "spelling.",
    ]
    assert lines[3] == "3 problems found; nothing was changed."
    assert "Traceback" not in err


@pytest.mark.parametrize("name", ["missing.yaml", "study.txt"])
def test_validate_unreadable_file_exits_2(
    tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given a missing file or a wrong suffix, then exit 2 with one message."""
    (tmp_path / "study.txt").write_text(STUDY, encoding="utf-8")

    rc = main(["validate", str(tmp_path / name)])

    assert rc == EXIT_USAGE
    assert str(tmp_path / name) in capsys.readouterr().err


def test_validate_refuses_a_study_with_nothing_to_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given no problem ids and no problem factor, then validate refuses (upstream's dry-run
    check) while plan still plans it, as upstream's planner does."""
    path = tmp_path / "no-problems.yaml"
    path.write_text(STUDY.replace("problem_ids: [p1, p2, p3]\n", ""), encoding="utf-8")

    assert main(["validate", str(path)]) == EXIT_USAGE
    assert "Study execution requires problem IDs" in capsys.readouterr().err
    assert main(["plan", str(path), "--format", "jsonl"]) == EXIT_OK
    records = _jsonl(capsys.readouterr().out)
    assert {record["problem_id"] for record in records} == {"default-problem"}


# --- plan ------------------------------------------------------------------------------------


def test_plan_table_explains_the_max_runs_cut(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given max_runs below the plan, then the table says how many runs are cut and which
    ones are kept, and counts runs per agent, problem and condition."""
    rc = main(["plan", str(study_file)])

    out = capsys.readouterr().out
    assert rc == EXIT_OK
    assert "runs     30" in out
    assert "max_runs 30: cut 18 of 48 runs; the first 30 in plan order" in out
    assert "runs per agent" in out and "runs per problem" in out
    assert "prompt_style=neutral, temperature=0.2, site=lab-a" in out
    assert out.rstrip().endswith("total    30 runs")


def test_plan_jsonl_has_the_run_spec_fields(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given ``--format jsonl``, then one JSON record per planned run, with the required keys
    and the planner's ids, seeds and assignments, in plan order."""
    rc = main(["plan", str(study_file), "--format", "jsonl"])

    records = _jsonl(capsys.readouterr().out)
    specs = list(iter_run_specs(load_study(study_file)))
    assert rc == EXIT_OK
    assert len(records) == len(specs) == 30
    assert all(set(record) >= REQUIRED_KEYS for record in records)
    assert [(r["run_id"], r["seed"], r["replicate"]) for r in records] == [
        (s.run_id, s.seed, s.replicate) for s in specs
    ]
    assert records[0]["factor_assignments"] == {"prompt_style": "neutral", "temperature": 0.2}
    assert records[0]["block_assignments"] == {"site": "lab-a"}
    assert (records[0]["agent_id"], records[0]["problem_id"]) == ("agent-a", "p1")


def test_plan_limit_shows_the_first_runs(
    study_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given ``--limit 5``, then exactly the first five records of the full output."""
    main(["plan", str(study_file), "--format", "jsonl"])
    full = capsys.readouterr().out.splitlines()

    rc = main(["plan", str(study_file), "--format", "jsonl", "--limit", "5"])

    assert rc == EXIT_OK
    assert capsys.readouterr().out.splitlines() == full[:5]


@pytest.mark.parametrize("limit", ["0", "-1", "x"])
def test_plan_refuses_a_bad_limit(
    study_file: Path, limit: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given a limit that is not a positive integer, then a usage error (exit 2) with help."""
    with pytest.raises(SystemExit) as caught:
        main(["plan", str(study_file), "--limit", limit])

    assert caught.value.code == EXIT_USAGE
    assert "--limit" in capsys.readouterr().err


def test_plan_csv_header_and_rows(study_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Given ``--format csv``, then a header with the id columns, one column per factor and
    ``block_<name>`` per block, then one row per run."""
    rc = main(["plan", str(study_file), "--format", "csv"])

    rows = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert rc == EXIT_OK
    assert rows[0] == [
        "index",
        "run_id",
        "condition_id",
        "replicate",
        "seed",
        "agent_id",
        "problem_id",
        "prompt_style",
        "temperature",
        "block_site",
    ]
    assert len(rows) == 1 + 30
    assert rows[1][0] == "0" and rows[1][5:] == ["agent-a", "p1", "neutral", "0.2", "lab-a"]


def test_plan_balanced_order(study_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Given ``--order balanced``, then the same runs with the same ids and seeds, replicate 1
    before replicate 2, in another order; a study's ``execution.order`` is the default."""
    main(["plan", str(study_file), "--format", "jsonl"])
    plan = _jsonl(capsys.readouterr().out)

    rc = main(["plan", str(study_file), "--format", "jsonl", "--order", "balanced"])
    balanced = _jsonl(capsys.readouterr().out)

    assert rc == EXIT_OK
    assert sorted(map(json.dumps, balanced)) == sorted(map(json.dumps, plan))
    assert [r["run_id"] for r in balanced] != [r["run_id"] for r in plan]
    replicates = [int(str(record["replicate"])) for record in balanced]
    assert replicates == sorted(replicates)

    study_file.write_text(STUDY + "execution:\n  order: balanced\n", encoding="utf-8")
    main(["plan", str(study_file), "--format", "jsonl"])
    assert _jsonl(capsys.readouterr().out) == balanced
    main(["plan", str(study_file), "--format", "jsonl", "--order", "plan"])
    assert _jsonl(capsys.readouterr().out) == plan


def test_plan_of_a_bad_study_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Given an invalid study, then plan prints nothing on stdout and exits 2."""
    path = tmp_path / "bad.yaml"
    path.write_text(STUDY + "design_spec: {kind: nope}\n", encoding="utf-8")

    rc = main(["plan", str(path), "--format", "jsonl"])

    out, err = capsys.readouterr()
    assert (rc, out) == (EXIT_USAGE, "")
    assert "design_spec.kind: Unsupported design kind: 'nope'." in err


# --- schema ----------------------------------------------------------------------------------


def test_schema_is_json_schema_of_study_files(capsys: pytest.CaptureFixture[str]) -> None:
    """Given ``studyq schema``, then a JSON Schema document describing study files."""
    rc = main(["schema"])

    schema = json.loads(capsys.readouterr().out)
    assert rc == EXIT_OK
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert "study_id" in schema["properties"]
    assert {"factors", "design_spec", "run_budget", "bindings", "execution"} <= set(
        schema["properties"]
    )


# --- help ------------------------------------------------------------------------------------


def _subcommands(
    parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
) -> Iterator[tuple[str, ...]]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                yield (*prefix, name)
                yield from _subcommands(child, (*prefix, name))


_COMMANDS = list(_subcommands(build_parser()))


def test_the_parser_has_the_study_commands() -> None:
    """The parameterized help test below covers at least the commands of this module."""
    assert {("validate",), ("plan",), ("schema",)} <= set(_COMMANDS)


@pytest.mark.parametrize("command", _COMMANDS, ids=" ".join)
def test_every_subcommand_help_has_an_example(
    command: tuple[str, ...], capsys: pytest.CaptureFixture[str]
) -> None:
    """Given ``studyq COMMAND --help`` for every registered subcommand (new ones included
    automatically), then the help ends with a runnable ``example:``."""
    with pytest.raises(SystemExit) as caught:
        main([*command, "--help"])

    out = capsys.readouterr().out
    assert caught.value.code == 0
    assert "example:" in out
    assert f"studyq {command[0]}" in out.split("example:", 1)[1]


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    """Given no subcommand, then the top-level help on stderr and exit 2."""
    assert main([]) == EXIT_USAGE
    assert "example:" in capsys.readouterr().err


# --- docs ------------------------------------------------------------------------------------

REPO_ROOT = Path(__file__).resolve().parents[1]
STUDIES_DOC = REPO_ROOT / "docs" / "studies.md"


def _console_sessions(text: str) -> list[tuple[list[str], list[str], int | None]]:
    """``(argv, expected output lines, expected exit code)`` per ``$ studyq ...`` command of
    the ``console`` blocks; a following ``$ echo $?`` gives the exit code."""
    sessions: list[tuple[list[str], list[str], int | None]] = []
    for block in text.split("```console\n")[1:]:
        lines = block.split("```", 1)[0].splitlines()
        index = 0
        while index < len(lines):
            command = lines[index].removeprefix("$ ")
            index += 1
            output = []
            while index < len(lines) and not lines[index].startswith("$ "):
                output.append(lines[index])
                index += 1
            if command == "echo $?":
                argv, expected, _ = sessions[-1]
                sessions[-1] = (argv, expected, int(output[0]))
            else:
                argv = shlex.split(command)
                assert argv[0] == "studyq", command
                sessions.append((argv[1:], output, None))
    return sessions


def test_docs_studies_examples_are_current(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Given the console examples of docs/studies.md, when each command is run from the
    repository root, then it prints exactly what the docs show (and exits as shown)."""
    sessions = _console_sessions(STUDIES_DOC.read_text(encoding="utf-8"))
    monkeypatch.chdir(REPO_ROOT)
    assert len(sessions) >= 6

    for argv, expected, expected_rc in sessions:
        rc = main(argv)
        out, err = capsys.readouterr()
        assert (out + err).splitlines() == expected, " ".join(argv)
        assert rc == (EXIT_OK if expected_rc is None else expected_rc), " ".join(argv)
