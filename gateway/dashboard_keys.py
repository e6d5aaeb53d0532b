"""The dashboard's key pages: the key list with the create form, one key with its charts and
its rotate and revoke controls, and the revoke confirmation. Pure functions, like
``dashboard_pages``.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .admin import MAX_GRACE
from .dashboard_charts import Series, bar_chart
from .dashboard_html import (
    Safe,
    badge,
    card,
    csrf_field,
    join,
    key_url,
    money,
    money_tick,
    number,
    page,
    render,
    stat,
    table,
    utc,
    when,
)
from .dashboard_pages import Frame, Totals, count, head, range_note, tier_label, totals_table
from .key_listing import KeyInfo

GRACE_CHOICES = (
    (0, "none: it stops at once"),
    (3600, "1 hour"),
    (86_400, "1 day"),
    (7 * 86_400, "7 days"),
)
assert all(g <= MAX_GRACE for g, _ in GRACE_CHOICES)


# --- keys ---------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyForm:
    id: str = ""
    models: str = "*"
    tier: str = ""
    description: str = ""
    error: str = ""


def keys_page(
    frame: Frame, keys: Sequence[KeyInfo], tiers: Sequence[str], form: KeyForm = KeyForm()
) -> Safe:
    rows = [
        (
            render(
                '<a class="key-link" href="{href}">{id}</a><div class="sub">{d}</div>',
                href=key_url(k["id"]),
                id=k["id"],
                d=k["description"],
            ),
            tier_label(k["tier"]),
            render('<span class="models">{m}</span>', m=", ".join(k["models"])),
            _status(k),
            when(k["last_used"]),
            number(k["today"]["requests"]),
            number(k["today"]["total_tokens"]),
            money(k["today"]["cost"]),
            number(k["requests"]),
            _key_actions(k),
        )
        for k in keys
    ]
    listing = table(
        [
            "Key",
            "Tier",
            "Models",
            "Status",
            "Last used",
            "#Today req.",
            "#Today tokens",
            "#Today cost",
            "#All req.",
            "Actions",
        ],
        rows,
        empty="No keys yet: create one below.",
        cls="keys",
    )
    body = render(
        '{head}{listing}<div class="grid two">{create}{help}</div>',
        head=head(frame, "Keys", "Every client key, from the config file and the database."),
        listing=card("Client keys", listing, aside=count(len(keys), "key")),
        create=create_form(frame.csrf, tiers, form),
        help=card(
            "About keys",
            Safe(
                "<ul class='plain'><li>A new key is shown <b>once</b>; the gateway keeps only"
                " its hash.</li><li><b>Revoke</b> stops a key at once, for good: its requests"
                " get 401.</li><li><b>Rotate</b> issues a new secret; the old one keeps working"
                " for the grace period you choose.</li><li>Keys from the config file are"
                " rotated there (new hash, then reload); they can be revoked here.</li></ul>"
            ),
        ),
    )
    return page("Keys", body, active="keys", csrf=frame.csrf)


def _status(k: KeyInfo) -> Safe:
    if k["revoked"]:
        return badge("revoked", "bad")
    if k["expires"] is not None and k["expires"] <= time.time():
        return badge("expired", "warn")
    return join([badge("active", "ok"), badge(k["source"], "muted")], " ")


def _key_actions(k: KeyInfo) -> Safe:
    if k["revoked"]:
        return Safe('<span class="muted">—</span>')
    links = [render('<a class="btn small" href="{h}">Details</a>', h=key_url(k["id"]))]
    links.append(
        render('<a class="btn small danger" href="{h}">Revoke</a>', h=key_url(k["id"], "revoke"))
    )
    return render('<div class="actions">{l}</div>', l=join(links, " "))


def create_form(csrf: str, tiers: Sequence[str], form: KeyForm) -> Safe:
    options = join(
        render(
            '<option value="{v}"{sel}>{label}</option>',
            v=t,
            label=t or "default",
            sel=Safe(" selected") if t == form.tier else Safe(""),
        )
        for t in ["", *tiers]
    )
    error = render('<div class="notice error" role="alert">{e}</div>', e=form.error)
    body = render(
        '{error}<form method="post" action="/dashboard/keys" class="form-grid" id="create-key">'
        "{csrf}"
        '<label for="new-id">Id</label><input id="new-id" name="id" required'
        ' pattern="[A-Za-z0-9][A-Za-z0-9._\\-]*" placeholder="billing-app" value="{id}">'
        '<label for="new-models">Models</label><input id="new-models" name="models"'
        ' value="{models}" placeholder="* or openai/*, demo/echo">'
        '<label for="new-tier">Tier</label><select id="new-tier" name="tier">{options}</select>'
        '<label for="new-description">Description</label><input id="new-description"'
        ' name="description" value="{description}" placeholder="what uses it">'
        '<div></div><button type="submit" class="btn primary">Create key</button></form>',
        error=error if form.error else Safe(""),
        csrf=csrf_field(csrf),
        id=form.id,
        models=form.models,
        options=options,
        description=form.description,
    )
    return card("Create a key", body)


# --- one key ------------------------------------------------------------------------------------


def key_page(
    frame: Frame,
    key: KeyInfo,
    *,
    days: Sequence[str],
    requests: Series,
    tokens: Series,
    cost: Series,
    per_model: Mapping[str, Totals],
) -> Safe:
    period = Totals(
        sum(t.requests for t in per_model.values()),
        sum(t.errors for t in per_model.values()),
        sum(t.total_tokens for t in per_model.values()),
        sum(t.cost for t in per_model.values()),
    )
    facts = render(
        '<dl class="facts"><dt>Tier</dt><dd>{tier}</dd><dt>Models</dt><dd>{models}</dd>'
        "<dt>Source</dt><dd>{source}</dd><dt>Created</dt><dd>{created}</dd>"
        "<dt>Last used</dt><dd>{last}</dd><dt>Status</dt><dd>{status}</dd></dl>",
        tier=key["tier"] or "default",
        models=", ".join(key["models"]),
        source="database (managed)" if key["source"] == "managed" else "config file",
        created=utc(key["created"]) if key["created"] else "—",
        last=when(key["last_used"]),
        status=_status(key),
    )
    stats = join(
        [
            stat("Requests today", number(key["today"]["requests"])),
            stat("Tokens today", number(key["today"]["total_tokens"])),
            stat("Cost today", money(key["today"]["cost"])),
            stat(
                f"Requests, {len(days)} days",
                number(period.requests),
                f"{number(period.errors)} errors",
            ),
            stat(f"Cost, {len(days)} days", money(period.cost)),
            stat("All-time requests", number(key["requests"]), money(key["cost"])),
        ]
    )
    charts = join(
        [
            card(
                "Requests per day",
                bar_chart("requests", days, requests, unit="requests"),
                aside=range_note(days),
            ),
            card(
                "Tokens per day",
                bar_chart("tokens", days, tokens, unit="tokens"),
                aside=range_note(days),
            ),
            card(
                "Cost per day",
                bar_chart("cost", days, cost, unit="cost", fmt=money_tick),
                aside=range_note(days),
            ),
            card("By model", totals_table("Model", per_model), aside=range_note(days)),
        ]
    )
    subtitle = key["description"] or "No description."
    body = render(
        '{head}<div class="grid key-top">{facts}{actions}</div><div class="stats">{stats}</div>'
        '<div class="grid two">{charts}</div>',
        head=head(frame, key["id"], subtitle, back=("Keys", "/dashboard/keys")),
        facts=card("Key", facts),
        actions=_key_manage(frame.csrf, key),
        stats=stats,
        charts=charts,
    )
    return page(key["id"], body, active="keys", csrf=frame.csrf)


def _key_manage(csrf: str, key: KeyInfo) -> Safe:
    if key["revoked"]:
        return card("Manage", Safe("<p class='muted'>This key is revoked for good.</p>"))
    parts: list[Safe] = []
    if key["source"] == "managed":
        options = join(
            render(
                '<option value="{v}"{sel}>{label}</option>',
                v=v,
                label=label,
                sel=Safe(" selected") if v == 3600 else Safe(""),
            )
            for v, label in GRACE_CHOICES
        )
        parts.append(
            render(
                '<form method="post" action="{action}" class="rotate-form" id="rotate-key">'
                '{csrf}<label for="grace">Rotate: a new secret; the old one keeps working'
                ' for</label><div class="row"><select id="grace" name="grace_seconds">{options}'
                '</select><button type="submit" class="btn">Rotate</button></div></form>',
                action=key_url(key["id"], "rotate"),
                csrf=csrf_field(csrf),
                options=options,
            )
        )
    else:
        parts.append(
            Safe(
                "<p class='muted'>A key from the config file rotates there: put a new hash in"
                " its <code>[[keys]]</code> entry and reload.</p>"
            )
        )
    parts.append(
        render(
            '<div class="revoke-row"><span class="muted">Revoke: refused at once, for good.'
            '</span><a class="btn danger" href="{h}">Revoke this key…</a></div>',
            h=key_url(key["id"], "revoke"),
        )
    )
    return card("Manage", join(parts))


def revoke_page(frame: Frame, key: KeyInfo) -> Safe:
    body = render(
        '{head}<section class="card narrow confirm"><h2>Revoke <code>{id}</code>?</h2>'
        "<p>Every request with this key will be refused with 401 at once, and it cannot be"
        " undone. {usage}</p>"
        '<form method="post" action="{action}" class="inline-form">{csrf}'
        '<input type="hidden" name="confirm" value="yes">'
        '<button type="submit" class="btn danger" id="confirm-revoke">Revoke key</button>'
        '<a class="btn ghost" href="{back}">Cancel</a></form></section>',
        head=head(frame, "Revoke a key", "", back=("Keys", "/dashboard/keys")),
        id=key["id"],
        usage=render("It was last used {w}.", w=when(key["last_used"])) if key["last_used"] else "",
        action=key_url(key["id"], "revoke"),
        csrf=csrf_field(frame.csrf),
        back=key_url(key["id"]),
    )
    return page("Revoke " + key["id"], body, active="keys", csrf=frame.csrf)
