"""The one exception tree of studyq.

::

    StudyqError
    ├── StudyError                 a study file or reference is wrong (CLI exit 2, nothing written)
    │   ├── StudyValidationError   carries every problem found, each with file, field and fix
    │   ├── ConstraintExpressionError   (orchestrator.study.constraints) a constraint cannot be
    evaluated │   └── SettingsError          a setting, secret file or service password is wrong
    ├── StoreError                 the result store refused or failed an operation
    │   ├── StudyConflictError     a different definition is already registered under a study_id
    │   ├── StoreURLError          the database URL cannot be parsed or names another backend
    │   └── StoreUnavailableError  the database cannot be reached (retryable)
    ├── BrokerUnavailableError     the broker cannot be reached (retryable)
    └── RunFailure                 a run failed terminally; never retried by the transport
        ├── BindingError           a reference cannot be resolved or is not allowed
        └── RunTimeoutError        the run exceeded ``execution.timeout_s``

Retryable infrastructure errors (``StoreUnavailableError``, ``BrokerUnavailableError``) are
kept apart from terminal run failures so a transport never retries a run that can only fail
again, and never gives up on a result because the database blinked.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = [
    "BindingError",
    "BrokerUnavailableError",
    "Problem",
    "RunFailure",
    "RunTimeoutError",
    "SettingsError",
    "StoreError",
    "StoreURLError",
    "StoreUnavailableError",
    "StudyConflictError",
    "StudyError",
    "StudyInFlightError",
    "StudyValidationError",
    "StudyqError",
]


class StudyqError(Exception):
    """Root of every error studyq raises on purpose."""


class StudyError(StudyqError):
    """A study file, reference or flag is wrong; the user must change the input."""


@dataclass(frozen=True, slots=True)
class Problem:
    """One problem found in a study: where it is, what is wrong, how to fix it."""

    field: str
    message: str
    fix: str = ""

    def render(self, source: str | None = None) -> str:
        """One line: ``file: field: message Fix: ...``."""
        where = f"{source}: " if source else ""
        location = f"{self.field}: " if self.field else ""
        fix = f" Fix: {self.fix}" if self.fix else ""
        return f"{where}{location}{self.message}{fix}"


class StudyValidationError(StudyError):
    """Every problem found in one study, reported at once."""

    def __init__(self, problems: list[Problem], source: str | None = None) -> None:
        self.problems = list(problems)
        self.source = source
        super().__init__("\n".join(problem.render(source) for problem in self.problems))


class SettingsError(StudyError):
    """A ``STUDYQ_*`` variable, a ``*_FILE`` secret, or the credentials in a URL are wrong;
    the message names the variable and the fix."""


class StoreError(StudyqError):
    """The result store refused or failed an operation."""


class StudyConflictError(StoreError):
    """A different study definition is already registered under the same ``study_id``."""


class StoreURLError(StoreError):
    """The database URL cannot be parsed or names a backend studyq does not support."""


class StoreUnavailableError(StoreError):
    """The database cannot be reached; retry later."""


class StudyInFlightError(StoreError):
    """A study cannot be deleted: some of its runs are still planned, queued or running."""

    def __init__(self, study_id: str, in_flight: dict[str, int]) -> None:
        self.study_id = study_id
        self.in_flight = in_flight
        listed = ", ".join(f"{count:,} {status}" for status, count in in_flight.items())
        super().__init__(
            f"study '{study_id}' still has runs in flight ({listed}); nothing was deleted. "
            f"Fix: `studyq cancel {study_id}` first (`--terminate` also stops the running "
            "ones), or let them finish."
        )


class BrokerUnavailableError(StudyqError):
    """The broker cannot be reached; retry later."""


class RunFailure(StudyqError):
    """A run failed terminally; transports must not retry it."""


class BindingError(RunFailure):
    """An agent, problem or runner reference cannot be resolved, or is not on the allow-list."""


class RunTimeoutError(RunFailure):
    """The run exceeded its time limit."""
