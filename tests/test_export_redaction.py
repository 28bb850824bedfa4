"""The evidence records' redaction shortcut: a record is written without the redaction walk
only when the walk could not change it, and the usual LLM metrics do not force the walk."""

from __future__ import annotations

import itertools

import pytest

from orchestrator.export_records import _MAYBE_SENSITIVE, _compact, maybe_sensitive, redact

KEYS = (
    "api_key", "API-KEY", " Authorization ", "bearer_token", "client_secret", "credential",
    "credentials", "Password", "private_key", "refresh_token", "Refresh Token", "secret",
    "access_token", "access-token", "openai_api_key", "my_access_token", "db_password",
    "x_secret", "aws_credentials", "ssh_private_key", "access_to\u212aen", "s\u212aey",
    "input_tokens", "output_tokens", "token", "tokens_per_s", "prompt", "latency_s",
)  # fmt: skip
TEXTS = (
    "Bearer abc.def", "bearer\tzzz", "API key: 123", "access-token=xyz", "refresh token : q",
    "sk-abcdefghijklmno", "ghp_abcdefghijklmnopqrstuvwxyz", "GHP_abcdefghijklmnopqrstuv",
    "plain words", "tokens: 12", "", "é \u212a", "see api docs",
)  # fmt: skip


@pytest.mark.parametrize(("key", "text"), list(itertools.product(KEYS, TEXTS)))
def test_a_record_redaction_would_change_is_never_skipped(key: str, text: str) -> None:
    record = {"metrics": {key: 1, "note": text}, "observations": [{key: text}], key: [text]}
    if redact(record) != record:
        assert maybe_sensitive(_compact(record).lower()), (key, text)


@pytest.mark.parametrize(("key", "text"), list(itertools.product(KEYS, TEXTS)))
def test_the_substring_shortcut_is_the_pattern(key: str, text: str) -> None:
    for record in ({key: text}, {"metrics": {key: 1}, "note": text}, {"k": f"{key} {text}"}):
        lowered = _compact(record).lower()
        assert maybe_sensitive(lowered) == (_MAYBE_SENSITIVE.search(lowered) is not None)


@pytest.mark.parametrize(
    "text",
    ["access token", "refresh-token", "accesstoken", "ghs_", "gh_", "ghx_", "token", "\\u00e9"],
)
def test_each_alternative_of_the_pattern(text: str) -> None:
    assert maybe_sensitive(text) == (_MAYBE_SENSITIVE.search(text) is not None)


def test_token_counts_alone_skip_the_walk() -> None:
    record = {"metrics": {"input_tokens": 10, "output_tokens": 3, "cost_usd": 0.1}}
    assert not maybe_sensitive(_compact(record).lower())
    assert redact(record) == record
