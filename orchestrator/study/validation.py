"""Every check a study must pass, reported at once with field paths and fixes.

Three layers, in the order a study meets them:

1. the schema (pydantic) -> :func:`schema_problems`, which turns pydantic's errors into
   studyq problems;
2. cross references, the upstream's ``validate_study`` (duplicates, hypothesis and plan
   references, the ``max_runs`` check) plus studyq's static constraint checks and the
   latin-square factors it refuses where the upstream is lenient -> :func:`reference_problems`;
3. runnability, the upstream's dry-run checks (a problem to run, an admissible condition,
   at least one run) -> :func:`runnable_problems`, used by ``validate``, ``run`` and
   ``submit`` but not by planning, because the upstream plans such studies fine.
"""

from __future__ import annotations

import difflib
from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import pydantic

from orchestrator.contracts.errors import Problem

if TYPE_CHECKING:
    from orchestrator.study.designs import Condition
    from orchestrator.study.factors import Factor
    from orchestrator.study.model import Study

__all__ = [
    "apply_legacy_outcome_roles",
    "field_path",
    "reference_problems",
    "runnable_problems",
    "schema_problems",
]

AGENT_FACTORS = ("agent_id", "agent", "agent_spec")
PROBLEM_FACTORS = ("problem_id", "problem")


def field_path(loc: Sequence[int | str]) -> str:
    """``('factors', 0, 'levels', 1)`` -> ``factors[0].levels[1]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_TYPE_WORDS = {
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "dict_type": "a mapping",
    "list_type": "a list",
    "string_type": "text",
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "a whole number",
    "float_type": "a number",
    "float_parsing": "a number",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
}


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "null"
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _generic_fix(kind: str, ctx: Mapping[str, Any]) -> str:
    bounds = {
        "greater_than": "use a value greater than {gt}.",
        "greater_than_equal": "use {ge} or more.",
        "less_than": "use a value less than {lt}.",
        "less_than_equal": "use {le} or less.",
        "string_too_short": "write at least {min_length} character(s).",
        "string_pattern_mismatch": "match the pattern {pattern}.",
    }
    if kind in bounds:
        try:
            return bounds[kind].format(**ctx)
        except (KeyError, IndexError):
            pass
    return "`studyq schema` shows what this field accepts."


def schema_problems(error: pydantic.ValidationError) -> list[Problem]:
    """One :class:`Problem` per pydantic error, worded for a person editing YAML."""
    problems: list[Problem] = []
    for item in error.errors(include_url=False):
        loc = item["loc"]
        # Tagged unions and Annotated validators add non-field segments; drop function names.
        path = field_path([part for part in loc if not (isinstance(part, str) and "[" in part)])
        kind = item["type"]
        ctx = item.get("ctx") or {}
        if kind == "studyq":
            problems.append(Problem(path, str(item["msg"]), str(ctx.get("fix", ""))))
        elif kind == "missing":
            name = str(loc[-1]) if loc else "field"
            problems.append(Problem(path, "is required but missing.", f"add `{name}:`."))
        elif kind == "extra_forbidden":
            problems.append(
                Problem(path, "is not a known key here.", "remove it or fix its spelling.")
            )
        elif kind in _TYPE_WORDS and path.endswith("]") and ".levels[" in path:
            problems.append(
                Problem(
                    path,
                    f"a level must be a mapping, not {_describe(item.get('input'))}.",
                    "write each level as `{name: ..., value: ...}`.",
                )
            )
        elif kind in _TYPE_WORDS:
            want = _TYPE_WORDS[kind]
            problems.append(
                Problem(
                    path,
                    f"must be {want}, not {_describe(item.get('input'))}.",
                    f"write {want} here.",
                )
            )
        else:
            message = str(item["msg"]).removeprefix("Value error, ")
            if not message.endswith("."):
                message += "."
            problems.append(Problem(path, message, _generic_fix(kind, ctx)))
    return problems


def apply_legacy_outcome_roles(payload: dict[str, Any]) -> list[Problem]:
    """Fold ``primary_outcomes``/``secondary_outcomes`` into ``outcomes[].primary`` in place.

    The upstream still reads these legacy keys; it refuses unknown names, overlaps and
    contradictions with roles the outcomes declare themselves.
    """
    if "primary_outcomes" not in payload and "secondary_outcomes" not in payload:
        return []
    raw_outcomes = payload.get("outcomes") or []
    if not isinstance(raw_outcomes, list):
        return []
    primary = payload.get("primary_outcomes") or []
    secondary = payload.get("secondary_outcomes") or []
    if not isinstance(primary, list) or not isinstance(secondary, list):
        return [Problem("primary_outcomes", "must be a list of outcome names.", "write a list.")]
    names = {str(o.get("name")) for o in raw_outcomes if isinstance(o, Mapping)}
    primary_names = {str(name) for name in primary}
    secondary_names = {str(name) for name in secondary}
    unknown = (primary_names | secondary_names) - names
    if unknown:
        return [
            Problem(
                "primary_outcomes" if unknown & primary_names else "secondary_outcomes",
                f"Legacy outcome roles reference unknown outcomes: {', '.join(sorted(unknown))}.",
                "name outcomes declared under `outcomes:`.",
            )
        ]
    overlap = primary_names & secondary_names
    if overlap:
        return [
            Problem(
                "secondary_outcomes",
                f"Outcomes cannot be both primary and secondary: {', '.join(sorted(overlap))}.",
                "list each outcome in one of the two.",
            )
        ]
    declared = any(isinstance(o, Mapping) and "primary" in o for o in raw_outcomes)
    if declared:
        declared_primary = {
            str(o.get("name")) for o in raw_outcomes if isinstance(o, Mapping) and o.get("primary")
        }
        if "primary_outcomes" in payload and declared_primary != primary_names:
            return [
                Problem(
                    "primary_outcomes",
                    "OutcomeSpec.primary conflicts with legacy Study.primary_outcomes metadata.",
                    "drop `primary_outcomes` and keep `primary:` on the outcomes.",
                )
            ]
        if "secondary_outcomes" in payload and (names - declared_primary) != secondary_names:
            return [
                Problem(
                    "secondary_outcomes",
                    "OutcomeSpec.primary conflicts with legacy Study.secondary_outcomes metadata.",
                    "drop `secondary_outcomes` and keep `primary:` on the outcomes.",
                )
            ]
        return []
    if primary_names:
        payload["outcomes"] = [
            {**o, "primary": str(o.get("name")) in primary_names} if isinstance(o, Mapping) else o
            for o in raw_outcomes
        ]
    return []


def _legacy_link_problems(payload: Mapping[str, Any], study: Study) -> list[Problem]:
    plans = {
        plan.analysis_plan_id: set(map(str, plan.hypothesis_ids)) for plan in study.analysis_plans
    }
    problems = []
    for index, raw in enumerate(payload.get("hypotheses") or []):
        if not isinstance(raw, Mapping):
            continue
        linked = raw.get("linked_analysis_plan_id")
        if linked in (None, ""):
            continue
        hypothesis_id = str(raw.get("hypothesis_id", ""))
        members = plans.get(str(linked))
        if members is None or hypothesis_id not in members:
            problems.append(
                Problem(
                    f"hypotheses[{index}].linked_analysis_plan_id",
                    f"Hypothesis '{hypothesis_id}' conflicts with analysis plan '{linked}'. "
                    "AnalysisPlan.hypothesis_ids is authoritative.",
                    f"add '{hypothesis_id}' to that plan's hypothesis_ids, or drop the link.",
                )
            )
    return problems


def _duplicates(label: str, field: str, names: Sequence[Any]) -> list[Problem]:
    seen: set[Any] = set()
    problems = []
    for index, name in enumerate(names):
        if name in seen:
            problems.append(
                Problem(
                    f"{field}[{index}]",
                    f"Duplicate {label} name detected: '{name}'.",
                    f"give each {label} a unique name.",
                )
            )
        seen.add(name)
    return problems


def _unknown(
    field: str,
    values: Sequence[Any],
    known: Collection[Any],
    unknown: str,
    fix: str,
) -> list[Problem]:
    """One problem for each of ``values`` that is not ``known``: ``<unknown> '<value>'.``"""
    return [
        Problem(f"{field}[{index}]", f"{unknown} '{value}'.", fix)
        for index, value in enumerate(values)
        if value not in known
    ]


def _binding_factor(study: Study, names: Sequence[str]) -> Factor | None:
    for factor in study.factors:
        if factor.name in names:
            return factor
    return None


def _binding_count(values: Sequence[Any], factor: Factor | None) -> int:
    if values:
        return len(values)
    if factor is not None:
        return max(1, len(factor.levels))
    return 1


# What each cross-reference check reads; skipped when one of those sections is broken.
_DEPENDS = {
    "hypotheses": {"hypotheses", "factors", "outcomes"},
    "analysis_plans": {"analysis_plans", "hypotheses", "outcomes"},
    "run_budget": {"run_budget", "factors", "problem_ids", "agent_specs"},
    "bindings": {"bindings", "execution", "factors", "agent_specs"},
}


def reference_problems(
    study: Study, payload: Mapping[str, Any], *, skip: Collection[str] = ()
) -> list[Problem]:
    """The upstream's ``validate_study`` checks plus studyq's static constraint checks.

    ``skip`` names sections that failed schema validation; checks that read them are left
    out rather than reporting consequences of a problem already reported.
    """
    problems = _reference_problems(study, payload)
    if not skip:
        return problems
    kept = []
    for problem in problems:
        section = problem.field.split(".")[0].split("[")[0]
        if _DEPENDS.get(section, {section}) & set(skip):
            continue
        kept.append(problem)
    return kept


def _reference_problems(study: Study, payload: Mapping[str, Any]) -> list[Problem]:
    factor_names = [factor.name for factor in study.factors]
    outcome_names = [outcome.name for outcome in study.outcomes]
    hypothesis_ids = [hypothesis.hypothesis_id for hypothesis in study.hypotheses]
    problems = _legacy_link_problems(payload, study)
    problems += _duplicates("factor", "factors", factor_names)
    problems += _duplicates("block", "blocks", [block.name for block in study.blocks])
    problems += _duplicates("outcome", "outcomes", outcome_names)
    problems += _duplicates(
        "analysis plan", "analysis_plans", [plan.analysis_plan_id for plan in study.analysis_plans]
    )
    problems += _duplicates("hypothesis", "hypotheses", hypothesis_ids)

    factor_set, outcome_set, hypothesis_set = (
        set(factor_names),
        set(outcome_names),
        set(hypothesis_ids),
    )
    for h_index, hypothesis in enumerate(study.hypotheses):
        named = f"Hypothesis '{hypothesis.hypothesis_id}' references unknown"
        problems += _unknown(
            f"hypotheses[{h_index}].independent_vars",
            hypothesis.independent_vars,
            factor_set,
            f"{named} independent variable",
            f"name a factor ({', '.join(factor_names) or 'none declared'}).",
        )
        problems += _unknown(
            f"hypotheses[{h_index}].dependent_vars",
            hypothesis.dependent_vars,
            outcome_set,
            f"{named} dependent variable",
            f"name an outcome ({', '.join(outcome_names) or 'none declared'}).",
        )
    for p_index, plan in enumerate(study.analysis_plans):
        named = f"Analysis plan '{plan.analysis_plan_id}' references unknown"
        problems += _unknown(
            f"analysis_plans[{p_index}].hypothesis_ids",
            plan.hypothesis_ids,
            hypothesis_set,
            f"{named} hypothesis",
            f"name a declared hypothesis ({', '.join(hypothesis_ids) or 'none'}).",
        )
        problems += _unknown(
            f"analysis_plans[{p_index}].outcomes",
            plan.outcomes,
            outcome_set,
            f"{named} outcome",
            f"name a declared outcome ({', '.join(outcome_names) or 'none'}).",
        )
    budget = study.run_budget
    if budget.max_runs is not None:
        requested = (
            _binding_count(study.problem_ids, _binding_factor(study, PROBLEM_FACTORS))
            * _binding_count(study.agent_specs, _binding_factor(study, AGENT_FACTORS))
            * budget.replicates
        )
        if requested > budget.max_runs:
            problems.append(
                Problem(
                    "run_budget.max_runs",
                    "Run budget max_runs is below the configured problem/agent/replicate plan "
                    f"({requested} runs for one condition, max_runs {budget.max_runs}).",
                    f"raise run_budget.max_runs to at least {requested}, or plan fewer "
                    "problems, agents or replicates.",
                )
            )
    problems += _latin_square_problems(study)
    for index, constraint in enumerate(study.constraints):
        if constraint.expression is not None:
            from orchestrator.study.constraints import check_expression

            reason = check_expression(constraint.expression)
            if reason is not None:
                message, _, fix = reason.partition(" Fix: ")
                problems.append(
                    Problem(
                        f"constraints[{index}].expression",
                        message,
                        fix
                        or "use factor and block names, literals, comparisons, "
                        "and/or/not and len/int/float/str/bool only.",
                    )
                )
    problems += _provider_problems(study)
    return problems


def _study_agents(study: Study) -> list[str]:
    for factor in study.factors:
        if factor.name in AGENT_FACTORS:
            return [str(level.value) for level in factor.levels]
    return [str(agent) for agent in study.agent_specs]


def _provider_problems(study: Study) -> list[Problem]:
    """``bindings.providers`` names agents of the study and providers ``execution.limits``
    declares: a typo in either would silently leave an agent unlimited."""
    problems = []
    agents = _study_agents(study)
    declared = sorted(study.execution.limits)
    for agent, provider in study.bindings.providers.items():
        field = f"bindings.providers.{agent}"
        if agent not in agents:
            close = difflib.get_close_matches(agent, agents, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"agents: {', '.join(agents)}."
            problems.append(
                Problem(field, f"'{agent}' is not an agent of this study.", f"name one; {hint}")
            )
        if provider not in study.execution.limits:
            close = difflib.get_close_matches(provider, declared, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            problems.append(
                Problem(
                    field,
                    f"unknown provider '{provider}': `execution.limits` does not declare it.",
                    f"declare `execution.limits.{provider}: {{max_concurrency: ...}}`, or name "
                    f"a declared provider{hint}: {', '.join(declared) or 'none declared'}.",
                )
            )
    return problems


_LATIN_SQUARE_ROLES = ("row_factor", "column_factor", "treatment_factor")


def _latin_square_problems(study: Study) -> list[Problem]:
    """A latin square needs three different factors. The upstream accepts one factor in two
    roles and lets the later role overwrite the earlier one's assignment, so the square's
    ``latin_square_row`` / ``latin_square_col`` metadata no longer matches the condition;
    studyq refuses it (docs/studies.md, "Stricter than upstream")."""
    from orchestrator.study.design_spec import DesignKind

    spec = study.design_spec
    if spec.kind != DesignKind.LATIN_SQUARE:
        return []
    problems = []
    named: dict[str, str] = {}
    for role in _LATIN_SQUARE_ROLES:
        name = str(spec.options.get(role, "") or "")
        if not name:
            continue  # a missing role is reported when the design is built
        if name in named:
            problems.append(
                Problem(
                    f"design_spec.options.{role}",
                    f"{role} '{name}' is also the {named[name]}; a latin square needs three "
                    f"different factors (one factor in both roles would take the {role}'s "
                    f"value, and the conditions would not match their {named[name]} "
                    "position in the square).",
                    "name three different factors in design_spec.options.row_factor, "
                    ".column_factor and .treatment_factor.",
                )
            )
        else:
            named[name] = role
    return problems


def runnable_problems(
    study: Study, conditions: Sequence[Condition], planned_runs: int, *, standalone: bool = False
) -> list[Problem]:
    """The upstream's dry-run checks: something to run, and at least one run to run it."""
    problems = []
    has_problem = bool(study.problem_ids) or any(
        factor.name in PROBLEM_FACTORS for factor in study.factors
    )
    if not (standalone or study.standalone) and not has_problem:
        problems.append(
            Problem(
                "problem_ids",
                "Study execution requires problem IDs, a problem factor, or condition_runner.",
                "add `problem_ids: [...]`, a factor named `problem_id`, or `bindings.runner`.",
            )
        )
    if not any(condition.admissible for condition in conditions):
        problems.append(
            Problem(
                "constraints",
                "No admissible conditions are available to execute "
                f"(all {len(conditions)} conditions fail an error-severity constraint).",
                "relax the constraints or set `severity: warning`.",
            )
        )
    elif planned_runs < 1:
        problems.append(
            Problem("run_budget", "No run specifications were generated.", "check the budget.")
        )
    return problems


def flatten(problems: Iterable[Problem]) -> list[Problem]:
    """Drop exact repeats (pydantic can report one cause twice through nested validators)."""
    seen: set[Problem] = set()
    out = []
    for problem in problems:
        if problem not in seen:
            seen.add(problem)
            out.append(problem)
    return out
