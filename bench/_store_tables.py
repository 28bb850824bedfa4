"""The Markdown tables of ``bench/store.py``: from a measured or saved document.

Not part of studyq: only the benchmark imports it.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

TO = "\u2013"  # en dash, for the ranges
BOTH = ("claim", "result")
"""The phases a run needs; a heartbeat is per ``heartbeat_s`` of a run's duration."""


def _span(values: Sequence[float], fmt: str) -> str:
    if not values:
        return ""
    return (
        f"{format(statistics.median(values), fmt)} "
        f"[{format(min(values), fmt)}{TO}{format(max(values), fmt)}]"
    )


def _rate(sample: dict[str, Any], phase: str) -> float:
    p = sample["phases"][phase]
    return float(p["count"] / p["seconds"])


def _runs_rate(sample: dict[str, Any]) -> float:
    p = sample["phases"]
    return float(sample["runs"] / (p["claim"]["seconds"] + p["result"]["seconds"]))


def _per_run_ms(sample: dict[str, Any], key: str, phases: Sequence[str]) -> float:
    return float(sum(sample["phases"][p][key] for p in phases) / sample["runs"] * 1e3)


def tables(document: dict[str, Any]) -> str:
    """The Markdown tables of a saved (or just measured) document."""
    samples: list[dict[str, Any]] = document["samples"]
    meta = document["meta"]
    floor = {
        (s["repeat"], s["writers"]): _rate(s, "upsert") for s in samples if s["mode"] == "floor"
    }
    counts = sorted({s["writers"] for s in samples})
    out = [
        f"{meta['date']}, {meta['cpus']} CPUs shared by PostgreSQL {meta['postgresql']} and the "
        f"writers, commit {meta['commit']}, {meta['runs']:,} runs per cell, batch {meta['batch']}"
        f" (`bench/store.py {' '.join(meta['argv'])}`). Medians of repeats [min{TO}max]; "
        "x floor = median of per-repeat ratios to the floor's UPSERT/s at the same writer count.",
        "",
    ]
    for mode in ("prefork", "batched"):
        out += [
            f"**{mode}**",
            "",
            "| writers | claims/s | results/s | runs/s | runs/s x floor | heartbeats/s | "
            "PG CPU ms/run | writer CPU ms/run | machine busy |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for count in counts:
            rows = [s for s in samples if s["mode"] == mode and s["writers"] == count]
            if not rows:
                continue
            ratios = [
                _runs_rate(s) / floor[(s["repeat"], count)]
                for s in rows
                if (s["repeat"], count) in floor
            ]
            beats = [_rate(s, "heartbeat") for s in rows if "heartbeat" in s["phases"]]
            busy = [
                statistics.mean([s["phases"]["claim"]["busy"], s["phases"]["result"]["busy"]])
                for s in rows
            ]
            out.append(
                f"| {count} | {_span([_rate(s, 'claim') for s in rows], ',.0f')} "
                f"| {_span([_rate(s, 'result') for s in rows], ',.0f')} "
                f"| {_span([_runs_rate(s) for s in rows], ',.0f')} | {_span(ratios, '.2f')} "
                f"| {_span(beats, ',.0f') or 'skipped'} "
                f"| {_span([_per_run_ms(s, 'pg_cpu_s', BOTH) for s in rows], '.2f')} "
                f"| {_span([_per_run_ms(s, 'writer_cpu_s', BOTH) for s in rows], '.2f')} "
                f"| {_span(busy, '.0%')} |"
            )
        out.append("")
    out += [
        "**floor** (one autocommit UPSERT per run)",
        "",
        "| writers | UPSERT/s | PG CPU ms/row | writer CPU ms/row | machine busy |",
        "| --- | --- | --- | --- | --- |",
    ]
    for count in counts:
        rows = [s for s in samples if s["mode"] == "floor" and s["writers"] == count]
        if rows:
            out.append(
                f"| {count} | {_span([_rate(s, 'upsert') for s in rows], ',.0f')} "
                f"| {_span([_per_run_ms(s, 'pg_cpu_s', ['upsert']) for s in rows], '.3f')} "
                f"| {_span([_per_run_ms(s, 'writer_cpu_s', ['upsert']) for s in rows], '.3f')} "
                f"| {_span([s['phases']['upsert']['busy'] for s in rows], '.0%')} |"
            )
    return "\n".join([*out, "", _cost_table(samples, counts)])


OPERATIONS = (
    ("prefork", "claim", "claim, one run per statement"),
    ("prefork", "heartbeat", "heartbeat"),
    ("prefork", "result", "result, one per transaction"),
    ("batched", "claim", "claim, per run of a batched statement"),
    ("batched", "result", "result, per run of a batched transaction"),
    ("floor", "upsert", "floor UPSERT"),
)


def _cost_table(samples: list[dict[str, Any]], counts: Sequence[int]) -> str:
    """PostgreSQL backend CPU per operation: what the capacity model divides cores by."""
    out = [
        "**PostgreSQL backend CPU per operation, ms** (median [min" + TO + "max])",
        "",
        "| operation | " + " | ".join(f"{count} writers" for count in counts) + " |",
        "| --- |" + " --- |" * len(counts),
    ]
    for mode, phase, label in OPERATIONS:
        cells = []
        for count in counts:
            values = [
                s["phases"][phase]["pg_cpu_s"] / s["phases"][phase]["count"] * 1e3
                for s in samples
                if s["mode"] == mode
                and s["writers"] == count
                and s["phases"].get(phase, {}).get("count")
            ]
            cells.append(_span(values, ".3f"))
        out.append(f"| {mode}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(out)
