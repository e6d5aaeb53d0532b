"""SIGTERM past the drain timeout: the streams still running end with a `server_shutdown`
error event, are recorded as such, and the process exits 0 within about the drain timeout."""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.auth import hash_key, new_key

from .fakes.base import UPSTREAM_KEY, fixture_bytes, sse_events
from .test_lifecycle import GatewayProcess

KEY = new_key()
EVENTS = sse_events(fixture_bytes("openai/chat-stream-text.sse"))
DRAIN = 2.0


async def test_streams_still_running_at_the_drain_timeout_get_an_error_event(
    tmp_path: Path, aiohttp_server: Any
) -> None:
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        if body["messages"][0]["content"] == "think":
            await asyncio.sleep(3600)  # never answers: the gateway sends keep-alives
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(EVENTS[0])
        while True:  # a stream that would never end
            await response.write(EVENTS[1])
            await asyncio.sleep(0.05)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    upstream: TestServer = await aiohttp_server(app)
    db = tmp_path / "usage.db"
    config = tmp_path / "gateway.toml"
    config.write_text(f"""
[server]
shutdown_timeout = {DRAIN}
keepalive_interval = 0.1

[storage]
path = "{db}"

[[providers]]
name = "openai"
kind = "openai"
base_url = "{str(upstream.make_url("")).rstrip("/")}/v1"
api_key = "{UPSTREAM_KEY}"
models = [{{ id = "gpt-4o" }}]

[[keys]]
id = "drain"
hash = "{hash_key(KEY)}"
""")
    gw = GatewayProcess(config)
    await gw.start()

    async def one_stream(session: aiohttp.ClientSession, prompt: str) -> bytes:
        body = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": prompt}]}
        async with session.post(
            gw.url + "/chat/completions",
            json={**body, "stream": True},
            headers={"Authorization": f"Bearer {KEY}"},
        ) as resp:
            assert resp.status == 200
            first = await resp.content.readline()
            return first + await resp.read()

    async with aiohttp.ClientSession() as session:
        try:
            streams = [
                asyncio.ensure_future(one_stream(session, prompt))
                for prompt in ("hi", "hi", "think")
            ]
            await asyncio.sleep(0.5)
            signalled = time.monotonic()
            gw.signal(signal.SIGTERM)
            results = await asyncio.wait_for(asyncio.gather(*streams), timeout=10)
        finally:
            code, stderr = await gw.stop(timeout=10)
        took = time.monotonic() - signalled
    assert code == 0, stderr
    assert DRAIN <= took < DRAIN + 1.5, took  # the drain timeout and a short grace, not 2x
    for raw in results:
        last = [e for e in raw.split(b"\n\n") if e][-1]
        error = json.loads(last.removeprefix(b"data: "))["error"]
        assert error["code"] == "server_shutdown"
        assert error["type"] == "server_error"
        assert error["param"] is None
    assert results[2].startswith(b": keep-alive")
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, outcome, stream FROM usage").fetchall()
    assert rows == [(200, "server_shutdown", 1)] * 3
