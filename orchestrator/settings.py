"""The one settings object: every knob has a name, a default and a reason.

Built once per process from ``STUDYQ_*`` environment variables (and ``*_FILE`` variants for
secrets, so passwords can come from Docker or Kubernetes secret files) and passed
explicitly; nothing reads the environment behind its back.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

__all__ = ["DEFAULT_DATABASE_URL", "Settings", "load_settings", "secure_broker_url"]

DEFAULT_DATABASE_URL = "sqlite:///studyq.db"


class Settings(BaseSettings):
    """studyq's configuration; CLI flags override these per command."""

    model_config = SettingsConfigDict(
        env_prefix="STUDYQ_", extra="ignore", frozen=True, hide_input_in_errors=True
    )

    database_url: str = Field(
        default=DEFAULT_DATABASE_URL,
        description="Result store. SQLite file (embedded default) or postgresql://... (shared).",
    )
    broker_url: str | None = Field(
        default=None,
        description="Celery broker (redis:// or rediss://). Unset means embedded execution.",
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
    publish_batch: int = Field(
        default=1000, gt=0, description="Runs marked queued and published per transaction."
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
                f"({self.heartbeat_s}) so a late heartbeat never loses a lease."
            )
        return self


def secure_broker_url(url: str) -> str:
    """``rediss://`` verifies the server's certificate unless the URL says otherwise; kombu
    would silently skip verification when ``ssl_cert_reqs`` is missing."""
    if url.startswith("rediss://") and "ssl_cert_reqs=" not in url:
        return url + ("&" if "?" in url else "?") + "ssl_cert_reqs=required"
    return url


def _from_file(name: str) -> str | None:
    path = os.environ.get(f"{name}_FILE")
    if not path:
        return None
    return Path(path).read_text(encoding="utf-8").strip()


def load_settings(**overrides: object) -> Settings:
    """Settings from the environment, ``STUDYQ_*_FILE`` secrets, then explicit overrides."""
    values: dict[str, object] = {}
    for field_name in ("database_url", "broker_url"):
        secret = _from_file(f"STUDYQ_{field_name.upper()}")
        if secret:
            values[field_name] = secret
    values.update({key: value for key, value in overrides.items() if value is not None})
    return Settings(**values)  # type: ignore[arg-type]
