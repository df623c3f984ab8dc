"""Scatter plots for the image benchmarks, drawn with PIL (a dependency) so that every run writes its PNG plots;
matplotlib is not a dependency of mmspec.

    scatter_png("speed.png", [(tau, speedup, "head (k=3)", True), ...], xlabel="tau", ylabel="speedup",
                title="speed vs acceptance", hline=1.0)

Points are numbered on the chart and named in a legend beside it (names of nearby points would overlap); filled
discs are lossless rows, crosses LOSSY ones.
"""
from __future__ import annotations

import math
from pathlib import Path

W, H, LEFT, RIGHT, TOP, BOTTOM, LEGEND = 560, 380, 60, 20, 34, 46, 330
LOSSLESS, LOSSY, GRID, TEXT = (31, 119, 180), (214, 39, 40), (225, 225, 225), (30, 30, 30)


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About n round tick values covering [lo, hi]."""
    step = (hi - lo) / max(n, 1) or 1.0
    mag = 10 ** math.floor(math.log10(step))
    step = min((m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step), default=10 * mag)
    first = math.ceil(lo / step) * step
    return [first + i * step for i in range(int((hi - first) / step + 1e-9) + 1)]


def _range(values: list[float], include: float | None) -> tuple[float, float]:
    lo, hi = min(values), max(values)
    if include is not None:
        lo, hi = min(lo, include), max(hi, include)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.1, 0.1)
    return lo - pad, hi + pad


def scatter_png(path, points: list[tuple[float, float, str, bool]], *, xlabel: str, ylabel: str, title: str,
                hline: float | None = None) -> Path | None:
    """Write a scatter plot of (x, y, name, lossless) points to `path`; None (nothing written) without points."""
    from PIL import Image, ImageDraw

    points = [p for p in points if p[0] is not None and p[1] is not None and math.isfinite(p[0])
              and math.isfinite(p[1])]
    if not points:
        return None
    x0, x1 = _range([p[0] for p in points], None)
    y0, y1 = _range([p[1] for p in points], hline)
    im = Image.new("RGB", (W + LEGEND, max(H, TOP + 14 * len(points) + 20)), "white")
    d = ImageDraw.Draw(im)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x, y):
        return LEFT + (x - x0) / (x1 - x0) * pw, TOP + (1 - (y - y0) / (y1 - y0)) * ph

    for t in _ticks(x0, x1):
        u, _ = px(t, y0)
        d.line([(u, TOP), (u, TOP + ph)], fill=GRID)
        d.text((u - 10, TOP + ph + 4), f"{t:g}", fill=TEXT)
    for t in _ticks(y0, y1):
        _, v = px(x0, t)
        d.line([(LEFT, v), (LEFT + pw, v)], fill=GRID)
        d.text((4, v - 5), f"{t:g}", fill=TEXT)
    d.rectangle([LEFT, TOP, LEFT + pw, TOP + ph], outline=TEXT)
    if hline is not None:
        _, v = px(x0, hline)
        d.line([(LEFT, v), (LEFT + pw, v)], fill=(120, 120, 120), width=1)
    d.text((LEFT, 10), title, fill=TEXT)
    d.text((LEFT + pw // 2 - 3 * len(xlabel), H - 18), xlabel, fill=TEXT)
    d.text((4, TOP - 16), ylabel, fill=TEXT)
    for i, (x, y, name, lossless) in enumerate(points, 1):
        u, v = px(x, y)
        if lossless:
            d.ellipse([u - 4, v - 4, u + 4, v + 4], fill=LOSSLESS)
        else:
            d.line([(u - 4, v - 4), (u + 4, v + 4)], fill=LOSSY, width=2)
            d.line([(u - 4, v + 4), (u + 4, v - 4)], fill=LOSSY, width=2)
        d.text((u + 5, v - 12), str(i), fill=TEXT)
        d.text((W + 4, TOP + 14 * (i - 1)), f"{i}. {name}" + ("" if lossless else " (LOSSY)"),
               fill=LOSSLESS if lossless else LOSSY)
    path = Path(path)
    im.save(path)
    return path
