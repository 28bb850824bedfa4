"""studyq's own sections of a study file: ``bindings`` and ``execution``.

design-research-experiments ignores unknown top-level keys, so these sections keep a study
file valid for the upstream package while telling studyq how to find the code to run and how
to run it.
"""

from __future__ import annotations

import builtins
import re
from typing import Annotated, Any, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

__all__ = [
    "RATE_LIMITED",
    "Bindings",
    "BreakerPolicy",
    "ExecutionPolicy",
    "ProviderLimit",
    "RetryPolicy",
]

RATE_LIMITED = "RateLimited"
"""The name under which ``retry.on`` lists ``workers.limits.RateLimited`` (studyq's own
transient error: an agent raises it on a 429, studyq when a provider window is full)."""

_REFERENCE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*:[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)*$")


def check_reference(value: str) -> str:
    """Accept ``package.module:callable`` only; anything else cannot be imported safely."""
    if not _REFERENCE.match(value):
        raise PydanticCustomError(
            "studyq",
            "'{value}' is not an import reference.",
            {"value": value, "fix": "write it as 'package.module:callable'."},
        )
    return value


Reference = Annotated[str, AfterValidator(check_reference)]

_PROVIDER = re.compile(r"^[A-Za-z0-9][\w.-]{0,63}$")


def check_provider(value: str) -> str:
    """A provider name: it becomes part of Redis keys shared by every worker."""
    if not _PROVIDER.match(value):
        raise PydanticCustomError(
            "studyq",
            "'{value}' is not a provider name.",
            {"value": value, "fix": "use letters, digits, '.', '_' or '-' (at most 64)."},
        )
    return value


def check_error_class(value: str) -> str:
    """A built-in exception name (``TimeoutError``), ``RateLimited``, or an import reference
    to an exception class (``lab.errors:Transient``)."""
    if value == RATE_LIMITED or (":" in value and _REFERENCE.match(value)):
        return value
    builtin = getattr(builtins, value, None)
    if isinstance(builtin, type) and issubclass(builtin, BaseException):
        return value
    raise PydanticCustomError(
        "studyq",
        "'{value}' is not an exception class studyq can name.",
        {
            "value": value,
            "fix": "name a built-in exception (TimeoutError, ConnectionError, ...), "
            "RateLimited, or an import reference 'package.module:ErrorClass'.",
        },
    )


Provider = Annotated[str, AfterValidator(check_provider)]
ErrorClass = Annotated[str, AfterValidator(check_error_class)]


class Bindings(BaseModel):
    """Where the code behind agent and problem ids lives.

    ``agents`` / ``problems`` map an id used in the study to ``package.module:callable``.
    ``runner`` names a condition runner for pure simulations (no agent/problem fan-out).
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    agents: dict[str, Reference] = Field(default_factory=dict)
    problems: dict[str, Reference] = Field(default_factory=dict)
    runner: Reference | None = None
    providers: dict[str, Provider] = Field(
        default_factory=dict,
        description="Agent id -> the provider whose `execution.limits` its runs count against "
        "(several agents may share one).",
    )

    def definition_dump(self) -> dict[str, Any]:
        """As the study's definition records it; keys added after a study could be registered
        are left out while unset, so upgrading studyq changes no registered study's hash."""
        return _definition_dump(self, {"providers"})

    def references(self) -> set[str]:
        """Every import reference the study itself names (the default allow-list)."""
        refs = set(self.agents.values()) | set(self.problems.values())
        if self.runner:
            refs.add(self.runner)
        return refs


class ProviderLimit(BaseModel):
    """One provider's limits, enforced cluster-wide (all workers together, through Redis)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_concurrency: int | None = Field(
        default=None, ge=1, description="Runs of the provider's agents executing at once."
    )
    requests_per_minute: float | None = Field(
        default=None, gt=0, description="Requests in any 60 s window."
    )
    tokens_per_minute: float | None = Field(
        default=None, gt=0, description="Tokens (the agents' estimates) in any 60 s window."
    )

    @model_validator(mode="after")
    def _some_limit(self) -> Self:
        if (
            self.max_concurrency is None
            and self.requests_per_minute is None
            and (self.tokens_per_minute is None)
        ):
            raise PydanticCustomError(
                "studyq",
                "a provider's limits set none of max_concurrency, requests_per_minute, "
                "tokens_per_minute.",
                {"fix": "set at least one, or remove the provider."},
            )
        return self


class RetryPolicy(BaseModel):
    """Which exceptions are transient, and how long to wait before the next attempt."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    on: list[ErrorClass] = Field(
        default_factory=list,
        description="Exceptions re-queued with backoff (up to `execution.max_attempts`); every "
        "other exception fails the run at once.",
    )
    backoff_s: float = Field(
        default=1.0, gt=0, description="Base of the exponential backoff (full jitter)."
    )
    max_backoff_s: float = Field(default=60.0, gt=0, description="Longest wait between attempts.")

    @model_validator(mode="before")
    @classmethod
    def _yaml_on(cls, value: Any) -> Any:
        """YAML 1.1 (PyYAML, as upstream reads study files) reads a bare ``on:`` key as
        ``True``; ``retry: {on: [...]}`` means the key ``on``."""
        if isinstance(value, dict) and True in value and "on" not in value:
            value = {("on" if key is True else key): item for key, item in value.items()}
        return value

    @model_validator(mode="after")
    def _ordered(self) -> Self:
        if self.max_backoff_s < self.backoff_s:
            raise PydanticCustomError(
                "studyq",
                "max_backoff_s ({high}) is below backoff_s ({low}).",
                {
                    "high": self.max_backoff_s,
                    "low": self.backoff_s,
                    "fix": "make max_backoff_s at least backoff_s.",
                },
            )
        return self


class BreakerPolicy(BaseModel):
    """Pause a study's dispatch when too many of its latest runs failed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    window: int = Field(default=50, ge=1, description="The latest finished runs looked at.")
    max_failure_rate: float = Field(
        default=0.6, gt=0, le=1, description="Failed share of the window that trips it."
    )


class ExecutionPolicy(BaseModel):
    """Defaults for how each run is executed; CLI flags and settings may override them."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeout_s: float | None = Field(
        default=None, gt=0, description="Hard time limit per run; a run over it fails as timeout."
    )
    max_attempts: int = Field(
        default=3, ge=1, description="Deliveries a run may use before it is failed as lost."
    )
    queue: str = Field(default="studyq", min_length=1, description="Celery queue for the runs.")
    rate_limit: str | None = Field(
        default=None, description="Celery rate limit per worker for the run task, e.g. '10/m'."
    )
    at_most_once: bool = Field(
        default=False,
        description="Commit each claim durably before the agent runs, so that a database crash "
        "can never make an agent run twice (paid API calls); costs one WAL flush per claim. "
        "By default claims commit asynchronously and a crash can re-run the runs claimed in "
        "its last ~200 ms.",
    )
    order: str = Field(
        default="plan",
        pattern="^(plan|balanced)$",
        description="Dispatch order: 'plan' (design order) or 'balanced' (replicate by "
        "replicate, shuffled with the study seed inside each replicate).",
    )
    limits: dict[Provider, ProviderLimit] = Field(
        default_factory=dict,
        description="Provider name -> its cluster-wide limits (see `bindings.providers`).",
    )
    retry: RetryPolicy | None = Field(
        default=None, description="Transient exceptions and their backoff; none: no retries."
    )
    max_cost_usd: float | None = Field(
        default=None, gt=0, description="Study budget in USD, from the runs' recorded cost_usd."
    )
    max_tokens: int | None = Field(
        default=None, gt=0, description="Study budget in tokens (input + output)."
    )
    breaker: BreakerPolicy | None = Field(
        default=None, description="Pause dispatch when too many of the latest runs failed."
    )

    def definition_dump(self) -> dict[str, Any]:
        """As the study's definition records it (see :meth:`Bindings.definition_dump`)."""
        return _definition_dump(self, {"limits", "retry", "max_cost_usd", "max_tokens", "breaker"})


def _definition_dump(section: BaseModel, later: set[str]) -> dict[str, Any]:
    fields = type(section).model_fields
    unset = {
        name
        for name in later
        if getattr(section, name) == fields[name].get_default(call_default_factory=True)
    }
    return section.model_dump(mode="json", exclude=unset)
