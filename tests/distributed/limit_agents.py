"""Agents that call the simulated provider (sim_provider.py) over HTTP, as an LLM agent calls
its API: inside ``workers.limits.request(...)``, raising ``RateLimited`` on a 429.

The study's factors say where the provider is (``provider_url``), how long each call is held
(``hold_s``), under which provider name the call is counted (``provider``) and the token
estimate (``tokens``).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from workers.limits import RateLimited, request


def _call(factors: dict[str, Any], seed: int) -> dict[str, Any]:
    url = f"{factors['provider_url']}/call?hold={factors.get('hold_s', 0)}&seed={seed}"
    try:
        with urllib.request.urlopen(url, timeout=120) as answer:
            body: dict[str, Any] = json.loads(answer.read())
            return body
    except urllib.error.HTTPError as error:
        if error.code == 429:
            raise RateLimited(
                "the provider answered 429", retry_after_s=float(error.headers["Retry-After"] or 1)
            ) from None
        raise


def llm_call(seed: int, factors: dict[str, Any]) -> dict[str, Any]:
    """One provider call per run, counted through ``workers.limits.request``."""
    with request(str(factors.get("provider", "sim")), tokens=int(factors.get("tokens", 0))):
        reply = _call(factors, seed)
    return {"output": {"seed": seed, "text": reply.get("text")}}


def silent_call(seed: int, factors: dict[str, Any]) -> dict[str, Any]:
    """One provider call per run that never tells studyq: studyq counts one request per run."""
    reply = _call(factors, seed)
    return {"output": {"seed": seed, "text": reply.get("text")}}
