"""Live cross-check: studyq and design-research-experiments 0.4.0 plan the same studies alike.

The upstream package needs Python >= 3.12 while studyq's venv may be 3.11, so upstream runs in
its own venv (``<repo>/.cache/upstream-venv``, built on first use from PyPI) and prints its
plan through ``tests/compat/upstream_plan.py``; studyq plans in-process; the records are
compared as canonical JSON text (``compat.harness``). Three checks:

* the committed golden files are still exactly what upstream prints (no stale goldens);
* every corpus study plans identically (same conditions, runs, order; same rejections);
* a seeded batch of random studies plans identically (``compat.random_studies``).

Finding Python 3.12: ``$STUDYQ_PY312``, then ``python3.12`` on PATH, then pyenv. If none runs,
or the venv cannot be built (no network), the tests skip, unless ``STUDYQ_REQUIRE_COMPAT=1``
makes that a failure (set it in CI). ``STUDYQ_COMPAT_SEED`` / ``STUDYQ_COMPAT_RANDOM_STUDIES``
choose another random batch, e.g. to hunt for new differences locally.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn

import pytest
from compat.harness import (
    CORPUS_DIR,
    UPSTREAM_PLAN,
    corpus_studies,
    golden_path,
    group_by_study,
    metadata_mismatch,
    plan_mismatch,
    read_records,
    studyq_records,
)
from compat.random_studies import write_random_studies

pytestmark = pytest.mark.compat

UPSTREAM_REQUIREMENT = "design-research-experiments==0.4.0"
REPO_ROOT = Path(__file__).resolve().parents[1]
VENV_DIR = REPO_ROOT / ".cache" / "upstream-venv"
RANDOM_SEED = int(os.environ.get("STUDYQ_COMPAT_SEED", "20261129"))
RANDOM_COUNT = int(os.environ.get("STUDYQ_COMPAT_RANDOM_STUDIES", "30"))
STUDIES = corpus_studies()

_VERSION_PROBE = "import sys; print('%d.%d' % sys.version_info[:2])"
_UPSTREAM_PROBE = "import importlib.metadata as m; print(m.version('design-research-experiments'))"


def _unavailable(reason: str) -> NoReturn:
    """Skip locally; fail where the cross-check is required (CI)."""
    if os.environ.get("STUDYQ_REQUIRE_COMPAT") == "1":
        pytest.fail(f"compat check required but unavailable: {reason}")
    pytest.skip(reason)


def _clean_env() -> dict[str, str]:
    """Environment for the upstream interpreter: nothing of studyq's venv may leak in."""
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP"}
    }
    env["PYTHONIOENCODING"] = "utf-8"
    return env


def _probe(command: list[str], timeout: float = 20) -> str | None:
    """Stdout of a short command, or None if it does not run cleanly."""
    try:
        done = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            env=_clean_env(),
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def _python312_candidates() -> Iterator[str]:
    explicit = os.environ.get("STUDYQ_PY312")
    if explicit:
        yield explicit
    on_path = shutil.which("python3.12")
    if on_path:
        yield on_path  # may be a pyenv shim that fails when 3.12 is not selected
    prefix = _probe(["pyenv", "prefix", "3.12"]) if shutil.which("pyenv") else None
    if prefix:
        yield str(Path(prefix.splitlines()[-1]) / "bin" / "python3.12")
    pattern = str(Path.home() / ".pyenv" / "versions" / "3.12*" / "bin" / "python3.12")
    yield from sorted(glob.glob(pattern), reverse=True)
    yield from ("/usr/local/bin/python3.12", "/usr/bin/python3.12")


def _find_python312() -> tuple[str | None, list[str]]:
    """The first candidate that really runs as 3.12, and what was tried (for the skip text)."""
    tried: list[str] = []
    for candidate in _python312_candidates():
        if _probe([candidate, "-c", _VERSION_PROBE]) == "3.12":
            return candidate, tried
        tried.append(candidate)
    return None, tried


def _venv_python() -> Path:
    scripts = "Scripts" if sys.platform == "win32" else "bin"
    return VENV_DIR / scripts / ("python.exe" if sys.platform == "win32" else "python")


def _build_venv(python312: str) -> None:
    """Create the venv and install the pinned upstream package from PyPI."""
    steps = [
        [python312, "-m", "venv", "--clear", str(VENV_DIR)],
        [
            str(_venv_python()),
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-input",
            UPSTREAM_REQUIREMENT,
        ],
    ]
    for step in steps:
        try:
            done = subprocess.run(
                step, capture_output=True, text=True, timeout=600, check=False, env=_clean_env()
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            _unavailable(f"cannot build {VENV_DIR}: {exc}")
        if done.returncode != 0:
            _unavailable(f"cannot build {VENV_DIR}: {' '.join(step[:4])}: {done.stderr[-800:]}")


@pytest.fixture(scope="module")
def upstream_python() -> Path:
    """A Python 3.12 with design-research-experiments 0.4.0, reused across sessions."""
    expected_version = UPSTREAM_REQUIREMENT.split("==")[1]
    if _probe([str(_venv_python()), "-c", _UPSTREAM_PROBE]) != expected_version:
        python312, tried = _find_python312()
        if python312 is None:
            _unavailable(f"python3.12 not available: tried {', '.join(tried) or 'nothing'}")
        _build_venv(python312)
        installed = _probe([str(_venv_python()), "-c", _UPSTREAM_PROBE])
        if installed != expected_version:
            _unavailable(f"{VENV_DIR} has design-research-experiments {installed!r}")
    return _venv_python()


def _run_upstream(python: Path, studies: list[Path], cwd: Path) -> str:
    """Upstream's records for the studies, planned with ``cwd`` as working directory."""
    done = subprocess.run(
        [str(python), str(UPSTREAM_PLAN), *(study.name for study in studies)],
        cwd=cwd,
        capture_output=True,
        text=True,
        encoding="utf-8",
        timeout=300,
        check=False,
        env=_clean_env(),
    )
    assert done.returncode == 0, f"upstream_plan.py failed:\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def upstream_corpus_text(upstream_python: Path) -> str:
    """Upstream's live output over the whole corpus (one interpreter start)."""
    return _run_upstream(upstream_python, STUDIES, CORPUS_DIR)


@pytest.fixture(scope="module")
def upstream_corpus(upstream_corpus_text: str) -> dict[str, list[dict[str, Any]]]:
    """The live corpus records, per study."""
    return group_by_study(read_records(upstream_corpus_text))


@pytest.fixture(scope="module")
def random_batch(
    upstream_python: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[Path], dict[str, list[dict[str, Any]]]]:
    """The random studies, their folder, and upstream's records for them."""
    folder = tmp_path_factory.mktemp("random-studies")
    studies = write_random_studies(folder, RANDOM_COUNT, RANDOM_SEED)
    records = group_by_study(read_records(_run_upstream(upstream_python, studies, folder)))
    return folder, studies, records


def test_golden_files_match_live_upstream(upstream_corpus_text: str) -> None:
    """The committed golden files are byte-for-byte what upstream prints today."""
    live: dict[str, list[str]] = {}
    for line in upstream_corpus_text.splitlines():
        live.setdefault(read_records(line)[0]["study"], []).append(line)

    assert sorted(live) == sorted(study.name for study in STUDIES)
    for study in STUDIES:
        golden_lines = golden_path(study).read_text(encoding="utf-8").splitlines()
        assert live[study.name] == golden_lines, (
            f"{study.name}: tests/golden is stale; regenerate it (see tests/test_golden.py)"
        )


@pytest.mark.parametrize("study", STUDIES, ids=lambda path: path.name)
def test_corpus_study_matches_live_upstream(
    study: Path,
    upstream_corpus: dict[str, list[dict[str, Any]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a corpus study, studyq plans it as the live upstream does, metadata included."""
    monkeypatch.chdir(CORPUS_DIR)
    expected = upstream_corpus[study.name]
    actual = studyq_records(study)

    problem = plan_mismatch(study.name, expected, actual) or metadata_mismatch(
        study.name, expected, actual
    )

    assert problem is None, problem


def test_random_batch_is_varied(
    random_batch: tuple[Path, list[Path], dict[str, list[dict[str, Any]]]],
) -> None:
    """The generator must keep producing both planned and rejected studies, or it tests little."""
    _, studies, records = random_batch
    rejected = [name for name, items in records.items() if items[0]["kind"] == "rejected"]

    assert len(records) == len(studies) == RANDOM_COUNT
    assert 1 <= len(rejected) <= RANDOM_COUNT // 2
    assert sum(item["kind"] == "run" for items in records.values() for item in items) > 0


@pytest.mark.parametrize("index", range(RANDOM_COUNT), ids=lambda index: f"random-{index:02d}")
def test_random_study_matches_live_upstream(
    index: int,
    random_batch: tuple[Path, list[Path], dict[str, list[dict[str, Any]]]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Given a random study (seed STUDYQ_COMPAT_SEED), studyq plans it as upstream does."""
    folder, studies, records = random_batch
    study = studies[index]
    monkeypatch.chdir(folder)
    expected = records[study.name]
    actual = studyq_records(study)
    source = f"\n--- {study.name} (STUDYQ_COMPAT_SEED={RANDOM_SEED}) ---\n" + study.read_text(
        encoding="utf-8"
    )

    problem = plan_mismatch(study.name, expected, actual) or metadata_mismatch(
        study.name, expected, actual
    )

    assert problem is None, f"{problem}{source}"
