"""Usage accounting seen from outside: rows in SQLite, /v1/usage, the admin API, the CLI."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.auth import hash_key, new_key
from gateway.usage_types import NANO, UsageRecord

from .conftest import CLIENT_KEY, Fakes, Gateway, MakeGateway, gateway_toml
from .fakes.anthropic_upstream import snapshot
from .fakes.base import UPSTREAM_KEY, fixture_bytes, sse_events
from .fakes.openai_upstream import recorded_completions
from .test_lifecycle import GatewayProcess

ROOT = Path(__file__).parent.parent
ADMIN_KEY = new_key()
MESSAGES: list[Any] = [{"role": "user", "content": "What's the weather like in SF?"}]


def priced(fakes: Fakes) -> str:
    """A provider whose prices make each recorded completion cost a visible amount:
    14 prompt tokens x 1000 + 37 completion tokens x 3000 per million = 0.125."""
    return f"""
[admin]
key_hash = "{hash_key(ADMIN_KEY)}"

[[providers]]
name = "priced"
kind = "openai"
base_url = "{fakes.urls["openai"]}/v1"
api_key = "{UPSTREAM_KEY}"
models = [{{ id = "gpt-4o", upstream = "gpt-4o-2024-08-06", price_in = 1000.0, price_out = 3000.0 }}]
"""


async def get(gateway: Gateway, path: str, key: str) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.get(gateway.url + path, headers={"Authorization": f"Bearer {key}"}) as resp,
    ):
        return resp.status, await resp.json()


async def post(
    gateway: Gateway, path: str, key: str, body: dict[str, Any] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.url + path, json=body or {}, headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        return resp.status, await resp.json()


async def test_rows_and_usage_answer_to_the_cent(make_gateway: MakeGateway, fakes: Fakes) -> None:
    gateway = await make_gateway(extra=priced(fakes))
    client = gateway.aclient()
    await client.chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)
    await client.chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)
    stream = await client.chat.completions.create(
        model="priced/gpt-4o", messages=MESSAGES, stream=True
    )
    async for _ in stream:
        pass
    gateway.fake.next_json(500, {"error": {"message": "boom", "type": "server_error"}})
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)

    records = await gateway.records()
    assert [(r.status, r.outcome, r.stream) for r in records] == [
        (200, "ok", False),
        (200, "ok", False),
        (200, "ok", True),
        (502, "upstream_error", False),
    ]
    first = records[0]
    assert (first.key_id, first.endpoint, first.model, first.provider, first.upstream_model) == (
        "test",
        "chat",
        "priced/gpt-4o",
        "priced",
        "gpt-4o-2024-08-06",
    )
    assert (first.prompt_tokens, first.completion_tokens, first.cost) == (14, 37, 0.125)
    assert first.latency_ms > 0 and first.ttft_ms is None and first.request_id.startswith("req_")
    assert records[2].ttft_ms is not None and records[2].ttft_ms <= records[2].latency_ms
    assert records[3].cost == 0.0  # failed upstream calls are not billed

    # the raw SQLite file says the same
    path = gateway.state.config.storage.path
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count(*) FROM usage").fetchone() == (4,)

    status, usage = await get(gateway, "/v1/usage", CLIENT_KEY)
    assert status == 200
    stream_cost = records[2].cost
    assert usage["object"] == "usage"
    assert usage["total_requests"] == 4
    assert usage["total_cost"] == pytest.approx(0.25 + stream_cost, abs=1e-9)
    assert round(usage["total_cost"], 2) == round(0.25 + stream_cost, 2)
    assert usage["total_tokens"] == sum(r.prompt_tokens + r.completion_tokens for r in records)
    assert set(usage["breakdown"]) == {"priced/gpt-4o"}
    model = usage["breakdown"]["priced/gpt-4o"]
    assert (model["requests"], model["errors"]) == (4, 1)
    today = time.strftime("%Y-%m-%d", time.gmtime())
    assert usage["period_end"] == today
    assert usage["period_start"] == today[:8] + "01"
    assert [d["date"] for d in usage["daily"]] == [today]
    assert usage["daily"][0]["requests"] == 4


async def test_usage_is_the_callers_own(make_gateway: MakeGateway) -> None:
    from .conftest import DEMO_ONLY_KEY

    gateway = await make_gateway()
    await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    status, usage = await get(gateway, "/v1/usage", DEMO_ONLY_KEY)
    assert status == 200
    assert usage["total_requests"] == 0  # the other key's chat is not this key's
    assert usage["breakdown"] == {}
    status, body = await get(gateway, "/api/v1/usage?start=2020-01-01&end=2020-01-31", CLIENT_KEY)
    assert status == 200 and body["total_requests"] == 0
    status, body = await get(gateway, "/v1/usage?start=yesterday", CLIENT_KEY)
    assert status == 400 and body["error"]["param"] == "start"


async def test_admin_api(make_gateway: MakeGateway, fakes: Fakes) -> None:
    gateway = await make_gateway(extra=priced(fakes))
    assert (await get(gateway, "/admin/keys", CLIENT_KEY))[0] == 401
    assert (await get(gateway, "/admin/keys", ""))[0] == 401
    await gateway.aclient().chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)

    status, created = await post(
        gateway,
        "/admin/keys",
        ADMIN_KEY,
        {"id": "new-app", "models": ["priced/*"], "description": "test"},
    )
    assert status == 201
    new = created["key"]
    assert new.startswith("gw-")
    answer = await gateway.aclient(key=new).chat.completions.create(
        model="priced/gpt-4o", messages=MESSAGES
    )
    assert answer.model == "priced/gpt-4o"
    with pytest.raises(openai.PermissionDeniedError):
        await gateway.aclient(key=new).chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES
        )

    await gateway.state.usage.flush()
    status, keys = await get(gateway, "/admin/keys", ADMIN_KEY)
    assert status == 200
    by_id = {k["id"]: k for k in keys["data"]}
    assert by_id["new-app"]["source"] == "managed"
    assert by_id["new-app"]["requests"] == 1
    assert by_id["test"]["source"] == "config"
    assert by_id["test"]["today"]["requests"] == 1
    assert by_id["test"]["cost"] == 0.125
    assert by_id["test"]["last_used"] is not None

    status, usage = await get(gateway, "/admin/usage?model=priced/gpt-4o", ADMIN_KEY)
    assert status == 200
    assert {k["key_id"] for k in usage["keys"]} == {"test", "new-app"}
    assert usage["total_cost"] == 0.25
    status, one = await get(gateway, "/admin/usage?key=new-app", ADMIN_KEY)
    assert [k["key_id"] for k in one["keys"]] == ["new-app"]

    status, revoked = await post(gateway, "/admin/keys/new-app/revoke", ADMIN_KEY)
    assert status == 200 and revoked["revoked"]
    with pytest.raises(openai.AuthenticationError):  # at once
        await gateway.aclient(key=new).chat.completions.create(
            model="priced/gpt-4o", messages=MESSAGES
        )
    # a config key can be revoked too
    assert (await post(gateway, "/admin/keys/test/revoke", ADMIN_KEY))[0] == 200
    with pytest.raises(openai.AuthenticationError):
        await gateway.aclient().models.list()
    assert (await post(gateway, "/admin/keys/nobody/revoke", ADMIN_KEY))[0] == 404

    status, breakers = await get(gateway, "/admin/breakers", ADMIN_KEY)
    assert status == 200 and breakers["deployments"]["priced/gpt-4o"] == "closed"


async def rotate_and_watch_the_grace_end(gateway: Gateway, grace: float) -> None:
    """Rotate a key through the admin API with a short grace; the old secret works until the
    grace ends and is refused within a second of it, without a restart or a manual reload."""
    _, created = await post(gateway, "/admin/keys", ADMIN_KEY, {"id": "rotating"})
    old = created["key"]
    asked_at = time.time()
    status, rotated = await post(
        gateway, "/admin/keys/rotating/rotate", ADMIN_KEY, {"grace_seconds": grace}
    )
    grace_end = time.time() + grace  # at the latest
    assert status == 200
    new = rotated["key"]
    assert (await get(gateway, "/v1/models", new))[0] == 200
    assert (await get(gateway, "/v1/models", old))[0] == 200  # still inside its grace
    while (await get(gateway, "/v1/models", old))[0] == 200:
        assert time.time() < grace_end + 1.0, "the old secret outlived its grace by over 1 s"
        await asyncio.sleep(0.05)
    refused_at = time.time()
    status, answer = await get(gateway, "/v1/models", old)
    assert status == 401 and answer["error"]["code"] == "invalid_api_key"
    assert refused_at >= asked_at + grace  # not before the grace was over
    assert (await get(gateway, "/v1/models", new))[0] == 200


async def test_rotation_keeps_the_old_secret_for_the_grace_period(
    make_gateway: MakeGateway, fakes: Fakes
) -> None:
    gateway = await make_gateway(extra=priced(fakes))
    await rotate_and_watch_the_grace_end(gateway, grace=1.5)
    assert (await post(gateway, "/admin/keys/test/rotate", ADMIN_KEY))[0] == 400  # config key


async def test_revocation_survives_a_restart(
    make_gateway: MakeGateway, fakes: Fakes, tmp_path: Path
) -> None:
    toml = gateway_toml(fakes.urls, priced(fakes), "retries = 0", str(tmp_path / "keep.db"))
    one = await make_gateway(toml=toml)
    _, created = await post(one, "/admin/keys", ADMIN_KEY, {"id": "short-lived"})
    await post(one, "/admin/keys/short-lived/revoke", ADMIN_KEY)
    await post(one, "/admin/keys/test/revoke", ADMIN_KEY)
    two = await make_gateway(toml=toml)
    assert (await get(two, "/v1/models", created["key"]))[0] == 401
    assert (await get(two, "/v1/models", CLIENT_KEY))[0] == 401


async def test_database_locked_then_free(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    locker = sqlite3.connect(gateway.state.config.storage.path, isolation_level=None)
    locker.execute("BEGIN EXCLUSIVE")
    try:
        for _ in range(3):
            answer = await gateway.aclient().chat.completions.create(
                model="openai/gpt-4o", messages=MESSAGES
            )
            assert answer.choices[0].message.content  # requests still succeed
        assert not await gateway.state.usage.flush()  # the batch could not be written...
        assert gateway.state.usage.dropped == 0  # ...and is kept, not dropped
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    records = await gateway.records()
    assert len(records) == 3


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
    )


async def test_cli_key_lifecycle_against_a_running_gateway(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    config = gateway.state.config.source
    made = await asyncio.to_thread(
        cli, "keys", "new", "--config", config, "--id", "cli-app", "--models", "demo/*"
    )
    assert made.returncode == 0, made.stderr
    key = next(w for w in made.stdout.split() if w.startswith("gw-"))

    async def status_of(k: str) -> int:
        return (await get(gateway, "/v1/models", k))[0]

    async def eventually(k: str, expected: int) -> None:
        for _ in range(60):
            if await status_of(k) == expected:
                return
            await asyncio.sleep(0.1)
        raise AssertionError(f"status never became {expected}")

    await eventually(key, 200)  # the gateway polls the database for key changes
    listed = await asyncio.to_thread(cli, "keys", "list", "--config", config)
    assert listed.returncode == 0
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("cli-app"))
    assert "database" in line and "active" in line
    assert key not in listed.stdout and hash_key(key) not in listed.stdout

    asked_at = time.time()
    rotated = await asyncio.to_thread(
        cli, "keys", "rotate", "cli-app", "--config", config, "--grace", "4"
    )
    grace_end = time.time() + 4  # at the latest
    assert rotated.returncode == 0, rotated.stderr
    new = next(w for w in rotated.stdout.split() if w.startswith("gw-"))
    await eventually(new, 200)
    assert await status_of(key) == 200  # the old secret is inside its grace...
    await eventually(key, 401)
    assert asked_at + 4 <= time.time() <= grace_end + 1.0  # ...and refused as soon as it ends

    revoked = await asyncio.to_thread(cli, "keys", "revoke", "cli-app", "--config", config)
    assert revoked.returncode == 0
    await eventually(new, 401)

    table = await asyncio.to_thread(cli, "usage", "--config", config)
    assert table.returncode == 0, table.stderr
    assert "cli-app" in table.stdout and "TOTAL" in table.stdout


async def test_kill_9_loses_at_most_the_flush_interval(tmp_path: Path) -> None:
    db = tmp_path / "crash.db"
    key = new_key()
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[storage]
path = "{db}"
flush_interval = 0.2

[[providers]]
name = "demo"
kind = "demo"
models = [{{ id = "embed", capabilities = ["embeddings"] }}]

[[keys]]
id = "load"
hash = "{hash_key(key)}"
""")
    gw = GatewayProcess(config)
    await gw.start()
    acknowledged: list[float] = []
    stop = asyncio.Event()

    async def load() -> None:
        async with aiohttp.ClientSession() as session:
            while not stop.is_set():
                try:
                    async with session.post(
                        gw.url + "/embeddings",
                        json={"model": "demo/embed", "input": "x"},
                        headers={"Authorization": f"Bearer {key}"},
                    ) as resp:
                        if resp.status == 200:
                            acknowledged.append(time.monotonic())
                except aiohttp.ClientError:
                    return

    workers = [asyncio.ensure_future(load()) for _ in range(8)]
    await asyncio.sleep(2.0)
    assert gw.proc is not None
    killed_at = time.monotonic()
    os.kill(gw.proc.pid, signal.SIGKILL)
    stop.set()
    await asyncio.gather(*workers)
    await gw.stop()
    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        written = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
        daily = conn.execute("SELECT coalesce(sum(requests), 0) FROM usage_daily").fetchone()[0]
    assert written == daily  # roll-ups agree with the raw rows
    # everything acknowledged more than a flush interval (plus a writer's slack) before the
    # kill is on disk
    settled = sum(1 for t in acknowledged if t < killed_at - 0.2 - 0.5)
    assert written >= settled, (written, settled, len(acknowledged))
    assert written <= len(acknowledged)
    json.dumps({"acknowledged": len(acknowledged), "written": written})


async def test_a_record_outlives_a_kill_9_one_flush_interval_later(tmp_path: Path) -> None:
    """With the default flush interval (1 s): a request, SIGKILL 1.5 s later, a restart; the
    record is in the database and in /v1/usage, cost included."""
    db = tmp_path / "crash.db"
    key = new_key()
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[storage]
path = "{db}"

[[providers]]
name = "demo"
kind = "demo"
models = [{{ id = "echo", price_in = 1000.0, price_out = 2000.0 }}]

[[keys]]
id = "survivor"
hash = "{hash_key(key)}"
""")
    flush_interval = 1.0  # the default: the config above does not set it
    gw = GatewayProcess(config)
    await gw.start()
    try:
        client = openai.AsyncOpenAI(base_url=gw.url, api_key=key, max_retries=0)
        answer = await client.chat.completions.create(model="demo/echo", messages=MESSAGES)
        await client.close()
        assert answer.usage is not None
        await asyncio.sleep(flush_interval + 0.5)
        assert gw.proc is not None
        os.kill(gw.proc.pid, signal.SIGKILL)
    finally:
        code, _ = await gw.stop()
    assert code == -signal.SIGKILL

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        rows = conn.execute(
            "SELECT key_id, model, prompt_tokens, completion_tokens, cost_nano FROM usage"
        ).fetchall()
    expected_cost = (
        answer.usage.prompt_tokens * 1000 + answer.usage.completion_tokens * 2000
    ) / 1e6
    assert rows == [
        (
            "survivor",
            "demo/echo",
            answer.usage.prompt_tokens,
            answer.usage.completion_tokens,
            round(expected_cost * 1e9),
        )
    ]

    again = GatewayProcess(config)
    await again.start()
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.get(again.url + "/usage", headers={"Authorization": f"Bearer {key}"}) as resp,
        ):
            assert resp.status == 200
            usage = await resp.json()
        again.signal(signal.SIGTERM)
    finally:
        code, stderr = await again.stop()
    assert code == 0, stderr
    assert usage["total_requests"] == 1
    assert usage["breakdown"]["demo/echo"]["requests"] == 1
    assert usage["total_cost"] == pytest.approx(expected_cost, abs=1e-9) and expected_cost > 0


# (provider's fake, model, $ per million in / out, recording, events that open the stream,
# the content event repeated until the client goes away, the text that event carries)
CUT_STREAMS = [
    ("openai", "openai/gpt-4o", 2.5, 10.0, "openai/chat-stream-text.sse", 1, 2, " unable"),
    ("anthropic", "anthropic/claude-haiku", 1.0, 5.0, "anthropic/stream-text-basic.sse", 3, 4,
     " there"),
    ("gemini", "google/gemini-flash", 0.1, 0.4,
     "gemini/firebase_googleai_streaming-success-basic-reply-short.sse", 1, 1,
     " capital of Wyoming"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("fake", "model", "price_in", "price_out", "fixture", "opening", "repeated", "text"),
    CUT_STREAMS,
    ids=[c[0] for c in CUT_STREAMS],
)
async def test_a_stream_the_client_cuts_is_billed_for_what_was_streamed(
    gateway: Gateway,
    fake: str,
    model: str,
    price_in: float,
    price_out: float,
    fixture: str,
    opening: int,
    repeated: int,
    text: str,
) -> None:
    """No provider sends its final count before the end: the completion tokens are estimated
    from the text streamed so far (at least 1 per 4 characters; Anthropic's message_start and
    Gemini's early chunks carry partial counts that must not win), and billed."""
    recorded = sse_events(fixture_bytes(fixture))
    upstream_chars = 0

    async def endless(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        nonlocal upstream_chars
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in recorded[:opening]:
            await response.write(event)
        for _ in range(2_000):
            await response.write(recorded[repeated])
            upstream_chars += len(text)
            await asyncio.sleep(0.01)
        raise AssertionError("the gateway never hung up")

    getattr(gateway.fakes, fake).next_behaviour(endless)
    received = ""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.base_url + "/chat/completions",
            json={"model": model, "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert resp.status == 200
        while len(received) < 40 * len(text):
            line = await resp.content.readline()
            if line.startswith(b"data: {"):
                for choice in json.loads(line[6:])["choices"]:
                    received += choice["delta"].get("content") or ""
        resp.close()  # the client goes away mid-stream

    [record] = await gateway.records_once_written(lambda r: r.endpoint == "chat")
    assert (record.status, record.outcome, record.stream) == (499, "client_closed", True)
    assert record.prompt_tokens > 0
    # what the client got, at least, and no more than what the upstream sent (+1: Gemini's
    # opening event carries text too)
    assert len(received) // 4 <= record.completion_tokens <= (upstream_chars + 3) // 4 + 1
    expected = (record.prompt_tokens * price_in + record.completion_tokens * price_out) / 1e6
    assert record.cost == pytest.approx(expected, abs=1e-9)
    assert record.cost > 0


async def test_the_answer_leaves_before_its_accounting_is_done(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the usage record, metrics and log line come after the answer is handed to the socket:
    # an accounting step that blocks the loop for a second does not delay the client
    from gateway import app as app_module

    account = app_module._account
    in_flight = []

    def slow_account(*args: Any) -> None:
        in_flight.append(len(args[2].in_flight))  # still counted, for a drain to wait on
        time.sleep(1.0)
        account(*args)

    monkeypatch.setattr(app_module, "_account", slow_account)
    gateway = await make_gateway()
    client = gateway.client()

    def ask() -> float:
        started = time.perf_counter()
        client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
        return time.perf_counter() - started

    await asyncio.to_thread(ask)  # the SDK's first call sets itself up: seconds, here
    await gateway.records_once_written()
    assert await asyncio.to_thread(ask) < 0.8

    async def both_recorded() -> list[Any]:
        while len(records := await gateway.records()) < 2:
            await asyncio.sleep(0.05)
        return records

    records = await asyncio.wait_for(both_recorded(), 5)
    assert [(r.status, r.outcome) for r in records] == [(200, "ok")] * 2
    assert in_flight == [1, 1] and gateway.state.in_flight == {}


async def test_a_bug_in_accounting_is_logged_and_the_request_leaves_the_in_flight_set(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from gateway import app as app_module

    def broken(*args: Any) -> None:
        raise RuntimeError("a bug")

    monkeypatch.setattr(app_module, "_account", broken)
    gateway = await make_gateway()
    answer = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES
    )
    assert answer.choices
    await asyncio.sleep(0.05)  # the accounting callback's turn
    assert gateway.state.in_flight == {}
    [logged] = [r for r in caplog.records if r.getMessage().startswith("accounting failed")]
    assert logged.exc_info is not None and "a bug" in str(logged.exc_info[1])


async def records_of_a_broken_models_call(
    make_gateway: MakeGateway,
    monkeypatch: pytest.MonkeyPatch,
    after_admission: Callable[[web.Request], Awaitable[None]],
) -> list[UsageRecord]:
    """GET /v1/models, whose handler admits the key and then runs `after_admission`, which
    must end the client's call with a cut connection; the usage records it left."""
    from gateway import handlers

    admit = handlers.admit

    async def broken(request: web.Request) -> web.StreamResponse:
        _, principal = handlers.authenticate(request)
        await admit(request, principal, None, {}, "models")
        await after_admission(request)
        raise AssertionError("after_admission must raise")

    broken.__name__ = "list_models"
    monkeypatch.setattr(handlers, "list_models", broken)
    gateway = await make_gateway()
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientError):
            resp = await session.get(
                gateway.base_url + "/models", headers={"Authorization": f"Bearer {CLIENT_KEY}"}
            )
            await resp.read()
    return await gateway.records_once_written()


async def test_a_client_gone_while_the_gateway_writes_is_recorded_as_499(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    # e.g. a keep-alive comment written to a client that left while the upstream thought:
    # the write fails with ConnectionResetError on a closing transport
    async def gone(request: web.Request) -> None:
        assert request.transport is not None
        request.transport.close()
        raise ConnectionResetError("Cannot write to closing transport")

    records = await records_of_a_broken_models_call(make_gateway, monkeypatch, gone)
    # (aiohttp's client may try the GET once more on a new connection)
    assert {(r.endpoint, r.status, r.outcome) for r in records} == {
        ("models", 499, "client_closed")
    }
    # a client leaving is routine: no error (aiohttp's "Error handling request") in the log
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


async def test_a_bug_after_the_answer_began_is_recorded_as_an_internal_error(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # the status is out, so the client's connection is cut; the record must not say "ok"
    async def begun_then_broken(request: web.Request) -> None:
        response = web.StreamResponse()
        await response.prepare(request)
        await response.write(b'{"object": "li')
        raise RuntimeError("a bug")

    records = await records_of_a_broken_models_call(make_gateway, monkeypatch, begun_then_broken)
    assert {(r.endpoint, r.status, r.outcome) for r in records} == {
        ("models", 500, "internal_error")
    }


def cache_priced(fakes: Fakes) -> str:
    """One model per provider kind at the same prices, cache reads and writes priced apart."""
    prices = "price_in = 3.0, price_out = 15.0, price_cache_read = 0.3, price_cache_write = 3.75"
    return "".join(
        f"""
[[providers]]
name = "cache-{kind}"
kind = "{kind}"
base_url = "{fakes.urls[fake]}/{version}"
api_key = "{UPSTREAM_KEY}"
models = [{{ id = "m", upstream = "{upstream}", {prices} }}]
"""
        for kind, fake, version, upstream in (
            ("openai", "openai", "v1", "gpt-4o-2024-08-06"),
            ("anthropic", "anthropic", "v1", "claude-haiku-4-5"),
            ("gemini", "gemini", "v1beta", "gemini-2.5-flash"),
        )
    )


def openai_with_cache() -> dict[str, Any]:
    body = recorded_completions()[0]
    body["usage"] = {
        "prompt_tokens": 12_000,
        "completion_tokens": 2_000,
        "total_tokens": 14_000,
        "prompt_tokens_details": {"cached_tokens": 10_000, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 1_500, "audio_tokens": 0},
    }
    return body


def anthropic_with_cache() -> dict[str, Any]:
    body: dict[str, Any] = snapshot("sdk-http_nonstream-tool-use-roundtrip.json")[0]["response"][
        "body"
    ]
    body["usage"].update(
        {
            "input_tokens": 597,
            "cache_read_input_tokens": 20_000,
            "cache_creation_input_tokens": 4_000,
        }
    )
    return body


def gemini_with_cache() -> dict[str, Any]:
    body: dict[str, Any] = json.loads(
        fixture_bytes("gemini/firebase_googleai_unary-success-thinking-function-call.json")
    )
    # recorded: promptTokenCount 38, candidatesTokenCount 8, thoughtsTokenCount 501
    body["usageMetadata"].update({"promptTokenCount": 9_000, "cachedContentTokenCount": 8_000})
    return body


# (provider, the recorded answer with cache fields set, then what the record must hold:
# prompt (all input), completion (reasoning included), cache reads, cache writes, reasoning,
# and the cost at 3.00 in / 0.30 cache read / 3.75 cache write / 15.00 out per million)
CACHE_CASES = [
    # 2,000 uncached x 3 + 10,000 read x 0.3 + 2,000 out x 15 = 39,000 micro
    ("openai", openai_with_cache, 12_000, 2_000, 10_000, 0, 1_500, "0.039"),
    # 597 uncached x 3 + 20,000 read x 0.3 + 4,000 written x 3.75 + 71 out x 15 = 23,856 micro
    ("anthropic", anthropic_with_cache, 24_597, 71, 20_000, 4_000, 0, "0.023856"),
    # 1,000 uncached x 3 + 8,000 read x 0.3 + (8 + 501 thoughts) out x 15 = 13,035 micro
    ("gemini", gemini_with_cache, 9_000, 509, 8_000, 0, 501, "0.013035"),
]


@pytest.mark.parametrize(
    ("kind", "answer", "prompt", "completion", "cached", "cache_write", "reasoning", "cost"),
    CACHE_CASES,
    ids=[c[0] for c in CACHE_CASES],
)
async def test_cache_and_reasoning_tokens_of_every_provider_are_recorded_and_priced(
    make_gateway: MakeGateway,
    fakes: Fakes,
    kind: str,
    answer: Callable[[], dict[str, Any]],
    prompt: int,
    completion: int,
    cached: int,
    cache_write: int,
    reasoning: int,
    cost: str,
) -> None:
    gateway = await make_gateway(extra=cache_priced(fakes))
    getattr(fakes, kind).next_json(200, answer())
    await gateway.aclient().chat.completions.create(model=f"cache-{kind}/m", messages=MESSAGES)

    [record] = [r for r in await gateway.records() if r.endpoint == "chat"]
    assert (record.status, record.provider, record.model) == (
        200,
        f"cache-{kind}",
        f"cache-{kind}/m",
    )
    assert (
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.cache_write_tokens,
        record.reasoning_tokens,
    ) == (prompt, completion, cached, cache_write, reasoning)
    assert Decimal(str(record.cost)) == Decimal(cost)
    path = gateway.state.config.storage.path
    with sqlite3.connect(path) as conn:
        row = conn.execute(
            "SELECT cached_tokens, cache_write_tokens, reasoning_tokens, cost_nano FROM usage"
            " WHERE endpoint = 'chat'"
        ).fetchone()
    assert row == (cached, cache_write, reasoning, int(Decimal(cost) * NANO))

    status, usage = await get(gateway, "/v1/usage", CLIENT_KEY)
    assert status == 200
    model = usage["breakdown"][f"cache-{kind}/m"]
    assert (model["cached_tokens"], model["cache_write_tokens"], model["reasoning_tokens"]) == (
        cached,
        cache_write,
        reasoning,
    )
    assert Decimal(str(model["cost"])) == Decimal(cost)


def edited_stream(fixture: str, *edits: tuple[str, str]) -> list[bytes]:
    raw = fixture_bytes(fixture)
    for old, new in edits:
        assert old.encode() in raw, old
        raw = raw.replace(old.encode(), new.encode())
    return sse_events(raw)


# the same, streamed: the counts come in the final chunk (OpenAI), in message_start and
# message_delta (Anthropic), or in every chunk (Gemini)
STREAMED_CACHE_CASES = [
    (
        "openai",
        "openai/chat-stream-include-usage-text-after-tool.sse",
        [
            ('"prompt_tokens":78,"completion_tokens":9,"total_tokens":87', '"prompt_tokens":12000,"completion_tokens":2000,"total_tokens":14000'),
            ('"cached_tokens":0', '"cached_tokens":10000'),
            ('"reasoning_tokens":0', '"reasoning_tokens":1500'),
        ],
        (12_000, 2_000, 10_000, 0, 1_500),
        "0.039",
    ),
    (
        # 11 uncached x 3 + 20,000 x 0.3 + 4,000 x 3.75 + 6 out x 15 = 21,123 micro
        "anthropic",
        "anthropic/stream-text-basic.sse",
        [('"input_tokens":11,', '"input_tokens":11,"cache_creation_input_tokens":4000,"cache_read_input_tokens":20000,')],
        (24_011, 6, 20_000, 4_000, 0),
        "0.021123",
    ),
    (
        # 8 uncached x 3 + 10 x 0.3 + (80 + 35 thoughts) out x 15 = 1,752 micro
        "gemini",
        "gemini/stream-text-usage-mid-stream.sse",
        [('"promptTokenCount": 18,', '"promptTokenCount": 18,"cachedContentTokenCount": 10,')],
        (18, 115, 10, 0, 35),
        "0.001752",
    ),
]  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "fixture", "edits", "tokens", "cost"),
    STREAMED_CACHE_CASES,
    ids=[c[0] for c in STREAMED_CACHE_CASES],
)
async def test_cache_and_reasoning_tokens_of_streams_are_recorded_and_priced(
    make_gateway: MakeGateway,
    fakes: Fakes,
    kind: str,
    fixture: str,
    edits: list[tuple[str, str]],
    tokens: tuple[int, int, int, int, int],
    cost: str,
) -> None:
    gateway = await make_gateway(extra=cache_priced(fakes))
    getattr(fakes, kind).next_stream(events=edited_stream(fixture, *edits))
    stream = await gateway.aclient().chat.completions.create(
        model=f"cache-{kind}/m", messages=MESSAGES, stream=True
    )
    async for _ in stream:
        pass

    [record] = [r for r in await gateway.records() if r.endpoint == "chat"]
    assert (record.status, record.outcome, record.stream) == (200, "ok", True)
    assert (
        record.prompt_tokens,
        record.completion_tokens,
        record.cached_tokens,
        record.cache_write_tokens,
        record.reasoning_tokens,
    ) == tokens
    assert Decimal(str(record.cost)) == Decimal(cost)


async def test_admin_api_errors_say_status_type_code_and_param(
    make_gateway: MakeGateway, fakes: Fakes
) -> None:
    """Each way the admin API refuses a request, as the OpenAI envelope with its own code."""
    gateway = await make_gateway(extra=priced(fakes))
    assert (await post(gateway, "/admin/keys", ADMIN_KEY, {"id": "taken"}))[0] == 201
    assert (await post(gateway, "/admin/keys/taken/revoke", ADMIN_KEY))[0] == 200
    bad = "invalid_request_error"
    cases: list[tuple[str, dict[str, Any] | None, int, str, str, str | None]] = [
        ("/admin/keys", {"id": "taken"}, 400, bad, "key_exists", "id"),
        ("/admin/keys", {"id": "test"}, 400, bad, "invalid_request", "id"),  # a config key
        ("/admin/keys", {"id": "x", "models": "openai/*"}, 400, bad, "invalid_request", "models"),
        ("/admin/keys", {"id": "x", "tier": 7}, 400, bad, "invalid_request", "tier"),
        ("/admin/keys", {"id": "x", "tier": "gold"}, 400, bad, "invalid_request", "tier"),
        ("/admin/keys", {"id": "x", "description": 1}, 400, bad, "invalid_request", "description"),
        ("/admin/keys", {"id": "x", "description": "d" * 201}, 400, bad, "invalid_request",
         "description"),
        ("/admin/keys/nobody/revoke", None, 404, bad, "key_not_found", "key_id"),
        ("/admin/keys/nobody/rotate", None, 404, bad, "key_not_found", "key_id"),
        ("/admin/keys/taken/rotate", None, 404, bad, "key_not_found", "key_id"),  # revoked
        ("/admin/keys/test/rotate", None, 400, bad, "invalid_request", "key_id"),  # config key
        ("/admin/keys/taken/rotate", {"grace_seconds": "1h"}, 400, bad, "invalid_request",
         "grace_seconds"),
        ("/admin/keys/taken/rotate", {"grace_seconds": -1}, 400, bad, "invalid_request",
         "grace_seconds"),
    ]  # fmt: skip
    for path, body, status, type_, code, param in cases:
        got, answer = await post(gateway, path, ADMIN_KEY, body)
        error = answer["error"]
        assert (got, error["type"], error["code"], error["param"]) == (
            status,
            type_,
            code,
            param,
        ), (
            path,
            body,
            answer,
        )
    for key in (CLIENT_KEY, "wrong"):
        got, answer = await get(gateway, "/admin/keys", key)
        assert (got, answer["error"]["type"], answer["error"]["code"]) == (
            401,
            "invalid_request_error",
            "invalid_api_key",
        )
