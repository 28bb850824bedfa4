"""Fixtures of the security tests.

The hardened-defaults tests need nothing running. The canary test (test_security_canary.py)
starts its own Redis and PostgreSQL database and reuses the worker and database helpers of
``tests/distributed/dist_services.py``, imported from that folder as the distributed tests do.
"""

from __future__ import annotations

import sys
from pathlib import Path

_DISTRIBUTED = str(Path(__file__).resolve().parent.parent / "distributed")
if _DISTRIBUTED not in sys.path:
    sys.path.insert(0, _DISTRIBUTED)
