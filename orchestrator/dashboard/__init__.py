"""``studyq dashboard``: a study dashboard in the browser (Starlette + Jinja2, inline SVG
plots drawn in Python, one small hand-written script for live refresh; no build step, no
CDN). :func:`create_app` builds the app; ``studyq dashboard`` serves it with uvicorn.

Needs the ``dashboard`` extra (``pip install 'studyq[dashboard]'``)."""

from __future__ import annotations

__all__ = ["create_app"]


def __getattr__(name: str) -> object:
    if name == "create_app":  # starlette is optional: imported on use
        from orchestrator.dashboard.app import create_app

        return create_app
    raise AttributeError(name)
