"""The dashboard's pages as HTML, from data the handlers in ``dashboard.py`` gathered: login,
overview (with the live tables), usage, and the pieces the key pages (``dashboard_keys``) share.

Pure functions, no I/O: each takes plain values and returns ``Safe`` HTML built with the
escaping helpers of ``dashboard_html``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .admin import IssuedKey
from .dashboard_charts import Series, bar_chart
from .dashboard_html import (
    EMPTY,
    Safe,
    badge,
    card,
    esc,
    join,
    key_url,
    money,
    money_tick,
    notices,
    number,
    page,
    render,
    stat,
    table,
    utc,
    when,
)
from .key_listing import KeyInfo

RANGES = (7, 30, 90)


@dataclass(frozen=True, slots=True)
class LiveRequest:
    request_id: str
    key_id: str
    model: str
    endpoint: str
    age: float  # seconds
    stream: bool


@dataclass(frozen=True, slots=True)
class Live:
    in_flight: list[LiveRequest]
    breakers: Sequence[tuple[str, str]]  # (deployment, state)


@dataclass(slots=True)
class Totals:
    requests: int = 0
    errors: int = 0
    total_tokens: int = 0
    cost: float = 0.0


@dataclass(frozen=True, slots=True)
class Frame:
    """What every logged-in page needs besides its own data."""

    csrf: str
    notices: list[tuple[str, str]] = field(default_factory=list)
    issued: IssuedKey | None = None


# --- login --------------------------------------------------------------------------------------


def login_page(error: str = "", info: str = "") -> Safe:
    message = Safe("")
    if error:
        message = render('<div class="notice error" role="alert">{e}</div>', e=error)
    elif info:
        message = render('<div class="notice ok" role="status">{i}</div>', i=info)
    body = render(
        '<div class="login"><section class="card login-card"><h1>Sign in</h1>'
        '<p class="muted">The dashboard is for the gateway\'s operator. Sign in with the admin'
        " key (the one whose hash is <code>[admin] key_hash</code>).</p>{message}"
        '<form method="post" action="/dashboard/login" class="stack">'
        '<label for="key">Admin key</label>'
        '<input id="key" name="key" type="password" autocomplete="current-password"'
        ' spellcheck="false" required autofocus>'
        '<button type="submit" class="btn primary">Sign in</button></form></section></div>',
        message=message,
    )
    return page("Sign in", body)


def message_page(title: str, text: str, *, csrf: str | None = None) -> Safe:
    body = render(
        '<section class="card narrow"><h1>{title}</h1><p>{text}</p>'
        '<p><a class="btn" href="/dashboard">Back to the dashboard</a></p></section>',
        title=title,
        text=text,
    )
    return page(title, body, csrf=csrf)


# --- overview -----------------------------------------------------------------------------------


def overview_page(
    frame: Frame,
    *,
    today: Totals,
    month: Totals,
    days: Sequence[str],
    requests_by_key: Series,
    cost_per_day: Series,
    keys: Sequence[KeyInfo],
    live: Live,
) -> Safe:
    in_flight, breakers = live_cards(live)
    stats = join(
        [
            stat("Requests today", number(today.requests), f"{number(today.errors)} errors"),
            stat("Tokens today", number(today.total_tokens)),
            stat("Cost today", money(today.cost)),
            stat(
                f"Cost, last {len(days)} days",
                money(month.cost),
                f"{number(month.requests)} requests",
            ),
            stat("Active keys", number(sum(not k["revoked"] for k in keys))),
            stat("In flight", number(len(live.in_flight)), "requests now", live="count"),
        ]
    )
    charts = join(
        [
            card(
                "Requests per day, by key",
                bar_chart("requests-by-key", days, requests_by_key, unit="requests"),
                aside=range_note(days),
            ),
            card(
                "Cost per day",
                bar_chart("cost", days, cost_per_day, unit="cost", fmt=money_tick),
                aside=range_note(days),
            ),
        ]
    )
    body = render(
        '{head}<div class="stats">{stats}</div><div class="grid two">{charts}</div>'
        '<div class="grid live"><div class="col">{in_flight}{keys}</div>{breakers}</div>',
        head=head(frame, "Overview", "Today and the last 30 days; days are UTC."),
        stats=stats,
        charts=charts,
        in_flight=in_flight,
        keys=_keys_today(keys),
        breakers=breakers,
    )
    return page("Overview", body, active="overview", csrf=frame.csrf)


def live_cards(live: Live) -> tuple[Safe, Safe]:
    """In-flight requests and breaker states; dashboard.js refreshes both from live.json."""
    in_flight = table(
        ["Request", "Key", "Model", "#Age", "Stream"],
        [
            (
                render('<code class="id">{r}</code>', r=r.request_id),
                r.key_id or "—",
                r.model or "—",
                f"{r.age:.1f} s",
                "stream" if r.stream else "—",
            )
            for r in live.in_flight
        ],
        empty="Nothing in flight.",
        cls="live",
    )
    breakers = table(
        ["Deployment", "State"],
        [(render("<code>{d}</code>", d=d), _breaker_badge(s)) for d, s in live.breakers],
        empty="No deployments configured.",
        cls="breakers",
    )
    return (
        card("In flight", in_flight, extra="live-card", aside=_live_dot()),
        card("Circuit breakers", breakers, extra="live-card", aside=_live_dot()),
    )


def _keys_today(keys: Sequence[KeyInfo], limit: int = 8) -> Safe:
    """The busiest keys today, then the most recently used: the overview's short list."""
    active = [k for k in keys if not k["revoked"]]
    active.sort(key=lambda k: (-k["today"]["requests"], -(k["last_used"] or 0), k["id"]))
    listing = table(
        ["Key", "Tier", "Last used", "#Requests", "#Tokens", "#Cost"],
        [
            (
                render('<a class="key-link" href="{h}">{id}</a>', h=key_url(k["id"]), id=k["id"]),
                tier_label(k["tier"]),
                when(k["last_used"]),
                number(k["today"]["requests"]),
                number(k["today"]["total_tokens"]),
                money(k["today"]["cost"]),
            )
            for k in active[:limit]
        ],
        empty="No active keys.",
    )
    more = render('<a class="small" href="/dashboard/keys">All {n} keys →</a>', n=len(keys))
    return card("Keys today", listing, aside=more)


def tier_label(tier: str | None) -> Safe:
    return esc(tier) if tier else Safe('<span class="muted">default</span>')


def _live_dot() -> Safe:
    return Safe('<span class="live-dot" data-live="status">live</span>')


def _breaker_badge(state: str) -> Safe:
    kind = {"closed": "ok", "half_open": "warn", "open": "bad"}.get(state, "")
    return badge(state.replace("_", "-"), kind)


# --- usage --------------------------------------------------------------------------------------


def usage_page(
    frame: Frame,
    *,
    days: Sequence[str],
    charts: Mapping[str, Series],
    by_key: Mapping[str, Totals],
    by_model: Mapping[str, Totals],
) -> Safe:
    selector = join(
        render(
            '<a class="{cls}" href="/dashboard/usage?days={n}">{n} days</a>',
            n=n,
            cls="active" if n == len(days) else "",
        )
        for n in RANGES
    )
    note = range_note(days)
    cards = join(
        [
            card(
                "Requests per day, by key",
                bar_chart("requests-by-key", days, charts["requests-by-key"], unit="requests"),
                aside=note,
            ),
            card(
                "Tokens per day, by key",
                bar_chart("tokens-by-key", days, charts["tokens-by-key"], unit="tokens"),
                aside=note,
            ),
            card(
                "Requests per day, by model",
                bar_chart("requests-by-model", days, charts["requests-by-model"], unit="requests"),
                aside=note,
            ),
            card(
                "Tokens per day, by model",
                bar_chart("tokens-by-model", days, charts["tokens-by-model"], unit="tokens"),
                aside=note,
            ),
            card(
                "Cost per day, by key",
                bar_chart("cost-by-key", days, charts["cost-by-key"], unit="cost", fmt=money_tick),
                aside=note,
            ),
            card(
                "Cost per day, by model",
                bar_chart(
                    "cost-by-model", days, charts["cost-by-model"], unit="cost", fmt=money_tick
                ),
                aside=note,
            ),
            card("Totals by key", totals_table("Key", by_key, link=True), aside=note),
            card("Totals by model", totals_table("Model", by_model), aside=note),
        ]
    )
    body = render(
        '{head}<div class="grid two">{cards}</div>',
        head=head(
            frame,
            "Usage",
            "Requests, tokens and cost per UTC day.",
            aside=render('<nav class="segmented">{s}</nav>', s=selector),
        ),
        cards=cards,
    )
    return page("Usage", body, active="usage", csrf=frame.csrf)


def totals_table(label: str, totals: Mapping[str, Totals], link: bool = False) -> Safe:
    ordered = sorted(totals.items(), key=lambda kv: (-kv[1].requests, kv[0]))
    return table(
        [label, "#Requests", "#Errors", "#Tokens", "#Cost"],
        [
            (
                render('<a href="{h}">{n}</a>', h=key_url(name), n=name) if link else name,
                number(t.requests),
                number(t.errors),
                number(t.total_tokens),
                money(t.cost),
            )
            for name, t in ordered
        ],
        empty="No requests in this period.",
    )


def issued_panel(issued: IssuedKey) -> Safe:
    if issued.old_key_valid_until is None:
        what = render("New key <b>{id}</b> created.", id=issued.id)
        after = Safe("")
    else:
        what = render("Key <b>{id}</b> rotated.", id=issued.id)
        after = render(
            "<p>The old secret keeps working until {t}.</p>", t=utc(issued.old_key_valid_until)
        )
    return render(
        '<section class="card issued" id="issued"><h2>{what}</h2>'
        "<p>Copy it now: this is the only time it is shown. The gateway keeps only its hash.</p>"
        '<div class="secret-row"><input id="new-key" class="mono" readonly value="{key}"'
        ' aria-label="the new key">'
        '<button type="button" class="btn primary" data-copy="new-key">Copy</button></div>'
        "{after}</section>",
        what=what,
        key=issued.key,
        after=after,
    )


# --- shared pieces ------------------------------------------------------------------------------


def head(
    frame: Frame,
    title: str,
    subtitle: str,
    *,
    back: tuple[str, str] | None = None,
    aside: Safe = EMPTY,
) -> Safe:
    crumb = render('<a class="crumb" href="{h}">← {l}</a>', l=back[0], h=back[1]) if back else ""
    issued = issued_panel(frame.issued) if frame.issued else Safe("")
    return render(
        '<div class="page-head"><div>{crumb}<h1>{title}</h1><p class="muted">{sub}</p></div>'
        "{aside}</div>{notices}{issued}",
        crumb=crumb,
        title=title,
        sub=subtitle,
        aside=aside,
        notices=notices(frame.notices),
        issued=issued,
    )


def range_note(days: Sequence[str]) -> Safe:
    return render('<span class="muted small">{n} days, UTC</span>', n=len(days))


def count(n: int, noun: str) -> Safe:
    return render(
        '<span class="muted small">{n} {noun}{s}</span>', n=n, noun=noun, s="" if n == 1 else "s"
    )
