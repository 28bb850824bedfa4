"""The quickstart works from a fresh environment, as the README and the example promise."""

from __future__ import annotations

import fnmatch
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from embedded_support import (
    ARTIFACT_FILES,
    QUICKSTART,
    REPO_ROOT,
    cli_env,
    explain,
    read_csv,
    run_cli,
    store_counts,
)

QUICKSTART_ID = "quickstart-design-search"
QUICKSTART_RUNS = 180  # 3 strategies x 2 budgets x 2 problems x 15 replicates


@pytest.mark.timeout(60)
def test_quickstart_runs_to_completion_in_an_empty_directory(tmp_path: Path) -> None:
    """Given an empty working directory and a database file that does not exist yet,
    when `studyq run examples/quickstart/study.yaml --db sqlite:///...` runs,
    then it exits 0, records 180 successes and writes the artifact set under artifacts/."""
    url = f"sqlite:///{tmp_path / 's.db'}"

    done = run_cli(["run", str(QUICKSTART), "--db", url], tmp_path)

    assert done.returncode == 0, explain(done)
    assert store_counts(url, QUICKSTART_ID) == {"success": QUICKSTART_RUNS}
    out = tmp_path / "artifacts" / QUICKSTART_ID
    for name in ARTIFACT_FILES:
        assert (out / name).is_file(), f"{name} missing: {sorted(p.name for p in out.iterdir())}"
    assert (out / "artifacts" / "checkpoints").is_dir()
    _, runs = read_csv(out / "runs.csv")
    assert len(runs) == QUICKSTART_RUNS
    assert {row["status"] for row in runs} == {"success"}
    assert f"executed {QUICKSTART_RUNS} runs" in done.stdout
    assert "artifacts: artifacts/quickstart-design-search" in done.stdout


def _readme_first_command() -> str:
    """The first ```bash block of README.md (the quickstart one-liner)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    match = re.search(r"```bash\n(.*?)```", readme, re.DOTALL)
    assert match, "README.md has no ```bash block"
    return match.group(1).strip()


def _copy_checkout(target: Path, root: Path = REPO_ROOT) -> None:
    """The repository's files as a fresh clone has them (tracked and new, not ignored).

    Outside a git checkout (a source tarball, or no git installed) the tree is copied
    without what ``.gitignore`` names, which is what a clone would lack too."""
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=root,
            capture_output=True,
            check=True,
        ).stdout.decode()
    except (OSError, subprocess.CalledProcessError):  # exit 128: not a git repository
        shutil.copytree(root, target, ignore=_ignored(root), dirs_exist_ok=True)
        return
    for name in filter(None, listed.split("\0")):
        source = root / name
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            destination = target / name
            destination.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, destination)


def _ignored(root: Path) -> Callable[[str, list[str]], set[str]]:
    """A ``copytree`` filter for ``.git`` and the name patterns of ``root/.gitignore``
    (ours has no negations or paths, only names and ``dir/`` patterns)."""
    gitignore = root / ".gitignore"
    lines = gitignore.read_text(encoding="utf-8").splitlines() if gitignore.exists() else []
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]

    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {".git"}
        for name in names:
            is_dir = (Path(folder) / name).is_dir()
            for pattern in patterns:
                if pattern.endswith("/") and not is_dir:
                    continue
                if fnmatch.fnmatch(name, pattern.rstrip("/")):
                    skipped.add(name)
        return skipped & set(names)

    return ignore


def test_the_checkout_copy_works_outside_git(tmp_path: Path) -> None:
    """Given a source tree that is not a git checkout (a tarball: `git ls-files` exits 128),
    when it is copied for the README test, then its files are copied and ignored ones not."""
    source = tmp_path / "studyq-1.0"
    for name in ("README.md", "orchestrator/cli.py", "examples/quickstart/study.yaml"):
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text(name, encoding="utf-8")
    for name in (".venv/bin/python", "orchestrator/__pycache__/cli.pyc", "studyq.db",
                 "artifacts/x/runs.csv", "pkg.egg-info/PKG-INFO"):  # fmt: skip
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_text("ignored", encoding="utf-8")
    shutil.copy2(REPO_ROOT / ".gitignore", source / ".gitignore")
    target = tmp_path / "copy"

    _copy_checkout(target, root=source)

    copied = {str(path.relative_to(target)) for path in target.rglob("*") if path.is_file()}
    assert copied == {
        ".gitignore", "README.md", "orchestrator/cli.py", "examples/quickstart/study.yaml",
    }  # fmt: skip


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_readme_first_command_works_as_written(tmp_path: Path) -> None:
    """Given a copy of the checkout without a virtual environment,
    when the README's first command runs verbatim in it (create a venv, pip install -e .,
    studyq run the quickstart),
    then it exits 0 and the quickstart's artifacts and default database appear."""
    command = _readme_first_command()
    assert "studyq run examples/quickstart/study.yaml" in command
    checkout = tmp_path / "checkout"
    _copy_checkout(checkout)
    assert not (checkout / ".venv").exists()

    env = cli_env()
    env.pop("PYTHONPATH")  # nothing but what the command itself installs
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        ["bash", "-c", command],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=280,
        check=False,
    )

    assert done.returncode == 0, explain(done)
    _, runs = read_csv(checkout / "artifacts" / QUICKSTART_ID / "runs.csv")
    assert len(runs) == QUICKSTART_RUNS
    assert (checkout / "studyq.db").is_file()  # the documented default store
