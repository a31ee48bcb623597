"""Charts drawn on the server as SVG (no script, no external font; labels escaped). Colours are
presentation attributes, not `style`, so the console's CSP (no inline style) does not block them."""

from __future__ import annotations

import math
from collections.abc import Sequence

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04", "#db2777", "#65a30d")
W, H, PAD_L, PAD_B, PAD_T = 1100, 220, 56, 28, 12


def _fmt(v: float) -> str:
    for div, suffix in ((1e6, "M"), (1e3, "k")):
        if abs(v) >= div:
            return f"{v / div:.{0 if (v / div).is_integer() else 1}f}{suffix}"
    return f"{v:.0f}" if v == int(v) else f"{v:.2g}"


def nice_top(v: float) -> float:
    """The smallest 4 x (1, 2, 2.5 or 5 x 10^k) at or above v: round gridline values."""
    if v <= 0:
        return 4.0
    step = v / 4
    mag = 10 ** math.floor(math.log10(step))
    return 4 * next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= step)


def _frame(title: str, top: float, unit: str = "") -> list[str]:
    out = [
        f'<svg class="chart" viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{escape(title)}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="12">',
        f"<title>{escape(title)}</title>",
    ]
    for k in range(5):
        y = PAD_T + (H - PAD_T - PAD_B) * k / 4
        out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        label = escape(unit + _fmt(top * (4 - k) / 4))
        out.append(f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#6b7280">{label}</text>')
    return out


def _xlabel(x: float, text: str, last: bool) -> str:
    anchor = "end" if last else "middle"
    return f'<text x="{x:.1f}" y="{H - 8}" text-anchor="{anchor}" fill="#374151">{escape(text)}</text>'


def bars(title: str, labels: Sequence[str], values: Sequence[float], *, every: int = 5) -> Markup:
    """One bar per label (e.g. per day); every `every`-th label written under the axis."""
    top = nice_top(max([*values, 0]))
    out = _frame(title, top)
    n = max(len(values), 1)
    step = (W - PAD_L) / n
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = (H - PAD_T - PAD_B) * (v / top)
        x = PAD_L + i * step
        out.append(
            f'<rect x="{x + step * 0.15:.1f}" y="{H - PAD_B - h:.1f}" width="{step * 0.7:.1f}" height="{h:.1f}" '
            f'fill="{PALETTE[0]}"><title>{escape(lab)}: {escape(_fmt(v))}</title></rect>'
        )
        if i % every == 0 or i == n - 1:
            out.append(_xlabel(x + step / 2 if i < n - 1 else W, lab[5:] if len(lab) == 10 else lab, i == n - 1))
    out.append("</svg>")
    return Markup("".join(out))


def lines(title: str, xs: Sequence[str], series: dict[str, Sequence[float | None]], *, unit: str = "", every: int = 6) -> Markup:
    """One polyline per series over shared x labels (None: no point there), with a legend."""
    top = nice_top(max([v for s in series.values() for v in s if v is not None] + [0]))
    out = _frame(title, top, unit)
    n = max(len(xs), 2)
    step = (W - PAD_L - 8) / (n - 1)
    for i, lab in enumerate(xs):
        if i % every == 0 or i == len(xs) - 1:
            out.append(_xlabel(PAD_L + i * step, lab, i == len(xs) - 1))
    for k, (name, vals) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        xy = [(PAD_L + i * step, H - PAD_B - (H - PAD_T - PAD_B) * (v / top)) for i, v in enumerate(vals) if v is not None]
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in xy)
        width = 3 if k == 0 else 2
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="{width}"><title>{escape(name)}</title></polyline>'
        )
        if len(xy) < 12:  # a few points: mark each one
            out.extend(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" fill="{colour}"/>' for x, y in xy)
        out.append(
            f'<rect x="{PAD_L + 8}" y="{PAD_T + 4 + k * 15}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{PAD_L + 22}" y="{PAD_T + 13 + k * 15}" fill="#111827">{escape(name)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))
