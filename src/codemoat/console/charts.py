"""Charts drawn on the server as SVG (no script, no external font; labels escaped). Colours are
presentation attributes, not `style`, so the console's CSP (no inline style) does not block them."""

from __future__ import annotations

from collections.abc import Sequence

from markupsafe import Markup, escape

PALETTE = ("#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#4b5563", "#ca8a04", "#db2777", "#65a30d")
W, H, PAD_L, PAD_B, PAD_T = 720, 220, 56, 28, 12


def _fmt(v: float) -> str:
    if abs(v) >= 1e6:
        return f"{v / 1e6:.1f}M"
    if abs(v) >= 1e3:
        return f"{v / 1e3:.0f}k"
    return f"{v:.0f}" if abs(v) >= 10 or v == int(v) else f"{v:.2f}"


def _frame(title: str, top: float, unit: str = "") -> list[str]:
    out = [
        f'<svg class="chart" viewBox="0 0 {W} {H}" width="100%" role="img" aria-label="{escape(title)}" '
        'xmlns="http://www.w3.org/2000/svg" font-family="sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
    ]
    for k in range(5):
        y = PAD_T + (H - PAD_T - PAD_B) * k / 4
        out.append(f'<line x1="{PAD_L}" y1="{y:.1f}" x2="{W}" y2="{y:.1f}" stroke="#e5e7eb"/>')
        out.append(
            f'<text x="{PAD_L - 6}" y="{y + 4:.1f}" text-anchor="end" fill="#6b7280">{escape(unit + _fmt(top * (4 - k) / 4))}</text>'
        )
    return out


def bars(title: str, labels: Sequence[str], values: Sequence[float], *, every: int = 5) -> Markup:
    """One bar per label (e.g. per day); every `every`-th label written under the axis."""
    top = max([*values, 1e-9]) * 1.1
    out = _frame(title, top)
    n = max(len(values), 1)
    step = (W - PAD_L) / n
    for i, (lab, v) in enumerate(zip(labels, values, strict=True)):
        h = (H - PAD_T - PAD_B) * (v / top)
        x = PAD_L + i * step
        out.append(
            f'<rect x="{x + step * 0.15:.1f}" y="{H - PAD_B - h:.1f}" width="{step * 0.7:.1f}" height="{h:.1f}" fill="{PALETTE[0]}">'
            f"<title>{escape(lab)}: {escape(_fmt(v))}</title></rect>"
        )
        if i % every == 0 or i == n - 1:
            out.append(
                f'<text x="{x + step / 2:.1f}" y="{H - 10}" text-anchor="middle" fill="#374151">{escape(lab[5:] if len(lab) == 10 else lab)}</text>'
            )
    out.append("</svg>")
    return Markup("".join(out))


def lines(title: str, xs: Sequence[str], series: dict[str, Sequence[float]], *, unit: str = "", every: int = 6) -> Markup:
    """One polyline per series over shared x labels, with a legend."""
    top = max([v for s in series.values() for v in s] + [1e-9]) * 1.1
    out = _frame(title, top, unit)
    n = max(len(xs), 2)
    step = (W - PAD_L - 8) / (n - 1)
    for i, lab in enumerate(xs):
        if i % every == 0 or i == len(xs) - 1:
            out.append(f'<text x="{PAD_L + i * step:.1f}" y="{H - 10}" text-anchor="middle" fill="#374151">{escape(lab)}</text>')
    for k, (name, vals) in enumerate(series.items()):
        colour = PALETTE[k % len(PALETTE)]
        pts = " ".join(f"{PAD_L + i * step:.1f},{H - PAD_B - (H - PAD_T - PAD_B) * (v / top):.1f}" for i, v in enumerate(vals))
        out.append(
            f'<polyline points="{pts}" fill="none" stroke="{colour}" stroke-width="{3 if k == 0 else 2}"><title>{escape(name)}</title></polyline>'
        )
        out.append(
            f'<rect x="{PAD_L + 8}" y="{PAD_T + 4 + k * 14}" width="10" height="10" fill="{colour}"/>'
            f'<text x="{PAD_L + 22}" y="{PAD_T + 13 + k * 14}" fill="#111827">{escape(name)}</text>'
        )
    out.append("</svg>")
    return Markup("".join(out))
