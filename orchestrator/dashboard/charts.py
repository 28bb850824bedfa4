"""The dashboard's plots :mod:`orchestrator.insight.plots` does not draw, as inline SVG with
the same conventions (one ``<svg class="plot" data-plot=NAME>``, a ``.mark`` per datum,
escaped text): cost burn (the running total of a study's cost over time) and the latency
histogram on fixed 1-2-5 edges (what one scan can bin without knowing the extremes)."""

from __future__ import annotations

from html import escape

from orchestrator.dashboard.queries import CostBurn
from orchestrator.insight.plots import COLORS, WIDTH, format_number

__all__ = ["cost_line", "latency_bars"]

_HEIGHT = 220.0
_LEFT, _TOP, _PAD = 70.0, 20.0, 16.0
_FONT = 'font-family="sans-serif" font-size="12"'


def _text(x: float, y: float, text: str, anchor: str = "middle") -> str:
    return f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" {_FONT}>{escape(text)}</text>'


def cost_line(burn: CostBurn, *, name: str = "cost") -> str:
    """Cumulative cost in dollars: one ``.mark.line`` path and a ``.mark.point`` per bucket."""
    head = (
        f'<svg class="plot" data-plot="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" viewBox="0 0 {WIDTH} {_HEIGHT:.0f}" width="{WIDTH}" '
        f'height="{_HEIGHT:.0f}"><title>cost so far (USD)</title>'
    )
    if not burn.points:
        return head + _text(WIDTH / 2, _HEIGHT / 2, "no run has reported a cost yet") + "</svg>"
    bottom = _HEIGHT - 44
    most = max(total for _, total in burn.points) or 1.0
    last = max(1, len(burn.points) - 1)

    def x(i: int) -> float:
        return _LEFT + i / last * (WIDTH - _PAD - _LEFT)

    def y(value: float) -> float:
        return bottom - value / most * (bottom - _TOP)

    coords = [(x(i), y(total)) for i, (_, total) in enumerate(burn.points)]
    path = "M" + "L".join(f"{cx:.1f} {cy:.1f}" for cx, cy in coords)
    body = [
        f'<path class="mark line" d="{path}" stroke="{COLORS["failed"]}" stroke-width="2" '
        'fill="none"/>'
    ]
    for (cx, cy), (moment, total) in zip(coords, burn.points, strict=True):
        body.append(
            f'<circle class="mark point" cx="{cx:.1f}" cy="{cy:.1f}" r="2.5" '
            f'fill="{COLORS["failed"]}"><title>{moment:%Y-%m-%d %H:%M} UTC: '
            f"${format_number(total)}</title></circle>"
        )
    body.append(
        f'<line x1="{_LEFT}" y1="{bottom:.1f}" x2="{WIDTH - _PAD}" y2="{bottom:.1f}" '
        'stroke="#444"/>'
    )
    body.append(_text(_LEFT - 6, _TOP + 4, f"${format_number(most)}", anchor="end"))
    body.append(_text(_LEFT - 6, bottom + 4, "$0", anchor="end"))
    first, final = burn.points[0][0], burn.points[-1][0]
    body.append(_text(_LEFT, bottom + 16, f"{first:%H:%M}"))
    body.append(_text(WIDTH - _PAD, bottom + 16, f"{final:%H:%M}"))
    body.append(_text((_LEFT + WIDTH) / 2, bottom + 32, "time (UTC); cost so far, USD"))
    return head + "".join(body) + "</svg>"


def _seconds(value: float) -> str:
    if value < 1:
        return f"{value * 1000:g} ms"
    if value < 120:
        return f"{value:g} s"
    if value < 7200:
        return f"{value / 60:g} min"
    return f"{value / 3600:g} h"


def _bin_text(index: int, edges: tuple[float, ...]) -> str:
    if index == 0:
        return f"< {_seconds(edges[0])}"
    if index >= len(edges):
        return f">= {_seconds(edges[-1])}"
    return f"{_seconds(edges[index - 1])} .. {_seconds(edges[index])}"


def latency_bars(bins: dict[int, int], edges: tuple[float, ...], *, name: str = "latency") -> str:
    """Finished runs per latency bin on a log axis of 1-2-5 edges: one ``.mark.bin`` rect
    per bin from the lowest to the highest bin that has runs (empty ones between too)."""
    caption = "latency of finished runs (log scale, 1-2-5 steps)"
    head = (
        f'<svg class="plot" data-plot="{escape(name)}" xmlns="http://www.w3.org/2000/svg" '
        f'role="img" viewBox="0 0 {WIDTH} {_HEIGHT:.0f}" width="{WIDTH}" '
        f'height="{_HEIGHT:.0f}"><title>{caption}</title>'
    )
    shown = {i: n for i, n in bins.items() if n}
    if not shown:
        return head + _text(WIDTH / 2, _HEIGHT / 2, "no finished run has a latency yet") + "</svg>"
    first, last = min(shown), max(shown)
    count = last - first + 1
    bottom = _HEIGHT - 44
    most = max(shown.values())
    step = (WIDTH - _PAD - _LEFT) / count
    body = []
    for slot, index in enumerate(range(first, last + 1)):
        n = bins.get(index, 0)
        x = _LEFT + slot * step
        height = n / most * (bottom - _TOP)
        body.append(
            f'<rect class="mark bin" x="{x + 1:.1f}" y="{bottom - height:.1f}" '
            f'width="{max(0.5, step - 2):.1f}" height="{height:.1f}" fill="{COLORS["bin"]}">'
            f"<title>{escape(_bin_text(index, edges))}: {n:,}</title></rect>"
        )
        body.append(_text(x + step / 2, bottom + 16, _bin_text(index, edges).split(" .. ")[0]))
    body.append(
        f'<line x1="{_LEFT}" y1="{bottom:.1f}" x2="{WIDTH - _PAD}" y2="{bottom:.1f}" '
        'stroke="#444"/>'
    )
    body.append(_text(_LEFT - 6, _TOP + 4, f"{most:,}", anchor="end"))
    body.append(_text(_LEFT - 6, bottom + 4, "0", anchor="end"))
    body.append(_text((_LEFT + WIDTH) / 2, bottom + 32, caption + "; runs per bin"))
    return head + "".join(body) + "</svg>"
