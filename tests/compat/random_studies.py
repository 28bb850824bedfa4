"""Seeded random study files for the live cross-check against design-research-experiments.

The hand-written corpus covers the traps we know about; random studies find the ones we do
not. Each study mixes a design kind, factors whose level values are raw YAML 1.1 tokens
(``017``, ``1e-7``, ``yes``, ``2024-01-02``, emoji, ...), blocks, constraints of every severity,
agent/problem factors and lists, seed policies and run budgets. Some end up rejected by
upstream; studyq must reject exactly those.

Everything is drawn from one ``random.Random(seed)``, so a seed names a reproducible batch.
Studies are written as YAML text (tokens verbatim, so the YAML loader's typing is exercised) or,
for about one in five, as JSON. Custom-matrix files are written next to the studies and
referenced by bare file name: run both planners with the batch folder as working directory.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["Tok", "render_yaml", "write_random_studies"]


@dataclass(frozen=True, slots=True)
class Tok:
    """A scalar written verbatim into YAML, so PyYAML's YAML 1.1 resolver decides its type."""

    text: str

    def value(self) -> Any:
        """The Python value PyYAML ``safe_load`` gives the token (used for JSON studies)."""
        return yaml.safe_load(f"v: {self.text}")["v"]


_TOKENS: dict[str, list[str]] = {
    "int": ["0", "1", "2", "-3", "017", "0x1F", "1_000", "12345678901234567890"],
    "float": ["0.1", "1.0", "-0.0", "1.0e-7", "2.5", "1.0e+16", "0.30000000000000004"],
    "special_float": [".inf", "-.inf", ".nan"],
    "str": [
        "alpha",
        "beta",
        "1e-7",
        "0o17",
        '"quoted"',
        "'single'",
        "é",
        '"e\\u0301"',
        "🚀",
        "東京",
        '"a\\u2028b"',
        '"2024-01-02"',
        '"yes"',
        '"with: colon"',
        "''",
        '"tab\\there"',
    ],
    "bool": ["yes", "no", "on", "off", "true", "False"],
    "null": ["~", "null"],
    "date": ["2024-01-02", "2024-01-02 03:04:05"],
    "compound": ["[1, two]", "{a: 1, b: [x]}"],
}
_CATEGORY_WEIGHTS = {
    "int": 5,
    "float": 5,
    "special_float": 1,
    "str": 8,
    "bool": 3,
    "null": 1,
    "date": 1,
    "compound": 1,
}
_NUMERIC = _TOKENS["int"] + _TOKENS["float"]
_FACTOR_NAMES = [
    "temperature",
    "prompt",
    "k",
    "agent",
    "agent_id",
    "agent_spec",
    "problem",
    "problem_id",
    "é_factor",
    "因子",
    "🚀",
]
_BLOCK_NAMES = ["session", "rater", "区"]
_KINDS = {
    "full_factorial": ["full_factorial", "full", "Full", " FULL_FACTORIAL "],
    "constrained_factorial": ["constrained_factorial"],
    "randomized_block": ["randomized_block"],
    "repeated_measures": ["repeated_measures", "Repeated_Measures"],
    "latin_square": ["latin_square"],
    "custom_matrix": ["custom_matrix"],
    "latin_hypercube": ["latin_hypercube", "lhs", "LHS"],
    "fractional_factorial_2level": ["fractional_factorial_2level", "frac2", " Frac2"],
}
_BOOL_TOKENS = ["true", "false", "yes", "no", '"false"', "1", "0"]
_ID_TOKENS = ["a1", "agent-é", "2", "0", "true", "~", "p-1", "2.5", "'007'", "问题"]
_SEEDS = ["0", "7", '"7"', "-1", "123456789", "abc", "2.5"]
_CSV_CELLS = ["", "1", "1.0", "alpha", "é", "🚀", "true", "None", " spaced "]


def _token(rng: random.Random) -> Tok:
    categories = list(_CATEGORY_WEIGHTS)
    category = rng.choices(categories, weights=[_CATEGORY_WEIGHTS[c] for c in categories])[0]
    return Tok(rng.choice(_TOKENS[category]))


def _levels(rng: random.Random, count: int, *, numeric: bool = False) -> list[dict[str, Any]]:
    pool = _NUMERIC if numeric else None
    return [
        {
            "name": f"l{index}",
            "value": Tok(rng.choice(pool)) if pool else _token(rng),
        }
        for index in range(count)
    ]


def _factor_names(rng: random.Random, count: int) -> list[str]:
    names = rng.sample(_FACTOR_NAMES, count)
    if count >= 2 and rng.random() < 0.04:
        names[-1] = names[0]  # duplicate factor name: validate_study rejects it
    return names


def _reference(rng: random.Random, name: str) -> str:
    if name.isidentifier() and rng.random() < 0.6:
        return name
    return f"factors[{name!r}]"


def _constraints(rng: random.Random, names: list[str]) -> list[dict[str, Any]]:
    constraints: list[dict[str, Any]] = []
    for index in range(rng.choice([0, 0, 1, 2])):
        if not names:
            break
        first = _reference(rng, rng.choice(names))
        second = _reference(rng, rng.choice(names))
        expression = rng.choice(
            [
                f"str({first}) != 'alpha'",
                f"{first} != {second}",
                f"len(str({first})) > {rng.randint(1, 4)}",
                f"str({first}) not in ['1', 'True', 'beta']",
                f"{first} == {first}",
                f"not (str({first}) == '0' and str({second}) != '0')",
            ]
        )
        constraint: dict[str, Any] = {
            "constraint_id": f"c{index}",
            "description": rng.choice(["", "random rule", "règle é"]),
            "expression": expression,
        }
        severity = rng.choice(["error", "warning", "ERROR", None])
        if severity is not None:
            constraint["severity"] = severity
        constraints.append(constraint)
    return constraints


def _blocks(rng: random.Random) -> list[dict[str, Any]]:
    names = rng.sample(_BLOCK_NAMES, rng.choice([0, 0, 1, 1, 2]))
    return [
        {"name": name, "levels": [_token(rng) for _ in range(rng.randint(1, 2))]} for name in names
    ]


def _matrix(rng: random.Random, folder: Path, index: int, columns: list[str]) -> str:
    """Write a custom matrix for the study and return its CWD-relative path."""
    columns = [*columns, "extra"]
    rows = rng.randint(0, 4)
    if rng.random() < 0.5:
        path = folder / f"matrix_{index:02d}.csv"
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(columns)
            for _ in range(rows):
                width = len(columns) + rng.choice([-1, 0, 0, 0, 1])
                writer.writerow([rng.choice(_CSV_CELLS) for _ in range(max(width, 1))])
    else:
        path = folder / f"matrix_{index:02d}.json"
        records = []
        for _ in range(rows):
            present = [column for column in columns if rng.random() < 0.85]
            records.append({column: _json_safe(_token(rng).value()) for column in present})
        path.write_text(json.dumps(records, ensure_ascii=False), encoding="utf-8")
    return path.name


def _json_safe(value: Any) -> Any:
    """JSON cannot hold dates; write them as the text PyYAML would have parsed."""
    return json.loads(json.dumps(value, default=str))


def _design(
    rng: random.Random, kind: str, folder: Path, index: int, study: dict[str, Any]
) -> dict[str, Any]:
    """Pick factors and design options that fit the kind, mostly in its valid range."""
    design: dict[str, Any] = {"kind": rng.choice(_KINDS[kind])}
    factors: list[dict[str, Any]]
    if kind == "latin_square":
        n = rng.choice([2, 3])
        names = _factor_names(rng, rng.choice([3, 3, 4]))
        factors = [
            {"name": name, "levels": _levels(rng, n + (rng.random() < 0.08))} for name in names
        ]
        row, column, treatment = names[:3]
        design["options"] = {
            "row_factor": row,
            "column_factor": column,
            "treatment_factor": treatment,
        }
    elif kind == "latin_hypercube":
        names = _factor_names(rng, rng.randint(1, 3))
        factors = [
            {"name": name, "levels": _levels(rng, rng.randint(2, 3), numeric=True)}
            for name in names
        ]
        design["n_samples"] = rng.randint(1, 5)
        if rng.random() < 0.4:
            bounds = {}
            for name in rng.sample(names, len(names)):
                low = rng.choice([0, -1, 0.5, 2])
                bounds[name] = [low, low + rng.choice([0.5, 1, 3, 0])]  # 0 width: rejected
            design["options"] = {"bounds": bounds}
    elif kind == "fractional_factorial_2level":
        names = _factor_names(rng, rng.randint(2, 6))
        factors = [
            {"name": name, "levels": _levels(rng, 2 + (rng.random() < 0.04))} for name in names
        ]
    else:
        names = _factor_names(rng, rng.choice([0, 1, 2, 2, 3]))
        factors = [{"name": name, "levels": _levels(rng, rng.randint(1, 3))} for name in names]
        if factors and rng.random() < 0.1:
            factors[0] = {"name": names[0], "default": _token(rng)}

    blocks = _blocks(rng) if kind != "latin_square" else []
    if kind == "custom_matrix":
        columns = rng.sample(names, len(names)) + [block["name"] for block in blocks]
        design["matrix_path"] = _matrix(rng, folder, index, columns)
    if kind in {"latin_hypercube", "fractional_factorial_2level"}:
        if rng.random() < 0.4:
            design["replicates"] = rng.choice([1, 2])
        if rng.random() < 0.4:
            design["center_points"] = rng.choice([0, 1, 2])
        if rng.random() < 0.3:
            design["block_randomization_key"] = rng.choice([*names, "session"])
    for flag in ("randomize", "counterbalance"):
        if rng.random() < 0.5:
            design[flag] = Tok(rng.choice(_BOOL_TOKENS))

    study["factors"] = factors
    if blocks:
        study["blocks"] = blocks
    constraints = _constraints(rng, names)
    if constraints:
        study["constraints"] = constraints
    return design


def _random_study(rng: random.Random, folder: Path, index: int) -> dict[str, Any]:
    kind = rng.choice(list(_KINDS))
    study: dict[str, Any] = {
        "study_id": rng.choice([f"random-{index:02d}", f"étude-{index:02d}-🚀"]),
        "title": f"Random study {index}",
    }
    study["design_spec"] = _design(rng, kind, folder, index, study)
    for key in ("agent_specs", "problem_ids"):
        if rng.random() < 0.4:
            study[key] = [Tok(rng.choice(_ID_TOKENS)) for _ in range(rng.randint(1, 3))]
    budget: dict[str, Any] = {}
    if rng.random() < 0.5:
        budget["replicates"] = rng.randint(1, 3)
    if rng.random() < 0.3:
        budget["max_runs"] = rng.randint(1, 12)
    if budget:
        study["run_budget"] = budget
    seeds = [*_SEEDS, "~"] if kind in {"latin_square", "custom_matrix"} else _SEEDS
    policy: dict[str, Any] = {"base_seed": Tok(rng.choice(seeds))}
    if rng.random() < 0.2:
        policy["strategy"] = rng.choice(["per-run", "", "é"])
    if rng.random() < 0.2:
        policy["per_run_offset"] = Tok(rng.choice(["1", "0", "1.5", '"x"']))
    study["seed_policy"] = policy
    return study


def _scalar_yaml(value: Any) -> str:
    if isinstance(value, Tok):
        return value.text
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if value == [] or value == {}:
        return json.dumps(value)
    raise TypeError(f"not a scalar: {value!r}")


def _is_scalar(value: Any) -> bool:
    return not isinstance(value, dict | list) or not value


def render_yaml(node: dict[str, Any], indent: int = 0) -> str:
    """Block-style YAML with every :class:`Tok` written verbatim and keys double-quoted."""
    lines: list[str] = []
    pad = " " * indent
    for key, value in node.items():
        quoted = json.dumps(key, ensure_ascii=False)
        if _is_scalar(value):
            lines.append(f"{pad}{quoted}: {_scalar_yaml(value)}")
        elif isinstance(value, dict):
            lines.append(f"{pad}{quoted}:")
            lines.append(render_yaml(value, indent + 2))
        else:
            lines.append(f"{pad}{quoted}:")
            lines.extend(_render_list(value, indent + 2))
    return "\n".join(lines)


def _render_list(items: list[Any], indent: int) -> list[str]:
    pad = " " * indent
    lines: list[str] = []
    for item in items:
        if _is_scalar(item):
            lines.append(f"{pad}- {_scalar_yaml(item)}")
        elif isinstance(item, dict):
            block = render_yaml(item, indent + 2)
            lines.append(f"{pad}- {block[indent + 2 :]}")
        else:
            lines.append(f"{pad}-")
            lines.extend(_render_list(item, indent + 2))
    return lines


def _to_json(node: Any) -> Any:
    if isinstance(node, Tok):
        return _json_safe(node.value())
    if isinstance(node, dict):
        return {key: _to_json(value) for key, value in node.items()}
    if isinstance(node, list):
        return [_to_json(item) for item in node]
    return node


def write_random_studies(folder: Path, count: int, seed: int) -> list[Path]:
    """Write ``count`` random studies (plus their matrices) into ``folder``; return their paths."""
    rng = random.Random(seed)
    paths: list[Path] = []
    for index in range(count):
        study = _random_study(rng, folder, index)
        if rng.random() < 0.2:
            path = folder / f"random_{index:02d}.json"
            path.write_text(json.dumps(_to_json(study), ensure_ascii=False), encoding="utf-8")
        else:
            path = folder / f"random_{index:02d}.yaml"
            path.write_text(render_yaml(study) + "\n", encoding="utf-8")
        paths.append(path)
    return paths
