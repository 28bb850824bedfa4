"""What a run's output comes to: evaluation rows, event rows and metrics, as upstream.

Rows carry every column of evaluations.csv and events.csv with the upstream's defaults, and
the metrics are the upstream's ``compose_metrics``; :func:`jsonable` makes values the store
can write (NumPy scalars and arrays become Python values).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import fields, is_dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np

from orchestrator.contracts.canonical import canonical_json, hash_identifier, to_jsonable
from orchestrator.contracts.runspec import RunSpec
from workers.bindings import ProblemPacket

__all__ = ["compose_metrics", "evaluate", "event_rows", "jsonable"]

_EVALUATOR_INPUT_KEYS = ("candidate", "state", "answer", "solution", "final_answer", "x")
_AUTO_EVENT_META = canonical_json({"auto_generated": True})


def evaluate(packet: ProblemPacket, output: Mapping[str, Any], run_id: str) -> list[dict[str, Any]]:
    """Evaluation rows with every evaluations.csv column, upstream defaults filled in."""
    if packet.output_evaluator is not None:
        raw = packet.output_evaluator(output)
    elif packet.evaluator is not None:
        selected: Any = output
        for key in _EVALUATOR_INPUT_KEYS:
            if key in output:
                selected = output[key]
                break
        raw = packet.evaluator(selected)
    else:
        return []
    rows = []
    for row in _evaluation_payload(raw):
        notes = row.get("notes_json", {})
        rows.append(
            {
                "run_id": run_id,
                "evaluator_id": str(row.get("evaluator_id", "problem_evaluator")),
                "metric_name": str(row.get("metric_name", "score")),
                "metric_value": jsonable(row.get("metric_value", row.get("value"))),
                "metric_unit": str(row.get("metric_unit", "unitless")),
                "aggregation_level": str(row.get("aggregation_level", "run")),
                "notes_json": _notes_json(notes) if isinstance(notes, Mapping) else jsonable(notes),
            }
        )
    return rows


def _notes_json(notes: Mapping[str, Any]) -> str:
    """``notes_json`` as the upstream writes it (``json.dumps(sort_keys=True)``)."""
    if not notes:
        return "{}"
    return json.dumps(to_jsonable(dict(notes)), sort_keys=True)


def _evaluation_payload(raw: Any) -> list[Mapping[str, Any]]:
    """Evaluator output as rows: a row, a metric mapping, a sequence of either, or an object."""
    if isinstance(raw, Mapping):
        if any(key in raw for key in ("metric_name", "metric_value", "value")):
            return [raw]
        return _metric_rows(raw)
    if isinstance(raw, Sequence) and not isinstance(raw, str | bytes):
        rows: list[Mapping[str, Any]] = []
        for item in raw:
            rows.extend(_evaluation_payload(item))
        return rows
    if raw is None:
        return []
    if is_dataclass(raw) and not isinstance(raw, type):
        return _metric_rows({f.name: getattr(raw, f.name) for f in fields(raw)})
    to_dict = getattr(raw, "to_dict", None)
    if callable(to_dict):
        try:
            candidate = to_dict()
        except Exception:
            candidate = None
        if isinstance(candidate, Mapping):
            return _metric_rows(candidate)
    if hasattr(raw, "__dict__"):
        return _metric_rows(vars(raw))
    return []


def _metric_rows(metrics: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [
        {"metric_name": str(name), "metric_value": value}
        for name, value in metrics.items()
        if str(name) != "higher_is_better" and isinstance(value, bool | int | float)
    ]


def event_rows(
    raw_events: Sequence[Any], output: Mapping[str, Any], spec: RunSpec
) -> list[dict[str, Any]]:
    """Event rows with every events.csv column; one ``assistant_output`` row if none."""
    timestamp = datetime.now(UTC).replace(microsecond=0).isoformat()
    rows: list[dict[str, Any]] = []
    for index, event in enumerate(raw_events):
        if not isinstance(event, Mapping):
            continue
        event_type = str(event.get("event_type", "event"))
        record_id = event.get("record_id")
        if record_id is None:
            record_id = hash_identifier(
                "evt",
                {
                    "run_id": spec.run_id,
                    "index": index,
                    "event_type": event.get("event_type", "event"),
                },
            )
        meta = event.get("meta_json", {})
        rows.append(
            {
                "timestamp": str(event.get("timestamp", timestamp)),
                "record_id": str(record_id),
                "text": str(event.get("text", "")),
                "session_id": str(event.get("session_id", spec.run_id)),
                "actor_id": str(event.get("actor_id", "agent")),
                "event_type": event_type,
                "meta_json": canonical_json(meta) if isinstance(meta, Mapping) else str(meta),
                "level": str(event.get("level", "step")),
                "study_id": spec.study_id,
                "run_id": spec.run_id,
                "condition_id": spec.condition_id,
                "trial_id": jsonable(event.get("trial_id")),
                "step_id": jsonable(event.get("step_id")),
                "tool_name": jsonable(event.get("tool_name")),
                "evaluation_id": jsonable(event.get("evaluation_id")),
            }
        )
    if rows:
        return rows
    return [
        {
            "timestamp": timestamp,
            "record_id": hash_identifier("evt", {"run_id": spec.run_id, "index": 0}),
            "text": str(output.get("text", "")),
            "session_id": spec.run_id,
            "actor_id": "agent",
            "event_type": "assistant_output",
            "meta_json": _AUTO_EVENT_META,
            "level": "step",
            "study_id": spec.study_id,
            "run_id": spec.run_id,
            "condition_id": spec.condition_id,
            "trial_id": None,
            "step_id": None,
            "tool_name": None,
            "evaluation_id": None,
        }
    ]


def compose_metrics(
    agent_metrics: Mapping[str, Any],
    evaluations: Sequence[Mapping[str, Any]],
    events: Sequence[Mapping[str, Any]],
    latency_s: float,
    cost_usd: float,
) -> dict[str, Any]:
    """The upstream's ``compose_metrics``: agent metrics, process metrics, then the fixed ones."""
    tool_calls = sum(1 for event in events if event["event_type"] == "tool_call")
    steps = sum(
        1 for event in events if event["event_type"] in ("step", "tool_call", "assistant_output")
    )
    metrics = dict(agent_metrics)
    metrics["tool_call_count"] = tool_calls
    metrics["step_event_count"] = steps
    metrics["unique_actor_count"] = len({event["actor_id"] for event in events})
    metrics["latency_s"] = latency_s
    metrics["cost_usd"] = cost_usd
    metrics["input_tokens"] = _number_or(agent_metrics.get("input_tokens"), 0)
    metrics["output_tokens"] = _number_or(agent_metrics.get("output_tokens"), 0)
    if evaluations:
        metrics.setdefault("primary_outcome", evaluations[0]["metric_value"])
    return metrics


def _number_or(value: Any, default: float) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def jsonable(value: Any) -> Any:
    """JSON types for the store: NumPy scalars and arrays become Python values first."""
    if isinstance(value, str | int | float | bool) or value is None:
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Mapping):
        return {str(key): jsonable(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(item) for item in value]
    return to_jsonable(value)
