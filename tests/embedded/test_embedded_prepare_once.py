"""`studyq run` loads and plans its study once: the preparation its bindings check made is
the one that runs (a 1,000,000-run study is not planned twice)."""

from __future__ import annotations

from pathlib import Path

import pytest
from embedded_support import QUICKSTART, store_counts

import orchestrator.embedded as embedded
from orchestrator.cli import main
from orchestrator.study.plan import PreparedStudy, prepare

QUICKSTART_ID = "quickstart-design-search"
QUICKSTART_RUNS = 180


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
