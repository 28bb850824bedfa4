"""Retries by error class, the fast parts: which exceptions are transient (workers.transient),
the backoff with full jitter, RateLimited, and the store's transient ending on SQLite."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import types
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest

from orchestrator.contracts.extensions import RetryPolicy
from orchestrator.contracts.results import ErrorKind, RunStatus, failed_result
from orchestrator.contracts.runspec import RunSpec
from orchestrator.embedded import register
from orchestrator.store import ResultStore
from orchestrator.store.engine import transaction
from orchestrator.store.retries import RETRIED, requeue_transient
from orchestrator.study.model import parse_study
from orchestrator.study.plan import prepare
from workers.bindings import Resolver
from workers.execution import execute_run
from workers.transient import (
    ErrorCatch,
    RateLimited,
    RetryRules,
    error_classes,
    is_transient,
    retry_delay,
)


@pytest.fixture
def lab_errors() -> Iterator[str]:
    """A module ``lab_errors_<id>`` with an exception class ``Transient`` and a non-class."""
    name = f"lab_errors_{id(object())}"
    module = types.ModuleType(name)

    class Transient(Exception):
        pass

    module.Transient = Transient  # type: ignore[attr-defined]
    module.NOT_A_CLASS = 7  # type: ignore[attr-defined]
    sys.modules[name] = module
    yield name
    del sys.modules[name]


# --- the classifier ----------------------------------------------------------------------


def test_builtin_names_match_by_isinstance_subclasses_included():
    # Given retry.on naming TimeoutError and ConnectionError
    classes = error_classes(["TimeoutError", "ConnectionError"])
    # Then those errors and their subclasses are transient, others are not
    assert is_transient(TimeoutError("slow"), classes)
    assert is_transient(ConnectionResetError("reset"), classes)  # a ConnectionError
    assert not is_transient(ValueError("bad"), classes)
    assert not is_transient(RuntimeError("boom"), classes)


def test_rate_limited_is_transient_only_when_listed():
    # Given RateLimited listed, and a list without it
    listed = error_classes(["RateLimited"])
    unlisted = error_classes(["TimeoutError"])
    # Then studyq's own class matches only where it is listed
    assert is_transient(RateLimited("429"), listed)
    assert not is_transient(RateLimited("429"), unlisted)
    # And an empty retry list makes nothing transient
    assert not is_transient(TimeoutError(), error_classes([]))


def test_import_references_resolve_through_the_allow_list(lab_errors: str):
    # Given a study's own exception class named by import reference
    reference = f"{lab_errors}:Transient"
    error = sys.modules[lab_errors].Transient("restarting")
    # When the worker may import it, it is transient
    assert is_transient(error, error_classes([reference]))
    # When the worker may not (not trusted, not allowed), it matches nothing: the run fails
    assert not is_transient(error, error_classes([reference], allowed=lambda _: False))
    # And a reference that does not import, or names no exception class, matches nothing
    assert error_classes([f"{lab_errors}:Missing", f"{lab_errors}:NOT_A_CLASS"]) == ()
    assert error_classes(["no_such_module_xyz:Error"]) == ()


def test_rules_from_a_stored_definition():
    # Given a stored execution section with a retry policy
    definition = {
        "execution": {
            "timeout_s": 5,
            "queue": "llm",
            "retry": {"on": ["TimeoutError", "RateLimited"], "backoff_s": 0.5},
        }
    }
    # When the worker builds its rules
    rules = RetryRules.from_definition(definition, allowed=lambda _: True, grace_s=2.0)
    # Then they name the classes, the queue and the messages' hard limit
    assert rules is not None
    assert rules.classes == (TimeoutError, RateLimited)
    assert (rules.queue, rules.hard_limit_s, rules.policy.backoff_s) == ("llm", 7.0, 0.5)
    # And a study without retry (or with an empty list) retries nothing
    assert RetryRules.from_definition({}, allowed=lambda _: True, grace_s=1) is None
    empty = {"execution": {"retry": {"on": []}}}
    assert RetryRules.from_definition(empty, allowed=lambda _: True, grace_s=1) is None


# --- the delay ---------------------------------------------------------------------------


def test_full_jitter_stays_under_the_exponential_ceiling_capped_at_max_backoff():
    # Given backoff_s 1 and max_backoff_s 5
    policy = RetryPolicy(on=["TimeoutError"], backoff_s=1.0, max_backoff_s=5.0)
    rng = random.Random(7)
    # When delays are drawn for attempts 1..6
    for attempt, ceiling in [(1, 1.0), (2, 2.0), (3, 4.0), (4, 5.0), (5, 5.0), (6, 5.0)]:
        draws = [retry_delay(policy, attempt, rng=rng) for _ in range(400)]
        # Then each lies in [0, min(max_backoff_s, backoff_s * 2**(attempt-1))] and fills it
        assert min(draws) >= 0.0 and max(draws) <= ceiling
        assert max(draws) > 0.8 * ceiling and min(draws) < 0.2 * ceiling
    # And a huge attempt number does not overflow
    assert 0 <= retry_delay(policy, 10_000, rng=rng) <= 5.0


def test_retry_after_is_a_floor_even_above_max_backoff():
    policy = RetryPolicy(on=["RateLimited"], backoff_s=0.1, max_backoff_s=1.0)
    rng = random.Random(1)
    # Given a provider asking to wait 0.5 s, then 30 s (above max_backoff_s)
    # Then the delay is at least what it asked, and exactly it when above the cap
    assert all(retry_delay(policy, 1, 0.5, rng=rng) >= 0.5 for _ in range(100))
    assert retry_delay(policy, 1, 30.0, rng=rng) == 30.0


def test_jitter_does_not_touch_the_global_random_state():
    # Given the global random state (the one a run's seed sets)
    policy = RetryPolicy(on=["TimeoutError"])
    random.seed(123)
    expected = random.random()
    random.seed(123)
    # When delays are drawn with the default generator
    for _ in range(10):
        retry_delay(policy, 2)
    # Then the run's random sequence is unchanged
    assert random.random() == expected


# --- RateLimited and the error hook --------------------------------------------------------


def test_rate_limited_pickles_with_its_retry_after():
    # Given a RateLimited (a prefork child may send it to the parent)
    error = RateLimited("429 from the provider", retry_after_s=2.5)
    # Then it survives pickling with its message and retry_after_s
    copy = pickle.loads(pickle.dumps(error))
    assert isinstance(copy, RateLimited) and copy.retry_after_s == 2.5
    assert str(copy) == "429 from the provider (retry after 2.5 s)"
    assert RateLimited().retry_after_s is None


def test_execute_run_hands_the_exception_to_on_error(make_spec: Callable[..., RunSpec]):
    # Given an agent that raises a RateLimited
    def agent(seed: int) -> None:
        raise RateLimited("429", retry_after_s=1.0)

    catch = ErrorCatch()
    # When it is executed with an error hook
    result = execute_run(make_spec("a"), Resolver(agents={"a": agent}), on_error=catch)
    # Then the result is failed as always, and the hook has the exception object itself
    assert result.status is RunStatus.FAILED and result.error_type == "RateLimited"
    assert isinstance(catch.error, RateLimited) and catch.error.retry_after_s == 1.0


# --- the store's transient ending ----------------------------------------------------------


def _study(store: ResultStore, max_attempts: int) -> str:
    payload = {
        "study_id": f"retry-{id(store)}-{max_attempts}",
        "title": "retries",
        "agent_specs": ["noop"],
        "problem_ids": ["noop"],
        "execution": {"max_attempts": max_attempts, "retry": {"on": ["TimeoutError"]}},
    }
    prepared = prepare(parse_study(payload))
    register(store, prepared)
    store.mark_queued(prepared.study.study_id, [0])
    return prepared.study.study_id


def test_requeue_transient_until_the_attempts_run_out(tmp_path: Path):
    # Given a run with max_attempts 2, claimed once
    store = ResultStore.open(f"sqlite:///{tmp_path / 'studyq.db'}")
    study_id = _study(store, max_attempts=2)
    spec = store.find_run(study_id, 0)
    assert spec is not None
    [claim] = store.claim_runs(study_id, [0], worker="w:1", lease_s=30)
    failed = failed_result(
        spec.spec,
        ErrorKind.ERROR,
        error_type="TimeoutError",
        message="slow provider",
        started_at=datetime.now(UTC),
        worker="w:1",
    )
    # When its attempt 1 fails transiently
    with transaction(store.engine) as connection:
        assert requeue_transient(connection, claim, failed, 5.0)
    # Then the run is queued again at attempt 1 (charged), and the attempt closed as retried
    row = store.find_run(study_id, 0)
    assert row is not None and (row.status, row.attempt, row.attempts_used) == ("queued", 1, 1)
    assert row.queued_at is not None and row.lease_owner is None
    [attempt] = store.iter_attempts(study_id)
    assert (attempt.outcome, attempt.error_type, attempt.error_message) == (
        RETRIED,
        "TimeoutError",
        "slow provider",
    )
    # And the same claim cannot re-queue it again (fenced)
    with transaction(store.engine) as connection:
        assert not requeue_transient(connection, claim, failed, 0.0)
    # When attempt 2 (its last) fails transiently too, it is not re-queued
    [second] = store.claim_runs(study_id, [0], worker="w:2", lease_s=30)
    with transaction(store.engine) as connection:
        assert not requeue_transient(connection, second, failed, 0.0)
    # And recording the failure as usual ends it
    assert store.finish_run(second, failed)
    row = store.find_run(study_id, 0)
    assert row is not None and (row.status, row.attempt) == ("failed", 2)
    store.close()


# --- studyq validate: retry.on references resolve -------------------------------------------


def test_validate_names_a_retry_reference_that_does_not_resolve(tmp_path: Path):
    # Given a study whose retry.on names a real exception class, a module attribute that is
    # not one, and a module that does not exist
    (tmp_path / "lab_retry_agents.py").write_text(
        "def agent(seed):\n    return {'output': {'seed': seed}}\n\n"
        "class Transient(Exception):\n    pass\n\nNOT_AN_EXCEPTION = 1\n",
        encoding="utf-8",
    )
    study = tmp_path / "study.yaml"
    study.write_text(
        "study_id: retry-validate\ntitle: t\nagent_specs: [a]\nproblem_ids: [noop]\n"
        "bindings:\n  agents: {a: 'lab_retry_agents:agent'}\n"
        "execution:\n  retry:\n    on: [TimeoutError, 'lab_retry_agents:Transient',\n"
        "         'lab_retry_agents:NOT_AN_EXCEPTION', 'lab_retry_missing:Error']\n",
        encoding="utf-8",
    )
    before = sorted(path.name for path in tmp_path.iterdir())

    def validate(*flags: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "orchestrator.cli", "validate", str(study), *flags],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip

    # When it is validated without running the study's code
    done = validate()
    # Then the reference whose module is missing is named, exit 2 (that the attribute is not
    # an exception class takes an import to see)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = [line for line in done.stderr.splitlines() if "execution.retry.on" in line]
    assert line.startswith(f"{study}: execution.retry.on[3]: ")
    assert "No module named 'lab_retry_missing'" in line and "Fix: " in line
    # When it is validated with --import
    done = validate("--import")
    # Then it exits 2 with one line per bad reference naming file, field and fix
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if "execution.retry.on" in line]
    assert len(lines) == 2
    assert lines[0].startswith(f"{study}: execution.retry.on[2]: ")
    assert "is int, not an exception class. Fix: name an exception class" in lines[0]
    assert lines[1].startswith(f"{study}: execution.retry.on[3]: ")
    assert "No module named 'lab_retry_missing'" in lines[1] and "Fix: " in lines[1]
    # And nothing was written next to the study
    assert sorted(path.name for path in tmp_path.iterdir()) == before
    # And --no-resolve skips the import
    assert validate("--no-resolve").returncode == 0


def test_the_retry_message_is_the_coordinators_run_message(make_spec: Callable[..., RunSpec]):
    from orchestrator.executors.celery.messages import MessageBuilder
    from workers.transient import run_message

    # Given a run and the coordinator's message builder
    spec = make_spec("a", factors={"temperature": 0.7})
    built = MessageBuilder(queue="llm", origin="1@host", hard_limit_s=12.0).build(spec, 2, "")
    # When the worker builds the message of the run's next attempt
    task_id, body, headers = run_message(spec, 2, origin="1@host", hard_limit_s=12.0)
    # Then it is the same message: task id, body and headers
    assert (task_id, body, headers) == (built.task_id, built.body, built.headers)


def test_redeliveries_publish_each_message_when_due_and_flush_the_rest(
    make_spec: Callable[..., RunSpec], monkeypatch: pytest.MonkeyPatch
):
    import threading
    import time

    from workers import transient

    published: list[tuple[str, float]] = []
    done = threading.Event()

    def publish(app: object, queue: str, rules: object, spec: RunSpec, attempt: int) -> None:
        published.append((spec.run_id, time.monotonic()))
        if len(published) == 3:
            done.set()

    monkeypatch.setattr(transient, "publish_run", publish)
    rules = RetryRules(RetryPolicy(on=["TimeoutError"]), (TimeoutError,), "q", None)
    timer = transient.Redeliveries()
    # Given three messages scheduled out of order, and one due much later
    start = time.monotonic()
    for run_id, delay in (("late", 0.3), ("early", 0.05), ("middle", 0.15), ("far", 60.0)):
        timer.schedule(delay, None, "q", rules, make_spec(run_id=run_id), 1)
    # Then the first three are published in the order they are due, none before its time
    assert done.wait(5)
    assert [run_id for run_id, _ in published] == ["early", "middle", "late"]
    for (_, at), delay in zip(published, (0.05, 0.15, 0.3), strict=True):
        assert at - start >= delay
    assert timer.pending == 1
    # When the process stops, the one still waiting is published at once
    assert timer.flush() == 1
    assert published[-1][0] == "far" and timer.pending == 0
