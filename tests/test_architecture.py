"""The dependency rules of docs/architecture.md, checked on every module's imports.

Every ``import`` and ``from ... import`` statement counts, at module level or inside a
function (a lazy import is still a dependency), as import-linter's forbidden contracts would
count them:

* ``orchestrator`` never imports ``workers`` (the coordinator reaches worker code through the
  entry points of :mod:`orchestrator.contracts.worker_api`);
* ``workers`` imports from ``orchestrator`` only the contracts and the store;
* ``celery``, ``kombu``, ``amqp`` and ``billiard`` are imported only by the Celery executor
  (``orchestrator.executors.celery``) and by the worker app (``workers``);
* the contracts import nothing of ``orchestrator`` but each other.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BROKER_LIBRARIES = ("celery", "kombu", "amqp", "billiard")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, imported module)`` of every import statement in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = (
        _module_name(path).rsplit(".", 1)[0] if path.name != "__init__.py" else _module_name(path)
    )
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the package
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            yield node.lineno, name
            for alias in node.names:  # `from orchestrator import store` imports a module
                yield node.lineno, f"{name}.{alias.name}"


def _product_modules() -> list[Path]:
    return sorted(
        path
        for top in ("orchestrator", "workers")
        for path in (ROOT / top).rglob("*.py")
        if "migrations" not in path.parts
    )


def _is(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def _violations(path: Path) -> list[str]:
    module = _module_name(path)
    found = []
    for line, name in _imports(path):
        where = f"{path.relative_to(ROOT)}:{line} imports {name}"
        if _is(module, "orchestrator") and _is(name, "workers"):
            found.append(f"{where}: orchestrator must not import workers")
        if (
            _is(module, "workers")
            and _is(name, "orchestrator")
            and not (
                _is(name, "orchestrator.contracts")
                or _is(name, "orchestrator.store")
                or name == "orchestrator"
            )
        ):
            found.append(f"{where}: workers may import only orchestrator.contracts and .store")
        if any(_is(name, lib) for lib in BROKER_LIBRARIES) and not (
            _is(module, "orchestrator.executors.celery") or _is(module, "workers")
        ):
            found.append(f"{where}: only the Celery executor and the worker app import {name}")
        if (
            _is(module, "orchestrator.contracts")
            and _is(name, "orchestrator")
            and not (_is(name, "orchestrator.contracts") or name == "orchestrator")
        ):
            found.append(f"{where}: contracts import only other contracts")
    return found


def test_the_product_code_keeps_the_dependency_rules() -> None:
    modules = _product_modules()
    assert len(modules) > 50, "the product modules were not found"
    violations = [line for path in modules for line in _violations(path)]
    assert not violations, "\n".join(violations)


@pytest.mark.parametrize(
    ("module", "source", "rule"),
    [
        (
            "orchestrator/distributed.py",
            "from workers.app import create_app\n",
            "not import workers",
        ),
        ("orchestrator/api.py", "def f():\n    import workers.execution\n", "not import workers"),
        ("orchestrator/cli/x.py", "from kombu import Connection\n", "only the Celery executor"),
        ("orchestrator/reconcile.py", "import celery\n", "only the Celery executor"),
        (
            "workers/runtask.py",
            "from orchestrator.study.plan import prepare\n",
            "only orchestrator.contracts",
        ),
        ("workers/x.py", "from orchestrator import distributed\n", "only orchestrator.contracts"),
        (
            "orchestrator/contracts/x.py",
            "from orchestrator.store import ResultStore\n",
            "contracts import only",
        ),
    ],
)
def test_each_rule_catches_its_violation(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str, rule: str
) -> None:
    # Given a module breaking one rule, written where that module would live
    fake_root = tmp_path
    path = fake_root / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", fake_root)
    # When its imports are checked / Then the rule it breaks is named
    assert any(rule in violation for violation in _violations(path)), _violations(path)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (
            "workers/tasks.py",
            "from celery import Celery\nfrom orchestrator.contracts.wire import TASK_NAME\n",
        ),
        ("orchestrator/executors/celery/redis.py", "from kombu import Connection\n"),
        ("workers/app.py", "from orchestrator.store import ResultStore\n"),
    ],
)
def test_what_the_rules_allow_passes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, module: str, source: str
) -> None:
    path = tmp_path / module
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(source)
    monkeypatch.setattr(__import__(__name__), "ROOT", tmp_path)
    assert _violations(path) == []
