"""Print design-research-experiments 0.4.0's plan for study files, one JSON record a line.

This script is the "upstream" half of the compatibility harness. It runs under the Python 3.12
venv that has ``design-research-experiments==0.4.0`` installed (never under studyq's venv) and
uses only the package's own functions, so what it prints is what the package itself would plan:

* ``load_study`` + ``validate_study`` + ``build_design`` for the conditions, and
* ``runners._build_run_specs`` (bound mode, the one ``run_study`` uses with agents and
  problems) for the run specs, in the package's order, truncated by ``max_runs``.

Usage (custom-matrix paths are relative to the working directory, as upstream reads them)::

    cd tests/compat/studies
    /path/to/py312/bin/python ../upstream_plan.py ff_3factor.yaml lhs_bounds.yaml ...
    /path/to/py312/bin/python ../upstream_plan.py --golden-dir ../../golden *.yaml *.yml *.json

Records (every line is the package's canonical JSON of the record, so value types survive: an
int problem id stays an int, ``1.0`` stays a float, dates are already strings):

* ``{"kind": "condition", "study", "condition_id", "admissible", "constraint_messages",
  "factor_assignments", "block_assignments", "metadata"}`` for every condition, admissible or
  not, in design order; then
* ``{"kind": "run", "study", "run_id", "condition_id", "replicate", "seed", "agent_id",
  "problem_id"}`` for every run spec, in plan order; then
* ``{"kind": "planned", "study", "conditions", "runs"}`` (the counts; it also marks a study
  planned with no conditions at all, e.g. an empty custom matrix); or only
* ``{"kind": "rejected", "study", "error": "<ExceptionType>: <message>"}`` when loading,
  ``validate_study`` (its messages joined with a newline) or design building fails.

``study`` is the file name of the study (``Path.name``). With ``--golden-dir DIR`` the records
of each study are written to ``DIR/<file name>.jsonl`` instead of standard output.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from design_research_experiments.designs import build_design
from design_research_experiments.runners import _build_run_specs
from design_research_experiments.schemas import ValidationError, stable_json_dumps
from design_research_experiments.study import load_study, validate_study


def plan_records(path: Path) -> list[dict[str, Any]]:
    """Return the records for one study file, or a single ``rejected`` record."""
    name = path.name
    try:
        study = load_study(path)
        errors = validate_study(study)
        if errors:
            raise ValidationError("\n".join(errors))
        conditions = build_design(study)
        run_specs = _build_run_specs(study=study, conditions=conditions)
    except Exception as exc:  # every failure is a rejection; its type is part of the record
        return [{"kind": "rejected", "study": name, "error": f"{type(exc).__name__}: {exc}"}]

    records: list[dict[str, Any]] = [
        {
            "kind": "condition",
            "study": name,
            "condition_id": condition.condition_id,
            "admissible": condition.admissible,
            "constraint_messages": list(condition.constraint_messages),
            "factor_assignments": condition.factor_assignments,
            "block_assignments": condition.block_assignments,
            "metadata": condition.metadata,
        }
        for condition in conditions
    ]
    records.extend(
        {
            "kind": "run",
            "study": name,
            "run_id": spec.run_id,
            "condition_id": spec.condition_id,
            "replicate": spec.replicate,
            "seed": spec.seed,
            "agent_id": spec.agent_spec_ref,
            "problem_id": spec.problem_spec_ref,
        }
        for spec in run_specs
    )
    records.append(
        {"kind": "planned", "study": name, "conditions": len(conditions), "runs": len(run_specs)}
    )
    return records


def render(records: list[dict[str, Any]]) -> str:
    """Canonical JSON lines (upstream ``stable_json_dumps``), newline-terminated."""
    return "".join(stable_json_dumps(record) + "\n" for record in records)


def main(argv: list[str] | None = None) -> int:
    """Plan every study named on the command line; exit 0 even when studies are rejected."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("studies", nargs="+", type=Path, help="study files (.yaml/.yml/.json)")
    parser.add_argument(
        "--golden-dir",
        type=Path,
        default=None,
        help="write <dir>/<study file name>.jsonl per study instead of printing",
    )
    args = parser.parse_args(argv)

    for path in args.studies:
        text = render(plan_records(path))
        if args.golden_dir is None:
            sys.stdout.write(text)
        else:
            args.golden_dir.mkdir(parents=True, exist_ok=True)
            (args.golden_dir / f"{path.name}.jsonl").write_text(
                text, encoding="utf-8", newline="\n"
            )
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
