"""Determinism: a run computes the same thing whichever pool ran it, and every time.

The study mixes ``random-search``, which draws from Python's global ``random`` *and* NumPy's
global state, with ``hill-climb``, which draws from the ``rng`` it is handed. Processes
(``--jobs 1`` in-process, ``--jobs 4`` process pool) seed and restore global state per run, so
both agents are deterministic there. Threads share global state, so only ``hill-climb`` is
promised to be deterministic with ``--threads`` (docs/embedded.md).
"""

from __future__ import annotations

from pathlib import Path

import pytest
from embedded_support import (
    CSV_FILES,
    cli_env,
    comparable_csv,
    comparable_manifest,
    explain,
    factor,
    finish,
    run_outcomes,
    start_cli,
    write_study,
)

STUDY_ID = "determinism"
RUNS = 2 * 2 * 12


def _study(path: Path) -> Path:
    return write_study(
        path,
        {
            "study_id": STUDY_ID,
            "title": "Determinism across pools",
            "factors": [factor("agent", "random-search", "hill-climb"), factor("budget", 30)],
            "problem_ids": ["beam-design", "spring-design"],
            "design_spec": {"kind": "full_factorial"},
            "run_budget": {"replicates": 12},
            "seed_policy": {"base_seed": 11},
        },
    )


@pytest.mark.timeout(90)
def test_same_outputs_serial_process_pool_and_repeated(tmp_path: Path) -> None:
    """Given one study with a global-RNG agent and an rng-handed agent,
    when it runs with --jobs 1, with --jobs 4 (process pool), again with --jobs 1, and with
    --threads --jobs 4, each into a fresh store,
    then the first three record identical outputs, metrics, evaluations and events for every
    run id and export identical artifacts (timestamps and latencies aside), and the thread
    pool agrees with them on every hill-climb run."""
    study = _study(tmp_path / "study.yaml")
    configurations = {
        "serial": ["--jobs", "1"],
        "processes": ["--jobs", "4"],
        "serial-again": ["--jobs", "1"],
        "threads": ["--threads", "--jobs", "4"],
    }
    children = {}
    for name, flags in configurations.items():
        folder = tmp_path / name
        folder.mkdir()
        url = f"sqlite:///{folder / 's.db'}"
        children[name] = (
            folder,
            url,
            start_cli(["run", str(study), "--db", url, *flags], folder, env=cli_env()),
        )
    for name, (_, _, child) in children.items():
        done = finish(child, timeout=80)
        assert done.returncode == 0, f"{name}: {explain(done)}"

    outcomes = {name: run_outcomes(url, STUDY_ID) for name, (_, url, _) in children.items()}
    serial = outcomes["serial"]
    assert len(serial) == RUNS
    assert {run["status"] for run in serial.values()} == {"success"}
    assert len({repr(run["outputs"]) for run in serial.values()}) == RUNS  # seeds matter
    for name in ("processes", "serial-again"):
        differing = sorted(run_id for run_id in serial if outcomes[name][run_id] != serial[run_id])
        assert not differing, f"{name} differs from serial on {len(differing)} runs: {differing}"

    hill_climb = {
        run_id for run_id, run in serial.items() if run["provenance"]["agent_id"] == "hill-climb"
    }
    assert len(hill_climb) == RUNS // 2
    differing = sorted(
        run_id for run_id in hill_climb if outcomes["threads"][run_id] != serial[run_id]
    )
    assert not differing, f"threads differ from serial on hill-climb runs {differing}"

    exported = {name: folder / "artifacts" / STUDY_ID for name, (folder, _, _) in children.items()}
    for name in ("processes", "serial-again"):
        for csv_name in CSV_FILES:
            assert comparable_csv(exported[name] / csv_name) == comparable_csv(
                exported["serial"] / csv_name
            ), f"{name}: {csv_name} differs from the serial run's"
        assert comparable_manifest(exported[name] / "manifest.json") == comparable_manifest(
            exported["serial"] / "manifest.json"
        )
