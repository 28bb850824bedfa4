"""The study every fault test sweeps, and its fault-free reference.

One shape (:class:`Shape`): the ``sleep`` agent (bound to :func:`fault_agents.counted_sleep`,
the demo agent plus a call tally) on the ``noop`` problem, ``arms`` conditions that differ only
by a factor level, ``replicates`` runs each, each sleeping ``sleep_s``. The study id is fixed
per shape, so the distributed sweep (in a database of its own) and the embedded reference
have the same run ids and seeds; only ``execution.queue`` differs between tests, which no id
depends on and no CSV artifact shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from orchestrator.api import run_study
from orchestrator.study.model import Study, parse_study
from orchestrator.study.plan import PreparedStudy, prepare

AGENT_REFERENCE = "fault_agents:counted_sleep"


@dataclass(frozen=True, slots=True)
class Shape:
    """How big a fault study is and how long each run sleeps."""

    arms: int
    replicates: int
    sleep_s: float

    @property
    def runs(self) -> int:
        return self.arms * self.replicates

    @property
    def study_id(self) -> str:
        return f"faults-{self.runs}x{int(self.sleep_s * 1000)}ms"


FAULT_SWEEP = Shape(arms=4, replicates=60, sleep_s=0.04)
"""240 runs of 40 ms: about 3 s on two workers of two slots, long enough for faults to land
mid-sweep, short enough for the whole folder to stay within minutes on two cores."""

LONG_SWEEP = Shape(arms=4, replicates=60, sleep_s=0.15)
"""240 runs of 150 ms, about 9 s on two workers of two slots, for tests whose faults come in
rounds (each starting a CLI or a worker) and must still find runs in flight to kill in the
last round; with 40 ms runs a fast worker can finish the sweep before it."""

BIG_SWEEP = Shape(arms=4, replicates=250, sleep_s=0.002)
"""1,000 short runs: the fault-free sweep of test 1."""


def payload(shape: Shape, *, queue: str = "studyq") -> dict[str, Any]:
    """The study as the mapping a study file holds."""
    return {
        "study_id": shape.study_id,
        "title": f"fault study: {shape.runs} sleep runs of {shape.sleep_s} s",
        "description": "studyq fault tests (tests/faults)",
        "agent_specs": ["sleep"],
        "problem_ids": ["noop"],
        "factors": [
            {
                "name": "sleep_s",
                "kind": "manipulated",
                "levels": [{"name": "s", "value": shape.sleep_s}],
            },
            {
                "name": "arm",
                "kind": "manipulated",
                "levels": [{"name": f"arm{i}", "value": i} for i in range(shape.arms)],
            },
        ],
        "design_spec": {"kind": "full_factorial"},
        "run_budget": {"replicates": shape.replicates},
        "seed_policy": {"base_seed": 20240607},
        "bindings": {"agents": {"sleep": AGENT_REFERENCE}},
        "execution": {"queue": queue, "max_attempts": 3},
    }


def study(shape: Shape, *, queue: str = "studyq") -> Study:
    return parse_study(payload(shape, queue=queue))


def prepared(shape: Shape, *, queue: str = "studyq") -> PreparedStudy:
    return prepare(study(shape, queue=queue))


def write_study_file(shape: Shape, directory: Path, *, queue: str) -> Path:
    """The study as a YAML file, for ``studyq submit``."""
    path = directory / f"{shape.study_id}.yaml"
    path.write_text(yaml.safe_dump(payload(shape, queue=queue), sort_keys=False))
    return path


def run_reference(shape: Shape, directory: Path, database_url: str) -> Path:
    """The fault-free artifacts: the embedded ``run_study`` of the same study (threads: the
    agent only sleeps) recorded in ``database_url``, exported to ``directory / "artifacts"``;
    returns that folder."""
    out_dir = directory / "artifacts"
    outcome = run_study(
        study(shape),
        jobs=16,
        threads=True,
        db=database_url,
        show_progress=False,
        output_dir=out_dir,
    )
    assert outcome.complete, f"the fault-free reference run did not complete: {outcome.counts}"
    return out_dir
