"""Fixtures every test folder shares.

* ``services``: the session's :class:`_services.ServiceSupplier` (PostgreSQL databases, Redis
  database numbers, the RabbitMQ vhost), everything it made removed at the end.
* ``transport``: ``"redis"`` or ``"rabbitmq"``. A test whose fixtures use it runs once on
  each (the ``rabbitmq`` case carries the ``rabbitmq`` marker: ``-m "not rabbitmq"`` leaves
  it out), unless it is marked ``redis_only(reason)``: it reads Redis itself. A test that
  asks for the raw Redis client ``redis_db`` must be marked so.
"""

from __future__ import annotations

import signal
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from _services import ServiceSupplier

from workers import bindings

# A suite started in the background by a shell without job control inherits SIGINT (and
# SIGQUIT) ignored, and every process it starts inherits that too: the tests that press
# Ctrl-C would then see it ignored. They test a terminal's default, so restore it.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def services() -> Iterator[ServiceSupplier]:
    supplier = ServiceSupplier()
    try:
        yield supplier
    finally:
        supplier.close()


@pytest.fixture(scope="session")
def transport(request: pytest.FixtureRequest) -> str:
    """The broker's transport of this test case (parametrised by pytest_generate_tests)."""
    kind: str = request.param
    return kind


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "transport" not in metafunc.fixturenames:
        return
    redis_only = metafunc.definition.get_closest_marker("redis_only")
    if redis_only is None and "redis_db" in metafunc.fixturenames:
        raise TypeError(
            f"{metafunc.definition.nodeid} reads Redis (fixture redis_db) but would also run "
            "on RabbitMQ: mark it @pytest.mark.redis_only(reason)"
        )
    params = [pytest.param("redis", id="redis")]
    if redis_only is None:
        params.append(pytest.param("rabbitmq", marks=pytest.mark.rabbitmq, id="rabbitmq"))
    metafunc.parametrize("transport", params, indirect=True, scope="session")


@pytest.fixture
def marker_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[str, Path]]:
    """A module whose import writes a marker file: proof that it was (not) imported."""
    name = f"studyq_marker_{tmp_path.name.replace('-', '_')}"
    marker = tmp_path / "imported.marker"
    (tmp_path / f"{name}.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('imported')\n\n"
        "def agent(seed):\n    return {'output': {'text': 'ran'}}\n",
        encoding="utf-8",
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    yield name, marker
    sys.modules.pop(name, None)
    bindings._imported.pop(f"{name}:agent", None)
