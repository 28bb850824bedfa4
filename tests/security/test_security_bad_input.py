"""A wrong database URL never prints its password, not even through the driver's message.

Given a PostgreSQL URL whose password holds an unescaped ``@`` (so the driver takes the
password's tail for part of the host, or of the port), when a real ``studyq`` command tries
to connect to 127.0.0.1 with it, then the error names the database with ``***`` and no part
of the password appears anywhere in the output.
"""

from __future__ import annotations

import pytest
from security_services import find_canary, make_canary

from orchestrator.cli import EXIT_CONNECT, EXIT_USAGE, main
from orchestrator.store.engine import redact

# {head}@{tail} is the password; psycopg reports "failed to resolve host '{tail}@127.0.0.1'"
# for the first and SQLAlchemy "invalid literal for int() ... '{tail}@127.0.0.1'" for the
# second (the tail lands in the port: a URL that does not parse, a usage error).
URLS = {
    "tail-in-host": ("postgresql://studyq:{head}@{tail}@127.0.0.1:5432/studyq", EXIT_CONNECT),
    "tail-in-port": ("postgresql://studyq:{head}@127.0.0.1:{tail}@127.0.0.1/studyq", EXIT_USAGE),
}


@pytest.mark.parametrize("command", [["status"], ["export", "some-study"]])
@pytest.mark.parametrize("case", list(URLS))
def test_a_password_with_an_unescaped_at_sign_is_masked_in_driver_errors(
    case: str,
    command: list[str],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    canary = make_canary()
    head, tail = canary[: len(canary) // 2], canary[len(canary) // 2 :]
    template, expected_code = URLS[case]
    monkeypatch.setenv("STUDYQ_DATABASE_URL", template.format(head=head, tail=tail))

    code = main(command)

    out, err = capsys.readouterr()
    shown = out + err
    assert code == expected_code, shown
    assert "Traceback" not in shown
    assert "***@127.0.0.1" in shown, shown  # the error is there, masked
    for piece in (canary, f"{head}@{tail}", head, tail):
        assert piece not in shown, f"{piece!r} leaked:\n{shown}"
    assert not find_canary(shown, canary), shown


def test_redact_masks_every_piece_of_the_password() -> None:
    url = "postgresql://bob:s3cret@tail:more@db/studyq?sslpassword=keyphrase"
    message = "host 'tail:more@db' port 'more@db' key 'keyphrase' pw 's3cret@tail:more'"
    shown = redact(message, url)
    for piece in ("s3cret", "tail", "more", "keyphrase"):
        assert piece not in shown, shown
    assert "@db" in shown  # the real host stays readable


def test_redact_leaves_a_message_without_secrets_alone() -> None:
    message = 'connection to server at "127.0.0.1", port 5432 failed: Connection refused'
    assert redact(message, "postgresql://bob:s3cret@127.0.0.1/studyq") == message
    assert redact(message, "postgresql://bob@127.0.0.1/studyq") == message
