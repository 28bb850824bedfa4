"""Retrying through a database outage, holding back termination during a write, and
reading run messages (no services needed)."""

from __future__ import annotations

import logging
import signal
from datetime import UTC, datetime
from types import FrameType

import pytest

from orchestrator.contracts.canonical import canonical_json, sha256_hex
from orchestrator.contracts.errors import StoreError, StoreUnavailableError
from orchestrator.contracts.runspec import RunSpec, spec_digest
from orchestrator.store import StudyInfo
from workers.interrupt import deferred_termination
from workers.retrying import MAX_DELAY_S, retry_unavailable
from workers.runtask import InvalidRunMessage, mismatch_reason, parse_delivery
from workers.runtime import StudyContext

log = logging.getLogger("test.retrying")


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def flaky(failures: int, error: Exception) -> object:
    calls = {"n": 0}

    def call() -> str:
        calls["n"] += 1
        if calls["n"] <= failures:
            raise error
        return "written"

    return call


def test_an_outage_is_retried_with_capped_exponential_backoff(caplog: pytest.LogCaptureFixture):
    clock = FakeClock()
    call = flaky(8, StoreUnavailableError("connection refused"))
    with caplog.at_level(logging.INFO, logger="test.retrying"):
        result = retry_unavailable(
            call, what="recording", budget_s=600, log=log, sleep=clock.sleep, clock=clock
        )
    assert result == "written"
    assert clock.sleeps == [0.25, 0.5, 1.0, 2.0, 4.0, 8.0, MAX_DELAY_S, MAX_DELAY_S]
    assert caplog.text.count("database unavailable while recording") == 8
    assert "succeeded after 9 tries" in caplog.text


def test_the_outage_budget_ends_with_the_error():
    clock = FakeClock()
    call = flaky(1000, StoreUnavailableError("connection refused"))
    with pytest.raises(StoreUnavailableError):
        retry_unavailable(
            call, what="recording", budget_s=30, log=log, sleep=clock.sleep, clock=clock
        )
    assert sum(clock.sleeps) == pytest.approx(30)


def test_other_store_errors_are_not_retried():
    clock = FakeClock()
    with pytest.raises(StoreError):
        retry_unavailable(
            flaky(1, StoreError("schema mismatch")),
            what="recording",
            budget_s=600,
            log=log,
            sleep=clock.sleep,
            clock=clock,
        )
    assert clock.sleeps == []


@pytest.mark.parametrize("spec", [None, "run-1", {"run_id": "x"}, {"study_id": "s"}])
def test_a_message_without_a_run_spec_is_invalid(spec: object):
    with pytest.raises(InvalidRunMessage):
        parse_delivery(spec, 0)


def test_termination_is_held_back_during_a_write_and_delivered_after():
    # Given a process whose SIGTERM handler records the signal
    seen: list[str] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        seen.append("handled")

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        # When SIGTERM arrives in the middle of a write
        with deferred_termination() as held:
            signal.raise_signal(signal.SIGTERM)
            seen.append("write finished")
            assert held == [signal.SIGTERM]
        # Then the write finishes first, and the handler runs right after
        assert seen == ["write finished", "handled"]
        assert signal.getsignal(signal.SIGTERM) is handler
    finally:
        signal.signal(signal.SIGTERM, previous)


def _info(definition: dict[str, object]) -> StudyInfo:
    return StudyInfo("s", definition, "h", "p", 1, 1, 3, "tester", datetime.now(UTC), [])


def test_a_study_asks_for_durable_claims_with_execution_at_most_once() -> None:
    assert StudyContext.build(_info({"execution": {"at_most_once": True}}), []).at_most_once
    assert not StudyContext.build(_info({"execution": {}}), []).at_most_once
    assert not StudyContext.build(_info({}), []).at_most_once


def test_a_message_that_agrees_with_the_store_has_no_mismatch_reason() -> None:
    # Given a registered spec and the message that carries it
    spec = RunSpec("s", "run-1", "cond-1", 1, 7, "a", "p", {"x": 1.0}, {}, 3, "fp")
    message = spec.to_message()
    digest = spec_digest(message)
    # Then the message agrees (a duplicate delivery at worst), whatever key order it has
    assert mismatch_reason(spec, dict(reversed(message.items())), digest, 0, 0) is None
    assert mismatch_reason(spec, message, digest, 2, 2) is None
    # ...while each kind of disagreement is named
    forged = {**message, "seed": 8}
    assert "seed" in str(mismatch_reason(spec, forged, spec_digest(forged), 0, 0))
    assert "attempt 3" in str(mismatch_reason(spec, message, digest, 3, 2))
    assert "does not have" in str(mismatch_reason(None, message, digest, 0, 0))
    # ...the digest is the SHA-256 of the canonical JSON ids and seeds are hashed from
    assert digest == sha256_hex(canonical_json(message))
    # ...and it sees a float that became an int, or an extra key
    assert spec_digest({**message, "factor_assignments": {"x": 1}}) != digest
    assert spec_digest({**message, "extra": None}) != digest
