from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import openai
import pytest
from aiohttp.test_utils import TestServer

from gateway import config as config_module
from gateway.app import build
from gateway.auth import hash_key, new_key

from .fakes.openai_upstream import UPSTREAM_KEY, FakeOpenAI

CLIENT_KEY = new_key()
DEMO_ONLY_KEY = new_key()


def gateway_toml(openai_url: str, extra: str = "", server: str = "request_timeout = 5") -> str:
    return f"""
[server]
{server}

[[providers]]
name = "openai"
kind = "openai"
base_url = "{openai_url}/v1"
api_key = "{UPSTREAM_KEY}"
models = [
  {{ id = "gpt-4o", upstream = "gpt-4o-2024-08-06", context_window = 128000, max_tokens = 16384, price_in = 2.5, price_out = 10.0, capabilities = ["chat", "tools", "vision", "json"] }},
  {{ id = "text-embedding-3-small", context_window = 8191, price_in = 0.02, capabilities = ["embeddings"] }},
  {{ id = "gpt-image-1", capabilities = ["images"] }},
  {{ id = "tts-1", capabilities = ["speech"] }},
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
    fake: FakeOpenAI
    clients: list[openai.OpenAI | openai.AsyncOpenAI] = field(default_factory=list)

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

    async def close_clients(self) -> None:
        for client in self.clients:
            if isinstance(client, openai.AsyncOpenAI):
                await client.close()
            else:
                client.close()


MakeGateway = Callable[..., Awaitable[Gateway]]


@pytest.fixture
async def fake_openai(aiohttp_server) -> tuple[FakeOpenAI, TestServer]:  # type: ignore[no-untyped-def]
    fake = FakeOpenAI()
    server = await aiohttp_server(fake.app())
    return fake, server


@pytest.fixture
async def make_gateway(aiohttp_server, fake_openai) -> AsyncIterator[MakeGateway]:  # type: ignore[no-untyped-def]
    fake, fake_server = fake_openai
    fake_url = str(fake_server.make_url("")).rstrip("/")

    made: list[Gateway] = []

    async def make(
        extra: str = "",
        server: str = "request_timeout = 5",
        toml: str | None = None,
        openai_url: str | None = None,
    ) -> Gateway:
        """A gateway in front of the fake upstream; `server` holds [server] lines."""
        text = toml if toml is not None else gateway_toml(openai_url or fake_url, extra, server)
        config = config_module.loads(text)
        server = await aiohttp_server(build(config))
        made.append(Gateway(server, fake))
        return made[-1]

    yield make
    for gw in made:
        await gw.close_clients()


@pytest.fixture
async def gateway(make_gateway: MakeGateway) -> Gateway:
    return await make_gateway()
