"""Plots as inline SVG text, drawn in Python: a page that embeds them needs no script, no
font and no network, so it opens offline and in a mail attachment.

Each function returns one ``<svg class="plot" data-plot="NAME">`` element. Every drawn datum
is an element with class ``mark`` plus its kind (``point``, ``mean``, ``ci``, ``bar``,
``line``, ``bin``), so a test counts what was drawn: ``svg[data-plot=outcome] .mark.point``.
Text is escaped with :func:`html.escape`; a long label is cut, its full text kept in a
``<title>`` tooltip.

* :func:`strip_plot`: outcome by group, a row per group: the sampled values as dots, the mean
  as a tick and the 95 % interval as a whisker; the best group's row is highlighted.
* :func:`completion_bars`: runs per group, one stacked bar per group (success, failed,
  cancelled, not finished).
* :func:`throughput_line`: runs finished per minute over time.
* :func:`histogram`: a distribution, one rect per bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from html import escape

from orchestrator.insight.aggregates import Histogram, Throughput
from orchestrator.insight.stats import Summary

__all__ = ["StripGroup", "completion_bars", "histogram", "strip_plot", "throughput_line"]

WIDTH = 900
_LABEL_W = 280
_ROW_H = 26
_PAD = 16
_AXIS_H = 34
_FONT = 'font-family="sans-serif" font-size="12"'

COLORS = {
    "success": "#2e7d32",
    "failed": "#c62828",
    "cancelled": "#9e9e9e",
    "pending": "#90caf9",
    "point": "#1565c0",
    "mean": "#000000",
    "best": "#fff3c4",
    "line": "#1565c0",
    "bin": "#5c6bc0",
}


def _num(value: float) -> str:
    return f"{value:.1f}"


def _cut(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _label(x: float, y: float, text: str, *, anchor: str = "end", limit: int = 40) -> str:
    shown = escape(_cut(text, limit))
    tip = f"<title>{escape(text)}</title>" if len(text) > limit else ""
    return f'<text x="{_num(x)}" y="{_num(y)}" text-anchor="{anchor}" {_FONT}>{tip}{shown}</text>'


def _svg(name: str, height: float, title: str, body: Sequence[str]) -> str:
    return (
        f'<svg class="plot" data-plot="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" viewBox="0 0 {WIDTH} {_num(height)}" width="{WIDTH}" '
        f'height="{_num(height)}"><title>{escape(title)}</title>' + "".join(body) + "</svg>"
    )


def format_number(value: float | None) -> str:
    """A number for a table or an axis: 4 significant digits, ``-`` when missing."""
    if value is None or math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 1e6 or abs(value) < 1e-3:
        return f"{value:.3e}"
    return f"{value:.4g}"


@dataclass(frozen=True, slots=True)
class _Scale:
    """Values from ``low`` to ``high`` onto pixels ``start`` to ``end``, linear or log10."""

    low: float
    high: float
    start: float
    end: float
    log: bool = False

    def _t(self, value: float) -> float:
        return math.log10(value) if self.log else value

    def __call__(self, value: float) -> float:
        low, high = self._t(self.low), self._t(self.high)
        v = min(max(value, self.low), self.high)
        if high <= low:
            return (self.start + self.end) / 2
        return self.start + (self._t(v) - low) / (high - low) * (self.end - self.start)

    def ticks(self, count: int = 5) -> list[float]:
        if self.high <= self.low:
            return [self.low]
        if self.log:
            first, last = math.floor(math.log10(self.low)), math.ceil(math.log10(self.high))
            step = max(1, (last - first) // count)
            values = [10.0**e for e in range(first, last + 1, step)]
            return [v for v in values if self.low <= v <= self.high] or [self.low, self.high]
        raw = (self.high - self.low) / count
        magnitude = 10 ** math.floor(math.log10(raw))
        step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
        first = math.ceil(self.low / step) * step
        return [first + i * step for i in range(int((self.high - first) / step) + 1)]


def _value_scale(
    points: Sequence[float], extras: Sequence[float], start: float, end: float
) -> _Scale:
    """The axis for ``points`` (drawn values) and ``extras`` (means, interval ends): log10
    when every point is positive and they span more than three decades (a few outliers
    would squash the rest), interval ends below it then clipped at the axis."""
    if points and min(points) > 0 and max(points) / min(points) > 1000:
        positive = [v for v in (*points, *extras) if v > 0]
        return _Scale(min(positive), max(positive), start, end, log=True)
    values = [*points, *extras]
    low, high = min(values), max(values)
    if high == low:
        low, high = low - 1, high + 1
    margin = (high - low) * 0.03
    return _Scale(low - margin, high + margin, start, end)


def _x_axis(scale: _Scale, y: float, caption: str) -> list[str]:
    parts = [
        f'<line x1="{_num(scale.start)}" y1="{_num(y)}" x2="{_num(scale.end)}" y2="{_num(y)}" '
        'stroke="#444"/>'
    ]
    for tick in scale.ticks():
        x = scale(tick)
        parts.append(
            f'<line x1="{_num(x)}" y1="{_num(y)}" x2="{_num(x)}" y2="{_num(y + 4)}" stroke="#444"/>'
        )
        parts.append(_label(x, y + 16, format_number(tick), anchor="middle"))
    suffix = " (log scale)" if scale.log else ""
    parts.append(
        _label((scale.start + scale.end) / 2, y + 30, caption + suffix, anchor="middle", limit=90)
    )
    return parts


@dataclass(frozen=True, slots=True)
class StripGroup:
    """One row of a strip plot: its label, its sampled values and its summary."""

    label: str
    values: Sequence[float]
    summary: Summary
    best: bool = False


def strip_plot(groups: Sequence[StripGroup], *, caption: str, name: str = "outcome") -> str:
    """Outcome by group: one ``g.strip`` row per group with a ``.mark.point`` per sampled
    value, a ``.mark.mean`` tick and a ``.mark.ci`` whisker (groups with an interval)."""
    top = _PAD
    height = top + len(groups) * _ROW_H + _AXIS_H + _PAD
    points = [v for g in groups for v in g.values]
    extras = [
        x
        for g in groups
        for x in (g.summary.mean, g.summary.ci_low, g.summary.ci_high)
        if x is not None
    ]
    if not points and not extras:
        empty = [_label(WIDTH / 2, height / 2, "no outcome values yet", anchor="middle")]
        return _svg(name, height, caption, empty)
    scale = _value_scale(points, extras, _LABEL_W + 10, WIDTH - _PAD)
    body: list[str] = []
    for row, group in enumerate(groups):
        y = top + row * _ROW_H + _ROW_H / 2
        parts = [f'<g class="strip" data-label="{escape(group.label)}">']
        if group.best:
            parts.append(
                f'<rect class="best" x="0" y="{_num(y - _ROW_H / 2)}" width="{WIDTH}" '
                f'height="{_ROW_H}" fill="{COLORS["best"]}"/>'
            )
        parts.append(_label(_LABEL_W, y + 4, ("★ " if group.best else "") + group.label))
        for i, value in enumerate(group.values):
            jitter = ((i * 7919) % 13 - 6) * 0.9  # deterministic spread within the row
            parts.append(
                f'<circle class="mark point" cx="{_num(scale(value))}" cy="{_num(y + jitter)}" '
                f'r="2.2" fill="{COLORS["point"]}" fill-opacity="0.35"/>'
            )
        s = group.summary
        if s.ci_low is not None and s.ci_high is not None:
            x1, x2 = scale(s.ci_low), scale(s.ci_high)
            parts.append(
                f'<path class="mark ci" d="M{_num(x1)} {_num(y - 6)}v12M{_num(x1)} {_num(y)}'
                f'H{_num(x2)}M{_num(x2)} {_num(y - 6)}v12" stroke="{COLORS["mean"]}" '
                f'stroke-width="1.5" fill="none"><title>95 % CI {format_number(s.ci_low)} .. '
                f"{format_number(s.ci_high)}</title></path>"
            )
        if s.mean is not None:
            x = scale(s.mean)
            parts.append(
                f'<rect class="mark mean" x="{_num(x - 2)}" y="{_num(y - 9)}" width="4" '
                f'height="18" fill="{COLORS["mean"]}"><title>mean {format_number(s.mean)} '
                f"(n={s.n})</title></rect>"
            )
        parts.append("</g>")
        body.append("".join(parts))
    body += _x_axis(scale, top + len(groups) * _ROW_H + 4, caption)
    return _svg(name, height, caption, body)


_STATUS_ORDER = ("success", "failed", "cancelled", "pending")


def completion_bars(
    groups: Sequence[tuple[str, dict[str, int]]], *, name: str = "completion"
) -> str:
    """Runs per group as one horizontal ``.mark.bar`` per group, stacked by status (success,
    failed, cancelled, and pending = planned + queued + running)."""
    height = _PAD + len(groups) * _ROW_H + _AXIS_H + _PAD + 16
    most = max([sum(c.values()) for _, c in groups] or [1]) or 1
    scale = _Scale(0, most, _LABEL_W + 10, WIDTH - _PAD)
    body: list[str] = []
    for row, (label, counts) in enumerate(groups):
        y = _PAD + row * _ROW_H
        parts = {
            "success": counts.get("success", 0),
            "failed": counts.get("failed", 0),
            "cancelled": counts.get("cancelled", 0),
            "pending": sum(counts.get(s, 0) for s in ("planned", "queued", "running")),
        }
        total = sum(parts.values())
        tip = ", ".join(f"{v} {k}" for k, v in parts.items() if v) or "no runs"
        segments = []
        x = scale.start
        for status in _STATUS_ORDER:
            width = scale(parts[status]) - scale.start if most else 0
            if parts[status]:
                segments.append(
                    f'<rect class="segment {status}" x="{_num(x)}" y="{_num(y + 4)}" '
                    f'width="{_num(width)}" height="{_ROW_H - 8}" fill="{COLORS[status]}"/>'
                )
            x += width
        body.append(
            f'<g class="mark bar" data-label="{escape(label)}" data-total="{total}">'
            f"<title>{escape(label)}: {escape(tip)}</title>"
            + _label(_LABEL_W, y + _ROW_H / 2 + 4, label)
            + "".join(segments)
            + _label(x + 4, y + _ROW_H / 2 + 4, f"{total:,}", anchor="start")
            + "</g>"
        )
    axis_y = _PAD + len(groups) * _ROW_H + 4
    body += _x_axis(scale, axis_y, "runs")
    legend_y = axis_y + _AXIS_H + 10
    for i, status in enumerate(_STATUS_ORDER):
        x = _LABEL_W + 10 + i * 130
        body.append(
            f'<rect x="{x}" y="{legend_y - 9}" width="10" height="10" fill="{COLORS[status]}"/>'
            + _label(x + 14, legend_y, status, anchor="start")
        )
    return _svg(name, height, "runs per condition by status", body)


def _when(moment: datetime) -> str:
    return moment.strftime("%H:%M")


def throughput_line(throughput: Throughput, *, name: str = "throughput") -> str:
    """Runs finished per minute over time: one ``.mark.line`` path and a ``.mark.point`` per
    time bucket."""
    height = 240.0
    points = throughput.points
    if not points:
        body = [_label(WIDTH / 2, height / 2, "no finished runs yet", anchor="middle")]
        return _svg(name, height, "runs finished per minute", body)
    rates = [throughput.per_minute(n) for _, n in points]
    left, bottom, top = 70.0, height - _AXIS_H - 10, 20.0
    xs = _Scale(0, max(1, len(points) - 1), left, WIDTH - _PAD)
    ys = _Scale(0, max(rates) or 1, bottom, top)
    coords = [(xs(i), ys(rate)) for i, rate in enumerate(rates)]
    path = "M" + "L".join(f"{_num(x)} {_num(y)}" for x, y in coords)
    body = [
        f'<path class="mark line" d="{path}" stroke="{COLORS["line"]}" stroke-width="2" '
        'fill="none"/>'
    ]
    for (x, y), (moment, count) in zip(coords, points, strict=True):
        body.append(
            f'<circle class="mark point" cx="{_num(x)}" cy="{_num(y)}" r="2.5" '
            f'fill="{COLORS["line"]}"><title>{moment:%Y-%m-%d %H:%M} UTC: {count:,} runs'
            "</title></circle>"
        )
    body.append(
        f'<line x1="{left}" y1="{_num(bottom)}" x2="{WIDTH - _PAD}" y2="{_num(bottom)}" '
        'stroke="#444"/>'
    )
    for tick in ys.ticks(4):
        body.append(_label(left - 6, ys(tick) + 4, format_number(tick)))
    for i in sorted({0, len(points) // 2, len(points) - 1}):
        body.append(_label(xs(i), bottom + 16, _when(points[i][0]), anchor="middle"))
    width_label = (
        "minute" if throughput.bucket_s == 60 else f"{throughput.bucket_s // 60}-minute bucket"
    )
    body.append(
        _label(
            (left + WIDTH) / 2,
            bottom + 30,
            f"time (UTC, one point per {width_label}); runs finished per minute",
            anchor="middle",
            limit=90,
        )
    )
    return _svg(name, height, "runs finished per minute", body)


def histogram(hist: Histogram | None, *, caption: str, name: str = "latency") -> str:
    """A distribution: one ``.mark.bin`` rect per bin (empty bins too, zero high)."""
    height = 240.0
    if hist is None:
        body = [_label(WIDTH / 2, height / 2, "no values yet", anchor="middle")]
        return _svg(name, height, caption, body)
    left, bottom, top = 70.0, height - _AXIS_H - 10, 20.0
    bins = len(hist.counts)
    xs = _Scale(0, bins, left, WIDTH - _PAD)
    ys = _Scale(0, max(hist.counts) or 1, bottom, top)
    edges = hist.edges
    body = []
    for i, count in enumerate(hist.counts):
        x1, x2 = xs(i), xs(i + 1)
        y = ys(count)
        body.append(
            f'<rect class="mark bin" x="{_num(x1 + 1)}" y="{_num(y)}" '
            f'width="{_num(max(0.5, x2 - x1 - 2))}" height="{_num(bottom - y)}" '
            f'fill="{COLORS["bin"]}"><title>{format_number(edges[i])} .. '
            f"{format_number(edges[i + 1])}: {count:,}</title></rect>"
        )
    body.append(
        f'<line x1="{left}" y1="{_num(bottom)}" x2="{WIDTH - _PAD}" y2="{_num(bottom)}" '
        'stroke="#444"/>'
    )
    for tick in ys.ticks(4):
        body.append(_label(left - 6, ys(tick) + 4, f"{tick:,.0f}"))
    for i in sorted({0, bins // 2, bins}):
        body.append(_label(xs(i), bottom + 16, format_number(edges[i]), anchor="middle"))
    body.append(_label((left + WIDTH) / 2, bottom + 30, caption, anchor="middle", limit=90))
    return _svg(name, height, caption, body)
