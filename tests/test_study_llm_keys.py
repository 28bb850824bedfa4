"""The study-file keys of LLM-scale sweeps (issue 12's contract): ``bindings.providers`` and
``execution.limits`` / ``retry`` / ``max_cost_usd`` / ``max_tokens`` / ``breaker``. A study
that uses them parses as written; every wrong value is one problem naming its field and fix."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestrator.contracts.errors import StudyValidationError
from orchestrator.study.model import Study, load_study

FULL = """\
study_id: llm-sweep
title: An LLM sweep
agent_specs: [writer, editor]
problem_ids: [noop]
bindings:
  agents: {writer: "lab.agents:writer", editor: "lab.agents:editor"}
  providers: {writer: openai, editor: openai}  # several agents may share one provider
execution:
  limits:
    openai: {max_concurrency: 8, requests_per_minute: 600, tokens_per_minute: 200000}
  retry: {on: [RateLimited, TimeoutError, ConnectionError, "lab.errors:Transient"], backoff_s: 1.0, max_backoff_s: 60}
  max_attempts: 4
  max_cost_usd: 25.00
  max_tokens: 20000000
  breaker: {window: 50, max_failure_rate: 0.6}
  order: balanced
"""  # noqa: E501 (the issue's example, verbatim)


def _load(tmp_path: Path, text: str) -> Study:
    path = tmp_path / "study.yaml"
    path.write_text(text, encoding="utf-8")
    return load_study(path)


def _problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(StudyValidationError) as raised:
        _load(tmp_path, text)
    return [f"{p.field}: {p.message} Fix: {p.fix}" for p in raised.value.problems]


def test_the_documented_example_parses_as_written(tmp_path: Path) -> None:
    study = _load(tmp_path, FULL)

    execution = study.execution
    assert study.bindings.providers == {"writer": "openai", "editor": "openai"}
    limit = execution.limits["openai"]
    assert (limit.max_concurrency, limit.requests_per_minute, limit.tokens_per_minute) == (
        8, 600, 200000,
    )  # fmt: skip
    assert execution.retry is not None  # YAML 1.1 reads a bare `on:` key as True: it is `on`
    assert execution.retry.on == [
        "RateLimited", "TimeoutError", "ConnectionError", "lab.errors:Transient",
    ]  # fmt: skip
    assert (execution.retry.backoff_s, execution.retry.max_backoff_s) == (1.0, 60.0)
    assert (execution.max_attempts, execution.max_cost_usd, execution.max_tokens) == (
        4, 25.0, 20_000_000,
    )  # fmt: skip
    assert execution.breaker is not None
    assert (execution.breaker.window, execution.breaker.max_failure_rate) == (50, 0.6)
    assert execution.order == "balanced"
    recorded = study.to_upstream_dict()
    assert recorded["execution"]["retry"]["on"][0] == "RateLimited"
    assert recorded["bindings"]["providers"] == {"writer": "openai", "editor": "openai"}


def test_a_study_without_the_new_keys_records_the_same_definition(tmp_path: Path) -> None:
    # Registered studies keep their hash across the upgrade: unset new keys are not recorded
    study = _load(tmp_path, FULL.split("bindings:")[0] + "execution:\n  timeout_s: 5\n")

    recorded = study.to_upstream_dict()["execution"]
    assert recorded == {
        "timeout_s": 5.0, "max_attempts": 3, "queue": "studyq", "rate_limit": None,
        "at_most_once": False, "order": "plan",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            ("max_concurrency: 8", "max_concurrency: 0"),
            "execution.limits.openai.max_concurrency: Input should be greater than or equal to 1",
        ),
        (
            ("requests_per_minute: 600", "requests_per_minute: -5"),
            "execution.limits.openai.requests_per_minute: Input should be greater than 0",
        ),
        (
            ("{max_concurrency: 8, requests_per_minute: 600, tokens_per_minute: 200000}", "{}"),
            "execution.limits.openai: a provider's limits set none of max_concurrency",
        ),
        (
            ('"lab.errors:Transient"', "Transiant"),
            "execution.retry.on[3]: 'Transiant' is not an exception class studyq can name",
        ),
        (
            ("max_backoff_s: 60", "max_backoff_s: 0.5"),
            "execution.retry: max_backoff_s (0.5) is below backoff_s (1.0)",
        ),
        (
            ("max_cost_usd: 25.00", "max_cost_usd: 0"),
            "execution.max_cost_usd: Input should be greater than 0",
        ),
        (
            ("max_tokens: 20000000", "max_tokens: -1"),
            "execution.max_tokens: Input should be greater than 0",
        ),
        (
            ("max_failure_rate: 0.6", "max_failure_rate: 1.5"),
            "execution.breaker.max_failure_rate: Input should be less than or equal to 1",
        ),
        (
            ("window: 50", "window: 0"),
            "execution.breaker.window: Input should be greater than or equal to 1",
        ),
        (
            ("editor: openai}", "editor: opnai}"),
            "bindings.providers.editor: unknown provider 'opnai': `execution.limits` does not "
            "declare it. Fix: declare `execution.limits.opnai: {max_concurrency: ...}`, or name a "
            "declared provider (did you mean 'openai'?): openai.",
        ),
        (
            ("providers: {writer: openai,", "providers: {writter: openai,"),
            "bindings.providers.writter: 'writter' is not an agent of this study. Fix: name one; "
            "did you mean 'writer'?",
        ),
        (
            ("providers: {writer: openai,", "providers: {writer: 'open ai',"),
            "bindings.providers.writer: 'open ai' is not a provider name",
        ),
    ],
    ids=lambda value: value[1][:20] if isinstance(value, tuple) else str(value)[:40],
)
def test_each_wrong_value_is_one_problem_with_its_field_and_fix(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    old, new = change
    assert old in FULL

    problems = _problems(tmp_path, FULL.replace(old, new))

    assert len(problems) == 1, problems
    assert problems[0].startswith(expected), problems
    assert " Fix: " in problems[0] and not problems[0].endswith("Fix: ")
