"""The gateway's state: what is built from one config (``Runtime``) and what outlives reloads.

A request takes ``state.runtime`` once, when it arrives, and keeps that object to its end, so a
reload (which swaps ``state.runtime``) never changes a request half-way. The old runtime's
connection pools are closed once its last request is done.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from . import config as config_module
from .auth import KeyStore
from .config import Config
from .resilience import Backoff, Breakers
from .router import Router
from .upstream import Upstream, make_upstream
from .usage import UsageRecorder

log = logging.getLogger("gateway")


class Runtime:
    """Everything built from one config: key store, router, upstream connections."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.keys = KeyStore(config.keys)
        self.router = Router(config)
        self.backoff = Backoff(config.server.retry_backoff, cap=8.0)
        self.upstreams: dict[str, Upstream] = {
            p.name: make_upstream(p, config.provider_api_key(p), config.server)
            for p in config.active_providers()
        }
        self.requests = 0  # requests in flight on this runtime
        self._retired = False
        self._closed: asyncio.Future[None] | None = None

    async def start(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.start()

    async def close(self) -> None:
        for upstream in self.upstreams.values():
            await upstream.close()

    def enter(self) -> None:
        self.requests += 1

    def leave(self) -> None:
        self.requests -= 1
        if self._retired and self.requests == 0:
            self._close_soon()

    def retire(self) -> None:
        """No new request will use this runtime: close it when the last one is done."""
        self._retired = True
        if self.requests == 0:
            self._close_soon()

    def _close_soon(self) -> None:
        if self._closed is None:
            self._closed = asyncio.ensure_future(self.close())


class GatewayState:
    def __init__(self, config: Config) -> None:
        self.runtime = Runtime(config)
        s = config.server
        self.breakers = Breakers(s.breaker_failures, s.breaker_cooldown)
        self.usage = UsageRecorder(config.storage)
        self.reloads = 0

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def reload(self) -> bool:
        """Read the config file again and switch to it; keep the old one if it is broken."""
        path = self.config.source
        try:
            config = config_module.load(path)
        except config_module.ConfigError as e:
            log.error("reload refused, still serving the previous config: %s", e)
            return False
        if config.storage != self.config.storage:
            log.warning("reload: [storage] changes take effect after a restart")
        new = Runtime(config)
        try:
            await new.start()
        except Exception:
            log.exception("reload refused: could not start the new config's upstreams")
            await new.close()
            return False
        old, self.runtime = self.runtime, new
        self.breakers.reconfigure(config.server.breaker_failures, config.server.breaker_cooldown)
        old.retire()
        self.reloads += 1
        _warn_disabled(config)
        log.info(
            "reloaded %s: %d providers, %d models, %d keys",
            path,
            len(new.upstreams),
            len(new.router.models),
            len(new.keys),
        )
        return True


STATE = web.AppKey("state", GatewayState)


def _warn_disabled(config: Config) -> None:
    active = config.active_providers()
    for p in config.providers:
        if p not in active:
            log.warning(
                "provider %s is disabled: environment variable %s is not set",
                p.name,
                p.api_key_env,
            )


async def state_ctx(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    _warn_disabled(state.config)
    await state.runtime.start()
    await state.usage.start()
    yield
    # aiohttp has let the requests in flight finish (or cancelled them) before this point
    await state.runtime.close()
    await state.usage.close()
