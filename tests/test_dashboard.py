"""The operator's dashboard: in a real headless Chromium (Debian's, driven by Playwright), and
its login, session and CSRF rules through plain HTTP."""

from __future__ import annotations

import asyncio
import re
import shutil
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest

from gateway.auth import hash_key, new_key
from gateway.dashboard_charts import PALETTE_SIZE, bar_chart, series
from gateway.dashboard_session import FREE_FAILURES, LoginThrottle, Sessions
from gateway.usage import UsageRecord
from gateway.usage_store import DailyKeyModelUsage

from .conftest import CLIENT_KEY, Gateway, MakeGateway

ROOT = Path(__file__).parent.parent
ARTIFACTS = ROOT / "test-artifacts" / "dashboard"
ADMIN = new_key()
ADMIN_TOML = f"""
[admin]
key_hash = "{hash_key(ADMIN)}"

[tiers.free]
chat_per_minute = 600

[tiers.pro]
chat_per_minute = 6000
"""
MESSAGES: list[Any] = [{"role": "user", "content": "Hello there"}]
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def today() -> str:
    return datetime.now(UTC).date().isoformat()


def seed_history(gateway: Gateway) -> dict[str, dict[str, int]]:
    """Records on the 29 days before today, so that the charts have a month to draw.
    Returns {key: {day: requests}}."""
    now = datetime.now(UTC)
    seeded: dict[str, dict[str, int]] = {"test": {}, "demo-only": {}}
    for back in range(1, 30):
        ts = (now - timedelta(days=back)).replace(hour=12).timestamp()
        day = (now - timedelta(days=back)).date().isoformat()
        for key, model, n in (
            ("test", "openai/gpt-4o", (back * 7) % 5),
            ("demo-only", "demo/echo", (back * 3) % 4 + 1),
        ):
            if n:
                seeded[key][day] = n
            for i in range(n):
                gateway.state.usage.record(
                    UsageRecord(ts, f"req_seed_{key}_{back}_{i}", key, "127.0.0.1", "chat",
                                model, model.split("/")[0], model.split("/")[1], 200, "ok",
                                40 + 10 * i, 120 + back, 0, 0, 0, 0.0004 * (i + 1), 300.0)
                )  # fmt: skip
    return seeded


# --- in a real browser ----------------------------------------------------------------------


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    """Debian's Chromium under Playwright. Missing or broken is a failure: CI installs it."""
    from playwright.async_api import async_playwright

    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: `apt-get install chromium` (.ci/run does this)")
    async with async_playwright() as p:
        try:
            browser = await p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        except Exception as e:
            pytest.fail(f"could not launch {executable} for the dashboard tests: {e}")
        yield browser
        await browser.close()


@pytest.mark.timeout(180)
async def test_the_dashboard_in_chromium(make_gateway: MakeGateway, browser: Any) -> None:
    gateway = await make_gateway(extra=ADMIN_TOML)
    client = gateway.aclient()
    for _ in range(3):
        await client.chat.completions.create(model="demo/echo", messages=MESSAGES)
    await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    # a stream held open upstream, to be seen in flight
    gate, sent = asyncio.Event(), asyncio.Event()
    gateway.fake.next_stream("openai/chat-stream-text.sse", gate=gate, sent=sent)

    async def held_stream() -> None:
        stream = await client.chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, stream=True
        )
        async for _ in stream:
            pass

    streaming = asyncio.create_task(held_stream())
    await asyncio.wait_for(sent.wait(), 10)
    seeded = seed_history(gateway)
    assert await gateway.state.usage.flush()

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    context = await browser.new_context(viewport={"width": 1366, "height": 768})
    page = await context.new_page()
    page.set_default_timeout(15_000)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    # (a page may answer 401, a wrong key at login; its assets and live.json never fail)
    page.on(
        "response",
        lambda r: (
            errors.append(f"{r.status} {r.url}")
            if r.status >= 400 and ("/static/" in r.url or "live.json" in r.url)
            else None
        ),
    )

    async def shot(name: str) -> None:
        await page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)

    # not logged in: the login form; a wrong key says so
    await page.goto(gateway.url + "/dashboard")
    assert page.url.endswith("/dashboard/login")
    await page.fill("#key", "gw-not-the-admin-key")
    await page.click("button[type=submit]")
    assert "That is not the admin key." in await page.inner_text(".notice.error")
    await shot("login")
    await page.fill("#key", ADMIN)
    await page.click("button[type=submit]")
    await page.wait_for_url(gateway.url + "/dashboard")

    # overview: today's numbers, charts, the stream in flight; then its end, seen by polling
    assert await page.inner_text("h1") == "Overview"
    day = page.locator(f'svg[data-chart="requests-by-key"] g.day[data-date="{today()}"]')
    assert await day.get_attribute("data-total") == "4"
    live = page.locator("table.live tbody")
    assert "stream" in await live.inner_text()
    assert "openai/gpt-4o" in await live.inner_text()
    assert "closed" in await page.inner_text("table.breakers")
    await shot("overview")
    gate.set()
    await asyncio.wait_for(streaming, 10)
    await page.wait_for_selector("table.live tr.empty", timeout=10_000)
    assert await page.inner_text('[data-live="count"]') == "0"
    assert await gateway.state.usage.flush()

    # one key's usage chart reflects the real requests
    await page.click("text=Keys")
    await page.click("a.key-link:text-is('test')")
    await page.wait_for_url(gateway.url + "/dashboard/keys/test")
    requests_today = page.locator(f'svg[data-chart="requests"] g.day[data-date="{today()}"]')
    assert await requests_today.get_attribute("data-total") == "5"
    for day, count in seeded["test"].items():
        past = page.locator(f'svg[data-chart="requests"] g.day[data-date="{day}"]')
        assert await past.get_attribute("data-total") == str(count)
    segments = requests_today.locator("rect[data-series]")
    by_model = {
        await segments.nth(i).get_attribute("data-series"): await segments.nth(i).get_attribute(
            "data-value"
        )
        for i in range(await segments.count())
    }
    assert by_model == {"demo/echo": "3", "openai/gpt-4o": "2"}
    await page.wait_for_timeout(200)
    await shot("key-usage")

    # create a key: shown once, and it works at once
    await page.click("nav >> text=Keys")
    await page.fill("#new-id", "browser-app")
    await page.fill("#new-models", "demo/*")
    await page.select_option("#new-tier", "free")
    await page.fill("#new-description", "made in Chromium")
    await page.click("#create-key button[type=submit]")
    await page.wait_for_selector("#new-key")
    created = await page.input_value("#new-key")
    assert created.startswith("gw-")
    await shot("key-created")
    await page.reload()
    assert await page.locator("#new-key").count() == 0  # once only
    assert created not in await page.content()
    row = page.locator("table.keys tr", has=page.locator("a.key-link:text-is('browser-app')"))
    assert "free" in await row.inner_text()
    new_client = gateway.aclient(created)
    answer = await new_client.chat.completions.create(model="demo/echo", messages=MESSAGES)
    assert answer.choices[0].message.content

    # rotate with no grace: the new secret works, the old one no longer does
    await page.click("a.key-link:text-is('browser-app')")
    await shot("key-manage")
    await page.select_option("#grace", "0")
    await page.click("#rotate-key button[type=submit]")
    await page.wait_for_selector("#new-key")
    rotated = await page.input_value("#new-key")
    assert rotated.startswith("gw-") and rotated != created
    with pytest.raises(openai.AuthenticationError):
        await new_client.chat.completions.create(model="demo/echo", messages=MESSAGES)
    rotated_client = gateway.aclient(rotated)
    await rotated_client.chat.completions.create(model="demo/echo", messages=MESSAGES)

    # revoke, with a confirmation; then the key is refused
    await page.click("text=Revoke this key")
    assert "cannot be undone" in await page.inner_text(".confirm")
    await shot("revoke-confirm")
    await page.click("#confirm-revoke")
    await page.wait_for_url(gateway.url + "/dashboard/keys")
    assert "Key browser-app revoked" in await page.inner_text(".notice.ok")
    row = page.locator("table.keys tr", has=page.locator("a.key-link:text-is('browser-app')"))
    assert "revoked" in await row.inner_text()
    await shot("after-revoke")
    with pytest.raises(openai.AuthenticationError) as refused:
        await rotated_client.chat.completions.create(model="demo/echo", messages=MESSAGES)
    assert refused.value.status_code == 401

    # the usage page draws per key and per model; then log out
    assert await gateway.state.usage.flush()
    await page.click("nav >> text=Usage")
    chart = page.locator(f'svg[data-chart="requests-by-model"] g.day[data-date="{today()}"]')
    assert await chart.get_attribute("data-total") == "7"
    await shot("usage")
    await page.set_viewport_size({"width": 1440, "height": 900})
    await page.click("nav >> text=Overview")
    await shot("overview-1440")
    await page.click("text=Log out")
    await page.wait_for_url(re.compile(r".*/dashboard/login\?logged_out$"))
    await page.goto(gateway.url + "/dashboard/keys")
    assert page.url.endswith("/dashboard/login")
    assert errors == []
    await context.close()


# --- over plain HTTP ------------------------------------------------------------------------


class Visitor:
    """A browser-like HTTP client: keeps cookies (also for 127.0.0.1), follows no redirect,
    and remembers every response so that a test can look for leaks."""

    def __init__(self, gateway: Gateway) -> None:
        self.url = gateway.url
        self.session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))
        self.seen: list[str] = []

    async def request(
        self,
        method: str,
        path: str,
        data: dict[str, str] | None = None,
        *,
        send_origin: bool = True,
        **headers: str,
    ) -> tuple[int, str, aiohttp.ClientResponse]:
        """As a browser would: a POST says where its form came from (Origin)."""
        origin = {"Origin": self.url} if method == "POST" and send_origin else {}
        async with self.session.request(
            method,
            self.url + path,
            data=data,
            allow_redirects=False,
            headers={**origin, **{k.replace("_", "-"): v for k, v in headers.items()}},
        ) as resp:
            text = await resp.text()
            self.seen.append(text)
            self.seen.extend(f"{k}: {v}" for k, v in resp.headers.items())
            return resp.status, text, resp

    async def login(self, key: str = ADMIN) -> tuple[int, str, aiohttp.ClientResponse]:
        return await self.request("POST", "/dashboard/login", {"key": key})

    async def csrf(self, path: str = "/dashboard") -> str:
        status, text, _ = await self.request("GET", path)
        assert status == 200
        match = re.search(r'name="csrf" value="([^"]+)"', text)
        assert match
        return match.group(1)

    async def close(self) -> None:
        await self.session.close()


@pytest.fixture
async def visitor(make_gateway: MakeGateway) -> AsyncIterator[Visitor]:
    v = Visitor(await make_gateway(extra=ADMIN_TOML))
    yield v
    for text in v.seen:  # the admin key is never echoed, in a page or a header
        assert ADMIN not in text
    await v.close()


async def test_pages_need_a_session(visitor: Visitor) -> None:
    for path in ("/dashboard", "/dashboard/keys", "/dashboard/keys/test", "/dashboard/usage"):
        status, _, resp = await visitor.request("GET", path)
        assert (status, resp.headers["Location"]) == (303, "/dashboard/login")
    status, text, _ = await visitor.request("GET", "/dashboard/live.json")
    assert status == 401
    error = orjson.loads(text)["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "invalid_request_error",
        "invalid_api_key",
        None,
    )
    status, _, resp = await visitor.request("POST", "/dashboard/keys", {"id": "x"})
    assert (status, resp.headers["Location"]) == (303, "/dashboard/login")
    status, text, resp = await visitor.request("GET", "/dashboard/login")
    assert status == 200 and 'name="key"' in text
    assert "'self'" in resp.headers["Content-Security-Policy"]
    assert resp.headers["Cache-Control"] == "no-store"
    status, css, resp = await visitor.request("GET", "/dashboard/static/dashboard.css")
    assert status == 200 and resp.content_type == "text/css" and ".topbar" in css
    assert (await visitor.request("GET", "/dashboard/static/nope.css"))[0] == 404


async def test_a_wrong_key_gets_the_form_again_and_no_cookie(visitor: Visitor) -> None:
    status, text, resp = await visitor.login("gw-wrong")
    assert status == 401
    assert "That is not the admin key." in text and 'name="key"' in text
    assert "Set-Cookie" not in resp.headers
    assert "gw-wrong" not in text
    assert (await visitor.request("GET", "/dashboard"))[0] == 303


async def test_login_sets_a_strict_http_only_session_cookie(visitor: Visitor) -> None:
    status, _, resp = await visitor.login()
    assert (status, resp.headers["Location"]) == (303, "/dashboard")
    cookie = resp.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and "Path=/dashboard" in cookie
    assert "Secure" not in cookie  # plain http here; https adds it
    value = cookie.split(";")[0].split("=", 1)[1]
    assert len(value) >= 40 and ADMIN not in value
    status, text, _ = await visitor.request("GET", "/dashboard")
    assert status == 200 and "Overview" in text
    status, _, resp = await visitor.request("GET", "/dashboard/login")
    assert (status, resp.headers["Location"]) == (303, "/dashboard")
    status, text, _ = await visitor.request("GET", "/dashboard/live.json")
    assert status == 200 and '"breakers"' in text


async def test_a_post_needs_the_session_csrf_token_and_this_origin(
    visitor: Visitor, make_gateway: MakeGateway
) -> None:
    await visitor.login()
    token = await visitor.csrf()
    form = {"id": "csrf-test", "models": "*"}
    assert (await visitor.request("POST", "/dashboard/keys", form))[0] == 403
    assert (await visitor.request("POST", "/dashboard/keys", {**form, "csrf": "nope"}))[0] == 403
    good = {**form, "csrf": token}
    for origin in ("https://evil.example", "null"):
        status, text, _ = await visitor.request("POST", "/dashboard/keys", good, Origin=origin)
        assert status == 403 and "another site" in text
    status, _, _ = await visitor.request(
        "POST", "/dashboard/keys", good, send_origin=False, Referer="https://evil.example/x"
    )
    assert status == 403
    assert (await visitor.request("POST", "/dashboard/logout", {"csrf": "nope"}))[0] == 403
    # nothing was created by any of those
    status, text, _ = await visitor.request("GET", "/dashboard/keys")
    assert "csrf-test" not in text
    # the same form with the token and this origin works, and shows the key once
    status, _, resp = await visitor.request("POST", "/dashboard/keys", good)
    assert (status, resp.headers["Location"]) == (303, "/dashboard/keys#issued")
    status, text, _ = await visitor.request("GET", "/dashboard/keys")
    key = re.search(r'id="new-key"[^>]*value="(gw-[^"]+)"', text)
    assert key is not None
    status, text, _ = await visitor.request("GET", "/dashboard/keys")
    assert key.group(1) not in text and 'id="new-key"' not in text
    # and a cross-site login form is refused too
    status, _, _ = await visitor.request(
        "POST", "/dashboard/login", {"key": ADMIN}, Origin="https://evil.example"
    )
    assert status == 403


async def test_create_errors_keep_the_form(visitor: Visitor) -> None:
    await visitor.login()
    token = await visitor.csrf("/dashboard/keys")
    form = {"csrf": token, "id": "test", "models": "demo/*", "description": "<b>x</b>"}
    status, text, _ = await visitor.request("POST", "/dashboard/keys", form)
    assert status == 400 and "defined in the config file" in text
    assert 'value="demo/*"' in text and "&lt;b&gt;x&lt;/b&gt;" in text and "<b>x</b>" not in text
    form = {"csrf": token, "id": "t2", "tier": "platinum"}
    status, text, _ = await visitor.request("POST", "/dashboard/keys", form)
    assert status == 400 and "No tier" in text


async def test_logout_ends_the_session(visitor: Visitor) -> None:
    _, _, resp = await visitor.login()
    cookie = resp.headers["Set-Cookie"].split(";")[0]
    token = await visitor.csrf()
    status, _, resp = await visitor.request("POST", "/dashboard/logout", {"csrf": token})
    assert (status, resp.headers["Location"]) == (303, "/dashboard/login?logged_out")
    # the old cookie, replayed by hand, opens nothing any more
    status, _, _ = await visitor.request("GET", "/dashboard", Cookie=cookie)
    assert status == 303


async def test_no_admin_key_no_dashboard(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as session:
        for method, path in (
            ("GET", "/dashboard"),
            ("GET", "/dashboard/login"),
            ("POST", "/dashboard/login"),
            ("GET", "/dashboard/static/dashboard.css"),
            ("GET", "/dashboard/live.json"),
        ):
            async with session.request(
                method, gateway.url + path, data={"key": "x"}, allow_redirects=False
            ) as resp:
                assert resp.status == 404, path


async def test_wrong_keys_from_one_address_are_slowed_down(visitor: Visitor) -> None:
    for _ in range(FREE_FAILURES + 1):
        assert (await visitor.login("gw-wrong"))[0] == 401
    status, text, resp = await visitor.login()  # even the right key waits now
    assert status == 429 and "try again in" in text
    assert "Set-Cookie" not in resp.headers


async def test_revoke_needs_the_confirmation(visitor: Visitor) -> None:
    await visitor.login()
    token = await visitor.csrf("/dashboard/keys/test/revoke")
    status, _, resp = await visitor.request("POST", "/dashboard/keys/test/revoke", {"csrf": token})
    assert (status, resp.headers["Location"]) == (303, "/dashboard/keys/test/revoke")
    await visitor.request("POST", "/dashboard/keys/test/revoke", {"csrf": token, "confirm": "yes"})
    async with aiohttp.ClientSession() as s:
        async with s.get(
            visitor.url + "/v1/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
        ) as resp:
            assert resp.status == 401
    assert (await visitor.request("GET", "/dashboard/keys/nobody"))[0] == 404


def test_sessions_expire_and_end_when_the_admin_key_changes() -> None:
    now = [1000.0]
    sessions = Sessions(ttl=60, clock=lambda: now[0])
    a = sessions.open("sha256:a")
    assert sessions.get(a.id, "sha256:a") is a
    assert sessions.get(a.id, "sha256:b") is None  # a reload changed the admin key
    assert sessions.get(a.id, "sha256:a") is None
    b = sessions.open("sha256:a")
    now[0] += 61
    assert sessions.get(b.id, "sha256:a") is None
    assert sessions.get("", "sha256:a") is None and len(sessions) == 0
    c = sessions.open("sha256:a")
    assert c.check_csrf(c.csrf) and not c.check_csrf("x") and not c.check_csrf("")


def test_login_backoff_doubles_and_forgets_after_success() -> None:
    now = [0.0]
    throttle = LoginThrottle(clock=lambda: now[0])
    for _ in range(FREE_FAILURES):
        throttle.failed("1.2.3.4")
    assert throttle.wait("1.2.3.4") == 0
    throttle.failed("1.2.3.4")
    assert throttle.wait("1.2.3.4") == 1
    throttle.failed("1.2.3.4")
    assert throttle.wait("1.2.3.4") == 2 and throttle.wait("5.6.7.8") == 0
    now[0] += 2
    assert throttle.wait("1.2.3.4") == 0
    throttle.succeeded("1.2.3.4")
    throttle.failed("1.2.3.4")
    assert throttle.wait("1.2.3.4") == 0


async def test_the_cookie_is_secure_over_https(visitor: Visitor) -> None:
    _, _, resp = await visitor.request(
        "POST", "/dashboard/login", {"key": ADMIN}, X_Forwarded_Proto="https"
    )
    assert "Secure" in resp.headers["Set-Cookie"]


def test_charts_group_small_series_and_escape_names() -> None:
    days = ["2025-03-14", "2025-03-15"]
    rows: list[DailyKeyModelUsage] = [
        {"date": days[i % 2], "key_id": f"k{i}", "model": "m", "requests": 10 - i, "errors": 0,
         "total_tokens": 100, "cost": 0.5}
        for i in range(9)
    ]  # fmt: skip
    rows.append(
        {"date": days[1], "key_id": "<script>", "model": "m", "requests": 20, "errors": 0,
         "total_tokens": 1, "cost": 0.0}
    )  # fmt: skip
    data = series(rows, days, "key_id", "requests", order=["k8"])
    # the given order first, then the largest
    assert [name for name, _ in data][:3] == ["k8", "<script>", "k0"]
    assert data[-1][0] == "3 others" and len(data) == PALETTE_SIZE
    assert sum(sum(v) for _, v in data) == sum(r["requests"] for r in rows)
    svg = bar_chart("requests", days, series(rows, days, "key_id", "requests"), unit="requests")
    assert "<script>" not in svg and "&lt;script&gt;" in svg
    assert f'data-date="{days[1]}" data-total="{sum(10 - i for i in range(1, 9, 2)) + 20}"' in svg
    empty = bar_chart("requests", days, [], unit="requests")
    assert "No requests in this period" in empty
