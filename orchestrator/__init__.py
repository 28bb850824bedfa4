"""studyq's coordinator: study files, designs, run plans, the result store, executors, export.

The public API is loaded lazily so that ``import orchestrator.contracts.runspec`` (which every
worker does) stays cheap.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "Study",
    "StudyRun",
    "export_study",
    "iter_run_specs",
    "load_study",
    "prepare",
    "resume_study",
    "run_study",
]

_LAZY = {
    "Study": "orchestrator.study.model",
    "load_study": "orchestrator.study.model",
    "iter_run_specs": "orchestrator.study.plan",
    "prepare": "orchestrator.study.plan",
    "StudyRun": "orchestrator.embedded",
    "run_study": "orchestrator.api",
    "resume_study": "orchestrator.api",
    "export_study": "orchestrator.api",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'orchestrator' has no attribute {name!r}")
    from importlib import import_module

    return getattr(import_module(module_name), name)
