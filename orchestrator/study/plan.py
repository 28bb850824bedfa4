"""The run plan: run specs streamed in the upstream's order, and the orders runs are dispatched in.

Plan order is the upstream's (UPSTREAM.md 6.1): admissible condition -> replicate -> agent
-> problem, truncated to ``run_budget.max_runs``. Specs are produced one at a time, so a
1,000,000-run plan never sits in memory. ``run_id`` and ``seed`` are the upstream's hashes;
the canonical JSON of their payloads is assembled from pre-serialized parts (the payload's
keys are fixed and sort the same way every time), which is what makes planning fast. A unit
test pins the fast path to :func:`orchestrator.contracts.canonical.hash_identifier`.

Dispatch order never changes ids or seeds; ``balanced`` runs replicate 1 of every cell
before replicate 2, shuffled inside each replicate, so a sweep cut short by a budget or a
crash leaves a balanced partial study.
"""

from __future__ import annotations

import hashlib
import random
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from orchestrator.contracts.canonical import canonical_json
from orchestrator.contracts.runspec import RunSpec
from orchestrator.study.designs import Condition, build_conditions
from orchestrator.study.model import Study
from orchestrator.study.validation import AGENT_FACTORS, PROBLEM_FACTORS

__all__ = [
    "DISPATCH_ORDERS",
    "PlanCell",
    "PlanRow",
    "PlanSummary",
    "PreparedStudy",
    "iter_plan_rows",
    "iter_run_specs",
    "plan_cells",
    "prepare",
    "summarize",
]

DISPATCH_ORDERS = ("plan", "balanced")
_SEED_MODULUS = 2**31 - 1


def _bound_ids(
    study: Study, condition: Condition, names: Sequence[str], listed: list[Any], default: str
) -> tuple[Any, ...]:
    for name in names:
        if name in condition.factor_assignments:
            return (str(condition.factor_assignments[name]),)
    if listed:
        return tuple(listed)
    return (default,)


@dataclass(frozen=True, slots=True)
class PlanCell:
    """One admissible condition with its agents and problems; ``offset`` is its first index."""

    condition: Condition
    agents: tuple[Any, ...]
    problems: tuple[Any, ...]
    offset: int

    @property
    def runs_per_replicate(self) -> int:
        return len(self.agents) * len(self.problems)


def plan_cells(
    study: Study, conditions: Sequence[Condition], *, standalone: bool | None = None
) -> list[PlanCell]:
    """The admissible conditions with the agents and problems each fans out to.

    ``standalone`` (default: the study names a ``bindings.runner``) plans one run per
    condition and replicate with no agent or problem, as the upstream's condition-runner mode.
    """
    standalone = study.standalone if standalone is None else standalone
    cells = []
    offset = 0
    replicates = study.run_budget.replicates
    for condition in conditions:
        if not condition.admissible:
            continue
        if standalone:
            agents: tuple[Any, ...] = (None,)
            problems: tuple[Any, ...] = (None,)
        else:
            agents = _bound_ids(study, condition, AGENT_FACTORS, study.agent_specs, "default-agent")
            problems = _bound_ids(
                study, condition, PROBLEM_FACTORS, study.problem_ids, "default-problem"
            )
        cell = PlanCell(condition, agents, problems, offset)
        cells.append(cell)
        offset += replicates * cell.runs_per_replicate
    return cells


class _CellHasher:
    """Pre-serialized payload parts for one cell; ``spec(r, a, p)`` costs two sha256 calls."""

    def __init__(self, study: Study, cell: PlanCell) -> None:
        self.study = study
        self.cell = cell
        study_id_json = canonical_json(study.study_id)
        condition_json = canonical_json(cell.condition.condition_id)
        self.agent_json = [canonical_json(agent) for agent in cell.agents]
        self.problem_json = [canonical_json(problem) for problem in cell.problems]
        self.run_mid = f',"condition_id":{condition_json},"problem_id":'
        self.run_tail = f',"study_id":{study_id_json}}}'
        policy = study.seed_policy
        seed_head = (
            f'{{"base_seed":{canonical_json(policy.base_seed)},"condition_id":{condition_json},'
            f'"per_run_offset":{canonical_json(policy.per_run_offset)},"replicate":'
        )
        self.seed_state = hashlib.sha256(seed_head.encode("utf-8"))
        self.seed_tail = (
            f',"strategy":{canonical_json(policy.strategy)},"study_id":{study_id_json}}}'
        )
        self.salts = [
            [canonical_json(f"{agent}:{problem}") for problem in cell.problems]
            for agent in cell.agents
        ]

    def ids(self, replicate: int, agent_index: int, problem_index: int) -> tuple[str, int]:
        """``(run_id, seed)`` of one run of this cell."""
        run_payload = (
            f'{{"agent_id":{self.agent_json[agent_index]}{self.run_mid}'
            f'{self.problem_json[problem_index]},"replicate":{replicate}{self.run_tail}'
        )
        run_id = "run-" + hashlib.sha256(run_payload.encode("utf-8")).hexdigest()[:12]
        seed_hash = self.seed_state.copy()
        seed_hash.update(
            f'{replicate},"salt":{self.salts[agent_index][problem_index]}{self.seed_tail}'.encode()
        )
        return run_id, int(seed_hash.hexdigest()[:16], 16) % _SEED_MODULUS


class PlanRow(NamedTuple):
    """One run as positions in its cell plus its ids; cheaper than a :class:`RunSpec`."""

    cell: PlanCell
    replicate: int
    agent_index: int
    problem_index: int
    plan_index: int
    run_id: str
    seed: int

    def spec(self, study_id: str) -> RunSpec:
        condition = self.cell.condition
        return RunSpec(
            study_id=study_id,
            run_id=self.run_id,
            condition_id=condition.condition_id,
            replicate=self.replicate,
            seed=self.seed,
            agent_id=self.cell.agents[self.agent_index],
            problem_id=self.cell.problems[self.problem_index],
            factor_assignments=condition.factor_assignments,
            block_assignments=condition.block_assignments,
            index=self.plan_index,
            condition_fingerprint=condition.fingerprint,
        )


def _limit(study: Study, cells: Sequence[PlanCell]) -> int:
    total = sum(study.run_budget.replicates * cell.runs_per_replicate for cell in cells)
    max_runs = study.run_budget.max_runs
    return total if max_runs is None else min(total, max_runs)


def iter_run_specs(
    study: Study,
    conditions: Sequence[Condition] | None = None,
    *,
    order: str = "plan",
    standalone: bool | None = None,
) -> Iterator[RunSpec]:
    """Yield the study's run specs, in plan order or in a dispatch order.

    ``RunSpec.index`` is always the plan position, whatever the order.
    """
    study_id = study.study_id
    for row in iter_plan_rows(study, conditions, order=order, standalone=standalone):
        yield row.spec(study_id)


def iter_plan_rows(
    study: Study,
    conditions: Sequence[Condition] | None = None,
    *,
    order: str = "plan",
    standalone: bool | None = None,
) -> Iterator[PlanRow]:
    """Like :func:`iter_run_specs`, but yields :class:`PlanRow` (for writers of millions)."""
    if order not in DISPATCH_ORDERS:
        raise ValueError(f"unknown dispatch order {order!r}; use one of {DISPATCH_ORDERS}")
    if conditions is None:
        conditions = build_conditions(study)
    cells = plan_cells(study, conditions, standalone=standalone)
    limit = _limit(study, cells)
    if order == "plan":
        yield from _plan_order(study, cells, limit)
    else:
        yield from _balanced_order(study, cells, limit)


def _plan_order(study: Study, cells: Sequence[PlanCell], limit: int) -> Iterator[PlanRow]:
    index = 0
    replicates = study.run_budget.replicates
    for cell in cells:
        ids = _CellHasher(study, cell).ids
        for replicate in range(1, replicates + 1):
            for agent_index in range(len(cell.agents)):
                for problem_index in range(len(cell.problems)):
                    if index >= limit:
                        return
                    run_id, seed = ids(replicate, agent_index, problem_index)
                    yield PlanRow(cell, replicate, agent_index, problem_index, index, run_id, seed)
                    index += 1


def _balanced_order(study: Study, cells: Sequence[PlanCell], limit: int) -> Iterator[PlanRow]:
    """Replicate by replicate; inside one, plan positions shuffled with the study seed.

    Holds one replicate's plan positions (8 bytes each), never the specs themselves; cell
    hashers are built when a cell is first reached.
    """
    hashers: dict[int, _CellHasher] = {}
    starts = [cell.offset for cell in cells]
    for replicate in range(1, study.run_budget.replicates + 1):
        positions = array("q")
        for cell in cells:
            width = cell.runs_per_replicate
            first = cell.offset + (replicate - 1) * width
            positions.extend(range(first, min(first + width, limit)))
        rng = random.Random(
            canonical_json(
                {
                    "base_seed": study.seed_policy.base_seed,
                    "replicate": replicate,
                    "study_id": study.study_id,
                }
            )
        )
        rng.shuffle(positions)
        for position in positions:
            cell_index = _find_cell(starts, position)
            cell = cells[cell_index]
            hasher = hashers.get(cell_index)
            if hasher is None:
                hasher = hashers[cell_index] = _CellHasher(study, cell)
            within = position - cell.offset
            replicate_of, rest = divmod(within, cell.runs_per_replicate)
            agent_index, problem_index = divmod(rest, len(cell.problems))
            run_id, seed = hasher.ids(replicate_of + 1, agent_index, problem_index)
            yield PlanRow(
                cell, replicate_of + 1, agent_index, problem_index, position, run_id, seed
            )


def _find_cell(starts: Sequence[int], position: int) -> int:
    from bisect import bisect_right

    return bisect_right(starts, position) - 1


@dataclass(slots=True)
class PlanSummary:
    """Counts for ``studyq plan --format table`` and ``validate``; computed without specs."""

    conditions: int = 0
    admissible: int = 0
    planned: int = 0
    total_before_cut: int = 0
    replicates: int = 1
    by_condition: Counter[str] = field(default_factory=Counter)
    by_agent: Counter[str] = field(default_factory=Counter)
    by_problem: Counter[str] = field(default_factory=Counter)
    labels: dict[str, str] = field(default_factory=dict)

    @property
    def cut(self) -> int:
        """Runs dropped by ``run_budget.max_runs``."""
        return self.total_before_cut - self.planned


def summarize(
    study: Study, conditions: Sequence[Condition], *, standalone: bool | None = None
) -> PlanSummary:
    """Count runs per condition, agent and problem, honouring ``max_runs``, in O(cells)."""
    cells = plan_cells(study, conditions, standalone=standalone)
    replicates = study.run_budget.replicates
    limit = _limit(study, cells)
    summary = PlanSummary(
        conditions=len(conditions),
        admissible=len(cells),
        planned=limit,
        total_before_cut=sum(replicates * cell.runs_per_replicate for cell in cells),
        replicates=replicates,
    )
    for cell in cells:
        cid = cell.condition.condition_id
        summary.labels.setdefault(cid, cell.condition.label)
        remaining = max(0, min(limit - cell.offset, replicates * cell.runs_per_replicate))
        if remaining == 0:
            continue
        summary.by_condition[cid] += remaining
        full, partial = divmod(remaining, cell.runs_per_replicate)
        for a_index, agent in enumerate(cell.agents):
            for p_index, problem in enumerate(cell.problems):
                within = a_index * len(cell.problems) + p_index
                count = full + (1 if within < partial else 0)
                if count:
                    summary.by_agent["" if agent is None else str(agent)] += count
                    summary.by_problem["" if problem is None else str(problem)] += count
    return summary


@dataclass(slots=True)
class PreparedStudy:
    """A study that passed every check, with its conditions and run counts."""

    study: Study
    conditions: list[Condition]
    summary: PlanSummary
    source: str | None = None
    standalone: bool = False

    def run_specs(self, *, order: str = "plan") -> Iterator[RunSpec]:
        return iter_run_specs(self.study, self.conditions, order=order, standalone=self.standalone)

    def plan_fingerprint(self) -> str:
        """Hash of what the plan is built from beyond the definition: the conditions (a
        custom matrix file or a callable constraint can change them), run count and mode."""
        payload = [[c.condition_id, c.admissible] for c in self.conditions] + [
            self.summary.planned,
            self.standalone,
        ]
        return hashlib.sha256(canonical_json(payload).encode("utf-8")).hexdigest()


def prepare(
    study: Study | str | Path,
    *,
    runnable: bool = True,
    max_bytes: int | None = None,
    standalone: bool | None = None,
) -> PreparedStudy:
    """Load (if given a path), build the design and count the plan, checking everything.

    ``runnable`` adds the upstream's dry-run checks (a problem to run, an admissible
    condition, at least one run); planning alone does not need them.
    """
    from orchestrator.contracts.errors import StudyValidationError
    from orchestrator.study.model import load_study
    from orchestrator.study.validation import runnable_problems

    source = None
    if not isinstance(study, Study):
        source = str(study)
        study = load_study(study, max_bytes=max_bytes)
    try:
        conditions = build_conditions(study)
    except StudyValidationError as exc:
        raise StudyValidationError(exc.problems, source) from None
    standalone = study.standalone if standalone is None else standalone
    summary = summarize(study, conditions, standalone=standalone)
    if runnable:
        problems = runnable_problems(study, conditions, summary.planned, standalone=standalone)
        if problems:
            raise StudyValidationError(problems, source)
    return PreparedStudy(study, conditions, summary, source, standalone)
