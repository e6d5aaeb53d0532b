from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway import config as config_module
from gateway.accesslog import AccessLog
from gateway.app import build
from gateway.auth import hash_key, new_key
from gateway.runtime import STATE, GatewayState
from gateway.usage import UsageRecord

from .fakes.anthropic_upstream import FakeAnthropic
from .fakes.base import UPSTREAM_KEY, FakeUpstream
from .fakes.gemini_upstream import FakeGemini
from .fakes.openai_upstream import FakeOpenAI

CLIENT_KEY = new_key()
DEMO_ONLY_KEY = new_key()


@dataclass
class Fakes:
    openai: FakeOpenAI
    anthropic: FakeAnthropic
    gemini: FakeGemini
    urls: dict[str, str]

    def all(self) -> list[FakeUpstream]:
        return [self.openai, self.anthropic, self.gemini]


def gateway_toml(
    urls: dict[str, str],
    extra: str = "",
    server: str = "request_timeout = 5\nretries = 0",
    db: str = "gateway-test.db",
) -> str:
    return f"""
[server]
{server}

[storage]
path = "{db}"
flush_interval = 0.05

[[providers]]
name = "openai"
kind = "openai"
base_url = "{urls["openai"]}/v1"
api_key = "{UPSTREAM_KEY}"
models = [
  {{ id = "gpt-4o", upstream = "gpt-4o-2024-08-06", context_window = 128000, max_tokens = 16384, price_in = 2.5, price_out = 10.0, capabilities = ["chat", "tools", "vision", "json"] }},
  {{ id = "text-embedding-3-small", context_window = 8191, price_in = 0.02, capabilities = ["embeddings"] }},
  {{ id = "gpt-image-1", capabilities = ["images"] }},
  {{ id = "tts-1", capabilities = ["speech"] }},
]

[[providers]]
name = "anthropic"
kind = "anthropic"
base_url = "{urls["anthropic"]}/v1"
api_key = "{UPSTREAM_KEY}"
models = [
  {{ id = "claude-haiku", upstream = "claude-haiku-4-5", context_window = 200000, max_tokens = 1024, price_in = 1.0, price_out = 5.0, capabilities = ["chat", "tools", "vision", "json"] }},
  {{ id = "claude-sonnet", upstream = "claude-sonnet-4-5", context_window = 200000, capabilities = ["chat", "tools", "vision", "json"] }},
]

[[providers]]
name = "google"
kind = "gemini"
base_url = "{urls["gemini"]}/v1beta"
api_key = "{UPSTREAM_KEY}"
models = [
  {{ id = "gemini-flash", upstream = "gemini-2.0-flash", context_window = 1000000, max_tokens = 8192, price_in = 0.1, price_out = 0.4, capabilities = ["chat", "tools", "vision", "json"] }},
  {{ id = "gemini-pro", upstream = "gemini-3-pro-preview", context_window = 1000000, capabilities = ["chat", "tools", "vision", "json"] }},
  {{ id = "embedding", upstream = "gemini-embedding-001", capabilities = ["embeddings"] }},
]

[[providers]]
name = "demo"
kind = "demo"
models = [
  {{ id = "echo", context_window = 8192, max_tokens = 1024, price_in = 1.0, price_out = 2.0 }},
  {{ id = "embed", capabilities = ["embeddings"] }},
]

[aliases]
"gpt-4" = ["openai/gpt-4o", "demo/echo"]

[[keys]]
id = "test"
hash = "{hash_key(CLIENT_KEY)}"

[[keys]]
id = "demo-only"
hash = "{hash_key(DEMO_ONLY_KEY)}"
models = ["demo/*"]
{extra}
"""


@dataclass
class Gateway:
    server: TestServer
    fakes: Fakes
    clients: list[openai.OpenAI | openai.AsyncOpenAI] = field(default_factory=list)

    @property
    def fake(self) -> FakeOpenAI:
        return self.fakes.openai

    @property
    def anthropic(self) -> FakeAnthropic:
        return self.fakes.anthropic

    @property
    def gemini(self) -> FakeGemini:
        return self.fakes.gemini

    @property
    def url(self) -> str:
        return str(self.server.make_url("")).rstrip("/")

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def client(self, key: str = CLIENT_KEY, **kw: object) -> openai.OpenAI:
        """A sync SDK client (call it from a thread: the gateway runs on the test's loop)."""
        kw.setdefault("max_retries", 0)
        client = openai.OpenAI(base_url=self.base_url, api_key=key, **kw)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    def aclient(self, key: str = CLIENT_KEY, **kw: object) -> openai.AsyncOpenAI:
        kw.setdefault("max_retries", 0)
        client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, **kw)  # type: ignore[arg-type]
        self.clients.append(client)
        return client

    @property
    def state(self) -> GatewayState:
        return self.server.app[STATE]

    async def records(self) -> list[UsageRecord]:
        """Every usage record so far (after flushing the write-behind queue)."""
        assert await self.state.usage.flush()
        return await self.state.usage.backend.records()

    async def records_once_written(
        self, where: Callable[[UsageRecord], bool] = lambda _: True, timeout: float = 5.0
    ) -> list[UsageRecord]:
        """The records `where` picks, once there are any: a request the client left is
        recorded when its handler has ended, a moment after the client is gone."""
        deadline = time.monotonic() + timeout
        while not (records := [r for r in await self.records() if where(r)]):
            assert time.monotonic() < deadline, "no usage record was written"
            await asyncio.sleep(0.05)
        return records

    async def close_clients(self) -> None:
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fakes(aiohttp_server) -> AsyncIterator[Fakes]:  # type: ignore[no-untyped-def]
    found = Fakes(FakeOpenAI(), FakeAnthropic(), FakeGemini(), {})
    for name in ("openai", "anthropic", "gemini"):
        server = await aiohttp_server(getattr(found, name).app())
        found.urls[name] = str(server.make_url("")).rstrip("/")
    yield found
    # every request the gateway sent must have been valid for its provider
    for fake in found.all():
        assert fake.violations == [], fake.violations


@pytest.fixture
async def make_gateway(aiohttp_server, fakes: Fakes, tmp_path) -> AsyncIterator[MakeGateway]:  # type: ignore[no-untyped-def]
    made: list[Gateway] = []

    async def make(
        extra: str = "",
        server: str = "request_timeout = 5\nretries = 0",
        toml: str | None = None,
        openai_url: str | None = None,
    ) -> Gateway:
        """A gateway in front of the fake upstreams; `server` holds [server] lines."""
        urls = dict(fakes.urls)
        if openai_url:
            urls["openai"] = openai_url
        db = tmp_path / f"usage-{len(made)}.db"
        text = toml if toml is not None else gateway_toml(urls, extra, server, str(db))
        source = tmp_path / f"gateway-{len(made)}.toml"
        source.write_text(text)  # so that a test can edit it and reload
        config = config_module.load(source)
        app_server = await aiohttp_server(build(config, access_log=AccessLog(devnull)))
        made.append(Gateway(app_server, fakes))
        return made[-1]

    devnull = os.open(os.devnull, os.O_WRONLY)
    yield make
    for gw in made:
        await gw.close_clients()
    os.close(devnull)


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()
