"""The gateway's state: what is built from one config (``Runtime``) and what outlives reloads.

A request takes ``state.runtime`` once, when it arrives, and keeps that object to its end, so a
reload (which swaps ``state.runtime``) never changes a request half-way. The old runtime's
connection pools are closed once its last request is done. The limiter, the breakers and the
usage store belong to ``GatewayState`` and survive reloads, so consumed quotas do too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from typing import TYPE_CHECKING

from aiohttp import web

from . import config as config_module
from .auth import KeyRecords, KeyStore
from .config import Config
from .exchange import Exchange
from .limits import KeyStreak, Limiter

if TYPE_CHECKING:
    from .cluster import RedisLimiter
from .metrics import Metrics
from .resilience import Backoff, Breakers
from .router import Router
from .upstream import Upstream, make_upstream
from .usage import TierState, UsageRecorder

log = logging.getLogger("gateway")

# How often the database is asked whether keys changed (from the CLI or another process).
KEY_POLL_INTERVAL = 2.0


class Runtime:
    """Everything built from one config: key store, router, upstream connections."""

    def __init__(self, config: Config, records: KeyRecords) -> None:
        self.config = config
        self.keys = KeyStore(config, records)
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
    # the serving loop, set by start(): the request path takes it from here, not from
    # asyncio.get_running_loop(), which makes a getpid() system call on every call (3.11)
    loop: asyncio.AbstractEventLoop

    def __init__(self, config: Config) -> None:
        self.records = KeyRecords()
        self.runtime = Runtime(config, self.records)
        s = config.server
        self.breakers = Breakers(s.breaker_failures, s.breaker_cooldown)
        self.limiter = Limiter(config.limits)
        self.usage = UsageRecorder(config.storage)
        self.cluster: RedisLimiter | None = None
        if config.cluster.redis_url:
            from .cluster import RedisLimiter  # Redis is imported only when configured

            self.cluster = RedisLimiter(
                config.cluster, self.limiter, config.limits.day_reset_hour, self.usage
            )
        self.metrics = Metrics()
        self.in_flight: dict[int, Exchange] = {}  # what the dashboard shows as live
        self.started_at = time.time()
        self.reloads = 0
        self._keys_generation = -1
        self._next_key_change: float | None = None  # when a grace or an expiry ends next
        self._tasks: list[asyncio.Task[None]] = []

    @property
    def config(self) -> Config:
        return self.runtime.config

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        await self.runtime.start()
        await self.usage.start()
        if self.cluster is not None:
            await self.cluster.start()
        await self.load_keys()
        await self._restore_limits()
        self._tasks = [
            asyncio.ensure_future(self._watch_keys()),
            asyncio.ensure_future(self._daily_rollover()),
        ]

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await self.runtime.close()
        if self.cluster is not None:
            await self.cluster.close()
        await self.usage.close()

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
        if config.cluster != self.config.cluster:
            log.warning("reload: [cluster] changes take effect after a restart")
        new = Runtime(config, self.records)
        try:
            await new.start()
        except Exception:
            log.exception("reload refused: could not start the new config's upstreams")
            await new.close()
            return False
        old, self.runtime = self.runtime, new
        self.breakers.reconfigure(config.server.breaker_failures, config.server.breaker_cooldown)
        self.limiter.reconfigure(config.limits)
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

    async def load_keys(self) -> None:
        """Read managed keys, revocations and earned tiers, and rebuild the key store."""
        backend = self.usage.backend
        self._keys_generation = await backend.keys_generation()
        self._next_key_change = await backend.next_key_change()
        self.records = KeyRecords(
            managed=await backend.valid_keys(),
            revoked=await backend.revoked_ids(),
            tiers=await backend.tier_states(),
        )
        self.runtime.keys = KeyStore(self.config, self.records)
        for key_id in self.records.revoked:
            self.limiter.forget(key_id)

    async def _restore_limits(self) -> None:
        """Give the limiter back today's requests and tokens and the period's spend."""
        day = self.limiter.period_start("day") or 0.0
        since = {p: self.limiter.period_start(p) or 0.0 for p in ("day", "month", "total")}
        counters = {
            period: await self.usage.backend.restore_counters(day, start)
            for period, start in since.items()
        }
        for p in self.runtime.keys.principals():
            c = counters[p.limits.budget_period].get(p.key_id)
            if c is not None:
                self.limiter.restore(
                    p.key_id,
                    day_requests=c.requests_today,
                    day_tokens=c.tokens_today,
                    period_cost=c.cost,
                    budget_period=p.limits.budget_period,
                )
        for state in self.records.tiers.values():
            if state.last_day:
                streak = KeyStreak(state.clean_days, date.fromisoformat(state.last_day))
                self.limiter.restore_streak(state.key_id, streak)

    async def _watch_keys(self) -> None:
        """Pick up keys created, rotated or revoked by another process (the CLI), and stop
        accepting a rotated key's old secret, or an expiring key, the moment its time is up."""
        while True:
            await asyncio.sleep(self._until_key_check())
            try:
                change = self._next_key_change
                due = change is not None and change <= self.usage.clock()
                if due or await self.usage.backend.keys_generation() != self._keys_generation:
                    await self.load_keys()
            except Exception:
                log.exception("could not read keys from the usage database")
                await asyncio.sleep(KEY_POLL_INTERVAL)

    def _until_key_check(self) -> float:
        """Seconds to the next poll, or sooner to the next grace end or expiry."""
        if self._next_key_change is None:
            return KEY_POLL_INTERVAL
        return min(KEY_POLL_INTERVAL, max(self._next_key_change - self.usage.clock(), 0.0))

    async def _daily_rollover(self) -> None:
        """At each daily reset: move keys up a tier where their record earns it."""
        while True:
            await asyncio.sleep(self.limiter.seconds_until_day_reset() + 1)
            try:
                await self.rollover()
            except Exception:
                log.exception("daily tier rollover failed")

    async def rollover(self) -> None:
        principals = self.runtime.keys.principals()
        tiers = {p.key_id: p.tier for p in principals}
        upgrades = self.limiter.rollover(tiers, self.config.tiers)
        for key_id, old, new in upgrades:
            tiers[key_id] = new
            reason = "automatic upgrade: used without hitting a limit"
            state = TierState(key_id, new, 0, _today(), time.time())
            await self.usage.backend.add_tier_change(key_id, old, new, reason, state=state)
            log.info("key %s moved from tier %s to %s", key_id, old, new)
        for key_id, streak in self.limiter.streaks().items():
            state = TierState(
                key_id, tiers.get(key_id), streak.days, streak.through.isoformat(), time.time()
            )
            await self.usage.backend.set_tier_state(state)
        if upgrades:
            await self.load_keys()


def _today() -> str:
    return datetime.now(UTC).date().isoformat()


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
    await state.start()
    yield
    # aiohttp has let the requests in flight finish (or cancelled them) before this point
    await state.close()
