"""The fault-free reference is the same whichever store the embedded run records in.

The fault tests compare every faulted sweep (recorded in PostgreSQL) with the embedded
``run_study`` of the same study recorded in PostgreSQL. This test checks that the choice does
not matter: the embedded default store (SQLite) exports the same artifacts.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from fault_audit import compare_artifacts
from fault_study import FAULT_SWEEP, Shape, run_reference

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


def test_the_embedded_run_exports_the_same_artifacts_from_sqlite_and_postgresql(
    tmp_path: Path, references: Callable[[Shape], Path]
):
    # Given the fault study's fault-free artifacts from the embedded run on PostgreSQL
    on_postgresql = references(FAULT_SWEEP)
    # When the same study is run embedded on the default store, SQLite
    on_sqlite = run_reference(FAULT_SWEEP, tmp_path, f"sqlite:///{tmp_path / 'studyq.db'}")
    # Then both export the same canonical artifacts (timestamps and latencies aside)
    assert compare_artifacts(on_sqlite, on_postgresql) == []
