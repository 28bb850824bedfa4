"""What an agent returned, normalized: the upstream's return shapes as one :class:`Returned`.

An agent may return an ``agent_result`` mapping, a design-research-agents ``ExecutionResult``
(or anything shaped like it), or any other value, which is taken as its text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Returned", "normalize_agent_return"]


@dataclass(slots=True)
class Returned:
    """An agent's return value, normalized as the upstream's ``AgentExecution``."""

    output: dict[str, Any]
    metrics: dict[str, Any] = field(default_factory=dict)
    events: list[Any] = field(default_factory=list)
    trace_refs: list[str] = field(default_factory=list)
    metadata: dict[str, Any] = field(default_factory=dict)


def normalize_agent_return(raw: Any) -> Returned:
    """Accept the upstream's return shapes: an ``agent_result`` mapping, an
    ``ExecutionResult``-like object, or anything else as text."""
    if isinstance(raw, Mapping):
        output_value = raw.get("output", raw.get("outputs", {}))
        output = {"text": output_value} if isinstance(output_value, str) else dict(output_value)
        if not output and "text" in raw:
            output = {"text": raw["text"]}
        return Returned(
            output=output,
            metrics=dict(raw.get("metrics", {})),
            events=list(raw.get("events", [])),
            trace_refs=[str(ref) for ref in raw.get("trace_refs", [])],
            metadata=dict(raw.get("metadata", {})),
        )
    if raw is not None and all(hasattr(raw, name) for name in ("success", "output", "metadata")):
        return _normalize_execution_result(raw)
    return Returned(output={"text": str(raw)})


def _normalize_execution_result(raw: Any) -> Returned:
    """A design-research-agents ``ExecutionResult`` (as the upstream reads it)."""
    mapping = dict(raw.output) if isinstance(raw.output, Mapping) else {}
    final = mapping.get("final_output")
    if isinstance(final, Mapping):
        output = dict(final)
    elif isinstance(final, str):
        output = {"text": final}
    elif final is not None:
        output = {"final_output": final}
    elif "text" in mapping:
        output = {"text": str(mapping["text"])}
    elif "model_text" in mapping:
        output = {"text": str(mapping["model_text"])}
    else:
        output = dict(mapping)
    metadata = dict(raw.metadata) if isinstance(raw.metadata, Mapping) else {}
    response = getattr(raw, "model_response", None)
    for attribute, key in (("model", "model_name"), ("provider", "model_provider")):
        value = getattr(response, attribute, None)
        if isinstance(value, str) and value.strip():
            metadata[key] = value
    metrics = dict(mapping["metrics"]) if isinstance(mapping.get("metrics"), Mapping) else {}
    usage = getattr(response, "usage", None)
    for usage_key, metric in (
        ("prompt_tokens", "input_tokens"),
        ("completion_tokens", "output_tokens"),
        ("total_tokens", "total_tokens"),
    ):
        count = (
            usage.get(usage_key) if isinstance(usage, Mapping) else getattr(usage, usage_key, None)
        )
        if isinstance(count, int):
            metrics.setdefault(metric, count)
    trace_refs: list[str] = []
    for ref in [metadata.get("trace_path"), *(metadata.get("trace_refs") or ())]:
        if isinstance(ref, str) and ref.strip() and ref not in trace_refs:
            trace_refs.append(ref)
    events = mapping.get("events", [])
    if not isinstance(events, Sequence) or isinstance(events, str | bytes):
        events = []
    return Returned(output, metrics, list(events), trace_refs, metadata)
