"""Fixtures of the deployment tests.

The file tests (compose, Dockerfile, manifests, the Slurm script's shell logic, docs) need
nothing running. The PostgreSQL ones get :class:`RolesCluster`: test-unique stand-ins for
roles.sql's three roles (see :mod:`deploy_pg`) and throwaway databases prepared the way
docs/deploy.md says (roles.sql, ``studyq db upgrade`` as the coordinator, roles.sql again),
all dropped at the end of the session.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from deploy_pg import Roles, RolesCluster, drop_stale, require_postgres


@pytest.fixture(scope="session")
def roles_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RolesCluster]:
    require_postgres()
    drop_stale()
    cluster = RolesCluster(tmp_path_factory.mktemp("roles-sql"))
    try:
        yield cluster
    finally:
        cluster.close()


@pytest.fixture(scope="session")
def roles_db(roles_cluster: RolesCluster) -> str:
    """A database prepared with roles.sql, migrated by the coordinator role."""
    return roles_cluster.prepared_database("")


@pytest.fixture(scope="session")
def roles(roles_cluster: RolesCluster) -> Roles:
    return roles_cluster.roles
