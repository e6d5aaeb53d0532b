"""A tiny HTML template helper for the dashboard, and the page frame every page shares.

``render(template, **values)`` fills ``{name}`` fields of a literal template; every value is
passed through ``html.escape`` unless it is already ``Safe`` (the output of ``render``,
``join`` or ``esc``), so nothing that came from a request, the config or the database reaches
the page unescaped. Templates hold no CSS or JS (those are static files), so braces are fields.
"""

from __future__ import annotations

import html
import time
from collections.abc import Iterable
from datetime import UTC, datetime
from urllib.parse import quote

STATIC = "/dashboard/static"
NAV = (("overview", "Overview", "/dashboard"), ("keys", "Keys", "/dashboard/keys"),
       ("usage", "Usage", "/dashboard/usage"))  # fmt: skip


class Safe(str):
    """Text that is already HTML: rendered into a template as it is."""

    __slots__ = ()


EMPTY = Safe("")


def esc(value: object) -> Safe:
    if isinstance(value, Safe):
        return value
    return Safe(html.escape("" if value is None else str(value), quote=True))


def render(template: str, /, **values: object) -> Safe:
    return Safe(template.format_map({k: esc(v) for k, v in values.items()}))


def join(parts: Iterable[Safe], sep: str = "") -> Safe:
    return Safe(sep.join(esc(p) for p in parts))


def key_url(key_id: str, action: str = "") -> str:
    return f"/dashboard/keys/{quote(key_id, safe='')}" + (f"/{action}" if action else "")


# --- numbers and times ------------------------------------------------------------------------


def number(n: float) -> str:
    """12 345, or 1.2M past a million (a thin space groups thousands: narrow and locale-free)."""
    if abs(n) >= 1_000_000:
        return f"{n / 1_000_000:.1f}M"
    return f"{n:,.0f}".replace(",", "\u202f")


def compact(n: float) -> str:
    """Axis labels: 950, 1.2k, 3.4M."""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(n) >= div:
            return f"{n / div:.1f}".rstrip("0").rstrip(".") + unit
    return f"{n:.2f}".rstrip("0").rstrip(".") if n % 1 else f"{n:.0f}"


def money(x: float) -> str:
    """Prices are USD or credits: two decimals, four below one unit so cents of cents show."""
    if x == 0:
        return "$0"
    return f"${x:,.2f}" if abs(x) >= 1 else f"${x:.4f}"


def money_tick(x: float) -> str:
    """Money on a chart's axis: "$0.004", not "$0.0040"."""
    if x == 0:
        return "$0"
    # enough decimals that neighbouring ticks ($0.00005 and $0.0001) never read the same
    text = f"${x:,.2f}" if abs(x) >= 1 else f"${x:.6f}"
    return text.rstrip("0").rstrip(".") if "." in text else text


def utc(ts: float | None) -> str:
    if ts is None:
        return "never"
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M UTC")


def ago(ts: float | None, now: float | None = None) -> str:
    if ts is None:
        return "never"
    seconds = max(0.0, (time.time() if now is None else now) - ts)
    for size, unit in ((86_400, "d"), (3_600, "h"), (60, "min")):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return "just now"


def when(ts: float | None) -> Safe:
    """A relative time with the exact UTC time on hover."""
    return render('<span title="{exact}">{rel}</span>', exact=utc(ts), rel=ago(ts))


# --- building blocks --------------------------------------------------------------------------


def badge(text: str, kind: str = "") -> Safe:
    return render('<span class="badge {kind}">{text}</span>', kind=kind, text=text)


def stat(label: str, value: str, note: str = "", live: str = "") -> Safe:
    attr = render(' data-live="{live}"', live=live) if live else Safe("")
    return render(
        '<div class="card stat"><div class="stat-label">{label}</div>'
        '<div class="stat-value"{attr}>{value}</div><div class="stat-note">{note}</div></div>',
        label=label,
        value=value,
        note=note,
        attr=attr,
    )


def card(title: str, body: Safe, *, extra: str = "", aside: Safe = EMPTY) -> Safe:
    return render(
        '<section class="card {extra}"><header class="card-head"><h2>{title}</h2>{aside}'
        "</header>{body}</section>",
        title=title,
        body=body,
        extra=extra,
        aside=aside,
    )


def table(
    head: Iterable[str], rows: Iterable[Iterable[object]], *, empty: str, cls: str = ""
) -> Safe:
    """A table; a column whose heading starts with '#' is numeric (right-aligned)."""
    heads = list(head)
    numeric = [h.startswith("#") for h in heads]
    th = join(
        render('<th class="{c}">{h}</th>', c="num" if n else "", h=h.lstrip("#"))
        for h, n in zip(heads, numeric, strict=True)
    )
    body = [
        render(
            "<tr>{cells}</tr>",
            cells=join(
                render('<td class="{c}">{v}</td>', c="num" if n else "", v=v)
                for v, n in zip(cells, numeric, strict=True)
            ),
        )
        for cells in rows
    ]
    if not body:
        body = [render('<tr class="empty"><td colspan="{n}">{t}</td></tr>', n=len(heads), t=empty)]
    return render(
        '<div class="table-wrap"><table class="{cls}"><thead><tr>{th}</tr></thead>'
        "<tbody>{rows}</tbody></table></div>",
        cls=cls,
        th=th,
        rows=join(body),
    )


def csrf_field(token: str) -> Safe:
    return render('<input type="hidden" name="csrf" value="{t}">', t=token)


def notices(items: Iterable[tuple[str, str]]) -> Safe:
    return join(
        render('<div class="notice {kind}" role="status">{text}</div>', kind=kind, text=text)
        for kind, text in items
    )


def page(title: str, body: Safe, *, active: str = "", csrf: str | None = None) -> Safe:
    """The whole document: top bar with navigation (when logged in) and the page's body."""
    if csrf is None:
        bar = Safe("")
    else:
        links = join(
            render(
                '<a href="{href}" class="{cls}">{label}</a>',
                href=href,
                label=label,
                cls="active" if name == active else "",
            )
            for name, label, href in NAV
        )
        bar = render(
            '<nav class="nav">{links}</nav><form method="post" action="/dashboard/logout"'
            ' class="logout">{csrf}<button type="submit" class="btn ghost">Log out</button>'
            "</form>",
            links=links,
            csrf=csrf_field(csrf),
        )
    return render(
        '<!doctype html><html lang="en"><head><meta charset="utf-8">'
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        '<meta name="referrer" content="same-origin">'
        "<title>{title} · Gateway</title>"
        '<link rel="stylesheet" href="{static}/dashboard.css">'
        '<link rel="icon" href="{static}/favicon.svg" type="image/svg+xml">'
        '<script src="{static}/dashboard.js" defer></script></head>'
        '<body><header class="topbar"><div class="topbar-inner">'
        '<a class="brand" href="/dashboard"><span class="logo" aria-hidden="true"></span>'
        'Gateway <span class="brand-sub">dashboard</span></a>{bar}</div></header>'
        '<main class="main">{body}</main></body></html>',
        title=title,
        static=STATIC,
        bar=bar,
        body=body,
    )
