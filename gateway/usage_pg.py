"""The usage database in a shared PostgreSQL, for a fleet of gateways (``[storage] url``).

The same logical schema as the SQLite store (``usage_store.py``), with PostgreSQL types:
``usage`` raw rows, ``usage_daily`` roll-ups (``day`` is a DATE), ``key_activity``, ``keys``
(``models`` is a TEXT[]), ``key_old_hashes``, ``revocations``, ``tier_changes``, ``tier_state``,
``meta``. Money is integer nano-units in BIGINT columns and sums are cast back to BIGINT, so
totals stay exact. Times are UNIX seconds in DOUBLE PRECISION, as in SQLite.

Migrations are versioned in ``schema_migrations`` and applied at open by whichever gateway gets
there first: it holds a transaction-level advisory lock while it migrates, and PostgreSQL's DDL
is transactional, so a second process starting at the same time waits, then finds nothing to do.

A batch is one statement: the rows go in through ``unnest`` of one array per column, and the
roll-up and activity upserts read the inserted rows from ``RETURNING``. Reading back "rows with
an id above the previous maximum", as the SQLite store does, would count another process's
concurrent rows twice here; ``RETURNING`` sees exactly this batch.

Key changes (add, revoke, rotate) take another advisory lock, so that two processes cannot hand
out the same hash or interleave a rotation: the same guarantee SQLite's write lock gives.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager
from datetime import date
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import asyncpg
from asyncpg.pool import PoolConnectionProxy

from .usage_types import (
    NANO,
    AdminUsage,
    DailyKeyModelUsage,
    KeyConflict,
    KeyStats,
    KeyTotals,
    ManagedKey,
    RestoredCounters,
    SchemaTooNew,
    TierChange,
    TierState,
    UnknownKey,
    UsageRecord,
    UsageStoreError,
    UsageSummary,
    add_totals,
    build_admin_usage,
    build_key_stats,
    build_summary,
    check_hash,
    check_key_fields,
    check_key_id,
    daily_row,
    day_boundary,
    is_valid_record,
    restored_counters,
    utc_day,
)

# Each migration is a list of statements; migration i brings the schema to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE usage (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            ts DOUBLE PRECISION NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            client_ip TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            model TEXT NOT NULL,
            provider TEXT NOT NULL,
            upstream_model TEXT NOT NULL,
            status BIGINT NOT NULL,
            outcome TEXT NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL,
            cost_nano BIGINT NOT NULL,
            latency_ms DOUBLE PRECISION NOT NULL,
            ttft_ms DOUBLE PRECISION,
            stream BOOLEAN NOT NULL
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        """CREATE TABLE usage_daily (
            key_id TEXT NOT NULL,
            day DATE NOT NULL,
            model TEXT NOT NULL,
            requests BIGINT NOT NULL,
            errors BIGINT NOT NULL,
            prompt_tokens BIGINT NOT NULL,
            completion_tokens BIGINT NOT NULL,
            cached_tokens BIGINT NOT NULL,
            cache_write_tokens BIGINT NOT NULL,
            reasoning_tokens BIGINT NOT NULL,
            cost_nano BIGINT NOT NULL,
            PRIMARY KEY (key_id, day, model)
        )""",
        "CREATE INDEX usage_daily_day ON usage_daily (day)",
        """CREATE TABLE key_activity (
            key_id TEXT PRIMARY KEY,
            first_used DOUBLE PRECISION NOT NULL,
            last_used DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            description TEXT NOT NULL,
            models TEXT[] NOT NULL,
            tier TEXT,
            created_at DOUBLE PRECISION NOT NULL,
            revoked_at DOUBLE PRECISION,
            expires_at DOUBLE PRECISION
        )""",
        """CREATE TABLE key_old_hashes (
            hash TEXT PRIMARY KEY,
            key_id TEXT NOT NULL REFERENCES keys (id),
            valid_until DOUBLE PRECISION NOT NULL
        )""",
        """CREATE TABLE revocations (
            key_id TEXT PRIMARY KEY,
            revoked_at DOUBLE PRECISION NOT NULL,
            reason TEXT NOT NULL
        )""",
        """CREATE TABLE tier_changes (
            id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            key_id TEXT NOT NULL,
            ts DOUBLE PRECISION NOT NULL,
            from_tier TEXT,
            to_tier TEXT,
            reason TEXT NOT NULL
        )""",
        "CREATE INDEX tier_changes_key ON tier_changes (key_id, ts)",
        """CREATE TABLE tier_state (
            key_id TEXT PRIMARY KEY,
            tier TEXT,
            clean_days BIGINT NOT NULL,
            last_day TEXT,
            updated_at DOUBLE PRECISION NOT NULL
        )""",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value BIGINT NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# Advisory lock keys, per schema so that two gateways' schemas in one database do not wait
# for each other.
_LOCK = "SELECT pg_advisory_xact_lock(hashtext($1 || coalesce(current_schema(), '')))"
_MIGRATE_LOCK = "gateway.usage.migrate:"
_KEYS_LOCK = "gateway.usage.keys:"

_COLUMNS = """ts, request_id, key_id, client_ip, endpoint, model, provider, upstream_model,
    status, outcome, prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
    reasoning_tokens"""
_ARRAY_TYPES = (
    "float8",
    *(["text"] * 7),
    "int8",
    "text",
    *(["int8"] * 5),
    "float8",
    "float8",
    "float8",
    "int8",
)
_UNNEST = ", ".join(f"${i}::{t}[]" for i, t in enumerate(_ARRAY_TYPES, 1))
# The record's fields as columns (one array each), the few conversions done in SQL, and the
# roll-ups from exactly the inserted rows. Groups are upserted in key order so that two
# processes writing the same days lock the same rows in the same order.
_WRITE = f"""WITH r AS (
    SELECT * FROM unnest({_UNNEST}) AS r ({_COLUMNS}, cost, latency_ms, ttft_ms, stream)
), new AS (
    INSERT INTO usage ({_COLUMNS}, cost_nano, latency_ms, ttft_ms, stream)
    SELECT ts, request_id, coalesce(key_id, ''), coalesce(client_ip, ''), endpoint,
        coalesce(model, ''), coalesce(provider, ''), coalesce(upstream_model, ''), status,
        outcome, prompt_tokens, completion_tokens, cached_tokens, cache_write_tokens,
        reasoning_tokens, round(cost * 1e9)::bigint, latency_ms, ttft_ms, stream <> 0
    FROM r
    RETURNING ts, key_id, model, outcome, prompt_tokens, completion_tokens, cached_tokens,
        cache_write_tokens, reasoning_tokens, cost_nano
), daily AS (
    INSERT INTO usage_daily AS d (key_id, day, model, requests, errors, prompt_tokens,
        completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, cost_nano)
    SELECT key_id, (to_timestamp(ts) AT TIME ZONE 'UTC')::date, model, count(*),
        count(*) FILTER (WHERE outcome <> 'ok'), sum(prompt_tokens), sum(completion_tokens),
        sum(cached_tokens), sum(cache_write_tokens), sum(reasoning_tokens), sum(cost_nano)
    FROM new GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
    ON CONFLICT (key_id, day, model) DO UPDATE SET
        requests = d.requests + excluded.requests,
        errors = d.errors + excluded.errors,
        prompt_tokens = d.prompt_tokens + excluded.prompt_tokens,
        completion_tokens = d.completion_tokens + excluded.completion_tokens,
        cached_tokens = d.cached_tokens + excluded.cached_tokens,
        cache_write_tokens = d.cache_write_tokens + excluded.cache_write_tokens,
        reasoning_tokens = d.reasoning_tokens + excluded.reasoning_tokens,
        cost_nano = d.cost_nano + excluded.cost_nano
)
INSERT INTO key_activity AS a (key_id, first_used, last_used)
SELECT key_id, min(ts), max(ts) FROM new WHERE key_id <> '' GROUP BY key_id ORDER BY key_id
ON CONFLICT (key_id) DO UPDATE SET
    first_used = least(a.first_used, excluded.first_used),
    last_used = greatest(a.last_used, excluded.last_used)"""

# sum() of BIGINT is NUMERIC in PostgreSQL: cast back, so that Python gets ints.
_SUMS = """sum(requests)::bigint, sum(errors)::bigint, sum(prompt_tokens)::bigint,
    sum(completion_tokens)::bigint, sum(cached_tokens)::bigint,
    sum(cache_write_tokens)::bigint, sum(reasoning_tokens)::bigint, sum(cost_nano)::bigint"""
_TOKENS = "sum(prompt_tokens + completion_tokens)::bigint"
# Text sorts byte-wise, as in SQLite, whatever the database's collation.
_C = 'COLLATE "C"'
_KEY_COLUMNS = "id, hash, description, models, tier, created_at, revoked_at, expires_at"

# Errors that mean "the database cannot be used now" (down, unreachable, restarting, out of
# connections or disk): the recorder keeps its batch and retries.
FAULTS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    OSError,
    TimeoutError,
)
_CONNECT_ERRORS: tuple[type[BaseException], ...] = (*FAULTS, ValueError)  # ValueError: a bad URL
# A value the statement cannot take: from asyncpg's encoders or from PostgreSQL (class 22).
_DATA_ERRORS = (asyncpg.DataError, TypeError, ValueError)
# Transactions PostgreSQL aborted to resolve a conflict between processes: run again at once.
_RETRY = (asyncpg.DeadlockDetectedError, asyncpg.SerializationError)


_Conn = PoolConnectionProxy


def redact(url: str) -> str:
    """The URL without its password (in the user part or the query), for logs and messages."""
    parts = urlsplit(url)
    if parts.password is not None:
        host = parts.netloc.rsplit("@", 1)[1]
        parts = parts._replace(netloc=f"{parts.username or ''}:***@{host}")
    query = parse_qsl(parts.query, keep_blank_values=True)
    if any(k == "password" for k, _ in query):
        safe = [(k, "***" if k == "password" else v) for k, v in query]
        parts = parts._replace(query=urlencode(safe, safe="*"))
    return urlunsplit(parts)


class PostgresUsageStore:
    """A usage database in PostgreSQL, through an asyncpg pool on the running event loop."""

    faults = FAULTS

    def __init__(
        self, pool: asyncpg.Pool, url: str, *, clock: Callable[[], float] = time.time
    ) -> None:
        self._pool = pool
        self.url = url
        self.clock = clock
        self.transactions = 0  # committed write_batch transactions, for tests and metrics

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        clock: Callable[[], float] = time.time,
        pool_size: int = 4,
        connect_timeout: float = 10.0,
        command_timeout: float = 30.0,
    ) -> PostgresUsageStore:
        """Connect, then create or migrate the schema. Raises if the database is unreachable:
        a gateway should not start without its usage database."""
        try:
            # min_size 0: while the database is down, the writer's backoff paces reconnects
            # (and logs once), rather than the pool's own floor-restoring loop.
            pool = await asyncpg.create_pool(
                url,
                min_size=0,
                max_size=pool_size,
                timeout=connect_timeout,
                command_timeout=command_timeout,
            )
        except _CONNECT_ERRORS as e:
            raise UsageStoreError(f"cannot open {redact(url)}: {e}") from e
        store = cls(pool, url, clock=clock)
        try:
            await store._migrate()
        except FAULTS as e:
            pool.terminate()
            raise UsageStoreError(f"cannot open {redact(url)}: {e}") from e
        except BaseException:
            pool.terminate()
            raise
        return store

    @property
    def where(self) -> str:
        return redact(self.url)

    async def close(self, timeout: float = 10.0) -> None:
        try:
            async with asyncio.timeout(timeout):
                await self._pool.close()
        except TimeoutError:
            self._pool.terminate()

    @asynccontextmanager
    async def _transaction(self, lock: str | None = None) -> AsyncIterator[_Conn]:
        async with self._pool.acquire() as conn, conn.transaction():
            if lock is not None:
                await conn.execute(_LOCK, lock)
            yield conn

    # --- schema ---------------------------------------------------------------------------

    async def schema_version(self) -> int:
        async with self._pool.acquire() as conn:
            return await _version(conn)

    async def _migrate(self) -> None:
        async with self._pool.acquire() as conn:
            version = await _version(conn)
            self._check_version(version)
            if version == SCHEMA_VERSION:
                return
            async with conn.transaction():
                await conn.execute(_LOCK, _MIGRATE_LOCK)
                await conn.execute(
                    """CREATE TABLE IF NOT EXISTS schema_migrations (
                        version INTEGER PRIMARY KEY,
                        applied_at DOUBLE PRECISION NOT NULL
                    )"""
                )
                version = await _version(conn)  # another process may have migrated meanwhile
                self._check_version(version)
                for i in range(version, SCHEMA_VERSION):
                    for statement in MIGRATIONS[i]:
                        await conn.execute(statement)
                    await conn.execute(
                        "INSERT INTO schema_migrations VALUES ($1, $2)", i + 1, self.clock()
                    )

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.where}: the usage database has schema version {version}, but this "
                f"gateway knows versions up to {SCHEMA_VERSION}; upgrade the gateway or "
                "point storage.url at another database"
            )

    # --- usage records --------------------------------------------------------------------

    async def write_batch(self, records: Sequence[UsageRecord]) -> int:
        """Insert records and update the daily roll-ups in one transaction.

        Returns how many were written: records of the wrong shape or types are left out (the
        caller counts them); database faults raise one of ``FAULTS`` and nothing is written.
        """
        if not records:
            return 0
        for attempt in range(3):
            try:
                return await self._write(records)
            except _DATA_ERRORS:
                return await self._write_valid(records)
            except _RETRY:
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _write(self, records: Sequence[UsageRecord]) -> int:
        async with self._transaction() as conn:
            await conn.execute(_WRITE, *zip(*records, strict=True))
        self.transactions += 1
        return len(records)

    async def _write_valid(self, records: Sequence[UsageRecord]) -> int:
        """One bad record fails the whole statement: leave out the records of the wrong shape
        or types and write the rest; if PostgreSQL still refuses a value, one savepoint each.

        NUL characters, which PostgreSQL text cannot hold (SQLite can), become U+FFFD, so
        that a client's odd model name does not cost its record.
        """
        valid = [_without_nul(r) for r in records if is_valid_record(r)]
        if not valid:
            return 0
        try:
            return await self._write(valid)
        except _DATA_ERRORS:
            pass
        written = 0
        async with self._transaction() as conn:
            for rec in valid:
                try:
                    async with conn.transaction():
                        await conn.execute(_WRITE, *([v] for v in rec))
                    written += 1
                except asyncpg.DataError:
                    continue
        self.transactions += 1
        return written

    async def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` raw rows older than `before`; roll-ups stay. Returns the count.

        Also forgets the hashes retired by a rotation whose grace time is over.
        """
        async with self._transaction() as conn:
            status = await conn.execute(
                "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts < $1 LIMIT $2)",
                before,
                limit,
            )
            await conn.execute("DELETE FROM key_old_hashes WHERE valid_until <= $1", self.clock())
        return int(status.split()[-1])

    async def records(
        self, key_id: str | None = None, start: float = 0.0, end: float | None = None
    ) -> list[UsageRecord]:
        """Raw records with start <= ts < end, oldest first (admin detail and tests)."""
        sql = """SELECT ts, request_id, key_id, client_ip, endpoint, model, provider,
            upstream_model, status, outcome, prompt_tokens, completion_tokens, cached_tokens,
            cache_write_tokens, reasoning_tokens, cost_nano, latency_ms, ttft_ms, stream
            FROM usage WHERE ts >= $1"""
        args: list[object] = [start]
        if end is not None:
            args.append(end)
            sql += f" AND ts < ${len(args)}"
        if key_id is not None:
            args.append(key_id)
            sql += f" AND key_id = ${len(args)}"
        rows = await self._pool.fetch(sql + " ORDER BY ts, id", *args)
        return [UsageRecord._make((*r[:15], r[15] / NANO, *r[16:])) for r in rows]

    # --- queries --------------------------------------------------------------------------

    async def summary(
        self, key_id: str | None, start: date, end: date, model: str | None = None
    ) -> UsageSummary:
        """Usage from `start` to `end`, both days included (UTC), of one key or all keys."""
        where, args = _filters(key_id, start, end, model)
        # one snapshot for both queries (READ COMMITTED would give each its own)
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            by_model = await conn.fetch(
                f"SELECT model, {_SUMS} FROM usage_daily WHERE {where}"
                f" GROUP BY model ORDER BY model {_C}",
                *args,
            )
            by_day = await conn.fetch(
                f"SELECT day, sum(requests)::bigint, {_TOKENS}, sum(cost_nano)::bigint"
                f" FROM usage_daily WHERE {where} GROUP BY day ORDER BY day",
                *args,
            )
        return build_summary(
            start,
            end,
            ((r[0], tuple(r[1:])) for r in by_model),
            ((r[0].isoformat(), r[1], r[2], r[3]) for r in by_day),
        )

    async def admin_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> AdminUsage:
        """Usage of every key (or one) from `start` to `end` inclusive, per key and model."""
        where, args = _filters(key_id, start, end, model)
        rows = await self._pool.fetch(
            f"SELECT key_id, model, {_SUMS} FROM usage_daily WHERE {where}"
            f" GROUP BY key_id, model ORDER BY key_id {_C}, model {_C}",
            *args,
        )
        return build_admin_usage(start, end, ((r[0], r[1], tuple(r[2:])) for r in rows))

    async def daily_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> list[DailyKeyModelUsage]:
        """One row per (day, key, model) with any request from `start` to `end` inclusive,
        oldest day first: the series the dashboard's charts are drawn from."""
        where, args = _filters(key_id, start, end, model)
        rows = await self._pool.fetch(
            "SELECT day, key_id, model, requests, errors, prompt_tokens + completion_tokens,"
            f" cost_nano FROM usage_daily WHERE {where}"
            f" ORDER BY day, key_id {_C}, model {_C}",
            *args,
        )
        return [daily_row(r[0].isoformat(), *r[1:]) for r in rows]

    async def key_stats(self, key_ids: Iterable[str] = ()) -> list[KeyStats]:
        """Per key: created, first and last use, all-time totals and today's (UTC) usage.

        Lists managed keys, keys that were ever used and `key_ids` (e.g. the config's keys).
        """
        today = date.fromisoformat(utc_day(self.clock()))
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            created = await conn.fetch("SELECT id, created_at FROM keys")
            activity = await conn.fetch("SELECT key_id, first_used, last_used FROM key_activity")
            totals = await conn.fetch(
                f"""SELECT key_id, sum(requests)::bigint, {_TOKENS}, sum(cost_nano)::bigint,
                    coalesce(sum(requests) FILTER (WHERE day = $1), 0)::bigint,
                    coalesce(sum(prompt_tokens + completion_tokens)
                        FILTER (WHERE day = $1), 0)::bigint,
                    coalesce(sum(cost_nano) FILTER (WHERE day = $1), 0)::bigint
                FROM usage_daily WHERE key_id <> '' GROUP BY key_id""",
                today,
            )
        return build_key_stats(
            key_ids,
            ((r[0], r[1]) for r in created),
            ((r[0], r[1], r[2]) for r in activity),
            ((r[0], r[1], r[2], r[3], r[4], r[5], r[6]) for r in totals),
        )

    async def totals_since(self, since: float) -> dict[str, KeyTotals]:
        """Requests, tokens and cost per key of the records with ts >= `since`.

        Whole UTC days from the roll-ups, the part of a day before the first midnight from the
        raw rows (see ``UsageStore.totals_since``).
        """
        midnight = day_boundary(since)
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            raw = await conn.fetch(
                f"SELECT key_id, count(*), {_TOKENS}, sum(cost_nano)::bigint FROM usage"
                " WHERE ts >= $1 AND ts < $2 GROUP BY key_id",
                since,
                midnight,
            )
            daily = await conn.fetch(
                f"SELECT key_id, sum(requests)::bigint, {_TOKENS}, sum(cost_nano)::bigint"
                " FROM usage_daily WHERE day >= $1 GROUP BY key_id",
                date.fromisoformat(utc_day(midnight)),
            )
        return add_totals(
            ((r[0], r[1], r[2], r[3]) for r in raw), ((r[0], r[1], r[2], r[3]) for r in daily)
        )

    async def restore_counters(
        self, today_start: float, cost_since: float
    ) -> dict[str, RestoredCounters]:
        """Per key: requests and tokens since `today_start`, cost since `cost_since`."""
        today = await self.totals_since(today_start)
        spent = await self.totals_since(cost_since)
        return restored_counters(today, spent)

    # --- managed keys ---------------------------------------------------------------------

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
        """Store a new key by its hash. Raises KeyConflict if the id or hash is taken."""
        check_key_id(key_id)
        check_hash(key_hash)
        check_key_fields(description, models)
        key = ManagedKey(
            key_id, key_hash, description, tuple(models), tier, self.clock(), None, expires_at
        )
        async with self._transaction(_KEYS_LOCK) as conn:
            await _check_unused(conn, key_id, key_hash)
            await conn.execute(
                f"INSERT INTO keys ({_KEY_COLUMNS}) VALUES ($1, $2, $3, $4, $5, $6, NULL, $7)",
                key_id,
                key_hash,
                description,
                list(models),
                tier,
                key.created_at,
                expires_at,
            )
            await _bump_keys_generation(conn)
        return key

    async def get_key(self, key_id: str) -> ManagedKey | None:
        row = await self._pool.fetchrow(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = $1", key_id)
        return _managed_key(row) if row else None

    async def list_keys(self, include_revoked: bool = True) -> list[ManagedKey]:
        sql = f"SELECT {_KEY_COLUMNS} FROM keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        return [_managed_key(r) for r in await self._pool.fetch(sql + f" ORDER BY id {_C}")]

    async def revoke_key(self, key_id: str, reason: str = "") -> float:
        """Revoke a managed or configured key id for good. Returns when it was revoked.

        Revoking again keeps the first time.
        """
        now = self.clock()
        async with self._transaction(_KEYS_LOCK) as conn:
            await conn.execute(
                "INSERT INTO revocations VALUES ($1, $2, $3) ON CONFLICT (key_id) DO NOTHING",
                key_id,
                now,
                reason,
            )
            await conn.execute(
                "UPDATE keys SET revoked_at = $2 WHERE id = $1 AND revoked_at IS NULL", key_id, now
            )
            await _bump_keys_generation(conn)
            revoked_at: float = await conn.fetchval(
                "SELECT revoked_at FROM revocations WHERE key_id = $1", key_id
            )
        return revoked_at

    async def revoked_ids(self) -> frozenset[str]:
        return frozenset(r[0] for r in await self._pool.fetch("SELECT key_id FROM revocations"))

    async def rotate_key(self, key_id: str, new_hash: str, grace: float) -> ManagedKey:
        """Give a managed key a new hash; the old one stays valid for `grace` seconds."""
        check_hash(new_hash)
        now = self.clock()
        async with self._transaction(_KEYS_LOCK) as conn:
            row = await conn.fetchrow(f"SELECT {_KEY_COLUMNS} FROM keys WHERE id = $1", key_id)
            if row is None:
                raise UnknownKey(f"no managed key '{key_id}' (configured keys rotate in TOML)")
            key = _managed_key(row)
            if key.revoked_at is not None:
                raise UnknownKey(f"key '{key_id}' is revoked")
            await _check_unused(conn, None, new_hash)
            if grace > 0:
                await conn.execute(
                    "INSERT INTO key_old_hashes VALUES ($1, $2, $3)", key.hash, key_id, now + grace
                )
            await conn.execute("UPDATE keys SET hash = $2 WHERE id = $1", key_id, new_hash)
            await _bump_keys_generation(conn)
        return ManagedKey(
            key.id,
            new_hash,
            key.description,
            key.models,
            key.tier,
            key.created_at,
            key.revoked_at,
            key.expires_at,
        )

    async def valid_keys(self) -> dict[str, ManagedKey]:
        """hash -> key for every hash accepted now: current hashes of live keys, and hashes
        retired by a rotation whose grace time has not passed."""
        now = self.clock()
        async with (
            self._pool.acquire() as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            rows = await conn.fetch(
                f"""SELECT {_KEY_COLUMNS} FROM keys WHERE revoked_at IS NULL
                    AND (expires_at IS NULL OR expires_at > $1)
                    AND id NOT IN (SELECT key_id FROM revocations)""",
                now,
            )
            old = await conn.fetch(
                "SELECT hash, key_id FROM key_old_hashes WHERE valid_until > $1", now
            )
        live = {k.id: k for k in map(_managed_key, rows)}
        valid = {k.hash: k for k in live.values()}
        for old_hash, kid in old:
            if kid in live:
                valid[old_hash] = live[kid]
        return valid

    async def next_key_change(self) -> float | None:
        """The next time at which valid_keys() changes by itself (an expiry or a grace end)."""
        result: float | None = await self._pool.fetchval(
            """SELECT min(t) FROM (
                SELECT expires_at AS t FROM keys WHERE revoked_at IS NULL AND expires_at > $1
                UNION ALL SELECT valid_until FROM key_old_hashes WHERE valid_until > $1) AS c""",
            self.clock(),
        )
        return result

    async def keys_generation(self) -> int:
        """A number that every key change (from any process) increases."""
        value = await self._pool.fetchval("SELECT value FROM meta WHERE name = 'keys_generation'")
        return int(value) if value is not None else 0

    # --- tiers ----------------------------------------------------------------------------

    async def add_tier_change(
        self,
        key_id: str,
        from_tier: str | None,
        to_tier: str | None,
        reason: str,
        *,
        state: TierState | None = None,
    ) -> TierChange:
        """Log a tier move (and, in the same transaction, the key's new state if given)."""
        change = TierChange(key_id, self.clock(), from_tier, to_tier, reason)
        async with self._transaction() as conn:
            await conn.execute(
                "INSERT INTO tier_changes (key_id, ts, from_tier, to_tier, reason)"
                " VALUES ($1, $2, $3, $4, $5)",
                *change,
            )
            if state is not None:
                await _put_tier_state(conn, state)
        return change

    async def tier_changes(self, key_id: str | None = None, since: float = 0.0) -> list[TierChange]:
        sql = "SELECT key_id, ts, from_tier, to_tier, reason FROM tier_changes WHERE ts >= $1"
        args: list[object] = [since]
        if key_id is not None:
            sql += " AND key_id = $2"
            args.append(key_id)
        return [TierChange(*r) for r in await self._pool.fetch(sql + " ORDER BY ts, id", *args)]

    async def set_tier_state(self, state: TierState) -> None:
        async with self._transaction() as conn:
            await _put_tier_state(conn, state)

    async def tier_states(self) -> dict[str, TierState]:
        rows = await self._pool.fetch(
            "SELECT key_id, tier, clean_days, last_day, updated_at FROM tier_state"
        )
        return {r[0]: TierState(*r) for r in rows}


async def _version(conn: _Conn) -> int:
    if await conn.fetchval("SELECT to_regclass('schema_migrations')") is None:
        return 0
    version: int = await conn.fetchval("SELECT coalesce(max(version), 0) FROM schema_migrations")
    return version


async def _check_unused(conn: _Conn, key_id: str | None, key_hash: str) -> None:
    if key_id is not None and await conn.fetchval("SELECT 1 FROM keys WHERE id = $1", key_id):
        raise KeyConflict(f"a managed key '{key_id}' already exists")
    if await conn.fetchval(
        "SELECT 1 FROM keys WHERE hash = $1 UNION ALL SELECT 1 FROM key_old_hashes WHERE hash = $1",
        key_hash,
    ):
        raise KeyConflict("this key hash is already in use")


async def _bump_keys_generation(conn: _Conn) -> None:
    await conn.execute(
        "INSERT INTO meta AS m VALUES ('keys_generation', 1)"
        " ON CONFLICT (name) DO UPDATE SET value = m.value + 1"
    )


async def _put_tier_state(conn: _Conn, state: TierState) -> None:
    await conn.execute(
        """INSERT INTO tier_state VALUES ($1, $2, $3, $4, $5) ON CONFLICT (key_id) DO UPDATE
        SET tier = excluded.tier, clean_days = excluded.clean_days,
            last_day = excluded.last_day, updated_at = excluded.updated_at""",
        state.key_id,
        state.tier,
        state.clean_days,
        state.last_day,
        state.updated_at,
    )


def _filters(
    key_id: str | None, start: date, end: date, model: str | None
) -> tuple[str, list[object]]:
    where = "day >= $1 AND day <= $2"
    args: list[object] = [start, end]
    if key_id is not None:
        args.append(key_id)
        where += f" AND key_id = ${len(args)}"
    if model is not None:
        args.append(model)
        where += f" AND model = ${len(args)}"
    return where, args


def _managed_key(row: asyncpg.Record) -> ManagedKey:
    kid, key_hash, description, models, tier, created, revoked, expires = row
    return ManagedKey(kid, key_hash, description, tuple(models), tier, created, revoked, expires)


def _without_nul(rec: UsageRecord) -> UsageRecord:
    if not any(isinstance(v, str) and "\x00" in v for v in rec):
        return rec
    return UsageRecord._make(v.replace("\x00", "\ufffd") if isinstance(v, str) else v for v in rec)
