"""The study model reads files exactly as design-research-experiments 0.4.0 does.

Every coercion below decides which files load and what gets hashed (UPSTREAM.md section 3),
so each is pinned: names through ``str()``, ``bool()`` flags, design-kind aliases, option
fallbacks, strict run budgets, YAML 1.1 typing, the ``study.yaml`` field order, and the
definition hash. Expected values were read off the 0.4.0 package itself.
"""

from __future__ import annotations

import datetime
import json
import math
from pathlib import Path
from typing import Any

import pytest

from orchestrator.contracts.canonical import canonical_json
from orchestrator.contracts.errors import StudyValidationError
from orchestrator.study.design_spec import DesignKind
from orchestrator.study.model import Study, load_study, parse_study

BASE: dict[str, Any] = {"study_id": "model-test", "title": "Model test"}


def _parse(**fields: Any) -> Study:
    return parse_study({**BASE, **fields})


def _problems(**fields: Any) -> list[tuple[str, str]]:
    with pytest.raises(StudyValidationError) as caught:
        _parse(**fields)
    return [(problem.field, problem.message) for problem in caught.value.problems]


# --- names, flags and aliases ----------------------------------------------------------------


def test_names_go_through_str() -> None:
    """Given non-text names (YAML ints, floats, booleans), then they are Python ``str()``-ed
    as upstream does (``yes`` -> ``"True"``) and labels default to the name."""
    study = parse_study(
        {
            "study_id": 17,
            "title": 2024,
            "factors": [
                {"name": 12, "levels": [{"name": True, "value": 1}, {"name": 1.5, "value": 2}]}
            ],
            "blocks": [{"name": False, "levels": [1]}],
            "constraints": [{"constraint_id": 3, "expression": "True"}],
        }
    )

    assert (study.study_id, study.title) == ("17", "2024")
    factor = study.factors[0]
    assert factor.name == "12"
    assert [(level.name, level.label) for level in factor.levels] == [
        ("True", "True"),
        ("1.5", "1.5"),
    ]
    assert study.blocks[0].name == "False"
    assert study.constraints[0].constraint_id == "3"
    assert study.to_upstream_dict()["output_dir"] == "artifacts/17"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("false", True), ("no", True), ("", False), (0, False), (1, True), (None, False), ([], False)],
)
def test_design_flags_are_python_bool(raw: Any, expected: bool) -> None:
    """Given ``randomize: "false"`` (a quoted string), then it is true, as Python ``bool()``."""
    study = _parse(design_spec={"randomize": raw, "counterbalance": raw})

    assert study.design_spec.randomize is expected
    assert study.design_spec.counterbalance is expected


@pytest.mark.parametrize(
    ("raw", "kind"),
    [
        ("full", DesignKind.FULL_FACTORIAL),
        (" Full_Factorial ", DesignKind.FULL_FACTORIAL),
        ("LHS", DesignKind.LATIN_HYPERCUBE),
        (" lhs\n", DesignKind.LATIN_HYPERCUBE),
        ("FRAC2", DesignKind.FRACTIONAL_FACTORIAL_2LEVEL),
        ("latin_square", DesignKind.LATIN_SQUARE),
        ("Custom_Matrix", DesignKind.CUSTOM_MATRIX),
        ("repeated_measures", DesignKind.REPEATED_MEASURES),
    ],
)
def test_design_kind_aliases(raw: str, kind: DesignKind) -> None:
    """Given a kind in any case, padded, or as an alias, then the canonical kind is used and
    written back under its canonical name."""
    study = _parse(design_spec={"kind": raw})

    assert study.design_spec.kind is kind
    assert study.to_upstream_dict()["design_spec"]["kind"] == kind.value


@pytest.mark.parametrize("raw", ["nope", "fractional", None, "full factorial"])
def test_unknown_design_kind_is_refused_with_upstreams_message(raw: Any) -> None:
    """Given an unknown kind, then upstream's message with the raw text's repr."""
    assert _problems(design_spec={"kind": raw}) == [
        ("design_spec.kind", f"Unsupported design kind: {str(raw)!r}.")
    ]


def test_n_samples_center_points_and_block_key_fall_back_to_options() -> None:
    """Given only ``options.n_samples`` / ``center_points`` / ``block_randomization_key``, then
    they are used (``int()``-ed); top-level values win over options; options stay as written."""
    from_options = _parse(
        design_spec={
            "kind": "lhs",
            "options": {"n_samples": "3", "center_points": 2.9, "block_randomization_key": "k"},
        }
    ).design_spec
    top_level = _parse(
        design_spec={
            "n_samples": 5,
            "center_points": 1,
            "block_randomization_key": "top",
            "options": {"n_samples": 3, "center_points": 2, "block_randomization_key": "k"},
        }
    ).design_spec
    default = _parse().design_spec

    assert (from_options.n_samples, from_options.center_points) == (3, 2)
    assert from_options.block_randomization_key == "k"
    assert from_options.options == {
        "n_samples": "3",
        "center_points": 2.9,
        "block_randomization_key": "k",
    }
    assert (top_level.n_samples, top_level.center_points) == (5, 1)
    assert top_level.block_randomization_key == "top"
    assert (default.n_samples, default.center_points, default.block_randomization_key) == (
        None,
        0,
        None,
    )


def test_design_numbers_are_int_converted_and_checked() -> None:
    """Given ``replicates: "3"`` and ``n_samples: 2.7``, then ``int()`` as upstream (3, 2);
    values ``int()`` cannot read or below the minimum are refused with upstream's text."""
    spec = _parse(design_spec={"replicates": "3", "n_samples": 2.7}).design_spec

    assert (spec.replicates, spec.n_samples) == (3, 2)
    assert _problems(design_spec={"replicates": 0, "n_samples": 0, "center_points": -1}) == [
        ("design_spec.replicates", "DesignSpec.replicates must be >= 1."),
        ("design_spec.n_samples", "DesignSpec.n_samples must be >= 1 when provided."),
        ("design_spec.center_points", "DesignSpec.center_points must be >= 0."),
    ]
    assert [field for field, _ in _problems(design_spec={"replicates": "x"})] == [
        "design_spec.replicates"
    ]


# --- run budget and seed policy --------------------------------------------------------------


@pytest.mark.parametrize("value", ["2", 2.0, True, None, [2]])
def test_run_budget_replicates_must_be_a_plain_int(value: Any) -> None:
    """Given a non-int replicate count, then it is refused at ``run_budget.replicates``
    (upstream does no coercion and fails later, or plans with ``True`` as 1)."""
    fields = [field for field, _ in _problems(run_budget={"replicates": value})]

    assert fields == ["run_budget.replicates"]


def test_run_budget_and_seed_policy_refuse_unknown_keys_others_ignore_them() -> None:
    """Given misspelled keys, then run_budget and seed_policy refuse them (upstream's
    ``TypeError`` from keyword expansion); factors, design_spec and the top level ignore them
    (and an input ``schema_version`` never reaches the output)."""
    assert _problems(run_budget={"replicate": 2}, seed_policy={"seed": 1}) == [
        ("run_budget.replicate", "is not a known key here."),
        ("seed_policy.seed", "is not a known key here."),
    ]
    study = _parse(
        schema_version="9.9",
        whatever={"x": 1},
        factors=[{"name": "f", "levels": [{"name": "a", "value": 1, "color": "red"}], "x": 2}],
        design_spec={"kind": "full", "shuffle": True},
    )

    written = study.to_upstream_dict()
    assert written["schema_version"] == "0.2.0"
    assert "whatever" not in written
    assert "shuffle" not in written["design_spec"]
    assert "color" not in written["factors"][0]["levels"][0]


def test_run_budget_bounds_and_null_sections() -> None:
    """Given zero replicates, parallelism and max_runs, then upstream's three messages; given
    ``run_budget: null`` / ``seed_policy: null``, then the defaults."""
    assert _problems(run_budget={"replicates": 0, "parallelism": 0, "max_runs": 0}) == [
        ("run_budget.replicates", "RunBudget.replicates must be >= 1."),
        ("run_budget.max_runs", "RunBudget.max_runs must be >= 1 when provided."),
        ("run_budget.parallelism", "RunBudget.parallelism must be >= 1."),
    ]
    study = _parse(run_budget=None, seed_policy=None)
    assert study.to_upstream_dict()["run_budget"] == {
        "replicates": 1,
        "max_runs": None,
        "parallelism": 1,
        "fail_fast": False,
    }
    assert study.to_upstream_dict()["seed_policy"] == {
        "base_seed": 0,
        "strategy": "condition_replicate",
        "per_run_offset": 9973,
    }


@pytest.mark.parametrize("base_seed", ["7", 7.0, None, {"a": 1}, [1, 2], True])
def test_seed_policy_values_keep_their_json_types(base_seed: Any) -> None:
    """Given ``base_seed: "7"`` (or a float, null, mapping...), then it is kept as written,
    because it is hashed with its JSON type."""
    study = _parse(seed_policy={"base_seed": base_seed, "per_run_offset": "9973"})

    assert canonical_json(study.seed_policy.base_seed) == canonical_json(base_seed)
    assert study.seed_policy.per_run_offset == "9973"


# --- legacy outcome roles --------------------------------------------------------------------

_OUTCOMES = [
    {"name": "success", "source_table": "runs", "column": "ok", "aggregation": "mean"},
    {"name": "cost", "source_table": "runs", "column": "usd", "aggregation": "sum"},
]


def test_legacy_primary_outcomes_set_the_primary_flags() -> None:
    """Given ``primary_outcomes: [success]``, then that outcome is primary, the other not."""
    study = _parse(outcomes=_OUTCOMES, primary_outcomes=["success"], secondary_outcomes=["cost"])

    assert [(outcome.name, outcome.primary) for outcome in study.outcomes] == [
        ("success", True),
        ("cost", False),
    ]
    assert "primary_outcomes" not in study.to_upstream_dict()


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"primary_outcomes": ["nope", "zzz"]},
            "Legacy outcome roles reference unknown outcomes: nope, zzz.",
        ),
        (
            {"primary_outcomes": ["success"], "secondary_outcomes": ["success"]},
            "Outcomes cannot be both primary and secondary: success.",
        ),
        (
            {
                "outcomes": [{**_OUTCOMES[0], "primary": False}, _OUTCOMES[1]],
                "primary_outcomes": ["success"],
            },
            "OutcomeSpec.primary conflicts with legacy Study.primary_outcomes metadata.",
        ),
    ],
)
def test_legacy_outcome_roles_refuse_what_upstream_refuses(
    fields: dict[str, Any], message: str
) -> None:
    """Given unknown names, an overlap or a contradiction, then upstream's message."""
    messages = [text for _, text in _problems(**{"outcomes": _OUTCOMES, **fields})]

    assert messages == [message]


# --- YAML 1.1 typing through the file reader -------------------------------------------------

_YAML_LEVELS = """\
study_id: yaml-typing
title: YAML 1.1 typing
factors:
  - name: v
    levels:
      - {name: a, value: 1e-7}
      - {name: b, value: 1.0e-7}
      - {name: c, value: 1.0e+16}
      - {name: d, value: 017}
      - {name: e, value: 0o17}
      - {name: f, value: 0x1F}
      - {name: g, value: 1_000}
      - {name: h, value: yes}
      - {name: i, value: Off}
      - {name: j, value: ~}
      - {name: k, value: 2024-01-02}
      - {name: l, value: 2024-01-02 03:04:05}
      - {name: m, value: .inf}
      - {name: n, value: 1.0}
      - {name: yes, value: "yes"}
problem_ids: [p]
"""


def test_yaml_values_are_typed_as_pyyaml_safe_load_types_them(tmp_path: Path) -> None:
    """Given the UPSTREAM.md 3.6 pitfalls in a study file, then the values have the YAML 1.1
    types that decide the hashes: ``1e-7`` is text, ``017`` is 15, ``yes`` is true, dates are
    dates (hashed as ``str()``), and a level named ``yes`` is named ``"True"``."""
    path = tmp_path / "study.yaml"
    path.write_text(_YAML_LEVELS, encoding="utf-8")

    levels = load_study(path).factors[0].levels

    values = [level.value for level in levels]
    assert values[:10] == ["1e-7", 1e-7, 1e16, 15, "0o17", 31, 1000, True, False, None]
    assert values[10] == datetime.date(2024, 1, 2)
    assert values[11] == datetime.datetime(2024, 1, 2, 3, 4, 5)
    assert math.isinf(values[12])
    assert [canonical_json(value) for value in values] == [
        '"1e-7"',
        "1e-07",
        "1e+16",
        "15",
        '"0o17"',
        "31",
        "1000",
        "true",
        "false",
        "null",
        '"2024-01-02"',
        '"2024-01-02 03:04:05"',
        "Infinity",
        "1.0",
        '"yes"',
    ]
    assert levels[-1].name == "True"


def test_json_study_keeps_json_types(tmp_path: Path) -> None:
    """Given a .json study, then ``json.load`` types: ``1.0`` stays a float, NaN is read."""
    path = tmp_path / "study.json"
    path.write_text(
        '{"study_id": "json", "title": "JSON", "notes": NaN,'
        ' "factors": [{"name": "x", "levels": [{"name": "a", "value": 1.0}]}]}',
        encoding="utf-8",
    )

    study = load_study(path)

    assert canonical_json(study.factors[0].levels[0].value) == "1.0"
    assert study.notes == "nan"


# --- study.yaml as written, and the definition hash ------------------------------------------

# Study.to_dict() of design-research-experiments 0.4.0 for _FULL_STUDY, key order included
# (captured with json.dumps on the package's own output).
_UPSTREAM_TO_DICT = json.loads(
    '{"schema_version": "0.2.0", "study_id": "x", "title": "t", "description": "", "authors": '
    '[], "rationale": "", "tags": [], "hypotheses": [{"hypothesis_id": "h", "label": "l", '
    '"statement": "s", "kind": "effect", "independent_vars": ["f"], "dependent_vars": ["o"], '
    '"moderators": [{"name": "m", "levels": []}], "mediators": [{"name": "md", "description": '
    '""}], "contrast": {"label": "contrast", "left": "a", "right": "b", "operation": '
    '"difference"}, "direction": "different", "minimum_effect_of_interest": null, "notes": ""}],'
    ' "factors": [{"name": "f", "description": "", "kind": "manipulated", "levels": [{"name": '
    '"a", "value": 1, "label": "a", "metadata": {}}], "dtype": null, "default": null, '
    '"metadata": {}}], "blocks": [{"name": "b", "levels": [1], "metadata": {}}], "constraints": '
    '[{"constraint_id": "c", "description": "", "expression": "f == 1", "callable_ref": null, '
    '"severity": "error"}], "design_spec": {"kind": "full_factorial", "replicates": 1, '
    '"randomize": false, "counterbalance": false, "matrix_path": null, "n_samples": null, '
    '"center_points": 0, "block_randomization_key": null, "options": {}}, "outcomes": [{"name": '
    '"o", "source_table": "runs", "column": "c", "aggregation": "mean", "derivation": null, '
    '"primary": false, "expected_type": "float", "missing_data_policy": "drop", "description": '
    '""}], "analysis_plans": [{"analysis_plan_id": "p", "hypothesis_ids": ["h"], "tests": '
    '["t"], "outcomes": [], "covariates": [], "random_effects": [], "filters": {}, '
    '"multiple_comparison_policy": "none", "plots": [], "export_tables": [], "notes": ""}], '
    '"run_budget": {"replicates": 1, "max_runs": null, "parallelism": 1, "fail_fast": false}, '
    '"seed_policy": {"base_seed": 0, "strategy": "condition_replicate", "per_run_offset": 9973},'
    ' "output_dir": "artifacts/x", "provenance_metadata": {}, "notes": "", "problem_ids": [], '
    '"agent_specs": []}'
)

_FULL_STUDY: dict[str, Any] = {
    "study_id": "x",
    "title": "t",
    "factors": [{"name": "f", "levels": [{"name": "a", "value": 1}]}],
    "blocks": [{"name": "b", "levels": [1]}],
    "constraints": [{"constraint_id": "c", "expression": "f == 1"}],
    "outcomes": [{"name": "o", "source_table": "runs", "column": "c", "aggregation": "mean"}],
    "hypotheses": [
        {
            "hypothesis_id": "h",
            "label": "l",
            "statement": "s",
            "independent_vars": ["f"],
            "dependent_vars": ["o"],
            "moderators": [{"name": "m"}],
            "mediators": [{"name": "md"}],
            "contrast": {"left": "a", "right": "b"},
        }
    ],
    "analysis_plans": [{"analysis_plan_id": "p", "hypothesis_ids": ["h"], "tests": ["t"]}],
}


def _key_orders(value: Any, path: str = "") -> dict[str, list[str]]:
    orders: dict[str, list[str]] = {}
    if isinstance(value, dict):
        orders[path or "(top)"] = list(value)
        for key, item in value.items():
            orders.update(_key_orders(item, f"{path}.{key}"))
    elif isinstance(value, list) and value:
        orders.update(_key_orders(value[0], f"{path}[0]"))
    return orders


def test_to_upstream_dict_equals_upstreams_study_yaml_in_order() -> None:
    """Given a study using every section, then ``to_upstream_dict`` equals the 0.4.0
    ``Study.to_dict()``: same values, defaults filled in, and the same key order at every
    level (UPSTREAM.md 3.2, 3.3, 3.5)."""
    written = parse_study(_FULL_STUDY).to_upstream_dict()

    assert _key_orders(written) == _key_orders(_UPSTREAM_TO_DICT)
    assert written == _UPSTREAM_TO_DICT


def test_studyq_sections_are_written_only_when_set_and_after_upstreams() -> None:
    """Given ``bindings`` / ``execution``, then they follow the upstream fields; given neither,
    the output is exactly upstream's."""
    plain = _parse().to_upstream_dict()
    extended = _parse(
        bindings={"agents": {"a": "pkg.agents:make"}}, execution={"order": "balanced"}
    ).to_upstream_dict()

    assert "bindings" not in plain and "execution" not in plain
    assert list(extended)[: len(plain)] == list(plain)
    assert list(extended)[len(plain) :] == ["bindings", "execution"]
    assert extended["execution"]["order"] == "balanced"


def _level_study(value: Any, **extra: Any) -> Study:
    return _parse(
        factors=[{"name": "t", "levels": [{"name": "low", "value": value}]}],
        problem_ids=["p"],
        **extra,
    )


def test_definition_hash_is_stable() -> None:
    """Given the same study twice, with keys in another order and unknown keys added, then
    the same definition hash (a 64-character hex digest)."""
    first = _level_study(0.2).definition_hash()
    reordered = parse_study(
        {
            "problem_ids": ["p"],
            "factors": [{"levels": [{"value": 0.2, "name": "low"}], "name": "t"}],
            "title": "Model test",
            "study_id": "model-test",
            "unknown_extra": [1, 2, 3],
        }
    ).definition_hash()

    assert first == _level_study(0.2).definition_hash() == reordered
    assert len(first) == 64 and int(first, 16) >= 0


@pytest.mark.parametrize(
    ("value", "extra"),
    [
        (0.3, {}),
        (1, {}),  # 0.2 -> 1
        ("0.2", {}),  # float -> text
        (0.2, {"seed_policy": {"base_seed": 1}}),
        (0.2, {"run_budget": {"replicates": 2}}),
        (0.2, {"bindings": {"runner": "pkg.sim:run"}}),
        (0.2, {"execution": {"timeout_s": 5}}),
    ],
)
def test_definition_hash_changes_with_what_changes_runs(value: Any, extra: dict[str, Any]) -> None:
    """Given a changed level value (even only its type), seed, budget or studyq section, then
    the definition hash changes."""
    assert _level_study(value, **extra).definition_hash() != _level_study(0.2).definition_hash()


def test_one_and_one_point_zero_hash_differently() -> None:
    """Given level values ``1`` and ``1.0`` (equal in Python), then different hashes."""
    assert _level_study(1).definition_hash() != _level_study(1.0).definition_hash()


# --- reporting -------------------------------------------------------------------------------


def test_every_problem_is_reported_at_once_with_field_paths() -> None:
    """Given a study with defects in many sections, then one error lists all of them, each
    with its field path, instead of stopping at the first as upstream does."""
    with pytest.raises(StudyValidationError) as caught:
        parse_study(
            {
                "study_id": " ",
                "title": "ok",
                "factors": [
                    {"name": "f", "kind": "sideways", "levels": [{"name": "a", "value": 1}]},
                    {"name": "g", "levels": [{"name": "x"}, {"name": "x"}]},
                    {"name": "h", "levels": ["bare"]},
                ],
                "blocks": [{"name": "b", "levels": []}],
                "constraints": [{"constraint_id": "c1"}],
                "design_spec": {"kind": "nope", "replicates": 0},
                "run_budget": {"replicates": 0, "bogus": 1},
                "seed_policy": {"seed": 3},
                "outcomes": [{"name": "o", "source_table": "runs"}],
            },
            source="study.yaml",
        )
    error = caught.value

    fields = [problem.field for problem in error.problems]
    assert fields == [
        "study_id",
        "factors[0].kind",
        "factors[1].levels",
        "factors[2].levels[0]",
        "blocks[0].levels",
        "constraints[0]",
        "design_spec.kind",
        "design_spec.replicates",
        "outcomes[0].column",
        "outcomes[0].aggregation",
        "run_budget.replicates",
        "run_budget.bogus",
        "seed_policy.seed",
    ]
    assert all(problem.message for problem in error.problems)
    lines = str(error).splitlines()
    assert len(lines) == len(fields)
    assert all(line.startswith("study.yaml: ") for line in lines)
    assert "duplicate level names: x." in lines[2]


def test_cross_reference_problems_are_reported_together() -> None:
    """Given duplicate names and dangling references, then all of upstream's validate_study
    messages at once, each at its field."""
    problems = _problems(
        factors=[
            {"name": "f", "levels": [{"name": "a", "value": 1}]},
            {"name": "f", "levels": [{"name": "a", "value": 2}]},
        ],
        outcomes=_OUTCOMES,
        hypotheses=[
            {"hypothesis_id": "h", "label": "l", "statement": "s", "independent_vars": ["zz"]}
        ],
        analysis_plans=[{"analysis_plan_id": "p", "hypothesis_ids": ["h9"], "tests": ["t"]}],
    )

    assert problems == [
        ("factors[1]", "Duplicate factor name detected: 'f'."),
        (
            "hypotheses[0].independent_vars[0]",
            "Hypothesis 'h' references unknown independent variable 'zz'.",
        ),
        (
            "analysis_plans[0].hypothesis_ids[0]",
            "Analysis plan 'p' references unknown hypothesis 'h9'.",
        ),
    ]


def test_missing_title_is_refused_like_a_blank_one() -> None:
    """Given no ``title`` at all, then upstream's ``Study.title must be non-empty.`` (the
    default is "" and a blank title fails, so a title is effectively required)."""
    with pytest.raises(StudyValidationError) as caught:
        parse_study({"study_id": "no-title"})

    assert [(p.field, p.message) for p in caught.value.problems] == [
        ("title", "Study.title must be non-empty.")
    ]


def test_hypothesis_without_label_is_refused() -> None:
    """Given a hypothesis without ``label``, then upstream's ``Hypothesis.label must be
    non-empty.`` (its default is "", which fails the non-blank check)."""
    problems = _problems(hypotheses=[{"hypothesis_id": "h", "statement": "s"}])

    assert problems == [("hypotheses[0].label", "Hypothesis.label must be non-empty.")]
