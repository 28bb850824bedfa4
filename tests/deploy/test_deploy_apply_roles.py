"""deploy/postgres/apply-roles.sh: roles.sql first, then each role's password from the
environment or a secret file, never on a command line.

A stand-in psql on PATH records every call (its arguments, its standard input and the
password variable); one integration test runs the script's password statement through the
real psql and server, with a password full of quoting traps.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from deploy_files import REPO
from deploy_pg import PG_PORT, Roles, admin_connect
from psycopg import sql

SCRIPT = REPO / "deploy" / "postgres" / "apply-roles.sh"
FAKE_PSQL = """#!/bin/sh
# Records one call per file: arguments, standard input, the password variable.
n=$(ls "$CALLS" | grep -c '[.]args$')
printf '%s\\n' "$@" > "$CALLS/$n.args"
cat > "$CALLS/$n.stdin"
printf '%s' "${STUDYQ_ROLE_PASSWORD:-}" > "$CALLS/$n.password"
exit "${FAKE_PSQL_EXIT:-0}"
"""
HOSTILE_PASSWORD = 'it\'s a "secret" \\ with spaces; DROP ROLE x; --'


@pytest.fixture
def calls(tmp_path: Path) -> Path:
    folder = tmp_path / "calls"
    folder.mkdir()
    (tmp_path / "bin").mkdir()
    psql = tmp_path / "bin" / "psql"
    psql.write_text(FAKE_PSQL)
    psql.chmod(0o755)
    return folder


def _run(calls: Path, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["sh", str(SCRIPT)],
        env={"PATH": f"{calls.parent / 'bin'}:/usr/bin:/bin", "CALLS": str(calls), **env},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def _call(calls: Path, n: int) -> tuple[list[str], str, str]:
    return (
        (calls / f"{n}.args").read_text().splitlines(),
        (calls / f"{n}.stdin").read_text(),
        (calls / f"{n}.password").read_text(),
    )


def test_roles_sql_then_one_password_statement_per_role(calls: Path, tmp_path: Path) -> None:
    secret_file = tmp_path / "worker_password"
    secret_file.write_text("from-the-file\n")
    done = _run(
        calls,
        STUDYQ_COORDINATOR_DB_PASSWORD="coordinator-pw",
        STUDYQ_WORKER_DB_PASSWORD="ignored-when-a-file-is-given",
        STUDYQ_WORKER_DB_PASSWORD_FILE=str(secret_file),
        STUDYQ_ANALYST_DB_PASSWORD=HOSTILE_PASSWORD,
    )
    assert done.returncode == 0, done.stderr
    args, _, _ = _call(calls, 0)
    assert args == ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", str(SCRIPT.parent / "roles.sql")]
    expected = {
        1: ("studyq_coordinator", "coordinator-pw"),
        2: ("studyq_worker", "from-the-file"),
        3: ("studyq_analyst", HOSTILE_PASSWORD),
    }
    for n, (role, password) in expected.items():
        args, stdin, given = _call(calls, n)
        assert args == ["-X", "-q", "-v", "ON_ERROR_STOP=1", "-v", f"role={role}"]
        assert given == password
        assert "\\getenv password STUDYQ_ROLE_PASSWORD" in stdin
        assert "ALTER ROLE :\"role\" PASSWORD :'password';" in stdin
        assert password not in stdin
    assert len(list(calls.glob("*.args"))) == 4


def test_a_role_without_a_password_keeps_its_own(calls: Path) -> None:
    done = _run(calls, STUDYQ_WORKER_DB_PASSWORD="worker-pw")
    assert done.returncode == 0
    assert len(list(calls.glob("*.args"))) == 2
    assert "no password given for studyq_coordinator" in done.stderr
    assert "no password given for studyq_analyst" in done.stderr


def test_a_failing_psql_stops_the_script(calls: Path) -> None:
    done = _run(calls, FAKE_PSQL_EXIT="3", STUDYQ_WORKER_DB_PASSWORD="worker-pw")
    assert done.returncode == 3
    assert len(list(calls.glob("*.args"))) == 1, "no password is set after a failed roles.sql"


def _scram_matches(verifier: str, password: str) -> bool:
    """Whether a SCRAM-SHA-256 verifier (``SCRAM-SHA-256$iter:salt$StoredKey:ServerKey``)
    was made from ``password`` (RFC 5802; an ASCII password needs no SASLprep)."""
    match = re.fullmatch(r"SCRAM-SHA-256\$(\d+):([^$]+)\$([^:]+):(.+)", verifier)
    assert match, verifier
    iterations, salt, stored_key, server_key = match.groups()
    salted = hashlib.pbkdf2_hmac(
        "sha256", password.encode(), base64.b64decode(salt), int(iterations)
    )
    client_key = hmac.new(salted, b"Client Key", "sha256").digest()
    return hashlib.sha256(client_key).digest() == base64.b64decode(stored_key) and hmac.new(
        salted, b"Server Key", "sha256"
    ).digest() == base64.b64decode(server_key)


@pytest.mark.integration
def test_the_password_statement_sets_a_hostile_password_verbatim(
    roles: Roles, roles_db: str
) -> None:
    """The script's SQL (psql variables, \\getenv) on the real server: the role can log in
    with exactly that password, quotes, backslash and all."""
    psql = shutil.which("psql")
    if psql is None:
        pytest.skip("psql is not installed")
    match = re.search(r"<<'SQL'\n(.*?)\nSQL\n", SCRIPT.read_text(), flags=re.S)
    assert match, "the password statement is a quoted here-document"
    role = roles.login("analyst")
    done = subprocess.run(
        [
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-v",
            f"role={role}",
            "-h",
            "127.0.0.1",
            "-p",
            str(PG_PORT),
            "-U",
            "postgres",
            "-d",
            roles_db,
        ],
        input=match.group(1) + "\n",
        env={"STUDYQ_ROLE_PASSWORD": HOSTILE_PASSWORD, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    try:
        with admin_connect() as admin:
            row = admin.execute(
                "SELECT rolpassword FROM pg_authid WHERE rolname = %s", [role]
            ).fetchone()
        assert row is not None
        assert _scram_matches(row[0], HOSTILE_PASSWORD)
        assert not _scram_matches(row[0], HOSTILE_PASSWORD.replace("\\", ""))
    finally:
        with admin_connect() as admin:
            admin.execute(
                sql.SQL("ALTER ROLE {} PASSWORD {}").format(
                    sql.Identifier(role), sql.Literal(roles.passwords["analyst"])
                )
            )
