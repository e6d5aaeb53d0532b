"""The SQLite file behind usage accounting and managed keys: schema, migrations, writes, queries.

``UsageStore`` is synchronous and owns one ``sqlite3`` connection, which stays in the thread
that opened it: the CLI and the gateway use it through ``SqliteBackend`` (``usage_backend.py``),
whose worker thread owns it. The schema is created and migrated at open (``PRAGMA user_version``).
``usage_pg.py`` keeps the same tables in PostgreSQL for a fleet of gateways.

Money is kept as integer nano-units (1e-9 of the price unit, USD or credits) in column
``cost_nano``: sums over millions of rows are then exact, and a record's cost loses at most half
a nano-unit when it is stored. Times are UNIX seconds (UTC); days are UTC dates ``YYYY-MM-DD``.

Tables (schema version 1):

- ``usage``: one raw row per request; deleted after ``retention_days``.
- ``usage_daily``: per (key, UTC day, model asked) sums, updated in the same transaction as the
  raw inserts and never deleted, so that summaries never scan raw rows.
- ``key_activity``: first and last use per key.
- ``keys``, ``key_old_hashes``, ``revocations``: managed keys, the hashes a rotation retired
  (valid until a grace time), and revoked key ids (managed or from the TOML config).
- ``tier_changes``, ``tier_state``: the history of tier moves and each key's current state.
- ``meta``: counters, e.g. ``keys_generation``, bumped by every key change so that a running
  gateway can notice changes made by the CLI with one cheap query.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import itertools
import json
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from datetime import date

from .usage_types import (
    DAY,
    NANO,
    AdminUsage,
    DailyKeyModelUsage,
    DailyUsage,
    KeyConflict,
    KeyStats,
    KeyTotals,
    KeyUsage,
    ManagedKey,
    ModelUsage,
    PeriodUsage,
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
    day_start,
    default_period,
    is_valid_record,
    restored_counters,
    utc_day,
)

# The types live in usage_types (both stores share them); they are also importable from here.
__all__ = [
    "DAY",
    "MIGRATIONS",
    "NANO",
    "SCHEMA_VERSION",
    "AdminUsage",
    "DailyKeyModelUsage",
    "DailyUsage",
    "KeyConflict",
    "KeyStats",
    "KeyTotals",
    "KeyUsage",
    "ManagedKey",
    "ModelUsage",
    "PeriodUsage",
    "RestoredCounters",
    "SchemaTooNew",
    "TierChange",
    "TierState",
    "UnknownKey",
    "UsageRecord",
    "UsageStore",
    "UsageStoreError",
    "UsageSummary",
    "day_start",
    "default_period",
    "is_valid_record",
]

# Each migration is a list of statements; migration i brings the schema to version i + 1.
MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE usage (
            id INTEGER PRIMARY KEY,
            ts REAL NOT NULL,
            request_id TEXT NOT NULL,
            key_id TEXT NOT NULL,
            client_ip TEXT NOT NULL,
            endpoint TEXT NOT NULL,
            model TEXT NOT NULL,
            provider TEXT NOT NULL,
            upstream_model TEXT NOT NULL,
            status INTEGER NOT NULL,
            outcome TEXT NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            cost_nano INTEGER NOT NULL,
            latency_ms REAL NOT NULL,
            ttft_ms REAL,
            stream INTEGER NOT NULL
        )""",
        "CREATE INDEX usage_ts ON usage (ts)",
        """CREATE TABLE usage_daily (
            key_id TEXT NOT NULL,
            day TEXT NOT NULL,
            model TEXT NOT NULL,
            requests INTEGER NOT NULL,
            errors INTEGER NOT NULL,
            prompt_tokens INTEGER NOT NULL,
            completion_tokens INTEGER NOT NULL,
            cached_tokens INTEGER NOT NULL,
            cache_write_tokens INTEGER NOT NULL,
            reasoning_tokens INTEGER NOT NULL,
            cost_nano INTEGER NOT NULL,
            PRIMARY KEY (key_id, day, model)
        ) WITHOUT ROWID""",
        "CREATE INDEX usage_daily_day ON usage_daily (day)",
        """CREATE TABLE key_activity (
            key_id TEXT PRIMARY KEY,
            first_used REAL NOT NULL,
            last_used REAL NOT NULL
        ) WITHOUT ROWID""",
        """CREATE TABLE keys (
            id TEXT PRIMARY KEY,
            hash TEXT NOT NULL UNIQUE,
            description TEXT NOT NULL,
            models TEXT NOT NULL,
            tier TEXT,
            created_at REAL NOT NULL,
            revoked_at REAL,
            expires_at REAL
        )""",
        """CREATE TABLE key_old_hashes (
            hash TEXT PRIMARY KEY,
            key_id TEXT NOT NULL REFERENCES keys (id),
            valid_until REAL NOT NULL
        )""",
        """CREATE TABLE revocations (
            key_id TEXT PRIMARY KEY,
            revoked_at REAL NOT NULL,
            reason TEXT NOT NULL
        )""",
        """CREATE TABLE tier_changes (
            id INTEGER PRIMARY KEY,
            key_id TEXT NOT NULL,
            ts REAL NOT NULL,
            from_tier TEXT,
            to_tier TEXT,
            reason TEXT NOT NULL
        )""",
        "CREATE INDEX tier_changes_key ON tier_changes (key_id, ts)",
        """CREATE TABLE tier_state (
            key_id TEXT PRIMARY KEY,
            tier TEXT,
            clean_days INTEGER NOT NULL,
            last_day TEXT,
            updated_at REAL NOT NULL
        )""",
        "CREATE TABLE meta (name TEXT PRIMARY KEY, value INTEGER NOT NULL)",
    ),
)
SCHEMA_VERSION = len(MIGRATIONS)

# The record tuple is bound as it is: SQL does the few conversions, so that a batch costs no
# Python work per record.
_INSERT_HEAD = """INSERT INTO usage (ts, request_id, key_id, client_ip, endpoint, model,
    provider, upstream_model, status, outcome, prompt_tokens, completion_tokens, cached_tokens,
    cache_write_tokens, reasoning_tokens, cost_nano, latency_ms, ttft_ms, stream) VALUES """
_INSERT_ROW = (
    "(?, ?, coalesce(?, ''), coalesce(?, ''), ?, coalesce(?, ''), coalesce(?, ''),"
    " coalesce(?, ''), ?, ?, ?, ?, ?, ?, ?, CAST(round(? * 1e9) AS INTEGER), ?, ?, ?)"
)
# Rows per INSERT, largest first: a batch goes in as statements of these sizes only. A
# statement per batch length made up to 500 different ones, each prepared anew (a 500-row
# INSERT compiles to a program of hundreds of KB) and kept in the connection's statement
# cache and here: ~40 MB of RSS that grew with the traffic. SQLite before 3.32 allowed only
# 999 parameters per statement (19 a row).
_INSERT_SIZES = (256, 64, 16, 4, 1) if sqlite3.sqlite_version_info >= (3, 32) else (32, 8, 1)


@functools.cache
def _insert_rows(n: int) -> str:
    return _INSERT_HEAD + ",".join([_INSERT_ROW] * n)


def _insert_chunks(count: int) -> list[tuple[int, int]]:
    """(start, size) of the statements that insert `count` rows, sizes from _INSERT_SIZES."""
    chunks, start = [], 0
    for size in _INSERT_SIZES:
        while count - start >= size:
            chunks.append((start, size))
            start += size
    return chunks


_ROLL_UP = """INSERT INTO usage_daily (key_id, day, model, requests, errors, prompt_tokens,
    completion_tokens, cached_tokens, cache_write_tokens, reasoning_tokens, cost_nano)
SELECT key_id, date(ts, 'unixepoch'), model, count(*), sum(outcome != 'ok'),
    sum(prompt_tokens), sum(completion_tokens), sum(cached_tokens), sum(cache_write_tokens),
    sum(reasoning_tokens), sum(cost_nano)
FROM usage WHERE id > ? GROUP BY 1, 2, 3
ON CONFLICT (key_id, day, model) DO UPDATE SET
    requests = requests + excluded.requests,
    errors = errors + excluded.errors,
    prompt_tokens = prompt_tokens + excluded.prompt_tokens,
    completion_tokens = completion_tokens + excluded.completion_tokens,
    cached_tokens = cached_tokens + excluded.cached_tokens,
    cache_write_tokens = cache_write_tokens + excluded.cache_write_tokens,
    reasoning_tokens = reasoning_tokens + excluded.reasoning_tokens,
    cost_nano = cost_nano + excluded.cost_nano"""

_ACTIVITY = """INSERT INTO key_activity (key_id, first_used, last_used)
SELECT key_id, min(ts), max(ts) FROM usage WHERE id > ? AND key_id != '' GROUP BY key_id
ON CONFLICT (key_id) DO UPDATE SET
    first_used = min(first_used, excluded.first_used),
    last_used = max(last_used, excluded.last_used)"""

_SUMS = """sum(requests), sum(errors), sum(prompt_tokens), sum(completion_tokens),
    sum(cached_tokens), sum(cache_write_tokens), sum(reasoning_tokens), sum(cost_nano)"""

_DATA_ERRORS = (
    sqlite3.InterfaceError,
    sqlite3.ProgrammingError,
    sqlite3.IntegrityError,
    TypeError,
    ValueError,
    OverflowError,
)


class UsageStore:
    """One connection to the usage database; use it from the thread that created it."""

    def __init__(
        self,
        path: str,
        *,
        clock: Callable[[], float] = time.time,
        busy_timeout: float = 2.0,
    ) -> None:
        self.path = path
        self.clock = clock
        self.transactions = 0  # committed write_batch transactions, for tests and metrics
        self.conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        try:
            self._use_wal(busy_timeout)
            # FULL syncs the WAL at each commit (NORMAL only at checkpoints, which a power loss
            # could undo): one fsync per batch, on the writer thread, buys the crash bound.
            self.conn.execute("PRAGMA synchronous = FULL")
            self.conn.execute("PRAGMA foreign_keys = ON")
            self._migrate()
        except BaseException:
            self.conn.close()
            raise

    def _use_wal(self, busy_timeout: float) -> None:
        # While another process holds the write lock on a new file (migrating it), SQLite
        # refuses the switch to WAL at once instead of waiting busy_timeout: `serve --workers N`
        # starting on a fresh database lost a worker to it. Wait here instead.
        deadline = time.monotonic() + busy_timeout
        while True:
            try:
                self.conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if "locked" not in str(e) or time.monotonic() >= deadline:
                    raise
                time.sleep(0.01)

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> UsageStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- schema ---------------------------------------------------------------------------

    def schema_version(self) -> int:
        version: int = self.conn.execute("PRAGMA user_version").fetchone()[0]
        return version

    def _migrate(self) -> None:
        self._check_version(self.schema_version())
        if self.schema_version() == SCHEMA_VERSION:
            return
        # Under the write lock, so that two processes opening a new file do not both migrate.
        with self._transaction():
            version = self.schema_version()
            self._check_version(version)
            for i in range(version, SCHEMA_VERSION):
                for statement in MIGRATIONS[i]:
                    self.conn.execute(statement)
            self.conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_version(self, version: int) -> None:
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(
                f"{self.path}: the usage database has schema version {version}, but this "
                f"gateway knows versions up to {SCHEMA_VERSION}; upgrade the gateway or "
                "point storage.path at another file"
            )

    def _transaction(self) -> _Transaction:
        return _Transaction(self.conn)

    # --- usage records --------------------------------------------------------------------

    def write_batch(self, records: Sequence[UsageRecord]) -> int:
        """Insert records and update the daily roll-ups in one transaction.

        Returns how many were written: records of the wrong shape or types are left out
        (the caller counts them); database faults (locked, full, read-only) raise
        ``sqlite3.Error`` and nothing is written.
        """
        if not records:
            return 0
        try:
            self._insert(records)
            return len(records)
        except _DATA_ERRORS:
            pass  # one bad record fails the whole executemany: find the good ones
        valid = [r for r in records if is_valid_record(r)]
        if valid:
            self._insert(valid)
        return len(valid)

    def _insert(self, records: Sequence[UsageRecord]) -> None:
        # Hundreds of rows per statement: executemany releases and retakes the GIL for every
        # row, and under a busy event loop each retake waits a whole switch interval (5 ms),
        # which made a batch of thousands take seconds.
        with self._transaction():
            before = self.conn.execute("SELECT coalesce(max(id), 0) FROM usage").fetchone()[0]
            for start, size in _insert_chunks(len(records)):
                chunk = records[start : start + size]
                self.conn.execute(_insert_rows(size), list(itertools.chain(*chunk)))
            self.conn.execute(_ROLL_UP, (before,))
            self.conn.execute(_ACTIVITY, (before,))
        self.transactions += 1

    def prune(self, before: float, limit: int = 10_000) -> int:
        """Delete up to `limit` raw rows older than `before`; roll-ups stay. Returns the count.

        Call it again while it returns `limit`: short transactions let batches in between.
        Also forgets the hashes retired by a rotation whose grace time is over.
        """
        with self._transaction():
            cur = self.conn.execute(
                "DELETE FROM usage WHERE id IN (SELECT id FROM usage WHERE ts < ? LIMIT ?)",
                (before, limit),
            )
            self.conn.execute("DELETE FROM key_old_hashes WHERE valid_until <= ?", (self.clock(),))
        return cur.rowcount

    def records(
        self, key_id: str | None = None, start: float = 0.0, end: float | None = None
    ) -> list[UsageRecord]:
        """Raw records with start <= ts < end, oldest first (admin detail and tests)."""
        sql = """SELECT ts, request_id, key_id, client_ip, endpoint, model, provider,
            upstream_model, status, outcome, prompt_tokens, completion_tokens, cached_tokens,
            cache_write_tokens, reasoning_tokens, cost_nano, latency_ms, ttft_ms, stream
            FROM usage WHERE ts >= ?"""
        args: list[object] = [start]
        if end is not None:
            sql += " AND ts < ?"
            args.append(end)
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        rows = self.conn.execute(sql + " ORDER BY ts, id", args).fetchall()
        return [UsageRecord._make((*r[:15], r[15] / NANO, r[16], r[17], bool(r[18]))) for r in rows]

    # --- queries --------------------------------------------------------------------------

    def summary(
        self, key_id: str | None, start: date, end: date, model: str | None = None
    ) -> UsageSummary:
        """Usage from `start` to `end`, both days included (UTC), of one key or all keys."""
        where, args = _filters(key_id, start, end, model)
        by_model = self.conn.execute(
            f"SELECT model, {_SUMS} FROM usage_daily WHERE {where} GROUP BY model ORDER BY model",
            args,
        ).fetchall()
        by_day = self.conn.execute(
            "SELECT day, sum(requests), sum(prompt_tokens + completion_tokens),"
            f" sum(cost_nano) FROM usage_daily WHERE {where} GROUP BY day ORDER BY day",
            args,
        ).fetchall()
        return build_summary(start, end, ((r[0], r[1:]) for r in by_model), by_day)

    def admin_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> AdminUsage:
        """Usage of every key (or one) from `start` to `end` inclusive, per key and model."""
        where, args = _filters(key_id, start, end, model)
        rows = self.conn.execute(
            f"SELECT key_id, model, {_SUMS} FROM usage_daily WHERE {where}"
            " GROUP BY key_id, model ORDER BY key_id, model",
            args,
        )
        return build_admin_usage(start, end, ((r[0], r[1], r[2:]) for r in rows))

    def daily_usage(
        self, start: date, end: date, key_id: str | None = None, model: str | None = None
    ) -> list[DailyKeyModelUsage]:
        """One row per (day, key, model) with any request from `start` to `end` inclusive,
        oldest day first: the series the dashboard's charts are drawn from."""
        where, args = _filters(key_id, start, end, model)
        return [
            daily_row(*row)
            for row in self.conn.execute(
                "SELECT day, key_id, model, requests, errors, prompt_tokens + completion_tokens,"
                f" cost_nano FROM usage_daily WHERE {where} ORDER BY day, key_id, model",
                args,
            )
        ]

    def key_stats(self, key_ids: Iterable[str] = ()) -> list[KeyStats]:
        """Per key: created, first and last use, all-time totals and today's (UTC) usage.

        Lists managed keys, keys that were ever used and `key_ids` (e.g. the config's keys).
        """
        return build_key_stats(
            key_ids,
            self.conn.execute("SELECT id, created_at FROM keys").fetchall(),
            self.conn.execute("SELECT * FROM key_activity").fetchall(),
            self.conn.execute(
                """SELECT key_id, sum(requests), sum(prompt_tokens + completion_tokens),
                    sum(cost_nano), sum(CASE day WHEN :d THEN requests ELSE 0 END),
                    sum(CASE day WHEN :d THEN prompt_tokens + completion_tokens ELSE 0 END),
                    sum(CASE day WHEN :d THEN cost_nano ELSE 0 END)
                FROM usage_daily WHERE key_id != '' GROUP BY key_id""",
                {"d": utc_day(self.clock())},
            ).fetchall(),
        )

    def totals_since(self, since: float) -> dict[str, KeyTotals]:
        """Requests, tokens and cost per key of the records with ts >= `since`.

        Roll-ups cover the whole UTC days from `since` on, raw rows only the part of a day
        before the first midnight, so that a period longer than the raw retention (a monthly
        budget) still adds up; a `since` that is not a UTC midnight needs that day's raw rows.
        """
        midnight = day_boundary(since)
        return add_totals(
            self.conn.execute(
                "SELECT key_id, count(*), sum(prompt_tokens + completion_tokens),"
                " sum(cost_nano) FROM usage WHERE ts >= ? AND ts < ? GROUP BY key_id",
                (since, midnight),
            ),
            self.conn.execute(
                "SELECT key_id, sum(requests), sum(prompt_tokens + completion_tokens),"
                " sum(cost_nano) FROM usage_daily WHERE day >= ? GROUP BY key_id",
                (utc_day(midnight),),
            ),
        )

    def restore_counters(
        self, today_start: float, cost_since: float
    ) -> dict[str, RestoredCounters]:
        """Per key: requests and tokens since `today_start`, cost since `cost_since`."""
        return restored_counters(self.totals_since(today_start), self.totals_since(cost_since))

    # --- managed keys ---------------------------------------------------------------------

    def add_key(
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
        with self._transaction():
            self._check_unused(key_id, key_hash)
            self.conn.execute(
                "INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, NULL, ?)",
                (key_id, key_hash, description, json.dumps(list(models)), tier, key.created_at,
                 expires_at),
            )  # fmt: skip
            self._bump_keys_generation()
        return key

    def get_key(self, key_id: str) -> ManagedKey | None:
        row = self.conn.execute("SELECT * FROM keys WHERE id = ?", (key_id,)).fetchone()
        return _managed_key(row) if row else None

    def list_keys(self, include_revoked: bool = True) -> list[ManagedKey]:
        sql = "SELECT * FROM keys"
        if not include_revoked:
            sql += " WHERE revoked_at IS NULL"
        return [_managed_key(r) for r in self.conn.execute(sql + " ORDER BY id")]

    def revoke_key(self, key_id: str, reason: str = "") -> float:
        """Revoke a managed or configured key id for good. Returns when it was revoked.

        Revoking again keeps the first time. Configured (TOML) ids are stored in
        ``revocations`` only; the gateway must check ``revoked_ids()`` for them.
        """
        now = self.clock()
        with self._transaction():
            self.conn.execute(
                "INSERT INTO revocations VALUES (?, ?, ?) ON CONFLICT (key_id) DO NOTHING",
                (key_id, now, reason),
            )
            self.conn.execute(
                "UPDATE keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                (now, key_id),
            )
            self._bump_keys_generation()
            revoked_at: float = self.conn.execute(
                "SELECT revoked_at FROM revocations WHERE key_id = ?", (key_id,)
            ).fetchone()[0]
        return revoked_at

    def revoked_ids(self) -> frozenset[str]:
        return frozenset(r[0] for r in self.conn.execute("SELECT key_id FROM revocations"))

    def rotate_key(self, key_id: str, new_hash: str, grace: float) -> ManagedKey:
        """Give a managed key a new hash; the old one stays valid for `grace` seconds."""
        check_hash(new_hash)
        now = self.clock()
        with self._transaction():
            key = self.get_key(key_id)
            if key is None:
                raise UnknownKey(f"no managed key '{key_id}' (configured keys rotate in TOML)")
            if key.revoked_at is not None:
                raise UnknownKey(f"key '{key_id}' is revoked")
            self._check_unused(None, new_hash)
            if grace > 0:
                self.conn.execute(
                    "INSERT INTO key_old_hashes VALUES (?, ?, ?)", (key.hash, key_id, now + grace)
                )
            self.conn.execute("UPDATE keys SET hash = ? WHERE id = ?", (new_hash, key_id))
            self._bump_keys_generation()
        return dataclasses.replace(key, hash=new_hash)

    def valid_keys(self) -> dict[str, ManagedKey]:
        """hash -> key for every hash accepted now: current hashes of live keys, and hashes
        retired by a rotation whose grace time has not passed."""
        now = self.clock()
        live = {
            k.id: k
            for k in map(
                _managed_key,
                self.conn.execute(
                    "SELECT * FROM keys WHERE revoked_at IS NULL"
                    " AND (expires_at IS NULL OR expires_at > ?)"
                    " AND id NOT IN (SELECT key_id FROM revocations)",
                    (now,),
                ),
            )
        }
        valid = {k.hash: k for k in live.values()}
        for old_hash, kid in self.conn.execute(
            "SELECT hash, key_id FROM key_old_hashes WHERE valid_until > ?", (now,)
        ):
            if kid in live:
                valid[old_hash] = live[kid]
        return valid

    def next_key_change(self) -> float | None:
        """The next time at which valid_keys() changes by itself (an expiry or a grace end)."""
        now = self.clock()
        row = self.conn.execute(
            """SELECT min(t) FROM (
                SELECT expires_at AS t FROM keys WHERE revoked_at IS NULL AND expires_at > :now
                UNION ALL SELECT valid_until FROM key_old_hashes WHERE valid_until > :now)""",
            {"now": now},
        ).fetchone()
        result: float | None = row[0]
        return result

    def keys_generation(self) -> int:
        """A number that every key change (from any process) increases."""
        row = self.conn.execute("SELECT value FROM meta WHERE name = 'keys_generation'").fetchone()
        return int(row[0]) if row else 0

    def _check_unused(self, key_id: str | None, key_hash: str) -> None:
        if (
            key_id is not None
            and self.conn.execute("SELECT 1 FROM keys WHERE id = ?", (key_id,)).fetchone()
        ):
            raise KeyConflict(f"a managed key '{key_id}' already exists")
        if self.conn.execute(
            "SELECT 1 FROM keys WHERE hash = ? UNION ALL SELECT 1 FROM key_old_hashes"
            " WHERE hash = ?",
            (key_hash, key_hash),
        ).fetchone():
            raise KeyConflict("this key hash is already in use")

    def _bump_keys_generation(self) -> None:
        self.conn.execute(
            "INSERT INTO meta VALUES ('keys_generation', 1)"
            " ON CONFLICT (name) DO UPDATE SET value = value + 1"
        )

    # --- tiers ----------------------------------------------------------------------------

    def add_tier_change(
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
        with self._transaction():
            self.conn.execute(
                "INSERT INTO tier_changes (key_id, ts, from_tier, to_tier, reason)"
                " VALUES (?, ?, ?, ?, ?)",
                change,
            )
            if state is not None:
                self._put_tier_state(state)
        return change

    def tier_changes(self, key_id: str | None = None, since: float = 0.0) -> list[TierChange]:
        sql = "SELECT key_id, ts, from_tier, to_tier, reason FROM tier_changes WHERE ts >= ?"
        args: list[object] = [since]
        if key_id is not None:
            sql += " AND key_id = ?"
            args.append(key_id)
        return [TierChange(*r) for r in self.conn.execute(sql + " ORDER BY ts, id", args)]

    def set_tier_state(self, state: TierState) -> None:
        with self._transaction():
            self._put_tier_state(state)

    def _put_tier_state(self, state: TierState) -> None:
        self.conn.execute(
            "INSERT OR REPLACE INTO tier_state VALUES (?, ?, ?, ?, ?)",
            (state.key_id, state.tier, state.clean_days, state.last_day, state.updated_at),
        )

    def tier_states(self) -> dict[str, TierState]:
        return {r[0]: TierState(*r) for r in self.conn.execute("SELECT * FROM tier_state")}


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on any error (the write lock is taken first,
    so a transaction never fails half-way on a lock upgrade)."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is None:
            try:
                self.conn.execute("COMMIT")
                return
            except BaseException:
                self.rollback()
                raise
        self.rollback()

    def rollback(self) -> None:
        # A failed ROLLBACK (the disk went away) must not hide the error that caused it.
        with contextlib.suppress(sqlite3.Error):
            if self.conn.in_transaction:
                self.conn.execute("ROLLBACK")


def _filters(
    key_id: str | None, start: date, end: date, model: str | None
) -> tuple[str, list[object]]:
    where = "day >= ? AND day <= ?"
    args: list[object] = [start.isoformat(), end.isoformat()]
    if key_id is not None:
        where += " AND key_id = ?"
        args.append(key_id)
    if model is not None:
        where += " AND model = ?"
        args.append(model)
    return where, args


def _managed_key(row: Sequence[object]) -> ManagedKey:
    kid, key_hash, description, models, tier, created, revoked, expires = row
    return ManagedKey(
        str(kid),
        str(key_hash),
        str(description),
        tuple(json.loads(str(models))),
        tier if isinstance(tier, str) else None,
        float(created),  # type: ignore[arg-type]
        float(revoked) if isinstance(revoked, int | float) else None,
        float(expires) if isinstance(expires, int | float) else None,
    )
