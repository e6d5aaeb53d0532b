"""Usage accounting on the request path: prices, and the write-behind recorder.

``UsageRecorder.record()`` appends the record to an in-memory deque and returns: no I/O, no
lock, no exception. One asyncio task drains the deque at most ``flush_interval`` seconds apart,
however few records wait (sooner when a batch fills), and hands each batch to the usage
database (``usage_backend.py``), which writes the batch and its daily roll-ups in one
transaction: by default a SQLite file on one dedicated worker thread, so that the event loop
never touches SQLite; with ``[storage] url`` a PostgreSQL database shared by a fleet of
gateways, through an asyncpg pool.

When the database cannot be written (locked, full, read-only, unreachable) the batch is kept
and retried with backoff, and the fault is logged once per episode. Records beyond
``queue_max`` waiting in memory are dropped and counted in ``dropped``; nothing is lost without
a count and a log line.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable
from typing import Concatenate, ParamSpec, TypeVar

from .config import ModelConfig, StorageConfig
from .translate.base import Usage
from .usage_backend import SqliteBackend, UsageBackend, open_backend
from .usage_store import UsageStore
from .usage_types import (
    DAY,
    NANO,
    AdminUsage,
    DailyKeyModelUsage,
    KeyStats,
    KeyTotals,
    ManagedKey,
    RestoredCounters,
    SchemaTooNew,
    TierChange,
    TierState,
    UsageRecord,
    UsageStoreError,
    UsageSummary,
    default_period,
)

__all__ = [
    "AdminUsage",
    "DailyKeyModelUsage",
    "KeyStats",
    "KeyTotals",
    "ManagedKey",
    "RestoredCounters",
    "SchemaTooNew",
    "TierChange",
    "TierState",
    "UsageBackend",
    "UsageRecord",
    "UsageRecorder",
    "UsageStore",
    "UsageStoreError",
    "UsageSummary",
    "cost_of",
    "default_period",
]

log = logging.getLogger("gateway.usage")

P = ParamSpec("P")
T = TypeVar("T")

PRUNE_CHUNK = 10_000


def cost_of(model: ModelConfig, usage: Usage) -> float:
    """What one request cost at `model`'s prices (per million tokens), plus its flat price.

    Uncached input is charged at ``price_in``, cache reads at ``price_cache_read`` and cache
    writes at ``price_cache_write`` (both default to ``price_in``), all output (reasoning
    included) at ``price_out``. The result is rounded to a nano-unit, the store's unit, so that
    what is stored and summed is exactly what this returns.
    """
    read_price = model.price_in if model.price_cache_read is None else model.price_cache_read
    write_price = model.price_in if model.price_cache_write is None else model.price_cache_write
    uncached = max(usage.prompt_tokens - usage.cached_tokens - usage.cache_write_tokens, 0)
    # tokens x price per million tokens = micro-units
    micro = (
        uncached * model.price_in
        + usage.cached_tokens * read_price
        + usage.cache_write_tokens * write_price
        + usage.completion_tokens * model.price_out
    )
    return round(micro * 1000 + model.price_request * NANO) / NANO


class UsageRecorder:
    """The write-behind queue in front of a usage database; see the module docstring.

    Only records are queued: reads and key changes go straight to ``backend``, so a read does
    not see records still waiting here (``flush()`` first where that matters). ``record()``
    must be called from the event loop's thread. ``dropped`` counts every record
    that will never be written (queue full, invalid, recorded after close, or still unwritten
    when close gave up); ``rejected`` the invalid ones among them; ``written`` the committed.
    """

    def __init__(
        self,
        config: StorageConfig,
        *,
        clock: Callable[[], float] = time.time,
        batch_size: int = 5_000,
        busy_timeout: float = 2.0,
        max_backoff: float = 30.0,
        close_timeout: float = 10.0,
        prune_every: float = 3_600.0,
    ) -> None:
        self.config = config
        self.clock = clock
        self.dropped = 0
        self.rejected = 0
        self.written = 0
        self._queue: deque[UsageRecord] = deque()
        self._pending: list[UsageRecord] = []  # taken from the queue, not yet committed
        self._writing = 0  # records in the batch being written
        self._limit = config.queue_max
        self._batch_size = batch_size
        self._busy_timeout = busy_timeout
        self._max_backoff = max(max_backoff, config.flush_interval)
        self._close_timeout = close_timeout
        self._prune_every = prune_every
        self._next_prune = 0.0
        self._closed = False
        self._wake = asyncio.Event()
        self._lock = asyncio.Lock()
        self._backend: UsageBackend | None = None
        self._task: asyncio.Task[None] | None = None
        self._failures = 0  # consecutive failed writes
        self._failing_since = 0.0
        self._overflow_seen = 0
        self._overflowing = False

    @property
    def depth(self) -> int:
        """Records waiting to be written."""
        return len(self._queue) + len(self._pending) + self._writing

    @property
    def failing(self) -> bool:
        """The last write failed; records are being kept for a retry."""
        return self._failures > 0

    @property
    def backend(self) -> UsageBackend:
        """The open database (after ``start()``)."""
        if self._backend is None:
            raise RuntimeError("the usage store is not open")
        return self._backend

    def record(self, rec: UsageRecord) -> None:
        """Queue one record for writing. O(1); never blocks, never raises."""
        if self._closed or len(self._queue) + len(self._pending) + self._writing >= self._limit:
            self.dropped += 1
            return
        self._queue.append(rec)
        if len(self._queue) == self._batch_size:
            self._wake.set()

    async def start(self) -> None:
        """Open (create, migrate) the database and start the writer.

        Raises ``UsageStoreError``, ``sqlite3.Error`` or a PostgreSQL error if the database
        cannot be opened: the gateway should not start without its usage database.
        """
        if self._task is not None:
            raise RuntimeError("UsageRecorder.start() called twice")
        self._backend = await open_backend(
            self.config, clock=self.clock, busy_timeout=self._busy_timeout
        )
        self._task = asyncio.create_task(self._run(), name="gateway-usage-writer")

    async def flush(self) -> bool:
        """Write every record queued so far. False if the database failed (records are kept)."""
        if self._backend is None:
            raise RuntimeError("UsageRecorder.flush() before start()")
        return await self._write_pending()

    async def close(self) -> None:
        """Stop the writer, write what is queued (retrying up to close_timeout), close the store."""
        if self._closed:
            return
        self._closed = True
        self._wake.set()
        if self._task is not None:
            await self._task
        if self._backend is not None:
            deadline = time.monotonic() + self._close_timeout
            while not await self._write_pending():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    lost = self.depth
                    self.dropped += lost
                    self._pending.clear()
                    self._queue.clear()
                    log.error("usage: %d records were not written before shutdown", lost)
                    break
                await asyncio.sleep(min(self._backoff(), remaining))
            await self._backend.close()
            self._backend = None
        elif self.depth:
            self.dropped += self.depth
            log.error("usage: %d records were recorded but the store was never started", self.depth)
            self._queue.clear()

    async def prune(self) -> int:
        """Delete raw records older than retention_days now; returns how many."""
        before = self.clock() - self.config.retention_days * DAY
        deleted = 0
        while (n := await self.backend.prune(before, PRUNE_CHUNK)) > 0:
            deleted += n
            if n < PRUNE_CHUNK:
                break
        return deleted

    async def call(
        self, fn: Callable[Concatenate[UsageStore, P], T], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """Run ``fn(store, ...)`` on the SQLite worker thread, e.g.
        ``call(UsageStore.revoke_key, id)``; for SQLite only (tests, benchmarks)."""
        backend = self.backend
        if not isinstance(backend, SqliteBackend):
            raise RuntimeError("call() needs the SQLite store; use the backend's methods")
        return await backend.call(fn, *args, **kwargs)

    # --- the writer -----------------------------------------------------------------------

    async def _run(self) -> None:
        # Flushes start at most flush_interval apart, counted from the start of the previous
        # one (when it took the queue), so that a record waits at most flush_interval and then
        # one batch write: the bound on what a crash can lose. A backoff after a fault counts
        # from the failed write's end, so that a slow failure (busy_timeout) does not eat it.
        loop = asyncio.get_running_loop()
        taken_at = loop.time()
        while not self._closed:
            if self._failures:
                await self._sleep(loop.time() + self._backoff())
            else:
                await self._sleep(taken_at + self.config.flush_interval)
            if self._closed:
                break
            taken_at = loop.time()
            try:
                await self._write_pending()
                await self._prune_step()
            except Exception:  # the writer must outlive any bug
                log.exception("usage: writer error")
            self._note_overflow()

    async def _sleep(self, deadline: float) -> None:
        """Until `deadline` (loop time: the flush interval or backoff), a batch fills, or
        close() is called."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return
            try:
                async with asyncio.timeout(remaining):
                    await self._wake.wait()
            except TimeoutError:
                return
            self._wake.clear()
            if not self._failures:  # a full batch ends the wait, but not a backoff
                return

    def _backoff(self) -> float:
        if not self._failures:
            return self.config.flush_interval
        return float(
            min(self.config.flush_interval * 2 ** min(self._failures, 20), self._max_backoff)
        )

    async def _write_pending(self) -> bool:
        backend = self.backend
        async with self._lock:
            if self._queue:
                taken, self._queue = self._queue, deque()
                self._pending.extend(taken)
            while self._pending:
                chunk = self._pending[: self._batch_size]
                del self._pending[: len(chunk)]
                self._writing = len(chunk)
                try:
                    written = await backend.write_batch(chunk)
                except backend.faults as e:
                    self._writing = 0  # back in _pending: count it once in the log line
                    self._pending[0:0] = chunk
                    self._fault(e)
                    return False
                except Exception:
                    written = 0
                    log.exception("usage: %d records could not be written", len(chunk))
                finally:
                    self._writing = 0
                self.written += written
                if written < len(chunk):
                    bad = len(chunk) - written
                    self.rejected += bad
                    self.dropped += bad
                    log.warning("usage: %d invalid records were not written", bad)
            if self._failures:
                log.info(
                    "usage: %s is writable again after %.1f s; queued records written",
                    backend.where,
                    time.monotonic() - self._failing_since,
                )
                self._failures = 0
            return True

    def _fault(self, error: BaseException) -> None:
        if not self._failures:
            self._failing_since = time.monotonic()
            log.error(
                "usage: cannot write to %s (%s); keeping %d records and retrying",
                self.backend.where,
                error,
                self.depth,
            )
        self._failures += 1

    async def _prune_step(self) -> None:
        """One chunk of retention per writer cycle, so that batches go in between."""
        now = self.clock()
        if now < self._next_prune or self._failures:
            return
        before = now - self.config.retention_days * DAY
        backend = self.backend
        try:
            deleted = await backend.prune(before, PRUNE_CHUNK)
        except backend.faults as e:  # retried next cycle; lasting faults show up in writes
            log.debug("usage: retention skipped: %s", e)
            return
        if deleted < PRUNE_CHUNK:
            self._next_prune = now + self._prune_every

    def _note_overflow(self) -> None:
        overflow = self.dropped - self.rejected
        if overflow > self._overflow_seen and not self._overflowing:
            self._overflowing = True
            log.error(
                "usage: more than %d records waiting; dropping new records until the writer "
                "catches up",
                self._limit,
            )
        elif overflow == self._overflow_seen and self._overflowing:
            self._overflowing = False
            log.warning("usage: no longer dropping records; %d dropped so far", overflow)
        self._overflow_seen = overflow
