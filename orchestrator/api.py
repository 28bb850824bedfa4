"""studyq's Python API, mirroring the ancestor's so its users can switch by changing an import.

``run_study`` / ``resume_study`` take a :class:`~orchestrator.study.model.Study` or a path and
return a :class:`~orchestrator.embedded.StudyRun`: counts, and ``results()`` streaming the
runs from the store. The CLI is a thin shell over these functions.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from orchestrator.contracts.errors import StudyError
from orchestrator.contracts.settings import load_settings
from orchestrator.embedded import StudyRun, SweepOptions, run_embedded
from orchestrator.export import ExportReport, export_artifacts
from orchestrator.store import ResultStore
from orchestrator.study.model import Study

__all__ = ["export_study", "resume_study", "run_study"]


def run_study(
    study: Study | str | Path,
    *,
    jobs: int | None = None,
    parallelism: int | None = None,
    threads: bool = False,
    db: str | None = None,
    resume: bool = True,
    dry_run: bool = False,
    show_progress: bool | None = None,
    limit: int | None = None,
    order: str | None = None,
    fail_fast: bool | None = None,
    timeout_s: float | None = None,
    export: bool = True,
    output_dir: str | Path | None = None,
    agent_bindings: Mapping[str, Any] | None = None,
    problem_registry: Mapping[str, Any] | None = None,
    condition_runner: Callable[..., Any] | None = None,
) -> StudyRun:
    """Run every run of ``study`` without a recorded success on this machine, then export.

    ``parallelism`` is the ancestor's name for ``jobs``. ``agent_bindings``,
    ``problem_registry`` and ``condition_runner`` are in-process objects, as the ancestor
    accepts; with process workers they must be importable module-level objects (picklable),
    or pass ``threads=True`` / ``jobs=1``. ``resume=False`` refuses a study that already has
    results instead of silently re-running them. Each keyword is the
    :class:`~orchestrator.embedded.SweepOptions` field of its name.

    Raises :class:`StudyError` when called from a process-pool child that is re-importing the
    calling script (a module-level call without the ``__main__`` guard).
    """
    _refuse_reimported_main()
    options = SweepOptions(
        jobs=jobs or parallelism,
        pool="thread" if threads else "process",
        db=db,
        resume=resume,
        dry_run=dry_run,
        show_progress=show_progress,
        limit=limit,
        order=order,
        fail_fast=fail_fast,
        timeout_s=timeout_s,
        export=export,
        output_dir=output_dir,
        agent_bindings=agent_bindings,
        problem_registry=problem_registry,
        condition_runner=condition_runner,
    )
    return run_embedded(study, options)


def _refuse_reimported_main() -> None:
    """Refuse to run while a multiprocessing child is importing the main module.

    A spawn or forkserver child (the process pool starts its workers with forkserver) imports
    the parent's main script before it unpickles its work; a module-level ``run_study`` would
    then run the whole study again in every worker. During that import, and only then, the
    standard library marks the process ``_inheriting`` (``multiprocessing.spawn._main``, and
    the forkserver when it preloads ``__main__``); it is the flag ``spawn`` itself checks
    before refusing to start processes from a child that is still bootstrapping. Forked
    children (Celery's prefork pool, ``fork``) never re-import ``__main__`` and never set it.
    """
    process = multiprocessing.current_process()
    if bool(getattr(process, "_inheriting", False)):
        raise StudyError(
            f"run_study was called while process {process.name} (pid {process.pid}) was "
            "importing the main script as a multiprocessing child: the script calls run_study "
            "at module level, so every process-pool worker would run the study again; put the "
            'call under `if __name__ == "__main__":`.'
        )


def resume_study(study: Study | str | Path, **options: Any) -> StudyRun:
    """Continue a study: only runs without a recorded success are executed."""
    options["resume"] = True
    return run_study(study, **options)


def export_study(
    study_id: str, *, db: str | None = None, output_dir: str | Path | None = None
) -> ExportReport:
    """Write the canonical artifacts of a stored study (bounded memory; partial if running)."""
    with ResultStore.open(db or load_settings().database_url) as store:
        return export_artifacts(store, study_id, output_dir)
