"""The dashboard's one plot :mod:`orchestrator.insight.plots` does not draw: cost burn, the
running total of a study's cost over time, as inline SVG with the same conventions (one
``<svg class="plot" data-plot=NAME>``, a ``.mark`` per datum, escaped text)."""

from __future__ import annotations

from html import escape

from orchestrator.dashboard.queries import CostBurn
from orchestrator.insight.plots import COLORS, WIDTH, format_number

__all__ = ["cost_line"]

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
