"""The public path of the design helpers (``orchestrator.designs.condition_label`` is named
in studyq's issues and used by scripts outside this repository); the code lives in
:mod:`orchestrator.study.designs`."""

from orchestrator.study.designs import *  # noqa: F403
from orchestrator.study.designs import __all__ as __all__
