"""Golden tests: studyq plans every corpus study exactly as design-research-experiments 0.4.0.

The corpus (``tests/compat/studies/``) was planned once by the upstream package with
``tests/compat/upstream_plan.py`` and the records committed under ``tests/golden/``, so these
tests need neither Python 3.12 nor the upstream package. For every study they require the same
conditions in the same order (ids, assignments, admissibility, constraint messages), the same
run specs in the same order (run id, condition, replicate, seed, agent, problem), and the same
rejections. ``tests/test_compat_upstream.py`` re-checks the golden files against a live upstream.

Regenerate after changing the corpus (needs the upstream venv; matrices are CWD-relative)::

    cd tests/compat/studies
    <py312 venv>/bin/python ../upstream_plan.py --golden-dir ../../golden $(ls -p | grep -v /)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from compat.harness import (
    CORPUS_DIR,
    GOLDEN_DIR,
    corpus_studies,
    golden_path,
    metadata_mismatch,
    plan_mismatch,
    read_records,
    studyq_records,
)

from orchestrator.contracts.canonical import canonical_json, sha256_hex

STUDIES = corpus_studies()

# Every design kind must stay covered by a study that upstream accepts (aliases resolved the
# way upstream resolves them: stripped, lower-cased, then mapped).
_KIND_ALIASES = {
    "full": "full_factorial",
    "lhs": "latin_hypercube",
    "frac2": "fractional_factorial_2level",
}
_ALL_KINDS = {
    "full_factorial",
    "constrained_factorial",
    "randomized_block",
    "repeated_measures",
    "latin_square",
    "custom_matrix",
    "latin_hypercube",
    "fractional_factorial_2level",
}


def _golden(study: Path) -> list[dict[str, Any]]:
    return read_records(golden_path(study).read_text(encoding="utf-8"))


def _studyq(study: Path, monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    # Upstream reads custom-matrix paths relative to the process CWD; the golden run used the
    # corpus folder as CWD, so studyq must be given the same one.
    monkeypatch.chdir(CORPUS_DIR)
    return studyq_records(study)


@pytest.mark.parametrize("study", STUDIES, ids=lambda path: path.name)
def test_plan_matches_golden(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Given a corpus study, studyq's conditions, runs and rejection equal upstream's."""
    problem = plan_mismatch(study.name, _golden(study), _studyq(study, monkeypatch))

    assert problem is None, problem


@pytest.mark.parametrize("study", STUDIES, ids=lambda path: path.name)
def test_condition_metadata_matches_golden(study: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Condition metadata (fingerprint, comparison axes, row metadata) equals upstream's.

    It is not hashed, but it is exported as ``assignment_meta_json`` in conditions.csv.
    """
    problem = metadata_mismatch(study.name, _golden(study), _studyq(study, monkeypatch))

    assert problem is None, problem


def test_corpus_and_golden_files_correspond() -> None:
    """Every study has a golden file and every golden file a study, so none is silently idle."""
    golden_names = {path.name for path in GOLDEN_DIR.glob("*.jsonl")}
    study_names = {golden_path(study).name for study in STUDIES}

    assert study_names == golden_names


@pytest.mark.parametrize("study", STUDIES, ids=lambda path: path.name)
def test_golden_file_is_well_formed(study: Path) -> None:
    """A golden file is one rejection, or conditions, then runs, then the planned counts."""
    records = _golden(study)
    kinds = [record["kind"] for record in records]

    assert {record["study"] for record in records} == {study.name}
    if kinds == ["rejected"]:
        return
    conditions, runs = kinds.count("condition"), kinds.count("run")
    assert kinds == ["condition"] * conditions + ["run"] * runs + ["planned"]
    assert records[-1]["conditions"] == conditions
    assert records[-1]["runs"] == runs


def test_corpus_covers_the_compatibility_surface() -> None:
    """The corpus stays big and varied enough to mean something (an empty corpus must fail)."""
    records = [record for study in STUDIES for record in _golden(study)]
    rejected = [record for record in records if record["kind"] == "rejected"]
    planned = {record["study"] for record in records if record["kind"] != "rejected"}
    runs = [record for record in records if record["kind"] == "run"]

    assert len(planned) >= 30
    assert len(rejected) >= 10
    assert len({record["error"] for record in rejected}) >= 10, "rejections need varied reasons"
    assert len(runs) >= 300
    assert any(not record["admissible"] for record in records if record["kind"] == "condition")
    assert {study.suffix for study in STUDIES} >= {".yaml", ".yml", ".json"}

    kinds = set()
    for study in STUDIES:
        if study.name not in planned:
            continue
        payload = yaml.safe_load(study.read_text(encoding="utf-8")) or {}
        raw = str((payload.get("design_spec") or {}).get("kind", "full_factorial"))
        kind = raw.strip().lower()
        kinds.add(_KIND_ALIASES.get(kind, kind))
    assert kinds >= _ALL_KINDS


# --- The worked example of UPSTREAM.md 5.1 and 6.3, checked by hand -------------------------

_EXAMPLE_STUDY = CORPUS_DIR / "ff_3factor.yaml"
_EXAMPLE_CONDITION = "cond-d3c8e8a79055"
_EXAMPLE_RUN = "run-6a65a0bce80f"
_EXAMPLE_SEED = 750557790


def test_worked_example_hashes_by_hand() -> None:
    """The published payload texts hash to the published ids and seed, step by step."""
    condition_text = (
        '{"blocks":{},"factors":{"max_steps":4,"prompt_style":"neutral","temperature":0.2}}'
    )
    run_text = (
        '{"agent_id":"default-agent","condition_id":"cond-d3c8e8a79055",'
        '"problem_id":"beam-design","replicate":1,"study_id":"ff-3factor"}'
    )
    seed_text = (
        '{"base_seed":7,"condition_id":"cond-d3c8e8a79055","per_run_offset":9973,'
        '"replicate":1,"salt":"default-agent:beam-design","strategy":"condition_replicate",'
        '"study_id":"ff-3factor"}'
    )

    factors = {"temperature": 0.2, "prompt_style": "neutral", "max_steps": 4}
    assert canonical_json({"factors": factors, "blocks": {}}) == condition_text
    assert "cond-" + sha256_hex(condition_text)[:12] == _EXAMPLE_CONDITION
    assert "run-" + sha256_hex(run_text)[:12] == _EXAMPLE_RUN
    prefix = sha256_hex(seed_text)[:16]
    assert prefix == "f9bf4f1b393dfc24"
    assert int(prefix, 16) == 17996189614338866212
    assert int(prefix, 16) % (2**31 - 1) == _EXAMPLE_SEED


def test_worked_example_golden_and_studyq(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first condition and run of the example study carry the published ids and seed."""
    for records in (_golden(_EXAMPLE_STUDY), _studyq(_EXAMPLE_STUDY, monkeypatch)):
        conditions = [record for record in records if record["kind"] == "condition"]
        runs = [record for record in records if record["kind"] == "run"]
        assert len(conditions) == 8
        assert len(runs) == 8
        assert conditions[0]["condition_id"] == _EXAMPLE_CONDITION
        assert conditions[0]["factor_assignments"] == {
            "prompt_style": "neutral",
            "temperature": 0.2,
            "max_steps": 4,
        }
        assert runs[0] == {
            "kind": "run",
            "study": _EXAMPLE_STUDY.name,
            "run_id": _EXAMPLE_RUN,
            "condition_id": _EXAMPLE_CONDITION,
            "replicate": 1,
            "seed": _EXAMPLE_SEED,
            "agent_id": "default-agent",
            "problem_id": "beam-design",
        }
