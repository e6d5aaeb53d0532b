"""The operator's web dashboard under ``/dashboard``: keys, usage charts, live requests, breakers,
and the key lifecycle, server-rendered by the gateway itself (no build step, no external asset).

Without ``[admin] key_hash`` there is no dashboard: every path under it answers 404.

Routes (all under ``/dashboard``): ``GET /login``, ``POST /login``, ``POST /logout``;
``GET`` itself (the overview), ``GET /keys``, ``POST /keys`` (create), ``GET /keys/{id}``,
``GET /keys/{id}/revoke`` (the confirmation), ``POST /keys/{id}/revoke``,
``POST /keys/{id}/rotate``, ``GET /usage?days=``; ``GET /live.json`` (in-flight requests and
breakers, polled by ``dashboard.js``); ``GET /static/{file}`` (CSS, JS, icon; no session).

Login and session: the login form posts the admin key; it is compared by hash and never stored,
echoed or put in a cookie. Success opens a server-side session (``dashboard_session``): the
cookie holds only a random id, ``HttpOnly; SameSite=Strict; Path=/dashboard`` (and ``Secure``
over https), and the session ends after 12 hours, at logout, at a restart, or when a reload
changes the admin key. Wrong keys are answered with the login page and a plain message; after
a few from one address, further attempts from it wait (doubling, up to a minute).

CSRF: GET never changes anything (it only uses up a one-shot message meant for that page).
Every POST must carry the session's CSRF token in a hidden ``csrf`` field, and its ``Origin``
(or, without one, its ``Referer``) must name this host; otherwise 403. Login, which has no
session yet, is checked by origin only.

Modules: this one holds the routes, guards and handlers; ``dashboard_session`` the sessions
and login backoff; ``dashboard_html`` the escaping template helper and page frame;
``dashboard_pages`` and ``dashboard_keys`` the pages; ``dashboard_charts`` the SVG charts;
``dashboard_static/`` the CSS, JS and icon. Key changes go through ``admin``'s shared functions.

Pages send a strict Content-Security-Policy (only this origin's CSS and JS, no inline script or
style), ``Cache-Control: no-store`` and ``X-Frame-Options: DENY``. Usage figures come from the
database, so they lag requests by at most ``[storage] flush_interval`` (1 s).
"""

from __future__ import annotations

import functools
import hmac
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from .admin import (
    add_client_key,
    client_keys,
    revoke_client_key,
    rotate_client_key,
)
from .auth import hash_key
from .dashboard_charts import GroupBy, Metric, days_between, series
from .dashboard_html import Safe, key_url
from .dashboard_keys import KeyForm, key_page, keys_page, revoke_page
from .dashboard_pages import (
    RANGES,
    Frame,
    Live,
    LiveRequest,
    Totals,
    login_page,
    message_page,
    overview_page,
    usage_page,
)
from .dashboard_session import LoginThrottle, Session, Sessions
from .errors import GatewayError, InvalidAPIKey, InvalidRequest
from .exchange import EXCHANGE
from .key_listing import KeyInfo
from .ops import breaker_states
from .runtime import STATE, GatewayState
from .usage_store import DailyKeyModelUsage

COOKIE = "gateway_dashboard"
LOGIN = "/dashboard/login"
STATIC_DIR = Path(__file__).parent / "dashboard_static"
STATIC_FILES = frozenset({"dashboard.css", "dashboard.js", "favicon.svg"})
OVERVIEW_DAYS = 30
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; script-src 'self'; img-src 'self';"
        " connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"
    ),
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


class Dashboard:
    """The dashboard's own state: sessions and the login throttle (in memory)."""

    def __init__(self) -> None:
        self.sessions = Sessions()
        self.throttle = LoginThrottle()


DASHBOARD = web.AppKey("dashboard", Dashboard)


# --- guards -------------------------------------------------------------------------------------


def _admin_hash(request: web.Request) -> str:
    key_hash = request.app[STATE].config.admin.key_hash
    if key_hash is None:
        raise web.HTTPNotFound()  # no admin key, no dashboard: as if the path did not exist
    return key_hash


def _session(request: web.Request) -> Session | None:
    session = request.app[DASHBOARD].sessions.get(request.cookies.get(COOKIE), _admin_hash(request))
    exchange = request.get(EXCHANGE)
    if session is not None and exchange is not None:
        exchange.key_id = "admin"  # the access log says who looked
    return session


def _viewer(request: web.Request) -> tuple[GatewayState, Session]:
    """For pages: the state and session, or a redirect to the login form."""
    session = _session(request)
    if session is None:
        raise web.HTTPSeeOther(LOGIN)
    return request.app[STATE], session


def _same_origin(request: web.Request) -> bool:
    """Origin (or Referer) names this host. Absent both, the CSRF token alone decides."""
    hosts = {request.host.lower()}
    if forwarded := request.headers.get("X-Forwarded-Host"):
        hosts.add(forwarded.split(",")[0].strip().lower())  # a browser cannot forge this one
    origin = request.headers.get("Origin")
    if origin is not None:
        return origin != "null" and _host_of(origin) in hosts
    referer = request.headers.get("Referer")
    return not referer or _host_of(referer) in hosts


def _host_of(url: str) -> str | None:
    try:
        return urlsplit(url).netloc.lower()
    except ValueError:  # "http://[": no URL a browser sends
        return None


async def _change(request: web.Request) -> tuple[GatewayState, Session, dict[str, str]]:
    """For POSTs that change something: session, same origin and the session's CSRF token."""
    state, session = _viewer(request)
    if not _same_origin(request):
        raise _forbidden("The form came from another site.", session)
    form = await _form(request, session)
    if not session.check_csrf(form.get("csrf", "")):
        raise _forbidden(
            "The form was stale or incomplete: reload the page and try again.", session
        )
    return state, session, form


async def _form(request: web.Request, session: Session | None = None) -> dict[str, str]:
    """The posted form's text fields. A body that is no readable form (not UTF-8, an unknown
    charset, broken multipart) gets a 400 page, not a 500."""
    try:
        posted = await request.post()
    except (ValueError, LookupError):  # UnicodeDecodeError is a ValueError
        body = message_page(
            "Bad request",
            "The form could not be read: send it from the dashboard's own pages, as UTF-8.",
            csrf=session.csrf if session else None,
        )
        raise _Stop(_html(body, status=400)) from None
    return {k: v for k, v in posted.items() if isinstance(v, str)}


class _Stop(Exception):
    """Ends a handler with this page. (An ``HTTPException`` of 400 or more would reach the
    gateway's middleware, which answers in OpenAI's JSON envelope: right for the API, not for
    a page.)"""

    def __init__(self, response: web.Response) -> None:
        self.response = response


def _pages(handler: Handler) -> Handler:
    @functools.wraps(handler)
    async def run(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except _Stop as stop:
            return stop.response

    return run


def _forbidden(why: str, session: Session | None = None) -> _Stop:
    body = message_page("Not allowed", why, csrf=session.csrf if session else None)
    return _Stop(_html(body, status=403))


def _html(body: Safe, status: int = 200) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", headers=HEADERS)


def _frame(session: Session) -> Frame:
    return Frame(session.csrf, session.take_notices(), session.take_issued())


# --- login --------------------------------------------------------------------------------------


async def login_form(request: web.Request) -> web.Response:
    if _session(request) is not None:
        raise web.HTTPSeeOther("/dashboard")
    info = "You are logged out." if "logged_out" in request.query else ""
    return _html(login_page(info=info))


async def login(request: web.Request) -> web.Response:
    expected = _admin_hash(request)
    if not _same_origin(request):
        raise _forbidden("The login form came from another site.")
    dashboard = request.app[DASHBOARD]
    exchange = request.get(EXCHANGE)
    ip = (exchange.client_ip if exchange else "") or request.remote or ""
    wait = dashboard.throttle.wait(ip)
    if wait > 0:
        message = f"Too many wrong keys from your address: try again in {wait:.0f} s."
        return _html(login_page(error=message), status=429)
    key = (await _form(request)).get("key")
    if key is None or not hmac.compare_digest(hash_key(key), expected):
        dashboard.throttle.failed(ip)
        return _html(login_page(error="That is not the admin key."), status=401)
    dashboard.throttle.succeeded(ip)
    session = dashboard.sessions.open(expected)
    response = web.HTTPSeeOther("/dashboard")
    response.set_cookie(
        COOKIE,
        session.id,
        path="/dashboard",
        httponly=True,
        samesite="Strict",
        secure=request.secure or request.headers.get("X-Forwarded-Proto") == "https",
        max_age=int(dashboard.sessions.ttl),
    )
    raise response


async def logout(request: web.Request) -> web.Response:
    _, session, _ = await _change(request)
    request.app[DASHBOARD].sessions.close(session.id)
    response = web.HTTPSeeOther(LOGIN + "?logged_out")
    response.del_cookie(COOKIE, path="/dashboard")
    raise response


# --- pages --------------------------------------------------------------------------------------


def _period(days: int) -> list[str]:
    """The last `days` UTC days, today included."""
    today = datetime.now(UTC).date()
    return days_between(today - timedelta(days=days - 1), today)


async def _rows(state: GatewayState, days: list[str], **kw: str) -> list[DailyKeyModelUsage]:
    start, end = date.fromisoformat(days[0]), date.fromisoformat(days[-1])
    return await state.usage.backend.daily_usage(start, end, **kw)


def _totals(
    rows: list[DailyKeyModelUsage], by: GroupBy, day: str | None = None
) -> dict[str, Totals]:
    out: dict[str, Totals] = {}
    for r in rows:
        if day is not None and r["date"] != day:
            continue
        t = out.setdefault(r[by] if by else "all", Totals())
        t.requests += r["requests"]
        t.errors += r["errors"]
        t.total_tokens += r["total_tokens"]
        t.cost += r["cost"]
    return out


def _order(rows: list[DailyKeyModelUsage], by: GroupBy) -> list[str]:
    """Keys or models by their requests in the period, the most first: the colour order."""
    totals = _totals(rows, by)
    return sorted(totals, key=lambda name: (-totals[name].requests, name))


async def overview(request: web.Request) -> web.Response:
    state, session = _viewer(request)
    days = _period(OVERVIEW_DAYS)
    rows = await _rows(state, days)
    keys = await client_keys(state)
    page = overview_page(
        _frame(session),
        today=_totals(rows, None, days[-1]).get("all", Totals()),
        month=_totals(rows, None).get("all", Totals()),
        days=days,
        requests_by_key=series(rows, days, "key_id", "requests"),
        cost_per_day=series(rows, days, None, "cost"),
        keys=keys,
        live=live_state(state),
    )
    return _html(page)


async def keys(request: web.Request) -> web.Response:
    state, session = _viewer(request)
    return _html(keys_page(_frame(session), await client_keys(state), list(state.config.tiers)))


async def _key(state: GatewayState, key_id: str) -> KeyInfo:
    for k in await client_keys(state):
        if k["id"] == key_id:
            return k
    raise _Stop(_html(message_page("No such key", f"There is no key '{key_id}'."), status=404))


async def key_detail(request: web.Request) -> web.Response:
    state, session = _viewer(request)
    key = await _key(state, request.match_info["key_id"])
    days = _period(OVERVIEW_DAYS)
    rows = await _rows(state, days, key_id=key["id"])
    page = key_page(
        _frame(session),
        key,
        days=days,
        requests=series(rows, days, "model", "requests"),
        tokens=series(rows, days, "model", "total_tokens", _order(rows, "model")),
        cost=series(rows, days, None, "cost"),
        per_model=_totals(rows, "model"),
    )
    return _html(page)


async def usage_view(request: web.Request) -> web.Response:
    state, session = _viewer(request)
    try:
        n = int(request.query.get("days", OVERVIEW_DAYS))
    except ValueError:
        n = OVERVIEW_DAYS
    days = _period(n if n in RANGES else OVERVIEW_DAYS)
    rows = await _rows(state, days)
    metrics: tuple[tuple[str, Metric], ...] = (
        ("requests", "requests"),
        ("tokens", "total_tokens"),
        ("cost", "cost"),
    )
    groups: tuple[tuple[str, GroupBy], ...] = (("key", "key_id"), ("model", "model"))
    charts = {
        f"{metric_name}-by-{by_name}": series(rows, days, by, metric, _order(rows, by))
        for metric_name, metric in metrics
        for by_name, by in groups
    }
    page = usage_page(
        _frame(session),
        days=days,
        charts=charts,
        by_key=_totals(rows, "key_id"),
        by_model=_totals(rows, "model"),
    )
    return _html(page)


# --- live ---------------------------------------------------------------------------------------


def live_state(state: GatewayState) -> Live:
    now = time.perf_counter()
    in_flight = [
        LiveRequest(e.request_id, e.key_id, e.model, e.endpoint, now - e.started, e.stream)
        # API requests only: the dashboard's and the admin API's own requests are no news
        for e in state.in_flight.values()
        if e.endpoint != "other"
    ]
    in_flight.sort(key=lambda r: -r.age)
    return Live(in_flight, list(breaker_states(state).items()))


async def live_json(request: web.Request) -> web.Response:
    if _session(request) is None:
        error = InvalidAPIKey("Log in to the dashboard first.")
        return web.Response(
            body=error.body(), status=error.status, content_type="application/json", headers=HEADERS
        )
    live = live_state(request.app[STATE])
    body = {
        "in_flight": [
            {
                "request_id": r.request_id,
                "key_id": r.key_id,
                "model": r.model,
                "endpoint": r.endpoint,
                "age_seconds": round(r.age, 1),
                "stream": r.stream,
            }
            for r in live.in_flight
        ],
        "breakers": [{"deployment": d, "state": s} for d, s in live.breakers],
    }
    return web.json_response(body, headers=HEADERS)


# --- key lifecycle ------------------------------------------------------------------------------


async def create_key(request: web.Request) -> web.Response:
    state, session, form = await _change(request)
    models = [m for m in form.get("models", "").replace(",", " ").split() if m] or ["*"]
    entered = KeyForm(
        form.get("id", "").strip(),
        form.get("models", "*"),
        form.get("tier", ""),
        form.get("description", "").strip(),
    )
    try:
        if not entered.id:
            raise InvalidRequest("A key needs an id.")
        issued = await add_client_key(
            state, entered.id, models, entered.tier or None, entered.description
        )
    except GatewayError as e:
        keys = await client_keys(state)
        page = keys_page(
            Frame(session.csrf), keys, list(state.config.tiers), _with_error(entered, e)
        )
        return _html(page, status=400)
    session.issued = issued
    raise web.HTTPSeeOther("/dashboard/keys#issued")


def _with_error(form: KeyForm, error: GatewayError) -> KeyForm:
    return KeyForm(form.id, form.models, form.tier, form.description, error.message)


async def revoke_confirm(request: web.Request) -> web.Response:
    state, session = _viewer(request)
    key = await _key(state, request.match_info["key_id"])
    if key["revoked"]:
        session.notices.append(("info", f"Key {key['id']} is already revoked."))
        raise web.HTTPSeeOther("/dashboard/keys")
    return _html(revoke_page(_frame(session), key))


async def revoke_key(request: web.Request) -> web.Response:
    state, session, form = await _change(request)
    key_id = request.match_info["key_id"]
    if form.get("confirm") != "yes":
        raise web.HTTPSeeOther(key_url(key_id, "revoke"))
    try:
        await revoke_client_key(state, key_id, "dashboard")
    except GatewayError as e:
        session.notices.append(("error", e.message))
    else:
        session.notices.append(("ok", f"Key {key_id} revoked: its requests now get 401."))
    raise web.HTTPSeeOther("/dashboard/keys")


async def rotate_key(request: web.Request) -> web.Response:
    state, session, form = await _change(request)
    key_id = request.match_info["key_id"]
    try:
        grace = float(form.get("grace_seconds", "3600"))
    except ValueError:
        grace = -1.0  # refused below with the admin API's message
    try:
        session.issued = await rotate_client_key(state, key_id, grace)
    except GatewayError as e:
        session.notices.append(("error", e.message))
    raise web.HTTPSeeOther(key_url(key_id) + "#issued")


# --- static files and routes --------------------------------------------------------------------


async def static(request: web.Request) -> web.StreamResponse:
    _admin_hash(request)
    name = request.match_info["name"]
    if name not in STATIC_FILES:
        raise web.HTTPNotFound()
    return web.FileResponse(
        STATIC_DIR / name,
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


async def to_overview(request: web.Request) -> web.Response:
    _admin_hash(request)
    raise web.HTTPSeeOther("/dashboard")


def add_routes(app: web.Application) -> None:
    app[DASHBOARD] = Dashboard()
    r = app.router
    r.add_get("/dashboard", _pages(overview), allow_head=False)
    r.add_get("/dashboard/", to_overview, allow_head=False)
    r.add_get("/dashboard/login", _pages(login_form), allow_head=False)
    r.add_post("/dashboard/login", _pages(login))
    r.add_post("/dashboard/logout", _pages(logout))
    r.add_get("/dashboard/keys", _pages(keys), allow_head=False)
    r.add_post("/dashboard/keys", _pages(create_key))
    r.add_get("/dashboard/keys/{key_id}", _pages(key_detail), allow_head=False)
    r.add_get("/dashboard/keys/{key_id}/revoke", _pages(revoke_confirm), allow_head=False)
    r.add_post("/dashboard/keys/{key_id}/revoke", _pages(revoke_key))
    r.add_post("/dashboard/keys/{key_id}/rotate", _pages(rotate_key))
    r.add_get("/dashboard/usage", _pages(usage_view), allow_head=False)
    r.add_get("/dashboard/live.json", _pages(live_json), allow_head=False)
    r.add_get("/dashboard/static/{name}", static, allow_head=False)
