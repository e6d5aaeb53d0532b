"""The shared PostgreSQL usage store against a real server: schema, write-behind, queries, keys,
faults, and a fleet of two gateways answering for each other.

The server is ``GATEWAY_TEST_POSTGRES_URL`` or ``postgresql://postgres@127.0.0.1:5432/postgres``
(``.ci/run`` starts one when none is running). The session works in a fresh database
``gateway_test_<random>``, dropped at the end, and each test in a fresh schema of it (the URL's
``search_path``), so that tests never see each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from gateway.auth import hash_key, new_key
from gateway.config import ConfigError, StorageConfig, loads
from gateway.translate.base import Usage
from gateway.usage import (
    KeyTotals,
    RestoredCounters,
    SchemaTooNew,
    TierState,
    UsageRecord,
    UsageRecorder,
    UsageStore,
    cost_of,
)
from gateway.usage_store import KeyConflict, UnknownKey, UsageStoreError, day_start

from .conftest import CLIENT_KEY, DEMO_ONLY_KEY, Fakes, MakeGateway, gateway_toml
from .test_usage import MODELS, NOW, TODAY, Clock, eventually, rec
from .test_usage_http import ADMIN_KEY, MESSAGES, get, post, priced, rotate_and_watch_the_grace_end

asyncpg = pytest.importorskip(
    "asyncpg", reason="asyncpg is not installed (pip install -e '.[test]' brings it)"
)
from gateway import usage_pg  # noqa: E402  (needs asyncpg)
from gateway.usage_pg import SCHEMA_VERSION, PostgresUsageStore  # noqa: E402

ROOT = Path(__file__).parent.parent
DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


# --- the server -----------------------------------------------------------------------------


def _with_database(url: str, database: str, query: str | None = None) -> str:
    parts = urlsplit(url)
    return urlunsplit(
        parts._replace(path=f"/{database}", query=parts.query if query is None else query)
    )


def _run_elsewhere(coro: Coroutine[Any, Any, None]) -> None:
    """Run admin statements on a loop of their own, away from the tests' loops."""
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, coro).result()


async def _execute(url: str, *statements: str) -> None:
    conn = await asyncpg.connect(url, timeout=5)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def pg_database() -> Iterator[str]:
    """A fresh database on the test server for this session; its URL."""
    server = os.environ.get("GATEWAY_TEST_POSTGRES_URL") or DEFAULT_URL
    name = f"gateway_test_{secrets.token_hex(4)}"
    try:
        _run_elsewhere(_execute(server, f"CREATE DATABASE {name}"))
    except Exception as e:  # any failure to reach the server means: no server here
        pytest.skip(
            f"no PostgreSQL server for the usage store tests: tried {usage_pg.redact(server)} "
            f"({type(e).__name__}: {e}); set GATEWAY_TEST_POSTGRES_URL or run .ci/run, "
            "which starts one"
        )
    yield _with_database(server, name)
    _run_elsewhere(_execute(server, f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.fixture
async def pg_url(pg_database: str) -> str:
    """A fresh, empty schema of the session's database, as the URL's search_path."""
    schema = f"t_{secrets.token_hex(4)}"
    await _execute(pg_database, f"CREATE SCHEMA {schema}")
    return _with_database(pg_database, urlsplit(pg_database).path[1:], f"search_path={schema}")


@pytest.fixture
async def sql(pg_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain connection to the test's schema, for looking at the tables directly."""
    conn = await asyncpg.connect(pg_url)
    yield conn
    await conn.close()


MakeStore = Callable[..., Awaitable[PostgresUsageStore]]
MakeRecorder = Callable[..., Awaitable[UsageRecorder]]


@pytest.fixture
async def make_store(pg_url: str) -> AsyncIterator[MakeStore]:
    made: list[PostgresUsageStore] = []

    async def make(url: str | None = None, **kw: Any) -> PostgresUsageStore:
        kw.setdefault("clock", Clock())
        store = await PostgresUsageStore.open(url or pg_url, **kw)
        made.append(store)
        return store

    yield make
    for store in made:
        await store.close()


@pytest.fixture
async def store(make_store: MakeStore) -> PostgresUsageStore:
    return await make_store()


@pytest.fixture
async def make_recorder(pg_url: str) -> AsyncIterator[MakeRecorder]:
    made: list[UsageRecorder] = []

    async def make(start: bool = True, url: str | None = None, **kw: Any) -> UsageRecorder:
        storage: dict[str, Any] = {"url": url or pg_url, "flush_interval": 0.05}
        storage.update(
            {k: kw.pop(k) for k in ("flush_interval", "queue_max", "retention_days") if k in kw}
        )
        kw.setdefault("clock", Clock())
        recorder = UsageRecorder(StorageConfig(**storage), **kw)
        made.append(recorder)
        if start:
            await recorder.start()
        return recorder

    yield make
    for recorder in made:
        await recorder.close()


def pg(recorder: UsageRecorder) -> PostgresUsageStore:
    backend = recorder.backend
    assert isinstance(backend, PostgresUsageStore)
    return backend


async def raw_count(sql: asyncpg.Connection) -> int:
    n: int = await sql.fetchval("SELECT count(*) FROM usage")
    return n


class Proxy:
    """A TCP relay in front of the server, to make the database unreachable and back."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Refuse new connections and cut the open ones, as a network failure would."""
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.transport.abort()
        self._writers.clear()
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}


@pytest.fixture
async def proxy(pg_url: str) -> AsyncIterator[Proxy]:
    parts = urlsplit(pg_url)
    if not parts.hostname:
        pytest.skip("the test server is reached through a socket file, not TCP")
    relay = Proxy(parts.hostname, parts.port or 5432)
    await relay.start()
    yield relay
    with contextlib.suppress(AssertionError):
        await relay.stop()


def through(proxy: Proxy, url: str) -> str:
    parts = urlsplit(url)
    netloc = parts.netloc.rsplit("@", 1)
    auth = netloc[0] + "@" if len(netloc) == 2 else ""
    return urlunsplit(parts._replace(netloc=f"{auth}127.0.0.1:{proxy.port}"))


# --- schema ---------------------------------------------------------------------------------

TABLES = {
    "usage",
    "usage_daily",
    "key_activity",
    "keys",
    "key_old_hashes",
    "revocations",
    "tier_changes",
    "tier_state",
    "meta",
    "schema_migrations",
}


async def tables(sql: asyncpg.Connection) -> set[str]:
    rows = await sql.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = current_schema()"
    )
    return {r[0] for r in rows}


async def test_a_new_database_is_migrated_and_reopens_unchanged(
    make_store: MakeStore, sql: asyncpg.Connection
) -> None:
    assert await tables(sql) == set()
    s = await make_store()
    assert await s.schema_version() == SCHEMA_VERSION
    assert await tables(sql) == TABLES
    await s.add_key("app", hash_key(new_key()))
    again = await make_store()  # a second open must not try to create the tables again
    assert await again.schema_version() == SCHEMA_VERSION
    assert [k.id for k in await again.list_keys()] == ["app"]
    assert await sql.fetchval("SELECT count(*) FROM schema_migrations") == SCHEMA_VERSION
    # money and token columns are 64-bit integers: sums stay exact
    types = dict(
        await sql.fetch(
            "SELECT column_name, data_type FROM information_schema.columns"
            " WHERE table_schema = current_schema() AND table_name = 'usage_daily'"
        )
    )
    assert types["cost_nano"] == types["prompt_tokens"] == "bigint"


async def test_pending_migrations_are_applied_at_open(
    make_store: MakeStore, sql: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    s = await make_store()
    assert await s.write_batch([rec()]) == 1
    v2 = ("ALTER TABLE usage ADD COLUMN region TEXT NOT NULL DEFAULT 'eu'",)
    monkeypatch.setattr(usage_pg, "MIGRATIONS", (*usage_pg.MIGRATIONS, v2))
    monkeypatch.setattr(usage_pg, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    s = await make_store()
    assert await s.schema_version() == SCHEMA_VERSION + 1
    assert [r[0] for r in await sql.fetch("SELECT region FROM usage")] == ["eu"]


async def test_a_newer_schema_is_refused_with_a_clear_error(
    make_store: MakeStore, sql: asyncpg.Connection
) -> None:
    await make_store()
    await sql.execute("INSERT INTO schema_migrations VALUES ($1, 0)", SCHEMA_VERSION + 5)
    with pytest.raises(SchemaTooNew, match=rf"schema version {SCHEMA_VERSION + 5}.*upgrade"):
        await make_store()


async def test_concurrent_starts_migrate_once(
    make_recorder: MakeRecorder, sql: asyncpg.Connection, pg_url: str
) -> None:
    # Hold the migration lock, as a first gateway that is migrating would...
    other = await asyncpg.connect(pg_url)
    tx = other.transaction()
    await tx.start()
    await other.execute(usage_pg._LOCK, usage_pg._MIGRATE_LOCK)
    starting = [asyncio.ensure_future(make_recorder()) for _ in range(3)]
    await asyncio.sleep(0.5)
    # ...the others wait for it rather than create the same tables at the same time...
    assert not any(t.done() for t in starting)
    assert await tables(sql) == set()
    await tx.rollback()
    await other.close()
    # ...then one migrates and the others find the schema current.
    recorders = await asyncio.gather(*starting)
    assert await sql.fetchval("SELECT count(*) FROM schema_migrations") == SCHEMA_VERSION
    for i, r in enumerate(recorders):
        r.record(rec(n=i))
        assert await r.flush()
    assert await raw_count(sql) == 3


async def test_unreachable_database_at_start_is_a_clear_error(
    make_recorder: MakeRecorder, pg_url: str
) -> None:
    with socket_closed() as port:
        url = urlunsplit(urlsplit(pg_url)._replace(netloc=f"someone:s3cret@127.0.0.1:{port}"))
        with pytest.raises(UsageStoreError, match="cannot open") as info:
            await make_recorder(url=url)
    assert "s3cret" not in str(info.value) and "someone:***@" in str(info.value)


@contextlib.contextmanager
def socket_closed() -> Iterator[int]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        yield s.getsockname()[1]  # bound, not listening: connections are refused


# --- writing --------------------------------------------------------------------------------


async def test_a_record_reads_back_with_every_field(make_recorder: MakeRecorder) -> None:
    r = await make_recorder()
    full = UsageRecord(
        ts=NOW + 0.25,
        request_id="req_abc",
        key_id="k1",
        client_ip="2001:db8::1",
        endpoint="chat",
        model="gpt-4",
        provider="openai",
        upstream_model="gpt-4o-2024-08-06",
        status=200,
        outcome="ok",
        prompt_tokens=1200,
        completion_tokens=300,
        cached_tokens=1000,
        cache_write_tokens=100,
        reasoning_tokens=120,
        cost=0.012345678,
        latency_ms=812.5,
        ttft_ms=95.25,
        stream=True,
    )
    failed = rec(NOW + 1, 2, status=499, outcome="client_closed", ttft_ms=None, cost=0.0)
    no_key = rec(NOW + 2, 3, key_id=None, client_ip=None, model=None)  # type: ignore[arg-type]
    for x in (full, failed, no_key):
        r.record(x)
    assert await r.flush()
    assert await r.backend.records() == [
        full,
        failed,
        no_key._replace(key_id="", client_ip="", model=""),
    ]
    assert await r.backend.records(key_id="k1", start=NOW + 1, end=NOW + 2) == [failed]


async def test_records_are_written_in_few_transactions(
    make_recorder: MakeRecorder, sql: asyncpg.Connection
) -> None:
    r = await make_recorder(flush_interval=60, batch_size=5_000)
    for i in range(12_000):
        r.record(rec(n=i))
    assert await r.flush()
    assert r.written == 12_000
    assert pg(r).transactions == 3
    assert await raw_count(sql) == 12_000
    assert await sql.fetchval("SELECT sum(requests) FROM usage_daily") == 12_000


async def test_the_writer_flushes_on_its_own_and_close_writes_the_rest(
    make_recorder: MakeRecorder, sql: asyncpg.Connection
) -> None:
    r = await make_recorder(flush_interval=0.05)
    for i in range(3):
        r.record(rec(n=i))

    async def written() -> bool:
        return r.written == 3

    await eventually(written)
    assert await raw_count(sql) == 3
    slow = await make_recorder(flush_interval=3_600)
    for i in range(50):
        slow.record(rec(n=i))
    await slow.close()
    assert await raw_count(sql) == 53
    slow.record(rec(n=51))  # after close: counted, not lost silently
    assert slow.dropped == 1


async def test_invalid_records_are_counted_and_odd_text_is_kept(
    make_recorder: MakeRecorder,
) -> None:
    r = await make_recorder(flush_interval=3_600)
    r.record(rec(n=1))
    r.record(("not", "a", "record"))  # type: ignore[arg-type]
    r.record(rec(n=2, prompt_tokens="many"))
    r.record(rec(n=3, completion_tokens=2**70))
    r.record(rec(n=4, model="gpt\x00-4"))  # PostgreSQL text cannot hold NUL; SQLite can
    assert await r.flush()
    assert (r.written, r.rejected, r.dropped) == (2, 3, 3)
    assert [(x.request_id, x.model) for x in await r.backend.records()] == [
        ("req_1", "m"),
        ("req_4", "gpt\ufffd-4"),
    ]


async def test_queue_bound_drops_and_counts(
    make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    r = await make_recorder(queue_max=10, flush_interval=0.05)
    for i in range(15):
        r.record(rec(n=i))
    assert (r.depth, r.dropped) == (10, 5)

    async def reported() -> bool:
        return any("dropping" in m for m in caplog.messages)

    await eventually(reported)
    assert await r.flush()
    assert (r.written, r.depth) == (10, 0)
    assert sum("dropping new records" in m for m in caplog.messages) == 1


async def test_two_writers_on_the_same_days_add_up(
    make_recorder: MakeRecorder, sql: asyncpg.Connection
) -> None:
    """Roll-ups come from each batch's own rows, not from "ids above the last maximum",
    which would count the other process's concurrent rows twice."""
    writers = [await make_recorder(flush_interval=3_600, batch_size=200) for _ in range(2)]

    async def write(r: UsageRecorder, tag: str) -> None:
        for _ in range(10):
            for i in range(300):
                r.record(rec(NOW - (i % 3) * 86_400, i, key=f"k{i % 4}", model=tag))
            assert await r.flush()
            await asyncio.sleep(0)

    await asyncio.gather(write(writers[0], "a"), write(writers[1], "b"))
    assert await raw_count(sql) == 6_000
    raw = await sql.fetch(
        "SELECT key_id, (to_timestamp(ts) AT TIME ZONE 'UTC')::date AS day, model, count(*) AS n"
        " FROM usage GROUP BY 1, 2, 3 ORDER BY 1, 2, 3"
    )
    daily = await sql.fetch(
        "SELECT key_id, day, model, requests AS n FROM usage_daily ORDER BY 1, 2, 3"
    )
    assert [tuple(r) for r in raw] == [tuple(r) for r in daily]


async def test_a_crash_loses_at_most_the_last_flush_interval(
    pg_url: str, sql: asyncpg.Connection
) -> None:
    """SIGKILL a process that records ~2,000 requests/s; what it reported written is in the
    database, as a prefix of what it recorded, with the roll-ups committed alongside."""
    child = """
import asyncio, sys, time
from gateway.config import StorageConfig
from gateway.usage import UsageRecorder, UsageRecord

async def main():
    rec = UsageRecorder(StorageConfig(url=sys.argv[1], flush_interval=0.05))
    await rec.start()
    n = 0
    while True:
        for _ in range(10):
            rec.record(UsageRecord(time.time(), f"r{n}", "k", "", "chat", "m", prompt_tokens=1))
            n += 1
        print(n, time.monotonic(), rec.written, flush=True)
        await asyncio.sleep(0.005)

asyncio.run(main())
"""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        child,
        pg_url,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout is not None
    reported, first = 0, None
    async for line in proc.stdout:
        _, t, written = line.split()
        first = first or float(t)
        reported = max(reported, int(written))
        if float(t) - first >= 1.5:
            break
    proc.kill()
    await proc.wait()
    ids = [r[0] for r in await sql.fetch("SELECT request_id FROM usage ORDER BY id")]
    assert ids == [f"r{i}" for i in range(len(ids))]  # a prefix: no gaps, no duplicates
    assert len(ids) >= reported > 0  # whatever was reported written is durable
    assert await sql.fetchval("SELECT sum(requests) FROM usage_daily") == len(ids)


# --- faults ---------------------------------------------------------------------------------


async def test_unreachable_then_back_writes_everything_and_logs_once(
    make_recorder: MakeRecorder,
    proxy: Proxy,
    pg_url: str,
    sql: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    r = await make_recorder(url=through(proxy, pg_url), flush_interval=3_600)
    r.record(rec(n=0))
    assert await r.flush()
    await proxy.stop()
    for i in range(1, 21):
        r.record(rec(n=i))
    assert not await r.flush()  # the pooled connection is gone
    assert not await r.flush()  # and new ones are refused
    r.record(rec(n=21))  # the request path carries on
    assert not await r.flush()
    assert (r.depth, r.written, r.dropped, r.failing) == (21, 1, 0, True)
    await proxy.start()
    assert await r.flush()
    assert (r.depth, r.written, r.failing) == (0, 22, False)
    assert await raw_count(sql) == 22
    errors = [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
    assert len(errors) == 1 and "cannot write to" in errors[0], errors
    assert "127.0.0.1" in errors[0]
    assert any("writable again" in m for m in caplog.messages)


async def test_the_writer_retries_on_its_own_after_a_fault(
    make_recorder: MakeRecorder, proxy: Proxy, pg_url: str, sql: asyncpg.Connection
) -> None:
    r = await make_recorder(url=through(proxy, pg_url), flush_interval=0.02, max_backoff=0.1)
    await proxy.stop()
    r.record(rec())

    async def failing() -> bool:
        return r.failing

    await eventually(failing)
    await proxy.start()

    async def written() -> bool:
        return r.written == 1 and not r.failing

    await eventually(written)
    assert await raw_count(sql) == 1


async def test_close_gives_up_after_its_timeout_and_counts_the_loss(
    make_recorder: MakeRecorder,
    proxy: Proxy,
    pg_url: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    r = await make_recorder(url=through(proxy, pg_url), flush_interval=3_600, close_timeout=0)
    await proxy.stop()
    for i in range(7):
        r.record(rec(n=i))
    await r.close()
    assert r.dropped == 7
    assert any("7 records were not written" in m for m in caplog.messages)


# --- the same answers as SQLite, to the cent ----------------------------------------------------


def random_records(n: int, seed: int = 7) -> list[UsageRecord]:
    rnd = random.Random(seed)
    records = []
    for i in range(n):
        model = rnd.choice(["cached", "plain", "flat"])
        usage = Usage(prompt_tokens=rnd.randint(0, 5000), completion_tokens=rnd.randint(0, 2000))
        usage.cached_tokens = rnd.randint(0, usage.prompt_tokens)
        usage.cache_write_tokens = rnd.randint(0, usage.prompt_tokens - usage.cached_tokens)
        usage.reasoning_tokens = rnd.randint(0, usage.completion_tokens)
        records.append(
            rec(
                NOW - rnd.randint(0, 4 * 86_400),
                i,
                key=rnd.choice(["k1", "k2", "K3", "_k4"]),
                model=model,
                outcome=rnd.choice(["ok", "ok", "upstream_error"]),
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=usage.completion_tokens,
                cached_tokens=usage.cached_tokens,
                cache_write_tokens=usage.cache_write_tokens,
                reasoning_tokens=usage.reasoning_tokens,
                cost=cost_of(MODELS[model], usage),
            )
        )
    return records


async def test_every_query_answers_as_the_sqlite_store_does(
    store: PostgresUsageStore, tmp_path: Path
) -> None:
    records = random_records(3000)
    with UsageStore(str(tmp_path / "same.db"), clock=Clock()) as lite:
        for i in range(0, len(records), 700):
            assert await store.write_batch(records[i : i + 700]) == len(records[i : i + 700])
            lite.write_batch(records[i : i + 700])
        await store.add_key("managed", hash_key(new_key()))
        lite.add_key("managed", hash_key(new_key()))
        start, end = date(2025, 3, 12), date(2025, 3, 14)
        for key in ("k1", None, "nobody"):
            assert await store.summary(key, start, end) == lite.summary(key, start, end)
        assert await store.summary(None, start, end, "flat") == lite.summary(
            None, start, end, "flat"
        )
        for args in ((start, end), (date(2025, 3, 1), TODAY, "k2"), (start, end, None, "plain")):
            assert await store.admin_usage(*args) == lite.admin_usage(*args)  # type: ignore[arg-type]
            assert await store.daily_usage(*args) == lite.daily_usage(*args)  # type: ignore[arg-type]
        assert await store.key_stats(["config-key"]) == lite.key_stats(["config-key"])
        today, month = day_start(TODAY), day_start(date(2025, 3, 1))
        for since in (0.0, month, today, today + 5400, NOW - 3 * 86_400 + 1234.5):
            assert await store.totals_since(since) == lite.totals_since(since)
        assert await store.restore_counters(today, month) == lite.restore_counters(today, month)
        assert await store.records("K3", NOW - 86_400) == lite.records("K3", NOW - 86_400)


async def test_summary_matches_the_raw_records_to_the_cent(store: PostgresUsageStore) -> None:
    records = random_records(2000, seed=11)
    assert await store.write_batch(records) == 2000
    start, end = date(2025, 3, 12), date(2025, 3, 14)
    got = await store.summary("k1", start, end)
    mine = [
        r
        for r in records
        if r.key_id == "k1" and start <= datetime.fromtimestamp(r.ts, UTC).date() <= end
    ]
    assert list(got) == [
        "object",
        "total_tokens",
        "total_requests",
        "total_cost",
        "period_start",
        "period_end",
        "breakdown",
        "daily",
    ]
    assert got["total_requests"] == len(mine)
    assert Decimal(repr(got["total_cost"])) == sum(Decimal(repr(r.cost)) for r in mine)
    for model, b in got["breakdown"].items():
        rows = [r for r in mine if r.model == model]
        assert b["errors"] == sum(r.outcome != "ok" for r in rows)
        assert b["cached_tokens"] == sum(r.cached_tokens for r in rows)
        assert b["cost"] == float(sum(Decimal(repr(r.cost)) for r in rows))
    assert [d["date"] for d in got["daily"]] == ["2025-03-12", "2025-03-13", "2025-03-14"]


async def test_costs_add_up_to_the_cent(store: PostgresUsageStore) -> None:
    cost = cost_of(MODELS["flat"], Usage())  # 0.1: ten of them are 1.0, not 0.9999999999999999
    await store.write_batch([rec(n=i, cost=cost) for i in range(10)])
    assert (await store.summary("k1", TODAY, TODAY))["total_cost"] == 1.0
    assert (await store.admin_usage(TODAY, TODAY))["total_cost"] == 1.0


async def test_admin_usage_and_key_stats(store: PostgresUsageStore) -> None:
    await store.add_key("managed", hash_key(new_key()))
    await store.write_batch(
        [
            rec(n=1, key="k1", model="a", cost=0.5),
            rec(n=2, key="k1", model="b", cost=0.25),
            rec(n=3, key="k2", model="a", cost=1.0),
            rec(NOW - 86_400 * 3, 4, key="k2", model="a", cost=8.0),
            rec(NOW - 86_400, 5, key="managed", cost=2.0),
            rec(NOW - 60, 6, key="managed", cost=0.5),
        ]
    )
    every = await store.admin_usage(TODAY, TODAY)
    assert [(k["key_id"], k["requests"], k["cost"]) for k in every["keys"]] == [
        ("k1", 2, 0.75),
        ("k2", 1, 1.0),
        ("managed", 1, 0.5),
    ]
    by_model = await store.admin_usage(date(2025, 3, 1), TODAY, model="a")
    assert [(k["key_id"], k["cost"]) for k in by_model["keys"]] == [("k1", 0.5), ("k2", 9.0)]
    stats = {s["key_id"]: s for s in await store.key_stats(["idle"])}
    m = stats["managed"]
    assert (m["created"], m["first_used"], m["last_used"]) == (NOW, NOW - 86_400, NOW - 60)
    assert (m["requests"], m["total_tokens"], m["cost"]) == (2, 30, 2.5)
    assert m["today"] == {"requests": 1, "total_tokens": 15, "cost": 0.5}
    assert stats["idle"]["last_used"] is None and stats["idle"]["requests"] == 0


# --- retention and restore ------------------------------------------------------------------


async def test_retention_deletes_raw_rows_and_keeps_roll_ups(make_recorder: MakeRecorder) -> None:
    clock = Clock()
    r = await make_recorder(flush_interval=3_600, retention_days=30, clock=clock)
    old, recent = NOW - 40 * 86_400, NOW - 10 * 86_400
    for i in range(5):
        r.record(rec(old, i, cost=1.0))
    r.record(rec(recent, 9, cost=1.0))
    assert await r.flush()
    assert await r.prune() == 5
    assert [x.request_id for x in await r.backend.records()] == ["req_9"]
    kept = await r.backend.summary("k1", datetime.fromtimestamp(old, UTC).date(), TODAY)
    assert (kept["total_requests"], kept["total_cost"]) == (6, 6.0)
    clock.now += 25 * 86_400
    assert await r.prune() == 1


async def test_restore_counters_for_the_limiter(store: PostgresUsageStore) -> None:
    today = day_start(TODAY)
    await store.write_batch(
        [
            rec(today - 3600, 1, cost=1.0),  # yesterday 23:00
            rec(today + 3600, 2, cost=0.5, prompt_tokens=100, completion_tokens=20),
            rec(today + 7200, 3, cost=0.25, prompt_tokens=7, completion_tokens=3),
            rec(day_start(date(2025, 2, 28)), 4, cost=16.0),  # last month
            rec(today + 60, 5, key="k2", cost=2.0),
            rec(day_start(date(2025, 3, 1)) + 1, 6, cost=4.0),  # first of the month
        ]
    )
    month = day_start(date(2025, 3, 1))
    assert await store.restore_counters(today, month) == {
        "k1": RestoredCounters(requests_today=2, tokens_today=130, cost=5.75),
        "k2": RestoredCounters(requests_today=1, tokens_today=15, cost=2.0),
    }
    assert (await store.totals_since(today + 5400))["k1"] == KeyTotals(1, 10, 0.25)
    await store.prune(today)  # past the raw retention, whole days come from the roll-ups
    assert (await store.totals_since(month))["k1"] == KeyTotals(4, 160, 5.75)
    assert (await store.totals_since(0))["k1"].cost == 21.75


# --- keys and tiers -------------------------------------------------------------------------


async def test_managed_keys_add_list_revoke(make_store: MakeStore) -> None:
    clock = Clock()
    s = await make_store(clock=clock)
    k1, k2 = hash_key(new_key()), hash_key(new_key())
    gen = await s.keys_generation()
    added = await s.add_key("app", k1, description="the app", models=["openai/*"], tier="free")
    assert (added.created_at, added.models, added.tier) == (NOW, ("openai/*",), "free")
    assert await s.get_key("app") == added
    await s.add_key("temp", k2, expires_at=NOW + 100)
    assert await s.keys_generation() > gen
    with pytest.raises(KeyConflict):
        await s.add_key("app", hash_key(new_key()))
    with pytest.raises(KeyConflict):
        await s.add_key("other", k1)
    with pytest.raises(ValueError):
        await s.add_key("bad id!", hash_key(new_key()))
    with pytest.raises(ValueError):
        await s.add_key("plain", "sha256:nothex")
    assert {h: k.id for h, k in (await s.valid_keys()).items()} == {k1: "app", k2: "temp"}
    assert await s.next_key_change() == NOW + 100
    clock.now = NOW + 100
    assert list(await s.valid_keys()) == [k1]  # expired

    clock.now = NOW + 200
    assert await s.revoke_key("app", "leaked") == NOW + 200
    assert await s.revoke_key("toml-key") == NOW + 200  # a key from the config file
    clock.now = NOW + 300
    assert await s.revoke_key("app") == NOW + 200  # the first revocation stands
    assert await s.valid_keys() == {}
    s = await make_store(clock=clock)  # another process sees the same
    assert await s.revoked_ids() == {"app", "toml-key"}
    assert [(k.id, k.revoked_at) for k in await s.list_keys()] == [
        ("app", NOW + 200),
        ("temp", None),
    ]
    assert [k.id for k in await s.list_keys(include_revoked=False)] == ["temp"]


async def test_rotation_keeps_the_old_hash_for_the_grace_period(make_store: MakeStore) -> None:
    clock = Clock()
    s = await make_store(clock=clock)
    old, new = hash_key(new_key()), hash_key(new_key())
    await s.add_key("app", old)
    rotated = await s.rotate_key("app", new, grace=3600)
    assert rotated.hash == new and await s.get_key("app") == rotated
    assert set(await s.valid_keys()) == {old, new}
    assert await s.next_key_change() == NOW + 3600
    clock.now = NOW + 3599
    assert set(await s.valid_keys()) == {old, new}
    clock.now = NOW + 3600
    assert set(await s.valid_keys()) == {new}
    with pytest.raises(KeyConflict):
        await s.add_key("reuse", old)  # a retired hash is not handed out again...
    await s.prune(0)
    await s.add_key("reuse", old)  # ...until its grace time is over and it was pruned
    with pytest.raises(UnknownKey):
        await s.rotate_key("toml-key", hash_key(new_key()), grace=0)
    third = hash_key(new_key())
    await s.rotate_key("app", third, grace=0)
    valid = await s.valid_keys()
    assert valid[third].id == "app" and new not in valid
    await s.revoke_key("app")
    with pytest.raises(UnknownKey):
        await s.rotate_key("app", hash_key(new_key()), grace=0)


async def test_concurrent_key_changes_never_share_a_hash(make_store: MakeStore) -> None:
    stores = [await make_store() for _ in range(4)]
    h = hash_key(new_key())
    results = await asyncio.gather(
        *(s.add_key(f"app{i}", h) for i, s in enumerate(stores)), return_exceptions=True
    )
    assert sum(not isinstance(r, BaseException) for r in results) == 1
    assert all(isinstance(r, KeyConflict) for r in results if isinstance(r, BaseException))


async def test_key_changes_from_another_process_reach_the_recorder(
    make_recorder: MakeRecorder, make_store: MakeStore
) -> None:
    r = await make_recorder()
    h = hash_key(new_key())
    await r.backend.add_key("app", h, models=["demo/*"])
    gen = await r.backend.keys_generation()
    assert (await r.backend.valid_keys())[h].models == ("demo/*",)
    cli = await make_store()  # as `gateway keys revoke` on another host would
    await cli.revoke_key("app")
    assert await r.backend.keys_generation() > gen
    assert await r.backend.valid_keys() == {}
    assert await r.backend.revoked_ids() == {"app"}


async def test_tier_changes_and_state(make_recorder: MakeRecorder) -> None:
    clock = Clock()
    r = await make_recorder(clock=clock)
    await r.backend.add_tier_change(
        "k1", "free", "pro", "7 clean days", state=TierState("k1", "pro", 0, "2025-03-15", NOW)
    )
    clock.now += 10
    await r.backend.add_tier_change("k2", None, "free", "first use")
    await r.backend.set_tier_state(TierState("k2", "free", 3, "2025-03-15", NOW))
    await r.backend.set_tier_state(TierState("k2", "free", 4, "2025-03-16", NOW + 86_400))
    changes = await r.backend.tier_changes()
    assert [(c.key_id, c.ts, c.from_tier, c.to_tier) for c in changes] == [
        ("k1", NOW, "free", "pro"),
        ("k2", NOW + 10, None, "free"),
    ]
    assert [c.reason for c in await r.backend.tier_changes("k1")] == ["7 clean days"]
    assert (await r.backend.tier_changes(since=NOW + 5))[0].key_id == "k2"
    assert await r.backend.tier_states() == {
        "k1": TierState("k1", "pro", 0, "2025-03-15", NOW),
        "k2": TierState("k2", "free", 4, "2025-03-16", NOW + 86_400),
    }


# --- configuration --------------------------------------------------------------------------


def test_storage_url_must_be_postgresql() -> None:
    assert loads('[storage]\nurl = "postgres://db/usage"').storage.url == "postgres://db/usage"
    with pytest.raises(ConfigError, match=r"storage\.url"):
        loads('[storage]\nurl = "mysql://db/usage"')
    with pytest.raises(ConfigError, match=r"storage\.pool_size"):
        loads("[storage]\npool_size = 0")


def test_passwords_stay_out_of_log_lines() -> None:
    assert usage_pg.redact("postgresql://gw:s3cret@db:5432/u") == "postgresql://gw:***@db:5432/u"
    assert (
        usage_pg.redact("postgresql://gw@db/u?password=s3cret&search_path=x")
        == "postgresql://gw@db/u?password=***&search_path=x"
    )
    assert usage_pg.redact("postgresql://gw@db/u") == "postgresql://gw@db/u"


def test_without_a_url_nothing_imports_asyncpg(tmp_path: Path) -> None:
    child = f"""
import asyncio, sys
from gateway.app import build
from gateway.config import StorageConfig
from gateway.usage import UsageRecorder
import gateway.keys_cli, gateway.admin

async def main():
    r = UsageRecorder(StorageConfig(path={str(tmp_path / "u.db")!r}))
    await r.start()
    await r.close()

asyncio.run(main())
print("asyncpg" in sys.modules)
"""
    result = subprocess.run(
        [sys.executable, "-c", child], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


# --- a fleet: two gateways, one database -----------------------------------------------------


def fleet_toml(fakes: Fakes, url: str, tmp_path: Path) -> str:
    db = str(tmp_path / "unused.db")
    text = gateway_toml(fakes.urls, priced(fakes), "request_timeout = 5\nretries = 0", db)
    return text.replace(f'path = "{db}"', f'url = "{url}"')


async def test_two_gateways_answer_for_the_whole_fleet(
    make_gateway: MakeGateway, fakes: Fakes, pg_url: str, tmp_path: Path
) -> None:
    toml = fleet_toml(fakes, pg_url, tmp_path)
    one, two = await make_gateway(toml=toml), await make_gateway(toml=toml)
    assert isinstance(one.state.usage.backend, PostgresUsageStore)
    await one.aclient().chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)
    for _ in range(2):
        await two.aclient().chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)
    await two.aclient(key=DEMO_ONLY_KEY).embeddings.create(model="demo/embed", input="x")
    assert await one.state.usage.flush() and await two.state.usage.flush()

    for gw in (one, two):
        # (the GET /v1/usage calls are requests too, recorded without a model: leave them out)
        status, usage = await get(gw, "/v1/usage", CLIENT_KEY)
        assert status == 200
        assert usage["breakdown"]["priced/gpt-4o"]["requests"] == 3  # one on `one`, two on `two`
        assert usage["total_cost"] == 0.375  # 3 x 0.125, to the cent
        status, admin = await get(gw, "/admin/usage", ADMIN_KEY)
        assert status == 200
        assert {
            k["key_id"]: {m: u["requests"] for m, u in k["breakdown"].items() if m}
            for k in admin["keys"]
        } == {"test": {"priced/gpt-4o": 3}, "demo-only": {"demo/embed": 1}}
        assert admin["total_cost"] == 0.375
    records = await one.state.usage.backend.records()
    assert sorted(r.model for r in records if r.model) == ["demo/embed", *["priced/gpt-4o"] * 3]

    # a key made on one gateway works on the other once it has polled the database
    status, created = await post(one, "/admin/keys", ADMIN_KEY, {"id": "fleet-app"})
    assert status == 201
    await two.state.load_keys()
    assert (await get(two, "/v1/models", created["key"]))[0] == 200
    await post(two, "/admin/keys/fleet-app/revoke", ADMIN_KEY)
    await one.state.load_keys()
    assert (await get(one, "/v1/models", created["key"]))[0] == 401


async def test_a_rotated_secret_is_refused_when_its_grace_ends(
    make_gateway: MakeGateway, fakes: Fakes, pg_url: str, tmp_path: Path
) -> None:
    gateway = await make_gateway(toml=fleet_toml(fakes, pg_url, tmp_path))
    assert isinstance(gateway.state.usage.backend, PostgresUsageStore)
    await rotate_and_watch_the_grace_end(gateway, grace=1.5)


async def test_the_cli_works_on_the_shared_database(
    make_gateway: MakeGateway, fakes: Fakes, pg_url: str, tmp_path: Path
) -> None:
    toml = fleet_toml(fakes, pg_url, tmp_path)
    gateway = await make_gateway(toml=toml)
    await gateway.aclient().chat.completions.create(model="priced/gpt-4o", messages=MESSAGES)
    assert await gateway.state.usage.flush()
    config = gateway.state.config.source

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "gateway", *args, "--config", config],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    made = await asyncio.to_thread(cli, "keys", "new", "--id", "cli-app")
    assert made.returncode == 0, made.stderr
    assert "127.0.0.1" in made.stdout  # where the hash went
    key = next(w for w in made.stdout.split() if w.startswith("gw-"))
    await gateway.state.load_keys()
    assert (await get(gateway, "/v1/models", key))[0] == 200
    rotated = await asyncio.to_thread(cli, "keys", "rotate", "cli-app", "--grace", "0")
    assert rotated.returncode == 0, rotated.stderr
    listed = await asyncio.to_thread(cli, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    line = next(ln for ln in listed.stdout.splitlines() if ln.startswith("test "))
    assert "config" in line and "0.1250" in line
    assert any(ln.startswith("cli-app") and "database" in ln for ln in listed.stdout.splitlines())
    revoked = await asyncio.to_thread(cli, "keys", "revoke", "cli-app")
    assert revoked.returncode == 0, revoked.stderr
    await gateway.state.load_keys()
    assert (await get(gateway, "/v1/models", key))[0] == 401
    table = await asyncio.to_thread(cli, "usage")
    assert table.returncode == 0, table.stderr
    assert "priced/gpt-4o" in table.stdout and "0.125000" in table.stdout


async def test_the_cli_says_when_the_database_is_unreachable(tmp_path: Path) -> None:
    with socket_closed() as port:
        config = tmp_path / "gateway.toml"
        config.write_text(f'[storage]\nurl = "postgresql://nobody@127.0.0.1:{port}/usage"\n')
        result = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "keys", "list", "--config", str(config)],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )
    assert result.returncode == 1
    assert "cannot open the usage database" in result.stderr
    assert "Traceback" not in result.stderr
