"""The seam between ``UsageRecorder`` and the database it writes to.

``UsageBackend`` is every store operation as a coroutine. Two implement it:

- ``SqliteBackend`` (here): the synchronous ``UsageStore`` on one dedicated worker thread,
  which owns the SQLite connection, so that the event loop never touches SQLite;
- ``PostgresUsageStore`` (``usage_pg.py``): an asyncpg pool on the event loop, shared by a
  fleet of gateways. asyncpg is imported only when ``[storage] url`` asks for it.

``faults`` names the errors that mean "the database cannot be written now": the recorder keeps
the batch and retries with backoff. Any other error from ``write_batch`` loses the batch.
"""

from __future__ import annotations

import asyncio
import functools
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import date
from typing import Concatenate, ParamSpec, Protocol, TypeVar

from .config import StorageConfig
from .usage_store import UsageStore
from .usage_types import (
    AdminUsage,
    DailyKeyModelUsage,
    KeyStats,
    KeyTotals,
    ManagedKey,
    RestoredCounters,
    TierChange,
    TierState,
    UsageRecord,
    UsageSummary,
)

P = ParamSpec("P")
T = TypeVar("T")


class UsageBackend(Protocol):
    """A usage database, as the recorder, the admin API and the CLI use it."""

    @property
    def where(self) -> str:
        """The database for log lines and messages: a file path, or a URL without password."""
        ...

    @property
    def faults(self) -> tuple[type[BaseException], ...]: ...

    async def close(self) -> None: ...

    async def write_batch(self, records: Sequence[UsageRecord]) -> int:
        """Write records and their roll-ups in one transaction; returns how many were valid."""
        ...

    async def prune(self, before: float, limit: int = 10_000) -> int: ...

    async def records(
        self, key_id: str | None = None, start: float = 0.0, end: float | None = None
    ) -> list[UsageRecord]: ...

    async def summary(
        self, key_id: str | None, start: date, end: date, model: str | None = None
    ) -> UsageSummary: ...

    async def admin_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> AdminUsage: ...

    async def daily_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> list[DailyKeyModelUsage]: ...

    async def key_stats(self, key_ids: Iterable[str] = ()) -> list[KeyStats]: ...

    async def totals_since(self, since: float) -> dict[str, KeyTotals]: ...

    async def restore_counters(
        self, today_start: float, cost_since: float
    ) -> dict[str, RestoredCounters]: ...

    async def add_key(
        self,
        key_id: str,
        key_hash: str,
        *,
        description: str = "",
        models: Sequence[str] = ("*",),
        tier: str | None = None,
        expires_at: float | None = None,
    ) -> ManagedKey: ...

    async def get_key(self, key_id: str) -> ManagedKey | None: ...

    async def list_keys(self, include_revoked: bool = True) -> list[ManagedKey]: ...

    async def revoke_key(self, key_id: str, reason: str = "") -> float: ...

    async def revoked_ids(self) -> frozenset[str]: ...

    async def rotate_key(self, key_id: str, new_hash: str, grace: float) -> ManagedKey: ...

    async def valid_keys(self) -> dict[str, ManagedKey]: ...

    async def next_key_change(self) -> float | None: ...

    async def keys_generation(self) -> int: ...

    async def add_tier_change(
        self,
        key_id: str,
        from_tier: str | None,
        to_tier: str | None,
        reason: str,
        *,
        state: TierState | None = None,
    ) -> TierChange: ...

    async def tier_changes(
        self, key_id: str | None = None, since: float = 0.0
    ) -> list[TierChange]: ...

    async def set_tier_state(self, state: TierState) -> None: ...

    async def tier_states(self) -> dict[str, TierState]: ...


async def open_backend(
    config: StorageConfig, *, clock: Callable[[], float] = time.time, busy_timeout: float = 2.0
) -> UsageBackend:
    """Open (create, migrate) the configured database: PostgreSQL if ``url`` is set."""
    if config.url:
        from .usage_pg import PostgresUsageStore  # asyncpg only when it is asked for

        return await PostgresUsageStore.open(config.url, clock=clock, pool_size=config.pool_size)
    return await SqliteBackend.open(config.path, clock=clock, busy_timeout=busy_timeout)


class SqliteBackend:
    """``UsageStore`` on its own worker thread; every call is queued to that thread."""

    faults: tuple[type[BaseException], ...] = (sqlite3.Error,)

    def __init__(self, executor: ThreadPoolExecutor, store: UsageStore) -> None:
        self._executor = executor
        self._store = store

    @classmethod
    async def open(
        cls, path: str, *, clock: Callable[[], float] = time.time, busy_timeout: float = 2.0
    ) -> SqliteBackend:
        executor = ThreadPoolExecutor(1, thread_name_prefix="gateway-usage")
        try:
            store = await asyncio.get_running_loop().run_in_executor(
                executor,
                functools.partial(UsageStore, path, clock=clock, busy_timeout=busy_timeout),
            )
        except BaseException:
            executor.shutdown(wait=False)
            raise
        return cls(executor, store)

    @property
    def where(self) -> str:
        return self._store.path

    async def call(
        self, fn: Callable[Concatenate[UsageStore, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(store, ...)`` on the worker thread, e.g. ``call(UsageStore.revoke_key, id)``."""
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(fn, self._store, *args, **kwargs)
        )

    async def close(self) -> None:
        try:
            await self.call(UsageStore.close)
        finally:
            self._executor.shutdown(wait=False)

    async def write_batch(self, records: Sequence[UsageRecord]) -> int:
        return await self.call(UsageStore.write_batch, records)

    async def prune(self, before: float, limit: int = 10_000) -> int:
        return await self.call(UsageStore.prune, before, limit)

    async def records(
        self, key_id: str | None = None, start: float = 0.0, end: float | None = None
    ) -> list[UsageRecord]:
        return await self.call(UsageStore.records, key_id, start, end)

    async def summary(
        self, key_id: str | None, start: date, end: date, model: str | None = None
    ) -> UsageSummary:
        return await self.call(UsageStore.summary, key_id, start, end, model)

    async def admin_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> AdminUsage:
        return await self.call(UsageStore.admin_usage, start, end, key_id, model)

    async def daily_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> list[DailyKeyModelUsage]:
        return await self.call(UsageStore.daily_usage, start, end, key_id, model)

    async def key_stats(self, key_ids: Iterable[str] = ()) -> list[KeyStats]:
        return await self.call(UsageStore.key_stats, tuple(key_ids))

    async def totals_since(self, since: float) -> dict[str, KeyTotals]:
        return await self.call(UsageStore.totals_since, since)

    async def restore_counters(
        self, today_start: float, cost_since: float
    ) -> dict[str, RestoredCounters]:
        return await self.call(UsageStore.restore_counters, today_start, cost_since)

    async def add_key(
        self,
        key_id: str,
        key_hash: str,
        *,
        description: str = "",
        models: Sequence[str] = ("*",),
        tier: str | None = None,
        expires_at: float | None = None,
    ) -> ManagedKey:
        return await self.call(
            UsageStore.add_key,
            key_id,
            key_hash,
            description=description,
            models=models,
            tier=tier,
            expires_at=expires_at,
        )

    async def get_key(self, key_id: str) -> ManagedKey | None:
        return await self.call(UsageStore.get_key, key_id)

    async def list_keys(self, include_revoked: bool = True) -> list[ManagedKey]:
        return await self.call(UsageStore.list_keys, include_revoked)

    async def revoke_key(self, key_id: str, reason: str = "") -> float:
        return await self.call(UsageStore.revoke_key, key_id, reason)

    async def revoked_ids(self) -> frozenset[str]:
        return await self.call(UsageStore.revoked_ids)

    async def rotate_key(self, key_id: str, new_hash: str, grace: float) -> ManagedKey:
        return await self.call(UsageStore.rotate_key, key_id, new_hash, grace)

    async def valid_keys(self) -> dict[str, ManagedKey]:
        return await self.call(UsageStore.valid_keys)

    async def next_key_change(self) -> float | None:
        return await self.call(UsageStore.next_key_change)

    async def keys_generation(self) -> int:
        return await self.call(UsageStore.keys_generation)

    async def add_tier_change(
        self,
        key_id: str,
        from_tier: str | None,
        to_tier: str | None,
        reason: str,
        *,
        state: TierState | None = None,
    ) -> TierChange:
        return await self.call(
            UsageStore.add_tier_change, key_id, from_tier, to_tier, reason, state=state
        )

    async def tier_changes(self, key_id: str | None = None, since: float = 0.0) -> list[TierChange]:
        return await self.call(UsageStore.tier_changes, key_id, since)

    async def set_tier_state(self, state: TierState) -> None:
        await self.call(UsageStore.set_tier_state, state)

    async def tier_states(self) -> dict[str, TierState]:
        return await self.call(UsageStore.tier_states)
