"""Server-side SVG charts of the recent runs: no JavaScript library, no CDN, readable without scripts.

Points carry `data-run` and `data-value` so tests (and people with devtools) can check what was drawn.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pipemon.model.recent import Run
from pipemon.web.html import e

WIDTH, HEIGHT, PAD_LEFT, PAD_RIGHT, PAD_Y = 640, 180, 56, 8, 14


@dataclass(frozen=True, slots=True)
class Bands:
    """A baseline: its median and the values at ±2σ and ±3σ (computed in log space, shown raw)."""

    median: float
    low2: float
    high2: float
    low3: float
    high3: float
    samples: int


def bands_of(center: float, sigma: float, from_log: Callable[[float], float], samples: int) -> Bands:
    return Bands(from_log(center), from_log(center - 2 * sigma), from_log(center + 2 * sigma),
                 from_log(center - 3 * sigma), from_log(center + 3 * sigma), samples)


def _known(value: float) -> bool:
    return not (math.isnan(value) or math.isinf(value))


def line_chart(chart_id: str, title: str, runs: Sequence[Run], values: Sequence[float], fmt: Callable[[float], str],
               bands: Bands | None = None, baseline: float | None = None) -> str:
    """One point per run (oldest left), with the baseline's bands behind them."""
    known = [v for v in values if _known(v)]
    top_candidates = [*known, *([bands.high3] if bands else []), *([baseline] if baseline else [])]
    top = max([v for v in top_candidates if _known(v)], default=1.0) * 1.1 or 1.0
    inner_w, inner_h = WIDTH - PAD_LEFT - PAD_RIGHT, HEIGHT - 2 * PAD_Y
    step = inner_w / max(len(values) - 1, 1)

    def y(v: float) -> float:
        return PAD_Y + inner_h * (1 - min(max(v, 0.0), top) / top)

    parts = [f'<svg id="{e(chart_id)}" class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img"'
             f' aria-label="{e(title)}" preserveAspectRatio="none"><title>{e(title)}</title>']
    for frac in (0, 0.5, 1):  # axis labels
        parts.append(f'<text class="axis" x="{PAD_LEFT - 4}" y="{y(top * frac) + 4:.1f}" text-anchor="end">'
                     f"{e(fmt(top * frac))}</text>")
    if bands is not None:
        parts.append(_band("band3", y(bands.high3), y(bands.low3), f"±3σ: {fmt(bands.low3)} – {fmt(bands.high3)}"))
        parts.append(_band("band2", y(bands.high2), y(bands.low2), f"±2σ: {fmt(bands.low2)} – {fmt(bands.high2)}"))
        parts.append(_hline("median", y(bands.median), f"baseline median {fmt(bands.median)}"
                                                       f" ({bands.samples} runs)"))
    elif baseline is not None and _known(baseline):
        parts.append(_hline("median", y(baseline), f"baseline {fmt(baseline)}"))
    points = [(PAD_LEFT + i * step, v, run) for i, (v, run) in enumerate(zip(values, runs, strict=True))]
    path = " ".join(f"{x:.1f},{y(v):.1f}" for x, v, _ in points if _known(v))
    if path:
        parts.append(f'<polyline class="line" points="{path}"/>')
    for x, v, run in points:
        if not _known(v):
            continue
        parts.append(f'<circle class="pt o-{e(run.status)}" cx="{x:.1f}" cy="{y(v):.1f}" r="3"'
                     f' data-run="{e(run.run_id)}" data-value="{v!r}"><title>{e(run.run_id)}: {e(fmt(v))}'
                     f"</title></circle>")
    parts.append("</svg>")
    return "".join(parts)


def _band(cls: str, y_top: float, y_bottom: float, label: str) -> str:
    return (f'<rect class="{cls}" x="{PAD_LEFT}" y="{y_top:.1f}" width="{WIDTH - PAD_LEFT - PAD_RIGHT}"'
            f' height="{max(y_bottom - y_top, 0.5):.1f}"><title>{e(label)}</title></rect>')


def _hline(cls: str, y: float, label: str) -> str:
    return (f'<line class="{cls}" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" y1="{y:.1f}" y2="{y:.1f}">'
            f"<title>{e(label)}</title></line>")


def outcome_strip(runs: Sequence[Run]) -> str:
    """One cell per run, oldest left, coloured by outcome."""
    if not runs:
        return ""
    width = (WIDTH - PAD_LEFT - PAD_RIGHT) / len(runs)
    cells = "".join(
        f'<rect class="o-{e(r.status)}" x="{PAD_LEFT + i * width:.1f}" y="2" width="{max(width - 1, 1):.1f}"'
        f' height="16" data-run="{e(r.run_id)}" data-status="{e(r.status)}"><title>{e(r.run_id)}: {e(r.status)}'
        f"</title></rect>"
        for i, r in enumerate(runs))
    return (f'<svg id="outcomes" class="strip" viewBox="0 0 {WIDTH} 20" role="img" aria-label="outcomes of the'
            f' recent runs" preserveAspectRatio="none">{cells}</svg>')
