"""``studyq status`` prints each group of failed runs as a sentence, not a record's repr."""

from __future__ import annotations

from orchestrator.cli.cluster_commands import _describe_error
from orchestrator.store.records import ErrorSummary


def test_an_error_group_reads_as_a_sentence():
    # Given the top error groups of a study, as the store returns them
    groups = [
        ErrorSummary("timeout", "RunTimeoutError", 12, "run exceeded\n its limit of 5 s"),
        ErrorSummary("binding", "BindingError", 1, "x" * 300),
        ErrorSummary(None, None, 2, None),
    ]
    # When status describes them
    lines = [_describe_error(group) for group in groups]
    # Then each says how many runs failed, with which kind and class of error, and an example
    # on one line, clipped
    assert lines[0] == (
        "12 runs failed with a timeout error (RunTimeoutError), e.g.: run exceeded its limit of 5 s"
    )
    assert lines[1].startswith("1 run failed with a binding error (BindingError), e.g.: xxx")
    assert lines[1].endswith("...") and len(lines[1]) < 200
    assert lines[2] == "2 runs failed with an error"
    assert all("ErrorSummary" not in line for line in lines)
