"""The one settings object: every knob has a name, a default and a reason.

Built once per process from ``STUDYQ_*`` environment variables (and ``*_FILE`` variants for
secrets, so passwords can come from Docker or Kubernetes secret files) and passed
explicitly; nothing reads the environment behind its back. A wrong value, or a secret file
that is missing, unreadable or empty, is a :class:`~orchestrator.contracts.errors.SettingsError`
whose message names the variable and the fix.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, TypeVar

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from orchestrator.contracts.broker import secure_broker_url
from orchestrator.contracts.errors import SettingsError

__all__ = [
    "DEFAULT_DATABASE_URL",
    "Settings",
    "build_settings",
    "load_settings",
]

DEFAULT_DATABASE_URL = "sqlite:///studyq.db"


class Settings(BaseSettings):
    """studyq's configuration; CLI flags override these per command."""

    model_config = SettingsConfigDict(
        env_prefix="STUDYQ_",
        extra="ignore",
        frozen=True,
        hide_input_in_errors=True,
        # Every float knob is a duration or a size: `inf` would never expire a lease and
        # `nan` compares false with everything, so both are refused for every float field.
        allow_inf_nan=False,
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="Result store. SQLite file (embedded default) or postgresql://... (shared).",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker: redis://, rediss:// or amqp://. Unset: embedded execution.",
    )
    allowed_imports: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Extra module prefixes workers may import agent/problem code from, beyond "
        "the study's bindings and installed entry points (comma-separated in the env var).",
    )
    lease_s: float = Field(
        default=60.0,
        gt=0,
        description="How long a claimed run stays owned without a heartbeat. At least 4x "
        "heartbeat_s, so one late heartbeat never loses a lease.",
    )
    heartbeat_s: float = Field(default=10.0, gt=0, description="Lease extension interval.")
    queued_timeout_s: float = Field(
        default=600.0,
        gt=0,
        description="A run queued this long with no claim is presumed lost (broker restart) "
        "and published again by the reconcile loop.",
    )
    reconcile_interval_s: float = Field(
        default=5.0, gt=0, description="How often `studyq wait` reconciles and redraws."
    )
    unclaimed_warning_s: float = Field(
        default=60.0,
        ge=0,
        description="`studyq wait` says so (on stderr) when runs have been queued this long "
        "with no run claimed or running, and names the queue and database workers must use; "
        "again after ten times as long, and so on. 0: never.",
    )
    max_study_bytes: int = Field(
        default=10 * 1024 * 1024, gt=0, description="Study files larger than this are refused."
    )
    max_message_bytes: int = Field(
        default=1024 * 1024,
        gt=0,
        description="Broker messages larger than this are not decoded by a worker: they are "
        "moved to the queue's dead-letter list (`studyq dead-letters`). A run message is a "
        "few KiB; raise it only for studies whose factor values are very large.",
    )
    time_limit_grace_s: float = Field(
        default=10.0,
        gt=0,
        description="How long a run may keep going after its soft time limit "
        "(execution.timeout_s) before it is killed (prefork) or abandoned, and recorded as "
        "failed with error_kind 'timeout'.",
    )
    visibility_timeout_s: float = Field(
        default=7200.0,
        gt=0,
        description="Redis redelivers a message nobody acknowledged after this long. It must "
        "exceed the longest run's time limit plus time_limit_grace_s, or a run that is still "
        "executing gets a second delivery (which its claim refuses: noise, not a rerun).",
    )
    publish_batch: int = Field(
        default=1000, gt=0, description="Runs marked queued and published per transaction."
    )
    task_sent_events: bool = Field(
        default=False,
        description="Send a Celery task-sent event per published run, so Flower lists runs "
        "while they wait in the queue. Off: Flower lists each run from the worker's "
        "task-received event on (every run, once a worker takes it), and publishing is "
        "faster (docs/distributed.md).",
    )
    limits_url: str | None = Field(
        default=None,
        description="Redis holding the cluster-wide provider limits (execution.limits), e.g. "
        "redis://host:6379/0. Unset: the broker, when it is Redis.",
    )
    dashboard_token: str | None = Field(
        default=None,
        repr=False,
        description="`studyq dashboard`'s actions (resubmit, cancel, budget) need this token "
        "(Authorization: Bearer, or the form's token field). Unset: the dashboard is read-only.",
    )
    flower_url: str = Field(
        default="http://127.0.0.1:5555",
        description="Where `studyq dashboard` links to Flower for task-level detail.",
    )
    trace_dir: Path | None = Field(
        default=None,
        description="The trace store: a directory every worker can write (a shared file "
        "system). Trace files a run returns (trace_refs) are copied under "
        "<trace_dir>/<study_id>/<run_id>/ and the run records the stored copies, so a trace "
        "outlives the worker's disk. Unset: the run records the paths as the agent gave them.",
    )

    @field_validator("broker_url")
    @classmethod
    def _secure_broker(cls, value: str | None) -> str | None:
        return None if value is None else secure_broker_url(value)

    @field_validator("allowed_imports", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _lease_covers_heartbeats(self) -> Settings:
        if self.lease_s < 4 * self.heartbeat_s:
            raise ValueError(
                f"STUDYQ_LEASE_S ({self.lease_s}) must be at least 4x STUDYQ_HEARTBEAT_S "
                f"({self.heartbeat_s}) so a late heartbeat never loses a lease. Fix: raise "
                "STUDYQ_LEASE_S or lower STUDYQ_HEARTBEAT_S."
            )
        return self


def _from_file(name: str) -> str | None:
    """The stripped text of the file ``<name>_FILE`` names, or None when it is unset.

    Raises:
        SettingsError: the file is missing (a Secret not mounted yet), a directory,
            unreadable or empty; the message names the variable and the path.
    """
    variable = f"{name}_FILE"
    path = os.environ.get(variable)
    if not path:
        return None
    where = f"{variable}={path}:"
    instead = f"or unset {variable} to use {name}"
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        problem = f"{where} no such file. Fix: create it, mount the secret there, {instead}."
    except IsADirectoryError:
        problem = (
            f"{where} is a directory, not a file. Fix: point {variable} at the file inside "
            f"it that holds the URL, {instead}."
        )
    except PermissionError:
        problem = (
            f"{where} this user cannot read it. Fix: give the user running studyq read "
            f"access (e.g. chmod 600 and chown to it), {instead}."
        )
    except UnicodeDecodeError:
        problem = f"{where} is not UTF-8 text. Fix: write the URL into it as plain text."
    except OSError as error:
        problem = f"{where} cannot be read ({error.strerror}). Fix: check the file, {instead}."
    else:
        value = text.strip()
        if value:
            return value
        problem = f"{where} the file is empty. Fix: write the URL into it, {instead}."
    raise SettingsError(problem)


_Settings = TypeVar("_Settings", bound=Settings)


def build_settings(cls: type[_Settings], **values: object) -> _Settings:
    """``cls(**values)`` (the environment fills the rest), with pydantic's errors turned into
    one :class:`SettingsError` line per wrong variable, naming it and the fix, and never
    quoting a value (it may be a secret)."""
    try:
        return cls(**values)  # type: ignore[arg-type]
    except ValidationError as error:
        raise _settings_error(cls, error) from None


def _settings_error(cls: type[Settings], error: ValidationError) -> SettingsError:
    lines = []
    for item in error.errors(include_url=False, include_input=False):
        message = str(item["msg"]).removeprefix("Value error, ").rstrip(".") + "."
        name = str(item["loc"][0]) if item["loc"] else ""
        field = cls.model_fields.get(name)
        if field is None:  # a check across fields: the message names them and the fix
            lines.append(f"invalid settings: {message}")
            continue
        variable = f"STUDYQ_{name.upper()}"
        if item["type"] == "finite_number":
            message = "must be a finite number (not inf or nan)."
        default = field.get_default(call_default_factory=True)
        example = f" such as the default {default}" if default not in (None, [], "") else ""
        lines.append(
            f"invalid setting {variable}: {message} Fix: set it to a valid value{example}, "
            "or unset it."
        )
    return SettingsError("\n".join(lines))


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, ``STUDYQ_*_FILE`` secrets, then explicit overrides.

    Raises:
        SettingsError: a variable or a secret file is wrong.
    """
    values: dict[str, object] = {}
    for field_name in ("database_url", "broker_url"):
        secret = _from_file(f"STUDYQ_{field_name.upper()}")
        if secret:
            values[field_name] = secret
    values.update({key: value for key, value in overrides.items() if value is not None})
    return build_settings(Settings, **values)
