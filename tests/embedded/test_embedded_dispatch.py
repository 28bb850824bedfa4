"""How the embedded coordinator hands runs out: chunk sizes, claims ahead, one preparation.

The speed itself is measured in bench/embedded.py; these tests pin what the speed-ups must
not change: which runs execute, how often, with which seeds, and what is left in the store.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from embedded_support import QUICKSTART, factor, store_counts, write_study

import orchestrator.embedded as embedded
from orchestrator.cli import main
from orchestrator.executors.chunking import TARGET_S, ChunkSizer
from orchestrator.study.plan import PreparedStudy, prepare

QUICKSTART_ID = "quickstart-design-search"
QUICKSTART_RUNS = 180


def test_chunks_grow_to_the_target_time_for_fast_runs() -> None:
    """Given runs of 0.1 ms, when chunks of them are measured, then the size grows (at most
    fourfold a step) to the cap, as TARGET_S / 0.1 ms exceeds it."""
    sizer = ChunkSizer(first=1, most=512)
    sizes = []
    for _ in range(8):
        sizer.observe(sizer.size, sizer.size * 0.0001)
        sizes.append(sizer.size)

    assert sizes[:4] == [4, 16, 64, 200]
    assert sizes[-1] == 200  # TARGET_S / 0.1 ms
    assert int(TARGET_S / 0.0001) == 200


def test_chunks_stay_single_for_runs_as_long_as_the_target() -> None:
    """Given runs of 20 ms or more, then every chunk holds one run (no process waits behind
    another's slow runs at the end of a sweep)."""
    sizer = ChunkSizer(first=1)
    for seconds in (TARGET_S, 0.5, 2.0):
        sizer.observe(1, seconds)
        assert sizer.size == 1


def test_chunks_shrink_when_runs_get_slower() -> None:
    """Given fast runs first, when runs become slow, then the running mean brings the size
    down within a few chunks."""
    sizer = ChunkSizer(first=1)
    for _ in range(6):
        sizer.observe(sizer.size, sizer.size * 0.0001)
    assert sizer.size > 100
    for _ in range(10):
        sizer.observe(sizer.size, sizer.size * 0.05)
    assert sizer.size == 1


def _artifacts(folder: Path) -> dict[str, str]:
    return {
        name: (folder / name).read_text(encoding="utf-8")
        for name in ("conditions.csv", "evaluations.csv")
    }


@pytest.mark.timeout(120)
def test_process_pool_with_growing_chunks_records_what_one_process_records(
    tmp_path: Path,
) -> None:
    """Given the quickstart's 180 fast runs, when they run with --jobs 1 and with --jobs 3
    (chunks sized from run times, claims a batch ahead), then both record 180 successes, no
    run is left claimed, and the seed-derived artifacts are identical."""
    outcomes = {}
    for jobs in (1, 3):
        url = f"sqlite:///{tmp_path / f'jobs{jobs}.db'}"
        out = tmp_path / f"out{jobs}"
        outcome = embedded.run_embedded(
            QUICKSTART, jobs=jobs, db=url, output_dir=out, show_progress=False
        )
        assert outcome.executed == outcome.succeeded == QUICKSTART_RUNS
        assert store_counts(url, QUICKSTART_ID) == {"success": QUICKSTART_RUNS}
        outcomes[jobs] = _artifacts(out)

    assert outcomes[1] == outcomes[3]


@pytest.mark.timeout(120)
def test_a_stopped_sweep_releases_the_claims_taken_ahead(tmp_path: Path) -> None:
    """Given 600 runs whose second half fails, in process with fail_fast (the coordinator
    claims the next batch of 256 while one executes), when the first failure stops the
    sweep, then 300 runs succeeded, one failed, and none is left `running`: the runs claimed
    but never handed out, in this batch and the next, went back to the queue."""
    study = write_study(
        tmp_path / "study.yaml",
        {
            "study_id": "claims-ahead",
            "title": "The second condition fails",
            "factors": [factor("fail", False, True)],
            "agent_specs": ["flaky"],
            "problem_ids": ["noop"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 300},
            "bindings": {"agents": {"flaky": "workers.demo.agents:flaky"}},
        },
    )
    url = f"sqlite:///{tmp_path / 's.db'}"

    outcome = embedded.run_embedded(
        study, jobs=1, db=url, fail_fast=True, export=False, show_progress=False
    )

    assert outcome.stopped_by_fail_fast
    counts = store_counts(url, "claims-ahead")
    assert "running" not in counts, counts
    assert (counts.get("success"), counts.get("failed")) == (300, 1), counts
    assert counts.get("planned", 0) + counts.get("queued", 0) == 299, counts


@pytest.mark.timeout(120)
def test_studyq_run_prepares_the_study_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Given `studyq run` (which checks the study's bindings before it runs anything), when
    it runs the quickstart, then the study file is loaded and planned once: the checked
    preparation is what runs."""
    import orchestrator.study.plan as plan

    prepared: list[PreparedStudy] = []

    def counting_prepare(*args: object, **kwargs: object) -> PreparedStudy:
        result = prepare(*args, **kwargs)  # type: ignore[arg-type]
        prepared.append(result)
        return result

    monkeypatch.setattr(plan, "prepare", counting_prepare)
    monkeypatch.setattr(embedded, "prepare", counting_prepare)
    monkeypatch.chdir(tmp_path)
    url = f"sqlite:///{tmp_path / 's.db'}"

    code = main(["run", str(QUICKSTART), "--db", url, "--jobs", "1", "--no-progress"])

    assert code == 0
    assert len(prepared) == 1
    assert store_counts(url, QUICKSTART_ID) == {"success": QUICKSTART_RUNS}
