"""Charts for the dashboard as inline SVG, drawn on the server: no JS library, no network.

One kind of chart does all the work: a column per UTC day, stacked by series (keys or models).
Each day is a ``<g class="day" data-date=... data-total=...>`` and each segment a ``<rect>``
with ``data-series`` and ``data-value``, so the numbers behind a chart can be read (by a test,
or a curious operator) from the page; a ``<title>`` per day gives the browser's tooltip.
Colours come from CSS classes (``s0`` .. ``s7``): the page's CSP allows no inline styles.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from datetime import date, timedelta
from typing import Literal

from .dashboard_html import Safe, compact, join, render
from .usage_store import DailyKeyModelUsage

PALETTE_SIZE = 8  # the last colour is "other"
WIDTH, HEIGHT = 640, 200
LEFT, RIGHT, TOP, BOTTOM = 58, 22, 10, 24  # room for '$0.0008' and the last date

Metric = Literal["requests", "total_tokens", "cost"]
GroupBy = Literal["key_id", "model"] | None
Series = list[tuple[str, list[float]]]


def days_between(start: date, end: date) -> list[str]:
    return [(start + timedelta(days=i)).isoformat() for i in range((end - start).days + 1)]


def series(
    rows: Iterable[DailyKeyModelUsage],
    days: Sequence[str],
    by: GroupBy,
    metric: Metric,
    order: Sequence[str] = (),
) -> Series:
    """Per-day values of `metric`, one series per key or model (or one, "all"), largest first;
    past PALETTE_SIZE - 1 series the smallest are summed into "other".

    Names in `order` come first, in that order, so that the charts of one page give a key
    or a model the same colour whatever they measure."""
    index = {d: i for i, d in enumerate(days)}
    values: dict[str, list[float]] = {}
    for row in rows:
        i = index.get(row["date"])
        if i is None:
            continue
        name = row[by] if by else "all"
        values.setdefault(name or "(none)", [0.0] * len(days))[i] += row[metric]
    rank = {name: i for i, name in enumerate(order)}
    ordered = sorted(
        values.items(), key=lambda kv: (rank.get(kv[0], len(rank)), -sum(kv[1]), kv[0])
    )
    if len(ordered) >= PALETTE_SIZE:
        head, tail = ordered[: PALETTE_SIZE - 1], ordered[PALETTE_SIZE - 1 :]
        other = [sum(v[i] for _, v in tail) for i in range(len(days))]
        ordered = [*head, (f"{len(tail)} others", other)]
    return ordered


def _nice_step(top: float, whole: bool, ticks: int = 4) -> float:
    """A round step (1, 2, 2.5 or 5 times a power of ten) giving about `ticks` gridlines;
    at least 1 for counts (`whole`), which have no fractions to show."""
    raw = top / ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next((m * magnitude for m in (1, 2, 2.5, 5) if m * magnitude >= raw), 10 * magnitude)
    return max(step, 1.0) if whole else step


def _day_label(day: str) -> str:
    d = date.fromisoformat(day)
    return f"{d.strftime('%b')} {d.day}"


def bar_chart(
    name: str,
    days: Sequence[str],
    data: Series,
    *,
    unit: str,
    fmt: Callable[[float], str] = compact,
) -> Safe:
    """Stacked daily columns with a y axis, date labels and (for several series) a legend."""
    totals = [sum(v[i] for _, v in data) for i in range(len(days))]
    peak = max(totals, default=0.0)
    whole = all(float(v).is_integer() for _, values in data for v in values)
    step = _nice_step(peak, whole) if peak > 0 else 1.0
    top = step * max(1, math.ceil(peak / step - 1e-9))
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    slot = plot_w / max(len(days), 1)
    bar_w = max(1.0, min(slot * 0.72, 28.0))

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    parts: list[Safe] = []
    ticks = round(top / step)
    for t in range(ticks + 1):
        v = t * step
        parts.append(
            render(
                '<line class="grid" x1="{x1}" x2="{x2}" y1="{y}" y2="{y}"/>'
                '<text class="axis" x="{tx}" y="{ty}" text-anchor="end">{label}</text>',
                x1=LEFT,
                x2=WIDTH - RIGHT,
                y=f"{y(v):.1f}",
                tx=LEFT - 6,
                ty=f"{y(v) + 3.5:.1f}",
                label=fmt(v) if v else "0",
            )
        )
    every = max(1, math.ceil(len(days) / 8))
    for i, day in enumerate(days):
        x = LEFT + i * slot + (slot - bar_w) / 2
        base = 0.0
        rects: list[Safe] = []
        for s, (label, values) in enumerate(data):
            v = values[i]
            if v <= 0:
                continue
            rects.append(
                render(
                    '<rect class="s{c}" x="{x}" y="{y}" width="{w}" height="{h}"'
                    ' data-series="{label}" data-value="{value}"/>',
                    c=min(s, PALETTE_SIZE - 1) if len(data) > 1 else 0,
                    x=f"{x:.1f}",
                    y=f"{y(base + v):.1f}",
                    w=f"{bar_w:.1f}",
                    h=f"{max(y(base) - y(base + v), 0.5):.1f}",
                    label=label,
                    value=_plain(v),
                )
            )
            base += v
        detail = "".join(f"\n{label}: {fmt(values[i])}" for label, values in data if values[i])
        parts.append(
            render(
                '<g class="day" data-date="{day}" data-total="{total}"><title>{tip}</title>'
                '<rect class="hit" x="{hx}" y="{top}" width="{hw}" height="{hh}"/>{rects}</g>',
                day=day,
                total=_plain(totals[i]),
                tip=f"{day}: {fmt(totals[i])} {unit}{detail}",
                hx=f"{LEFT + i * slot:.1f}",
                top=TOP,
                hw=f"{slot:.1f}",
                hh=plot_h,
                rects=join(rects),
            )
        )
        if (len(days) - 1 - i) % every == 0:
            parts.append(
                render(
                    '<text class="axis" x="{x}" y="{y}" text-anchor="middle">{label}</text>',
                    x=f"{LEFT + i * slot + slot / 2:.1f}",
                    y=HEIGHT - 6,
                    label=_day_label(day),
                )
            )
    if peak == 0:
        parts.append(
            render(
                '<text class="empty-note" x="{x}" y="{y}" text-anchor="middle">No {unit} in'
                " this period</text>",
                x=LEFT + plot_w / 2,
                y=TOP + plot_h / 2,
                unit=unit,
            )
        )
    svg = render(
        '<svg class="chart" data-chart="{name}" viewBox="0 0 {w} {h}" role="img"'
        ' aria-label="{unit} per day" preserveAspectRatio="xMidYMid meet">{parts}</svg>',
        name=name,
        w=WIDTH,
        h=HEIGHT,
        unit=unit,
        parts=join(parts),
    )
    return Safe(svg + legend(data))


def legend(data: Series) -> Safe:
    if len(data) < 2:
        return Safe("")
    return render(
        '<ul class="legend">{items}</ul>',
        items=join(
            render(
                '<li><span class="swatch s{c}"></span>{label}</li>',
                c=min(i, PALETTE_SIZE - 1),
                label=label,
            )
            for i, (label, _) in enumerate(data)
        ),
    )


def _plain(v: float) -> str:
    """A value for a data attribute: integers without a fraction, costs to the nano-unit."""
    return str(int(v)) if float(v).is_integer() else f"{v:.9f}".rstrip("0")
