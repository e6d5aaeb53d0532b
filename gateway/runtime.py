"""Everything built from one config: key store, router, upstream connections.

Handlers take ``app[RUNTIME].current`` once at the start of a request and use that object to
the end, so that a reload (which swaps ``current``) never changes a request half-way.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from .auth import KeyStore
from .config import Config
from .router import Router
from .upstream import Upstream, make_upstream

log = logging.getLogger("gateway")


class Runtime:
    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = KeyStore(config.keys)
        self.router = Router(config)
        self.upstreams: dict[str, Upstream] = {
            p.name: make_upstream(p, config.provider_api_key(p), config.server)
            for p in config.active_providers()
        }

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()


class RuntimeHolder:
    """The runtime new requests use; swapped as a whole on reload."""

    def __init__(self, config: Config) -> None:
        self.current = Runtime(config)


RUNTIME = web.AppKey("runtime", RuntimeHolder)


async def runtime_ctx(app: web.Application) -> AsyncIterator[None]:
    holder = app[RUNTIME]
    config = holder.current.config
    for p in config.providers:
        if p not in config.active_providers():
            log.warning(
                "provider %s is disabled: environment variable %s is not set",
                p.name,
                p.api_key_env,
            )
    await holder.current.start()
    yield
    await holder.current.close()
