"""The studyq half of the compatibility harness, and how two plans are compared.

``upstream_plan.py`` prints design-research-experiments' plan of a study as JSON records; this
module builds the same records from studyq's planner so the two can be compared line by line.
It is shared by ``tests/test_golden.py`` (against committed upstream output) and
``tests/test_compat_upstream.py`` (against a live upstream run).

Records are compared as *canonical JSON text*, never as Python objects: ``1 == 1.0 == True``
and ``nan != nan`` in Python, but the three numbers hash differently and NaN hashes fine, so
only the serialized text tells whether studyq would compute the same ids.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from orchestrator.contracts.canonical import canonical_json, to_jsonable
from orchestrator.contracts.errors import StudyError
from orchestrator.study.designs import build_conditions
from orchestrator.study.model import load_study
from orchestrator.study.plan import iter_run_specs

__all__ = [
    "CORPUS_DIR",
    "DELIBERATE_REJECTIONS",
    "GOLDEN_DIR",
    "UPSTREAM_PLAN",
    "corpus_studies",
    "describe_mismatch",
    "golden_path",
    "group_by_study",
    "metadata_mismatch",
    "metadata_view",
    "plan_mismatch",
    "plan_view",
    "read_records",
    "studyq_records",
]

CORPUS_DIR = Path(__file__).resolve().parent / "studies"
GOLDEN_DIR = Path(__file__).resolve().parents[1] / "golden"
UPSTREAM_PLAN = Path(__file__).resolve().parent / "upstream_plan.py"

# Study files that upstream plans but studyq rejects on purpose, file name -> why. Keep it
# empty unless the lead decides a divergence is worth it: every entry is a study file that
# works with upstream and not with studyq. The tests assert the divergence still holds.
DELIBERATE_REJECTIONS: dict[str, str] = {
    "problem_ids_scalar_string.yaml": (
        "upstream splits a bare string into one problem per character ('beam' -> b, e, a, m); "
        "studyq refuses it and says to write a list (docs/studies.md, 'Stricter than upstream')"
    ),
    "run_replicates_bool.yaml": (
        "upstream takes `replicates: yes` (a YAML boolean) as 1 replicate; studyq requires "
        "an integer and says so"
    ),
}

# Fields that decide ids, order and admissibility. ``metadata`` is compared separately
# (metadata_view) so a metadata-only difference is reported as such.
_CONDITION_FIELDS = (
    "kind",
    "study",
    "condition_id",
    "admissible",
    "constraint_messages",
    "factor_assignments",
    "block_assignments",
)
_RUN_FIELDS = (
    "kind",
    "study",
    "run_id",
    "condition_id",
    "replicate",
    "seed",
    "agent_id",
    "problem_id",
)


def corpus_studies() -> list[Path]:
    """Every study file of the corpus (top-level files only; matrices live in a subfolder)."""
    return sorted(path for path in CORPUS_DIR.iterdir() if path.is_file())


def golden_path(study: Path | str) -> Path:
    """Where the committed upstream records of a corpus study live."""
    name = study.name if isinstance(study, Path) else study
    return GOLDEN_DIR / f"{name}.jsonl"


def read_records(text: str) -> list[dict[str, Any]]:
    """Parse JSON lines; ``json.loads`` keeps int/float/bool apart and accepts ``NaN``."""
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def group_by_study(records: Iterable[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    """Split one stream of records into per-study lists, keeping their order."""
    grouped: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        grouped.setdefault(str(record["study"]), []).append(record)
    return grouped


def studyq_records(path: Path) -> list[dict[str, Any]]:
    """studyq's plan of one study in the record format of ``upstream_plan.py``.

    Any :class:`StudyError` is a rejection (its text need not match upstream's). Any other
    exception propagates: a bad study file must never surface as a raw traceback.
    """
    name = path.name
    try:
        study = load_study(path)
        conditions = build_conditions(study)
        run_specs = list(iter_run_specs(study, conditions))
    except StudyError as exc:
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
            "agent_id": to_jsonable(spec.agent_id),
            "problem_id": to_jsonable(spec.problem_id),
        }
        for spec in run_specs
    )
    records.append(
        {"kind": "planned", "study": name, "conditions": len(conditions), "runs": len(run_specs)}
    )
    # Same domain as records read back from upstream's JSON lines (dates -> str, tuples -> list).
    return [json.loads(canonical_json(record)) for record in records]


def plan_view(records: Sequence[dict[str, Any]]) -> list[str]:
    """Canonical text of what must match exactly: ids, order, assignments, admissibility.

    A rejection is reduced to ``kind`` and ``study``: both sides must reject, for any reason.
    """
    view: list[str] = []
    for record in records:
        kind = record["kind"]
        if kind == "condition":
            fields: Sequence[str] = _CONDITION_FIELDS
        elif kind == "run":
            fields = _RUN_FIELDS
        elif kind == "planned":
            fields = ("kind", "study", "conditions", "runs")
        elif kind == "rejected":
            fields = ("kind", "study")
        else:
            raise ValueError(f"unknown record kind {kind!r}")
        view.append(canonical_json({key: record[key] for key in fields}))
    return view


def metadata_view(records: Sequence[dict[str, Any]]) -> list[str]:
    """Canonical text of each condition's metadata (exported as ``assignment_meta_json``)."""
    return [
        canonical_json({"condition_id": record["condition_id"], "metadata": record["metadata"]})
        for record in records
        if record["kind"] == "condition"
    ]


def _counts(lines: Sequence[str]) -> str:
    kinds = Counter(json.loads(line).get("kind", "condition metadata") for line in lines)
    return ", ".join(f"{kind}={count}" for kind, count in kinds.items())


def describe_mismatch(label: str, expected: Sequence[str], actual: Sequence[str]) -> str:
    """A short failure message: record counts and the first differing line of each side."""
    first = next(
        (i for i, pair in enumerate(zip(expected, actual, strict=False)) if pair[0] != pair[1]),
        min(len(expected), len(actual)),
    )
    missing = "<no record>"
    return (
        f"{label}: studyq's plan differs from upstream's\n"
        f"  upstream: {len(expected)} records ({_counts(expected)})\n"
        f"  studyq:   {len(actual)} records ({_counts(actual)})\n"
        f"  first difference at record {first}:\n"
        f"    upstream: {expected[first] if first < len(expected) else missing}\n"
        f"    studyq:   {actual[first] if first < len(actual) else missing}"
    )


def _expected(name: str, upstream: Sequence[dict[str, Any]]) -> Sequence[dict[str, Any]]:
    """Upstream's records, or a rejection for a :data:`DELIBERATE_REJECTIONS` entry."""
    if name not in DELIBERATE_REJECTIONS:
        return upstream
    assert upstream, f"{name}: no upstream records"
    assert upstream[-1]["kind"] == "planned", f"{name}: upstream rejects it too; drop the entry"
    return [{"kind": "rejected", "study": name}]


def plan_mismatch(
    name: str, upstream: Sequence[dict[str, Any]], studyq: Sequence[dict[str, Any]]
) -> str | None:
    """Why studyq's plan of study ``name`` is not upstream's, or None when it is."""
    expected, actual = plan_view(_expected(name, upstream)), plan_view(studyq)
    if not expected:
        return f"{name}: no upstream records to compare with"
    return None if actual == expected else describe_mismatch(name, expected, actual)


def metadata_mismatch(
    name: str, upstream: Sequence[dict[str, Any]], studyq: Sequence[dict[str, Any]]
) -> str | None:
    """Why studyq's condition metadata differs from upstream's, or None when it is equal."""
    expected, actual = metadata_view(_expected(name, upstream)), metadata_view(studyq)
    if actual == expected:
        return None
    return describe_mismatch(f"{name} metadata", expected, actual)
