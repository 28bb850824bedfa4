"""deploy/pgbouncer: the auth_file script, and the shipped pgbouncer.ini run by a real
PgBouncer (Debian's package) in front of the shared PostgreSQL, with the test-unique
stand-ins of studyq's roles (deploy_pg.py) logging in through it."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from deploy_files import REPO
from deploy_pg import HOST, PG_PORT, Roles
from pgbouncer import require_pgbouncer

from orchestrator.contracts.errors import StoreError
from orchestrator.store import ResultStore

SCRIPT = REPO / "deploy" / "pgbouncer" / "write-userlist.sh"
INI = REPO / "deploy" / "pgbouncer" / "pgbouncer.ini"


def _write_userlist(
    out: str, env: dict[str, str], *command: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["/bin/sh", str(SCRIPT), out, *command],
        env={"PATH": "/usr/bin:/bin", **env},
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )


def test_the_userlist_quotes_passwords_reads_files_and_skips_roles_without_one(
    tmp_path: Path,
) -> None:
    # Given a worker password with a double quote and a space, the analyst's in a file, and
    # no coordinator password
    secret = tmp_path / "analyst"
    secret.write_text("from-a-file\n")
    env = {"STUDYQ_WORKER_DB_PASSWORD": 'a"b c', "STUDYQ_ANALYST_DB_PASSWORD_FILE": str(secret)}
    # When the script writes the auth_file and runs the command after it
    out = tmp_path / "userlist.txt"
    done = _write_userlist(str(out), env, "/bin/echo", "started")
    # Then each role with a password has its line, quotes doubled, the file is private, the
    # command ran, and the missing password was reported
    assert done.returncode == 0, done.stderr
    assert out.read_text() == '"studyq_worker" "a""b c"\n"studyq_analyst" "from-a-file"\n'
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert done.stdout == "started\n"
    assert "studyq_coordinator" in done.stderr
    # and "-" prints it instead, for a Kubernetes Secret, with another login name if asked
    printed = _write_userlist(
        "-", {"STUDYQ_WORKER_DB_PASSWORD": "x", "STUDYQ_WORKER_DB_USER": "bob"}
    )
    assert printed.stdout == '"bob" "x"\n'


@pytest.mark.integration
@pytest.mark.timeout(60)
def test_the_shipped_pgbouncer_ini_lets_each_role_in_with_its_password_only(
    roles: Roles, roles_db: str, tmp_path: Path
) -> None:
    # Given the shipped pgbouncer.ini, pointed at this machine's PostgreSQL and the test's
    # database, and an auth_file written by the script for the stand-in logins
    binary = require_pgbouncer()
    auth_file = tmp_path / "userlist.txt"
    env = {}
    for kind in ("coordinator", "worker", "analyst"):
        env[f"STUDYQ_{kind.upper()}_DB_PASSWORD"] = roles.passwords[kind]
        env[f"STUDYQ_{kind.upper()}_DB_USER"] = roles.login(kind)
    assert _write_userlist(str(auth_file), env).returncode == 0
    port = _free_port()
    ini = (
        INI.read_text()
        .replace("studyq = host=postgres port=5432 dbname=studyq",
                 f"studyq = host={HOST} port={PG_PORT} dbname={roles_db}")
        .replace("listen_addr = 0.0.0.0", f"listen_addr = {HOST}")
        .replace("listen_port = 6432", f"listen_port = {port}")
        .replace("/etc/pgbouncer/auth/userlist.txt", str(auth_file))
    )  # fmt: skip
    assert ini.count(str(auth_file)) == 1 and f"dbname={roles_db}" in ini
    (tmp_path / "pgbouncer.ini").write_text(ini)
    command = [binary, str(tmp_path / "pgbouncer.ini")]
    if os.geteuid() == 0:
        command[1:1] = ["-u", "postgres"]
        tmp_path.chmod(0o755)
        os.chown(auth_file, *_postgres_ids())
    log = (tmp_path / "pgbouncer.log").open("w")
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        _wait_listening(port, process)

        def url(kind: str, password: str) -> str:
            return (
                f"postgresql+psycopg://{roles.login(kind)}:{password}@{HOST}:{port}/studyq"
                "?prepare_threshold=none"
            )

        # When each role opens the store through it, Then it is in, at the current schema
        for kind in ("coordinator", "worker", "analyst"):
            ResultStore.open(url(kind, roles.passwords[kind])).close()
        # and a wrong password is refused
        with pytest.raises(StoreError, match="authentication failed"):
            ResultStore.open(url("worker", "wrong")).close()
    finally:
        process.terminate()
        process.wait(10)
        log.close()


def _postgres_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("postgres")
    return entry.pw_uid, entry.pw_gid


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def _wait_listening(port: int, process: subprocess.Popen[bytes]) -> None:
    import socket
    import time

    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert process.poll() is None, "pgbouncer exited"
        try:
            socket.create_connection((HOST, port), 1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("pgbouncer is not listening")
