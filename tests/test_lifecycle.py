"""The gateway as a real process: reload on SIGHUP and drain on SIGTERM, with streams in flight."""

from __future__ import annotations

import asyncio
import signal
import sqlite3
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.auth import hash_key, new_key

from .fakes.base import UPSTREAM_KEY, fixture_bytes, sse_events
from .fakes.openai_upstream import recorded_completions
from .test_cli import free_port

ROOT = Path(__file__).parent.parent
KEY = new_key()
EVENTS = sse_events(fixture_bytes("openai/chat-stream-include-usage-text-after-tool.sse"))


def config_text(upstream: str, db: Path, keys: list[tuple[str, str]]) -> str:
    blocks = "".join(f'\n[[keys]]\nid = "{i}"\nhash = "{hash_key(k)}"\n' for i, k in keys)
    return f"""
[server]
shutdown_timeout = 20

[storage]
path = "{db}"

[[providers]]
name = "openai"
kind = "openai"
base_url = "{upstream}/v1"
api_key = "{UPSTREAM_KEY}"
models = [{{ id = "gpt-4o" }}]
{blocks}"""


@pytest.fixture
async def slow_upstream(aiohttp_server) -> TestServer:  # type: ignore[no-untyped-def]
    """An OpenAI-format upstream whose streams take about a second (a recorded stream, slowed)."""

    async def chat(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response(recorded_completions()[0])
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for event in EVENTS:
            await response.write(event)
            await asyncio.sleep(0.08)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    server: TestServer = await aiohttp_server(app)
    return server


class GatewayProcess:
    def __init__(self, config: Path) -> None:
        self.port = free_port()
        self.config = config
        self.proc: asyncio.subprocess.Process | None = None
        self.url = f"http://127.0.0.1:{self.port}/v1"

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "gateway",
            "--config",
            str(self.config),
            "--port",
            str(self.port),
            cwd=ROOT,
            stderr=subprocess.PIPE,
        )
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            except OSError:
                await asyncio.sleep(0.05)
        raise AssertionError("gateway did not start")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    async def stop(self, timeout: float = 25) -> tuple[int, str]:
        """Wait for the process to exit (killing it after `timeout`); its code and stderr."""
        assert self.proc is not None and self.proc.stderr is not None
        try:
            code = await asyncio.wait_for(self.proc.wait(), timeout=timeout)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
            code = -9
        stderr = await self.proc.stderr.read()
        return code, stderr.decode()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def chat(
    session: aiohttp.ClientSession, url: str, key: str, stream: bool = False
) -> tuple[int, bytes]:
    body: dict[str, Any] = {
        "model": "openai/gpt-4o",
        "messages": [{"role": "user", "content": "hi"}],
    }
    if stream:
        body["stream"] = True
    async with session.post(
        url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        return resp.status, await resp.read()


async def test_reload_keeps_streams_and_adds_keys(
    tmp_path: Path, slow_upstream: TestServer, session: aiohttp.ClientSession
) -> None:
    upstream = str(slow_upstream.make_url("")).rstrip("/")
    db = tmp_path / "usage.db"
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(upstream, db, [("first", KEY)]))
    gw = GatewayProcess(config)
    await gw.start()
    try:
        newcomer = new_key()
        assert (await chat(session, gw.url, newcomer))[0] == 401
        in_flight = asyncio.ensure_future(chat(session, gw.url, KEY, stream=True))
        await asyncio.sleep(0.2)
        config.write_text(config_text(upstream, db, [("first", KEY), ("second", newcomer)]))
        gw.signal(signal.SIGHUP)
        for _ in range(100):
            if (await chat(session, gw.url, newcomer))[0] == 200:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the new key never worked")
        status, raw = await in_flight
        assert status == 200 and raw.endswith(b"data: [DONE]\n\n")  # it survived the reload

        config.write_text("[server\nthis is not toml")
        gw.signal(signal.SIGHUP)
        await asyncio.sleep(0.5)
        assert (await chat(session, gw.url, newcomer))[0] == 200  # the old config still serves
        gw.signal(signal.SIGTERM)
    finally:
        code, stderr = await gw.stop()
    assert code == 0, stderr
    assert "reload refused, still serving the previous config" in stderr
    assert KEY not in stderr and newcomer not in stderr


async def test_sigterm_drains_open_streams(
    tmp_path: Path, slow_upstream: TestServer, session: aiohttp.ClientSession
) -> None:
    upstream = str(slow_upstream.make_url("")).rstrip("/")
    db = tmp_path / "usage.db"
    config = tmp_path / "gateway.toml"
    config.write_text(config_text(upstream, db, [("drain", KEY)]))
    gw = GatewayProcess(config)
    await gw.start()
    started = asyncio.Event()
    opened = 0

    async def one_stream() -> bytes:
        nonlocal opened
        body = {
            "model": "openai/gpt-4o",
            "messages": [{"role": "user", "content": "hi"}],
            "stream": True,
        }
        async with session.post(
            gw.url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
        ) as resp:
            first = await resp.content.readline()
            opened += 1
            if opened == 50:
                started.set()
            return first + await resp.read()

    try:
        streams = [asyncio.ensure_future(one_stream()) for _ in range(50)]
        await asyncio.wait_for(started.wait(), timeout=20)
        gw.signal(signal.SIGTERM)
        results = await asyncio.wait_for(asyncio.gather(*streams), timeout=30)
    finally:
        code, stderr = await gw.stop()
    assert code == 0, stderr
    assert all(r.endswith(b"data: [DONE]\n\n") for r in results)
    with sqlite3.connect(db) as conn:
        rows = conn.execute("SELECT status, outcome, stream FROM usage").fetchall()
    assert rows == [(200, "ok", 1)] * 50
