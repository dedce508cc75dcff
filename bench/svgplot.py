"""A minimal SVG line plot, so that the sweeps get a picture without matplotlib.

Why not matplotlib: it is a large dependency for two plots of a handful of points; this writes
the SVG text directly (axes from zero, ticks at the measured x values, one coloured polyline
with dots per series, a legend). Any browser, and GitHub's markdown, shows the result.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from html import escape

Series = Mapping[str, Sequence[tuple[float, float]]]  # name -> (x, y) points
COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b")
WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 40, 50  # margins around the plotting area


def nice_ticks(top: float, count: int = 5) -> list[float]:
    """About ``count`` round tick values from 0 to at least ``top`` (steps of 1, 2 or 5 x 10^k)."""
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    base = 10 ** math.floor(math.log10(raw))
    step = next(m * base for m in (1, 2, 5, 10) if m * base >= raw)
    return [i * step for i in range(math.ceil(top / step - 1e-9) + 1)]


def _text(x: float, y: float, s: str, anchor: str = "middle", extra: str = "") -> str:
    """An SVG text element (escaped)."""
    return (f'<text x="{x:.1f}" y="{y:.1f}" text-anchor="{anchor}" font-size="12" '
            f'font-family="sans-serif"{extra}>{escape(s)}</text>')


def line_plot(series: Series, title: str, x_label: str, y_label: str) -> str:
    """The SVG document of one plot. Both axes start at 0, so that cost proportional to x
    reads as a straight line aimed at the origin, and a flat cost reads as flat."""
    xs = sorted({x for pts in series.values() for x, _ in pts})
    y_ticks = nice_ticks(max((y for pts in series.values() for _, y in pts), default=1.0))
    x_top, y_top = max(xs, default=1.0) or 1.0, y_ticks[-1]
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + w * x / x_top

    def py(y: float) -> float:
        return TOP + h * (1 - y / y_top)

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" '
           f'viewBox="0 0 {WIDTH} {HEIGHT}">',
           f'<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>',
           _text(WIDTH / 2, 22, title, extra=' font-weight="bold"')]
    for y in y_ticks:
        out.append(f'<line x1="{LEFT}" y1="{py(y):.1f}" x2="{LEFT + w}" y2="{py(y):.1f}" '
                   'stroke="#ddd"/>')
        out.append(_text(LEFT - 6, py(y) + 4, f"{y:g}", anchor="end"))
    for x in [0.0, *xs] if 0 not in xs else xs:
        out.append(_text(px(x), TOP + h + 18, f"{x:g}"))
    out.append(f'<path d="M{LEFT},{TOP} V{TOP + h} H{LEFT + w}" fill="none" stroke="black"/>')
    out.append(_text(LEFT + w / 2, HEIGHT - 10, x_label))
    out.append(_text(16, TOP + h / 2, y_label, extra=f' transform="rotate(-90 16 {TOP + h / 2})"'))
    for i, (name, pts) in enumerate(series.items()):
        color = COLORS[i % len(COLORS)]
        coords = " ".join(f"{px(x):.1f},{py(y):.1f}" for x, y in sorted(pts))
        out.append(f'<polyline points="{coords}" fill="none" stroke="{color}" stroke-width="2"/>')
        out += [f'<circle cx="{px(x):.1f}" cy="{py(y):.1f}" r="3" fill="{color}"/>' for x, y in pts]
        # Legend bottom right: under a rising line, and below a flat one near the top.
        top = TOP + h - 8 - 18 * (len(series) - i)
        out.append(f'<rect x="{LEFT + w - 140}" y="{top}" width="12" height="12" fill="{color}"/>')
        out.append(_text(LEFT + w - 122, top + 10, name, anchor="start"))
    out.append("</svg>")
    return "\n".join(out) + "\n"
