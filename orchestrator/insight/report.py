"""``studyq report``: one self-contained HTML page (or a Markdown summary) of a study.

The page holds the study's design, hypotheses and outcomes (from the registered study
definition), the primary outcome by condition with 95 % intervals, completion per condition,
per-agent and per-problem summaries, failures, cost and tokens, throughput and latency, and
provenance. Its plots are inline SVG (:mod:`.plots`) and its style an inline ``<style>``:
no script, no font, no image file and no network request, so it opens offline. Every figure
comes from :func:`~orchestrator.insight.aggregates.read_insight` (SQL aggregates and a capped
sample), so a 100,000-run study's page stays small. Text from the study file is escaped
with :func:`html.escape` (HTML) or has its table pipes escaped (Markdown).
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from html import escape
from importlib import metadata
from typing import Any

from orchestrator.insight.aggregates import GroupSummary, Insight
from orchestrator.insight.plots import (
    StripGroup,
    completion_bars,
    format_number,
    histogram,
    strip_plot,
    throughput_line,
)
from orchestrator.insight.summary import best_group, best_note

__all__ = ["Provenance", "provenance", "render_html", "render_markdown"]

_PACKAGES = ("studyq", "sqlalchemy", "celery", "numpy", "pydantic", "psycopg")


@dataclass(frozen=True, slots=True)
class Provenance:
    """Where the results came from and what the report was built with."""

    studyq_version: str
    python_version: str
    platform: str
    package_versions: dict[str, str]
    git_sha: str | None
    git_sha_source: str
    workers: list[tuple[str, int]]
    worker_count: int
    first_started_at: datetime | None
    last_finished_at: datetime | None
    submitted_at: datetime
    submitted_by: str
    generated_at: datetime
    store: str


def _version(name: str) -> str:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def provenance(insight: Insight, *, store: str) -> Provenance:
    """The report's provenance: package versions (those :func:`orchestrator.export.
    default_provenance` records, plus the store's and broker's libraries), the git SHA the
    study file recorded (``provenance_metadata.git_sha``) or else that of the directory the
    report is built in, the workers that ran attempts and the time span of the runs."""
    from orchestrator.export import default_provenance

    declared = insight.definition.get("provenance_metadata") or {}
    captured = default_provenance()
    versions = {name: _version(name) for name in _PACKAGES}
    versions.update(
        (name, str(version))
        for name, version in (captured.get("package_versions") or {}).items()
        if name not in versions
    )
    sha: str | None
    if isinstance(declared, Mapping) and declared.get("git_sha"):
        sha, source = str(declared["git_sha"]), "recorded in the study's provenance_metadata"
    else:
        sha = str(captured["git_sha"]) if captured.get("git_sha") else None
        source = "of the directory the report was built in" if sha else "no git repository"
    return Provenance(
        studyq_version=versions["studyq"],
        python_version=sys.version.split()[0],
        platform=platform.platform(),
        package_versions=versions,
        git_sha=sha,
        git_sha_source=source,
        workers=[(w.worker, w.attempts) for w in insight.workers],
        worker_count=insight.worker_count,
        first_started_at=insight.span.first_started_at,
        last_finished_at=insight.span.last_finished_at,
        submitted_at=insight.submitted_at,
        submitted_by=insight.submitted_by,
        generated_at=datetime.now(UTC),
        store=store,
    )


# -- shared pieces ---------------------------------------------------------------------------


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else moment.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _span(p: Provenance) -> str:
    if p.first_started_at is None or p.last_finished_at is None:
        return "no run has finished"
    seconds = max(0.0, (p.last_finished_at - p.first_started_at).total_seconds())
    return f"{_when(p.first_started_at)} .. {_when(p.last_finished_at)} ({seconds:,.1f} s)"


def _ci(group: GroupSummary) -> str:
    s = group.outcome
    if s.ci_low is None or s.ci_high is None:
        return "-"
    return f"[{format_number(s.ci_low)}, {format_number(s.ci_high)}]"


def _pending(counts: Mapping[str, int]) -> int:
    return sum(counts.get(s, 0) for s in ("planned", "queued", "running"))


def _group_row(group: GroupSummary, best: GroupSummary | None) -> list[str]:
    c = group.counts
    mark = "★ " if best is not None and group.key == best.key else ""
    return [
        mark + group.label,
        f"{group.total:,}",
        f"{c.get('success', 0):,}",
        f"{c.get('failed', 0):,}",
        f"{c.get('cancelled', 0):,}",
        f"{_pending(c):,}",
        f"{group.outcome.n:,}",
        format_number(group.outcome.mean),
        format_number(group.outcome.std),
        _ci(group),
        format_number(group.outcome.minimum),
        format_number(group.outcome.maximum),
        format_number(group.mean_latency_s),
        f"{group.cost_usd:,.4f}",
    ]


_GROUP_HEAD = [
    "",
    "runs",
    "success",
    "failed",
    "cancelled",
    "pending",
    "n",
    "mean",
    "std",
    "95 % CI",
    "min",
    "max",
    "mean latency s",
    "cost $",
]


def _levels(factor: Mapping[str, Any]) -> str:
    levels = []
    for level in factor.get("levels") or []:
        if isinstance(level, Mapping):
            name, value = level.get("name"), level.get("value")
            levels.append(str(name) if name == value or value is None else f"{name}={value}")
        else:
            levels.append(str(level))
    return ", ".join(levels)


def _list(values: Any) -> str:
    if isinstance(values, list | tuple):
        return ", ".join(
            str(v.get("agent_id", v)) if isinstance(v, Mapping) else str(v) for v in values
        )
    return "" if values is None else str(values)


def _design_rows(insight: Insight) -> list[list[str]]:
    d = insight.definition
    budget = d.get("run_budget") or {}
    design = d.get("design_spec") or {}
    rows = [
        ["design", str(design.get("kind", "-")) if isinstance(design, Mapping) else str(design)],
        ["conditions with runs", f"{len(insight.conditions):,}"],
        ["runs planned", f"{insight.run_count:,}"],
        ["replicates", str(budget.get("replicates", "-")) if isinstance(budget, Mapping) else "-"],
        ["problems", _list(d.get("problem_ids")) or "-"],
    ]
    if d.get("agent_specs"):
        rows.append(["agents", _list(d.get("agent_specs"))])
    return rows


def _factor_rows(insight: Insight) -> list[list[str]]:
    rows = []
    for kind in ("factors", "blocks"):
        for factor in insight.definition.get(kind) or []:
            if isinstance(factor, Mapping):
                rows.append(
                    [
                        str(factor.get("name", "")),
                        "block" if kind == "blocks" else str(factor.get("kind", "")),
                        _levels(factor),
                        str(factor.get("description") or ""),
                    ]
                )
    return rows


def _hypothesis_rows(insight: Insight) -> list[list[str]]:
    rows = []
    for h in insight.definition.get("hypotheses") or []:
        if isinstance(h, Mapping):
            rows.append(
                [
                    str(h.get("hypothesis_id", "")),
                    str(h.get("label") or ""),
                    " ".join(str(h.get("statement") or "").split()),
                    _list(h.get("independent_vars")),
                    _list(h.get("dependent_vars")),
                    str(h.get("direction") or "-"),
                ]
            )
    return rows


def _outcome_rows(insight: Insight) -> list[list[str]]:
    rows = []
    for o in insight.definition.get("outcomes") or []:
        if isinstance(o, Mapping):
            rows.append(
                [
                    str(o.get("name", "")) + (" (primary)" if o.get("primary") else ""),
                    f"{o.get('source_table', 'runs')}.{o.get('column') or o.get('name')}",
                    str(o.get("aggregation") or "-"),
                    " ".join(str(o.get("description") or "").split()),
                ]
            )
    return rows


def _failure_rows(insight: Insight) -> list[list[str]]:
    return [
        [
            f"{f.count:,}",
            f.error_kind or "-",
            f.error_type or "-",
            " ".join((f.error_message or "").split())[:300],
            f.example_run_id,
        ]
        for f in insight.failures
    ]


def _cost_rows(insight: Insight) -> list[list[str]]:
    t = insight.totals
    finished = t.counts.get("success", 0) + t.counts.get("failed", 0)
    return [
        ["total cost $", f"{t.cost_usd:,.4f}"],
        ["cost per finished run $", f"{t.cost_usd / finished:,.6f}" if finished else "-"],
        ["input tokens", f"{t.input_tokens:,}"],
        ["output tokens", f"{t.output_tokens:,}"],
        ["agent time s (sum of run latencies)", f"{t.latency_s:,.1f}"],
    ]


def _provenance_rows(p: Provenance) -> list[list[str]]:
    workers = ", ".join(f"{w} ({n:,} attempts)" for w, n in p.workers[:10])
    if p.worker_count > 10:
        workers += f", ... {p.worker_count - 10} more"
    return [
        ["studyq", p.studyq_version],
        ["python", f"{p.python_version} ({p.platform})"],
        ["packages", ", ".join(f"{k} {v}" for k, v in p.package_versions.items())],
        ["git SHA", f"{p.git_sha} ({p.git_sha_source})" if p.git_sha else p.git_sha_source],
        ["workers (host:pid)", workers or "none yet"],
        ["runs span", _span(p)],
        ["submitted", f"{_when(p.submitted_at)} by {p.submitted_by or '-'}"],
        ["store", p.store],
        ["report built", _when(p.generated_at)],
    ]


# -- HTML ----------------------------------------------------------------------------------

_CSS = """
body{font-family:sans-serif;margin:2em auto;max-width:960px;color:#222;line-height:1.4}
h1{margin-bottom:.2em}h2{border-bottom:1px solid #ccc;padding-bottom:.2em;margin-top:2em}
table{border-collapse:collapse;margin:.5em 0;font-size:13px}
th,td{border:1px solid #ddd;padding:3px 6px;text-align:left;vertical-align:top}
td.n{text-align:right;font-variant-numeric:tabular-nums}th{background:#f4f4f4}
tr.best td{background:#fff3c4}.muted{color:#666}.answer{background:#f7f9fc;padding:.6em 1em;
border-left:4px solid #1565c0}svg.plot{max-width:100%;height:auto;display:block;margin:.5em 0}
code{background:#f4f4f4;padding:0 3px}
"""


def _table(head: Sequence[str], rows: Iterable[Sequence[str]], *, best: str | None = None) -> str:
    out = ["<table>"]
    if any(head):
        out += ["<thead><tr>", *(f"<th>{escape(h)}</th>" for h in head), "</tr></thead>"]
    out.append("<tbody>")
    count = 0
    for row in rows:
        count += 1
        klass = ' class="best"' if best is not None and row and row[0] == best else ""
        cells = "".join(
            f'<td class="n">{escape(c)}</td>' if i and _numeric(c) else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        out.append(f"<tr{klass}>{cells}</tr>")
    if not count:
        out.append(f'<tr><td colspan="{len(head)}" class="muted">none</td></tr>')
    out.append("</tbody></table>")
    return "".join(out)


def _numeric(cell: str) -> bool:
    return bool(cell) and (cell[0].isdigit() or cell[0] in "-[") and cell != "-"


def _kv(rows: Sequence[Sequence[str]]) -> str:
    return _table(["", ""], rows)


def render_html(insight: Insight, prov: Provenance) -> str:
    """The self-contained HTML page of the study."""
    d = insight.definition
    outcome = insight.outcome
    best = best_group(insight.conditions, outcome)
    title = str(d.get("title") or insight.study_id)
    strips = [
        StripGroup(
            g.label,
            insight.samples.get(g.key, []),
            g.outcome,
            best is not None and g.key == best.key,
        )
        for g in insight.conditions
    ]
    caption = (
        f"{outcome.name} ({outcome.direction}); dots: sampled runs, bar: mean, whisker: 95 % CI"
    )
    best_label = ("★ " + best.label) if best is not None else None
    answer = (
        f"Best condition: <b>{escape(best.label)}</b>, mean {escape(outcome.name)} "
        f"{escape(format_number(best.outcome.mean))} (95 % CI {escape(_ci(best))}, "
        f"n={best.outcome.n:,}; {escape(outcome.direction)}: {escape(outcome.why)}); "
        f"{escape(best_note(insight.conditions, best))}."
        if best is not None
        else "No condition is marked best: no successful run has a value yet."
        if outcome.lower_is_better is not None
        else f"No condition is marked best: {escape(outcome.why)}."
    )
    t = insight.totals
    counts = ", ".join(f"{n:,} {s}" for s, n in t.counts.items() if n)
    sampled = sum(len(v) for v in insight.samples.values())
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{escape(title)} — studyq report</title><style>{_CSS}</style></head><body>",
        f"<h1>{escape(title)}</h1>",
        f'<p class="muted">study <code>{escape(insight.study_id)}</code> · {t.runs:,} runs '
        f"({escape(counts) or 'none'}) · report built {escape(_when(prov.generated_at))}</p>",
    ]
    if d.get("description"):
        parts.append(f"<p>{escape(' '.join(str(d['description']).split()))}</p>")
    parts += [
        '<h2 id="outcome">Outcome by condition</h2>',
        f'<p class="answer">{answer}</p>',
        strip_plot(strips, caption=caption),
        f'<p class="muted">{sampled:,} of {sum(g.outcome.n for g in insight.conditions):,} '
        "outcome values drawn (a fixed sample of each condition's successful runs, chosen by "
        "spec digest); means and intervals use every successful run. 95 % CI: mean ± "
        "t(0.975, n-1)·s/√n.</p>",
        _table(
            ["condition", "n", "mean", "std", "95 % CI", "min", "max"],
            (_group_row(g, best)[:1] + _group_row(g, best)[6:12] for g in insight.conditions),
            best=best_label,
        ),
        '<h2 id="design">Design</h2>',
        _kv(_design_rows(insight)),
        "<h3>Factors</h3>",
        _table(["factor", "kind", "levels", "description"], _factor_rows(insight)),
        '<h3 id="hypotheses">Hypotheses</h3>',
        _table(
            ["id", "label", "statement", "independent", "dependent", "direction"],
            _hypothesis_rows(insight),
        ),
        '<h3 id="outcomes">Outcomes</h3>',
        _table(["outcome", "source", "aggregation", "description"], _outcome_rows(insight)),
        '<h2 id="completion">Completion per condition</h2>',
        completion_bars([(g.label, g.counts) for g in insight.conditions]),
        _table(
            ["condition", *_GROUP_HEAD[1:6]],
            (_group_row(g, best)[:6] for g in insight.conditions),
            best=best_label,
        ),
        '<h2 id="agents">Per agent</h2>',
        _table(["agent", *_GROUP_HEAD[1:]], (_group_row(g, None) for g in insight.agents)),
        '<h2 id="problems">Per problem</h2>',
        _table(["problem", *_GROUP_HEAD[1:]], (_group_row(g, None) for g in insight.problems)),
        '<h2 id="failures">Failures</h2>',
        _table(
            ["runs", "kind", "type", "message", "example run (studyq show ID)"],
            _failure_rows(insight),
        ),
        '<h2 id="cost">Cost and tokens</h2>',
        _kv(_cost_rows(insight)),
        '<h2 id="throughput">Throughput and latency</h2>',
        throughput_line(insight.throughput),
        histogram(insight.latency, caption="run latency (s), finished runs"),
        '<h2 id="provenance">Provenance</h2>',
        _kv(_provenance_rows(prov)),
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


# -- Markdown ------------------------------------------------------------------------------


def _md_cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _md_table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = [
        "| " + " | ".join(_md_cell(h) for h in head) + " |",
        "|" + "|".join("---" for _ in head) + "|",
    ]
    lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
    if len(lines) == 2:
        lines.append("| " + " | ".join(["none", *([""] * (len(head) - 1))]) + " |")
    return lines


def render_markdown(insight: Insight, prov: Provenance) -> str:
    """The study as a Markdown text summary: the same tables as the page, without plots."""
    d = insight.definition
    outcome = insight.outcome
    best = best_group(insight.conditions, outcome)
    t = insight.totals
    lines = [
        f"# {d.get('title') or insight.study_id}",
        "",
        f"study `{insight.study_id}` · {t.runs:,} runs ("
        + (", ".join(f"{n:,} {s}" for s, n in t.counts.items() if n) or "none")
        + f") · report built {_when(prov.generated_at)}",
        "",
    ]
    if d.get("description"):
        lines += [" ".join(str(d["description"]).split()), ""]
    lines += [
        "## Outcome by condition",
        "",
        f"{outcome.name}, {outcome.direction} ({outcome.why}); successful runs, mean with "
        "95 % CI (Student t).",
        "",
    ]
    lines += _md_table(
        ["condition", "n", "mean", "std", "95 % CI", "min", "max"],
        (_group_row(g, best)[:1] + _group_row(g, best)[6:12] for g in insight.conditions),
    )
    lines.append("")
    if best is not None:
        lines += [
            f"Best condition (★): {best.label}, mean {format_number(best.outcome.mean)}; "
            f"{best_note(insight.conditions, best)}.",
            "",
        ]
    sections: list[tuple[str, list[str], list[list[str]]]] = [
        ("Design", ["item", "value"], _design_rows(insight)),
        ("Factors", ["factor", "kind", "levels", "description"], _factor_rows(insight)),
        (
            "Hypotheses",
            ["id", "label", "statement", "independent", "dependent", "direction"],
            _hypothesis_rows(insight),
        ),
        ("Outcomes", ["outcome", "source", "aggregation", "description"], _outcome_rows(insight)),
        (
            "Completion per condition",
            ["condition", *_GROUP_HEAD[1:6]],
            [_group_row(g, best)[:6] for g in insight.conditions],
        ),
        ("Per agent", ["agent", *_GROUP_HEAD[1:]], [_group_row(g, None) for g in insight.agents]),
        (
            "Per problem",
            ["problem", *_GROUP_HEAD[1:]],
            [_group_row(g, None) for g in insight.problems],
        ),
        (
            "Failures",
            ["runs", "kind", "type", "message", "example run"],
            _failure_rows(insight),
        ),
        ("Cost and tokens", ["item", "value"], _cost_rows(insight)),
        ("Provenance", ["item", "value"], _provenance_rows(prov)),
    ]
    for heading, head, rows in sections:
        lines += [f"## {heading}", "", *_md_table(head, rows), ""]
    return "\n".join(lines)
