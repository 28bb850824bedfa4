"""docs/deploy.md covers what the lab engineer needs, and everything it names exists: files,
commands, settings."""

from __future__ import annotations

import re

import pytest
from deploy_files import REPO, parse_env_file

from orchestrator.cli import main as studyq_main
from workers.config import WorkerSettings

DOC = REPO / "docs" / "deploy.md"


def _text() -> str:
    return DOC.read_text()


def test_the_guide_covers_every_deployment_task() -> None:
    headings = [
        line.lstrip("#").strip().lower() for line in _text().splitlines() if line.startswith("## ")
    ]
    for topic in (
        "docker compose",
        "slurm",
        "kubernetes",
        "scaling",
        "monitoring",
        "upgrading",
        "backing up",
        "secrets",
        "database roles",
    ):
        assert any(topic in heading for heading in headings), topic
    text = _text()
    for needle in (
        "docker compose up -d --scale worker=",
        "studyq db upgrade",
        "pg_dump --format=custom",
        "pg_restore",
        "--exit-on-error",
        "STUDYQ_DATABASE_URL_FILE",
        "STUDYQ_BROKER_URL_FILE",
        "#SBATCH --signal=B:TERM@",
        "scancel --batch --signal=TERM",
        "kubectl apply -k deploy/kubernetes",
        "studyq_worker",
        "studyq_analyst",
        "studyq_coordinator",
    ):
        assert needle in text, needle


def test_every_file_the_guide_names_exists() -> None:
    named = set(
        re.findall(r"`((?:deploy|docs|orchestrator|workers|tests|examples)/[\w./-]+)`", _text())
    )
    named |= {
        name
        for name in ("docker-compose.yml", "Dockerfile", ".env.example")
        if f"`{name}`" in _text()
    }
    assert len(named) >= 8
    for path in named:
        assert (REPO / path).exists(), path


def _code(text: str) -> str:
    """The guide's code, without shell comments: fenced blocks and inline spans."""
    blocks = [
        re.sub(r"#.*", "", block) for block in re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    ]
    spans = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(blocks + spans)


def test_every_studyq_command_the_guide_shows_exists(capsys: pytest.CaptureFixture[str]) -> None:
    # `studyq COMMAND`; not `kubectl -n studyq ...` nor a URL's `.../studyq`
    used = set(re.findall(r"(?<!-n )(?<![/\w-])studyq ([a-z]+)\b", _code(_text())))
    assert {"db", "check", "status", "submit", "wait", "run", "export", "worker"} <= used
    for command in sorted(used):
        with pytest.raises(SystemExit) as exit_info:
            studyq_main([command, "--help"])
        assert exit_info.value.code == 0, f"studyq {command}: {capsys.readouterr().err}"


def test_every_setting_the_guide_names_exists() -> None:
    known = {f"STUDYQ_{name.upper()}" for name in WorkerSettings.model_fields}
    known |= {"STUDYQ_DATABASE_URL_FILE", "STUDYQ_BROKER_URL_FILE"}
    known |= set(parse_env_file(REPO / ".env.example")[0])
    known |= set(
        re.findall(
            r"STUDYQ_[A-Z0-9_]*[A-Z0-9]", (REPO / "deploy/slurm/studyq-workers.sbatch").read_text()
        )
    )
    known |= set(
        re.findall(
            r"STUDYQ_[A-Z0-9_]*[A-Z0-9]", (REPO / "deploy/postgres/apply-roles.sh").read_text()
        )
    )
    named = set(re.findall(r"STUDYQ_[A-Z0-9_]*[A-Z0-9]\b(?!<)", _text()))
    unknown = {name for name in named if name not in known and not name.endswith("_DB_PASSWORD")}
    assert not unknown, unknown
