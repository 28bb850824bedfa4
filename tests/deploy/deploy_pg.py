"""Throwaway databases and roles for testing deploy/postgres/roles.sql on the real server.

Role names are global to a PostgreSQL cluster that other people's tests share, so the tests
never create or drop ``studyq_coordinator``, ``studyq_worker`` or ``studyq_analyst``
themselves: :class:`Roles` applies roles.sql with those three names replaced by
test-unique ones (``studyq_worker_t<pid>_<hex>``), and creates login roles that are members
of them. Everything is on 127.0.0.1, and every database and role created is dropped at the
end; ones left by a killed session (its pid no longer runs) are dropped by the next one. The
databases themselves come from tests/_services.py.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import _services
import psycopg
from _services import HOST, PG_PORT, _pid_alive, require_postgres, unavailable
from psycopg import sql

from orchestrator.store import upgrade

__all__ = [
    "ADMIN_URL",
    "HOST",
    "KINDS",
    "PG_PORT",
    "ROLES_SQL",
    "Roles",
    "RolesCluster",
    "admin_connect",
    "apply_roles_sql",
    "drop_stale",
    "require_postgres",
    "role_session",
    "unavailable",
]

ADMIN = f"host={HOST} port={PG_PORT} user=postgres dbname=postgres connect_timeout=3"
ADMIN_URL = f"postgresql+psycopg://postgres@{HOST}:{PG_PORT}"
"""SQLAlchemy URL of the server as the superuser, without a database."""
REPO = Path(__file__).resolve().parents[2]
ROLES_SQL = REPO / "deploy" / "postgres" / "roles.sql"
KINDS = ("coordinator", "worker", "analyst")
_ROLE_NAME = re.compile(r"\bstudyq_(coordinator|worker|analyst)\b")
_TEST_ROLE = re.compile(r"studyq_(?:login_)?(?:coordinator|worker|analyst)_t(\d+)_[0-9a-f]+")


def admin_connect(dbname: str = "postgres") -> psycopg.Connection:
    """An autocommit connection as the superuser ``postgres``."""
    dsn = ADMIN.replace("dbname=postgres", f"dbname={dbname}")
    return psycopg.connect(dsn, autocommit=True)


@dataclass
class Roles:
    """Test-unique stand-ins for roles.sql's three roles, with a login member of each."""

    suffix: str = field(default_factory=lambda: f"t{os.getpid()}_{secrets.token_hex(3)}")
    passwords: dict[str, str] = field(
        default_factory=lambda: {kind: secrets.token_hex(12) for kind in KINDS}
    )

    def group(self, kind: str) -> str:
        """The stand-in of ``studyq_<kind>``."""
        return f"studyq_{kind}_{self.suffix}"

    def login(self, kind: str) -> str:
        """A login role that is a member of :meth:`group`, as a person or service would be."""
        return f"studyq_login_{kind}_{self.suffix}"

    def roles_sql(self) -> str:
        """roles.sql with the three role names replaced by this test's."""
        return _ROLE_NAME.sub(lambda match: self.group(match.group(1)), ROLES_SQL.read_text())

    def url(self, kind: str, database: str) -> str:
        """The SQLAlchemy URL a studyq process of this kind would use."""
        return (
            f"postgresql+psycopg://{self.login(kind)}:{self.passwords[kind]}"
            f"@{HOST}:{PG_PORT}/{database}"
        )

    def dsn(self, kind: str, database: str) -> str:
        """The libpq connection string of :meth:`url`."""
        return (
            f"host={HOST} port={PG_PORT} dbname={database} user={self.login(kind)} "
            f"password={self.passwords[kind]} connect_timeout=3"
        )

    def create_logins(self) -> None:
        """Create the login members (after roles.sql created the groups)."""
        with admin_connect() as admin:
            for kind in KINDS:
                admin.execute(
                    sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE {}").format(
                        sql.Identifier(self.login(kind)),
                        sql.Literal(self.passwords[kind]),
                        sql.Identifier(self.group(kind)),
                    )
                )

    def coordinator_owns_what_it_creates(self, database: str) -> None:
        """``ALTER ROLE login IN DATABASE db SET role = group``: what docs/deploy.md tells a
        person who runs migrations to do, so the tables belong to the coordinator role."""
        with admin_connect() as admin:
            admin.execute(
                sql.SQL("ALTER ROLE {} IN DATABASE {} SET role = {}").format(
                    sql.Identifier(self.login("coordinator")),
                    sql.Identifier(database),
                    sql.Literal(self.group("coordinator")),
                )
            )

    def drop(self) -> None:
        """Drop the logins, then the groups (their databases must be dropped first)."""
        with admin_connect() as admin:
            for name in [*(self.login(k) for k in KINDS), *(self.group(k) for k in KINDS)]:
                admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


def apply_roles_sql(roles: Roles, database: str, tmp_dir: Path) -> str:
    """Apply roles.sql as the superuser, as docs/deploy.md says (psql, ON_ERROR_STOP), or
    through psycopg when psql is not installed. Returns psql's messages."""
    script = tmp_dir / f"roles-{secrets.token_hex(4)}.sql"
    script.write_text(roles.roles_sql())
    psql = shutil.which("psql")
    if psql is None:
        with admin_connect(database) as admin:
            admin.execute(script.read_text())  # no parameters: the simple query protocol
        return ""
    done = subprocess.run(
        [
            psql,
            "-X",
            "-q",
            "-v",
            "ON_ERROR_STOP=1",
            "-h",
            HOST,
            "-p",
            str(PG_PORT),
            "-U",
            "postgres",
            "-d",
            database,
            "-f",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, f"roles.sql failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout + done.stderr


def drop_stale() -> None:
    """Drop databases and roles left by killed sessions of these tests."""
    _services.drop_stale_pg_databases()
    with admin_connect() as admin:
        names = [row[0] for row in admin.execute("SELECT rolname FROM pg_roles").fetchall()]
        # Logins first: they are members of the groups.
        for name in sorted(names, key=lambda name: "_login_" not in name):
            match = _TEST_ROLE.fullmatch(name)
            if match and not _pid_alive(int(match.group(1))):
                with contextlib.suppress(psycopg.Error):
                    admin.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))


@contextlib.contextmanager
def role_session(roles: Roles, kind: str, database: str) -> Iterator[psycopg.Connection]:
    """An autocommit connection as the login member of ``kind``."""
    connection = psycopg.connect(roles.dsn(kind, database), autocommit=True)
    try:
        yield connection
    finally:
        connection.close()


class RolesCluster:
    """The session's stand-in roles and the databases prepared with them."""

    def __init__(self, tmp_dir: Path) -> None:
        self.roles = Roles()
        self.tmp_dir = tmp_dir
        self.databases: list[str] = []
        self._logins = False

    def new_database(self, tag: str) -> str:
        """An empty database ``studyq_test_<pid>_roles<tag>`` (``tag``: letters)."""
        name = _services.pg_name(f"roles{tag}")
        _services.create_pg_database(name)
        self.databases.append(name)
        return name

    def apply(self, database: str) -> str:
        output = apply_roles_sql(self.roles, database, self.tmp_dir)
        if not self._logins:
            self.roles.create_logins()
            self._logins = True
        return output

    def prepared_database(self, tag: str, *, migrate_as: str = "coordinator") -> str:
        """roles.sql, ``studyq db upgrade`` (as the coordinator's login, or as the superuser
        with ``migrate_as="postgres"``), roles.sql again: a database ready for a sweep."""
        name = self.new_database(tag)
        self.apply(name)
        if migrate_as == "coordinator":
            self.roles.coordinator_owns_what_it_creates(name)
            upgrade(self.roles.url("coordinator", name))
        else:
            upgrade(f"{ADMIN_URL}/{name}")
        self.apply(name)
        return name

    def close(self) -> None:
        for name in self.databases:
            _services.drop_pg_database(name)
        self.roles.drop()
