"""The worker's knobs: the one :class:`~orchestrator.contracts.settings.Settings` plus what
only workers read.

:class:`WorkerSettings` *is* a ``Settings`` (a subclass reading the same ``STUDYQ_*``
environment), so there is still one settings object per process, built once and passed
explicitly; it only adds the values that matter on the worker side of a distributed
sweep. They can move into ``Settings`` itself without changing a caller.
"""

from __future__ import annotations

from pydantic import Field

from orchestrator.contracts.settings import Settings, build_settings, load_settings

__all__ = ["WorkerSettings", "load_worker_settings"]


class WorkerSettings(Settings):
    """``Settings`` plus the worker-only knobs (``STUDYQ_SHUTDOWN_GRACE_S`` and friends)."""

    shutdown_grace_s: float = Field(
        default=20.0,
        ge=0,
        description="On a warm shutdown (SIGTERM to the worker), how long runs already "
        "executing may keep going. Runs still going then are handed back: their lease is "
        "released without charging an attempt and their message is requeued. Keep it below "
        "the platform's kill timeout (Kubernetes terminationGracePeriodSeconds, 30 s by "
        "default; Slurm KillWait).",
    )
    at_most_once: bool = Field(
        default=False,
        description="Claim every run durably before its agent runs, whatever the study's "
        "execution.at_most_once says: a PostgreSQL crash then never makes an agent run twice.",
    )
    trust_study_bindings: bool = Field(
        default=True,
        description="Import the code a study's own `bindings` name (as it was registered). "
        "False for a worker that runs other people's studies: then only installed entry "
        "points and STUDYQ_ALLOWED_IMPORTS are importable, and a run naming anything else "
        "fails as a `binding` error.",
    )
    result_retry_s: float = Field(
        default=600.0,
        ge=0,
        description="How long a worker keeps retrying, with exponential backoff, to reach the "
        "database to claim a run or record its result before it gives up on that message.",
    )

    @classmethod
    def from_settings(cls, settings: Settings) -> WorkerSettings:
        """``settings`` as a ``WorkerSettings``: its values are kept (secrets read from files,
        CLI overrides) and only the worker-only fields come from the environment, because
        explicit values win over the environment in pydantic-settings."""
        if isinstance(settings, WorkerSettings):
            return settings
        return build_settings(cls, **settings.model_dump())


def load_worker_settings(**overrides: object) -> WorkerSettings:
    """:func:`~orchestrator.contracts.settings.load_settings` (environment, ``*_FILE`` secrets,
    overrides), extended with the worker-only fields from the environment."""
    return WorkerSettings.from_settings(load_settings(**overrides))
