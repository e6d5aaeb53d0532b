"""Usage store and recorder against real SQLite files: schema, write-behind, queries, keys."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path

import pytest

from gateway import usage_store
from gateway.auth import hash_key, new_key
from gateway.config import ModelConfig, StorageConfig, loads
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
    default_period,
)
from gateway.usage_backend import SqliteBackend
from gateway.usage_store import SCHEMA_VERSION, KeyConflict, UnknownKey, day_start

ROOT = Path(__file__).parent.parent
NOW = datetime(2025, 3, 15, 12, 0, tzinfo=UTC).timestamp()
TODAY = date(2025, 3, 15)


class Clock:
    def __init__(self, now: float = NOW) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rec(
    ts: float = NOW, n: int = 0, key: str = "k1", model: str = "m", **kw: object
) -> UsageRecord:
    fields: dict[str, object] = {
        "ts": ts,
        "request_id": f"req_{n}",
        "key_id": key,
        "client_ip": "10.0.0.1",
        "endpoint": "chat",
        "model": model,
        "prompt_tokens": 10,
        "completion_tokens": 5,
    }
    fields.update(kw)
    return UsageRecord(**fields)  # type: ignore[arg-type]


MakeRecorder = Callable[..., Awaitable[UsageRecorder]]


@pytest.fixture
def db(tmp_path: Path) -> str:
    return str(tmp_path / "usage.db")


@pytest.fixture
async def make_recorder(db: str) -> AsyncIterator[MakeRecorder]:
    made: list[UsageRecorder] = []

    async def make(start: bool = True, **kw: object) -> UsageRecorder:
        storage = {"path": db, "flush_interval": 0.05}
        storage.update(
            {k: kw.pop(k) for k in ("flush_interval", "queue_max", "retention_days") if k in kw}
        )
        kw.setdefault("clock", Clock())  # records are stamped NOW: keep retention from pruning them
        recorder = UsageRecorder(StorageConfig(**storage), **kw)  # type: ignore[arg-type]
        made.append(recorder)
        if start:
            await recorder.start()
        return recorder

    yield make
    for recorder in made:
        await recorder.close()


@pytest.fixture
def store(db: str) -> Iterator[UsageStore]:
    with UsageStore(db, clock=Clock()) as s:
        yield s


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 5.0) -> None:
    """Poll until the real writer (flush interval 0.05 s) has done its part."""
    deadline = time.monotonic() + timeout
    while not await check():
        assert time.monotonic() < deadline, "the writer did not get there in time"
        await asyncio.sleep(0.01)


def raw_count(path: str) -> int:
    with sqlite3.connect(path) as conn:
        n: int = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    return n


# --- schema ---------------------------------------------------------------------------------


def test_new_file_is_created_at_the_current_schema_and_reopens_unchanged(db: str) -> None:
    with UsageStore(db) as s:
        assert s.schema_version() == SCHEMA_VERSION
        assert s.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        tables = {r[0] for r in s.conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        assert {
            "usage",
            "usage_daily",
            "keys",
            "revocations",
            "tier_changes",
            "tier_state",
        } <= tables
        s.add_key("app", hash_key(new_key()))
    with UsageStore(db) as s:  # a second open must not try to create the tables again
        assert s.schema_version() == SCHEMA_VERSION
        assert [k.id for k in s.list_keys()] == ["app"]


def test_pending_migrations_are_applied_at_open(db: str, monkeypatch: pytest.MonkeyPatch) -> None:
    with UsageStore(db) as s:
        s.write_batch([rec()])
    v2 = ("ALTER TABLE usage ADD COLUMN region TEXT NOT NULL DEFAULT 'eu'",)
    monkeypatch.setattr(usage_store, "MIGRATIONS", (*usage_store.MIGRATIONS, v2))
    monkeypatch.setattr(usage_store, "SCHEMA_VERSION", SCHEMA_VERSION + 1)
    with UsageStore(db) as s:
        assert s.schema_version() == SCHEMA_VERSION + 1
        assert s.conn.execute("SELECT region FROM usage").fetchall() == [("eu",)]


def test_a_newer_schema_is_refused_with_a_clear_error(db: str) -> None:
    UsageStore(db).close()
    with sqlite3.connect(db) as conn:
        conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 5}")
    with pytest.raises(SchemaTooNew, match=rf"schema version {SCHEMA_VERSION + 5}.*upgrade"):
        UsageStore(db)


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
    r.record(full)
    r.record(failed)
    assert await r.flush()
    assert await r.call(UsageStore.records) == [full, failed]


async def test_records_are_written_in_few_transactions(make_recorder: MakeRecorder) -> None:
    r = await make_recorder(flush_interval=60, batch_size=5_000)
    for i in range(12_000):
        r.record(rec(n=i))
    assert await r.flush()
    assert r.written == 12_000
    assert await r.call(lambda s: s.transactions) == 3
    assert raw_count(r.config.path) == 12_000


async def test_the_writer_flushes_on_its_own_within_the_interval(
    make_recorder: MakeRecorder,
) -> None:
    r = await make_recorder(flush_interval=0.05)
    for i in range(3):
        r.record(rec(n=i))

    async def written() -> bool:
        return r.written == 3

    await eventually(written)
    assert raw_count(r.config.path) == 3


async def test_a_record_waits_at_most_the_interval_and_one_write(
    make_recorder: MakeRecorder, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The flush cadence counts from the start of the previous flush, not its end: with slow
    writes, a trickle of records is still on disk within flush_interval plus one write."""
    interval, write = 0.5, 0.4
    real_write = SqliteBackend.write_batch

    async def slow_write(self: SqliteBackend, records: Sequence[UsageRecord]) -> int:
        await asyncio.sleep(write)
        return await real_write(self, records)

    monkeypatch.setattr(SqliteBackend, "write_batch", slow_write)
    r = await make_recorder(flush_interval=interval)
    recorded: list[float] = []
    waited: list[float] = []
    loop = asyncio.get_running_loop()
    start = loop.time()
    while loop.time() - start < 3.0 or len(waited) < len(recorded):
        if loop.time() - start < 3.0 and len(recorded) < 60:
            r.record(rec(n=len(recorded)))
            recorded.append(loop.time())
        while len(waited) < r.written:  # records are written in order
            waited.append(loop.time() - recorded[len(waited)])
        assert loop.time() - start < 10, "the writer fell behind"
        await asyncio.sleep(0.01)
    assert len(waited) == len(recorded) == 60
    # the bound is interval + write = 0.9 s; writing an interval after the previous write
    # ended would give interval + 2 x write = 1.3 s
    assert max(waited) < interval + write + 0.2, max(waited)


async def test_a_full_batch_is_written_before_the_interval_ends(
    make_recorder: MakeRecorder,
) -> None:
    r = await make_recorder(flush_interval=3_600, batch_size=100)
    for i in range(100):
        r.record(rec(n=i))

    async def written() -> bool:
        return r.written == 100

    await eventually(written)


async def test_close_writes_what_is_queued(make_recorder: MakeRecorder) -> None:
    r = await make_recorder(flush_interval=3_600)
    for i in range(50):
        r.record(rec(n=i))
    assert r.depth == 50
    await r.close()
    assert raw_count(r.config.path) == 50
    r.record(rec(n=51))  # after close: counted, not lost silently
    assert r.dropped == 1


async def test_records_of_a_recorder_never_started_are_counted(make_recorder: MakeRecorder) -> None:
    r = await make_recorder(start=False)
    r.record(rec())
    await r.close()
    assert (r.dropped, r.depth) == (1, 0)


async def test_record_never_raises_and_invalid_records_are_counted(
    make_recorder: MakeRecorder,
) -> None:
    r = await make_recorder(flush_interval=3_600)
    r.record(rec(n=1))
    r.record(("not", "a", "record"))  # type: ignore[arg-type]
    r.record(rec(n=2, prompt_tokens="many"))
    r.record(rec(n=3, completion_tokens=2**70))
    r.record(rec(n=4))
    assert await r.flush()
    assert (r.written, r.rejected, r.dropped) == (2, 3, 3)
    assert [x.request_id for x in await r.call(UsageStore.records)] == ["req_1", "req_4"]


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


def test_batches_of_any_length_use_a_few_insert_statements(store: UsageStore) -> None:
    # A statement per batch length kept hundreds of large prepared statements alive (RSS
    # that grew with the traffic); batches are cut into a few fixed sizes instead.
    sizes: set[int] = set()  # rows per INSERT statement (the trace shows bound values)
    store.conn.set_trace_callback(
        lambda sql: (
            sizes.add(sql.count("CAST(round(")) if sql.startswith("INSERT INTO usage (") else None
        )
    )
    n = 0
    for length in [*range(1, 40), 255, 256, 257, 700, 1333]:
        store.write_batch([rec(n=n + i) for i in range(length)])
        n += length
    store.conn.set_trace_callback(None)
    assert len(sizes) <= 5
    assert raw_count(store.path) == n
    assert [r.request_id for r in store.records()] == [f"req_{i}" for i in range(n)]


# --- faults ---------------------------------------------------------------------------------


async def test_a_locked_database_keeps_records_and_logs_once(
    make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    r = await make_recorder(flush_interval=3_600, busy_timeout=0.01)
    other = sqlite3.connect(r.config.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(20):
            r.record(rec(n=i))
        assert not await r.flush()
        assert not await r.flush()
        r.record(rec(n=20))  # the request path carries on
        assert not await r.flush()
        assert (r.depth, r.written, r.dropped, r.failing) == (21, 0, 0, True)
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert await r.flush()
    assert (r.depth, r.written, r.failing) == (0, 21, False)
    assert raw_count(r.config.path) == 21
    errors = [x for x in caplog.records if x.levelno >= logging.WARNING]
    assert len(errors) == 1 and "database is locked" in errors[0].getMessage()
    assert any("writable again" in m for m in caplog.messages)


async def test_the_writer_retries_on_its_own_after_a_fault(make_recorder: MakeRecorder) -> None:
    r = await make_recorder(flush_interval=0.02, busy_timeout=0.01, max_backoff=0.1)
    other = sqlite3.connect(r.config.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    r.record(rec())

    async def failing() -> bool:
        return r.failing

    await eventually(failing)
    other.execute("ROLLBACK")
    other.close()

    async def written() -> bool:
        return r.written == 1 and not r.failing

    await eventually(written)


@pytest.mark.parametrize(
    ("fault", "cure", "message"),
    [
        ("PRAGMA query_only = ON", "PRAGMA query_only = OFF", "readonly"),
        ("PRAGMA max_page_count = {pages}", "PRAGMA max_page_count = 1000000", "full"),
    ],
    ids=["read-only", "full"],
)
async def test_a_read_only_or_full_database_keeps_records(
    make_recorder: MakeRecorder,
    caplog: pytest.LogCaptureFixture,
    fault: str,
    cure: str,
    message: str,
) -> None:
    caplog.set_level(logging.INFO, logger="gateway.usage")
    r = await make_recorder(flush_interval=3_600)

    def apply(store: UsageStore, sql: str) -> None:
        pages = store.conn.execute("PRAGMA page_count").fetchone()[0]
        store.conn.execute(sql.format(pages=pages))

    await r.call(apply, fault)
    for i in range(200):
        r.record(rec(n=i, request_id="x" * 500 + str(i)))
    assert not await r.flush()
    assert not await r.flush()
    assert r.depth == 200
    await r.call(apply, cure)
    assert await r.flush()
    assert raw_count(r.config.path) == 200
    errors = [x.getMessage() for x in caplog.records if x.levelno >= logging.WARNING]
    assert len(errors) == 1 and message in errors[0]


async def test_close_gives_up_after_its_timeout_and_counts_the_loss(
    make_recorder: MakeRecorder, caplog: pytest.LogCaptureFixture
) -> None:
    r = await make_recorder(flush_interval=3_600, busy_timeout=0.01, close_timeout=0)
    other = sqlite3.connect(r.config.path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        for i in range(7):
            r.record(rec(n=i))
        await r.close()
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert r.dropped == 7
    assert any("7 records were not written" in m for m in caplog.messages)


def test_a_crash_loses_at_most_the_last_flush_interval(tmp_path: Path) -> None:
    """SIGKILL a process that records ~2,000 requests/s; every record acknowledged more
    than one flush interval (plus slack for a write) before the kill must be on disk."""
    flush_interval, slack = 0.05, 1.0
    child = """
import asyncio, sys, time
from gateway.config import StorageConfig
from gateway.usage import UsageRecorder, UsageRecord

async def main():
    rec = UsageRecorder(StorageConfig(path=sys.argv[1], flush_interval=float(sys.argv[2])))
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
    path = str(tmp_path / "crash.db")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-c", child, path, str(flush_interval)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=env,
    )
    assert proc.stdout is not None
    acks: list[tuple[int, float, int]] = []
    for line in proc.stdout:
        n, t, written = line.split()
        acks.append((int(n), float(t), int(written)))
        if acks[-1][1] - acks[0][1] >= 2 * slack:
            break
    proc.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    rest = proc.stdout.read()
    proc.stdout.close()
    proc.wait()
    acks += [(int(n), float(t), int(w)) for n, t, w in (x.split() for x in rest.splitlines())]

    with sqlite3.connect(path) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        ids = [r[0] for r in conn.execute("SELECT request_id FROM usage ORDER BY id")]
        rolled_up = conn.execute("SELECT sum(requests) FROM usage_daily").fetchone()[0]
    acknowledged, stored = acks[-1][0], len(ids)
    print(f"crash: {acknowledged} acknowledged, {stored} written, {acknowledged - stored} lost")
    assert ids == [f"r{i}" for i in range(stored)]  # a prefix: no gaps, no duplicates
    assert rolled_up == stored  # roll-ups and raw rows committed together
    assert stored >= max(w for _, _, w in acks)  # whatever was reported written is durable
    must_have = max(n for n, t, _ in acks if t <= killed_at - flush_interval - slack)
    assert stored >= must_have > 0, (acknowledged, stored)


# --- cost and summaries ---------------------------------------------------------------------

PRICED = loads("""
[[providers]]
name = "p"
kind = "demo"
models = [
  { id = "cached", price_in = 3.0, price_out = 15.0, price_cache_read = 0.3, price_cache_write = 3.75 },
  { id = "plain", price_in = 2.5, price_out = 10.0 },
  { id = "flat", price_in = 0.15, price_out = 0.6, price_request = 0.1 },
]
""")
MODELS = {m.id: m for m in PRICED.providers[0].models}


@pytest.mark.parametrize(
    ("model", "usage", "expected"),
    [
        ("cached", Usage(prompt_tokens=1000, completion_tokens=500), "0.0105"),
        # 2,000 uncached at 3.00 + 8,000 cache reads at 0.30 + 100 out at 15.00
        (
            "cached",
            Usage(prompt_tokens=10_000, completion_tokens=100, cached_tokens=8000),
            "0.0099",
        ),
        # 1,000 uncached at 3.00 + 4,000 cache writes at 3.75
        ("cached", Usage(prompt_tokens=5000, cache_write_tokens=4000), "0.018"),
        # reasoning is part of the completion tokens, charged once
        ("cached", Usage(completion_tokens=2000, reasoning_tokens=1500), "0.03"),
        # cache prices default to price_in
        ("plain", Usage(prompt_tokens=1000, cached_tokens=400, cache_write_tokens=100), "0.0025"),
        ("flat", Usage(prompt_tokens=1_000_000, completion_tokens=1_000_000), "0.85"),
        ("flat", Usage(), "0.1"),
    ],
)
def test_cost_of_uses_each_configured_price(model: str, usage: Usage, expected: str) -> None:
    assert cost_of(MODELS[model], usage) == float(expected)


def test_costs_add_up_to_the_cent(store: UsageStore) -> None:
    # ten requests at 0.1 each: naive float addition gives 0.9999999999999999
    assert sum([0.1] * 10) != 1.0
    cost = cost_of(MODELS["flat"], Usage())
    store.write_batch([rec(n=i, cost=cost) for i in range(10)])
    assert store.summary("k1", TODAY, TODAY)["total_cost"] == 1.0


def test_summary_and_roll_ups_match_the_raw_records(store: UsageStore) -> None:
    rnd = random.Random(7)
    records = []
    for i in range(3000):
        model = rnd.choice(["cached", "plain", "flat"])
        usage = Usage(prompt_tokens=rnd.randint(0, 5000), completion_tokens=rnd.randint(0, 2000))
        usage.cached_tokens = rnd.randint(0, usage.prompt_tokens)
        usage.cache_write_tokens = rnd.randint(0, usage.prompt_tokens - usage.cached_tokens)
        usage.reasoning_tokens = rnd.randint(0, usage.completion_tokens)
        records.append(
            rec(
                NOW - rnd.randint(0, 4 * 86_400),
                i,
                key=rnd.choice(["k1", "k2"]),
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
    for i in range(0, len(records), 700):
        store.write_batch(records[i : i + 700])

    start, end = date(2025, 3, 12), date(2025, 3, 14)  # inclusive; leaves out the 11th and 15th
    got = store.summary("k1", start, end)
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
    assert (got["object"], got["period_start"], got["period_end"]) == (
        "usage",
        "2025-03-12",
        "2025-03-14",
    )
    assert got["total_requests"] == len(mine)
    assert got["total_tokens"] == sum(r.prompt_tokens + r.completion_tokens for r in mine)
    exact = sum(Decimal(repr(r.cost)) for r in mine)
    assert Decimal(repr(got["total_cost"])) == exact
    for model, b in got["breakdown"].items():
        rows = [r for r in mine if r.model == model]
        assert b == {
            "requests": len(rows),
            "errors": sum(r.outcome != "ok" for r in rows),
            "prompt_tokens": sum(r.prompt_tokens for r in rows),
            "completion_tokens": sum(r.completion_tokens for r in rows),
            "total_tokens": sum(r.prompt_tokens + r.completion_tokens for r in rows),
            "cached_tokens": sum(r.cached_tokens for r in rows),
            "cache_write_tokens": sum(r.cache_write_tokens for r in rows),
            "reasoning_tokens": sum(r.reasoning_tokens for r in rows),
            "cost": float(sum(Decimal(repr(r.cost)) for r in rows)),
        }
    assert sorted(got["breakdown"]) == ["cached", "flat", "plain"]
    assert [d["date"] for d in got["daily"]] == ["2025-03-12", "2025-03-13", "2025-03-14"]
    for d in got["daily"]:
        rows = [
            r for r in mine if datetime.fromtimestamp(r.ts, UTC).date().isoformat() == d["date"]
        ]
        assert d["requests"] == len(rows)
        assert d["cost"] == float(sum(Decimal(repr(r.cost)) for r in rows))

    only_flat = store.summary(None, start, end, model="flat")
    assert list(only_flat["breakdown"]) == ["flat"]
    assert only_flat["total_requests"] == sum(
        1
        for r in records
        if r.model == "flat" and start <= datetime.fromtimestamp(r.ts, UTC).date() <= end
    )
    empty = store.summary("nobody", start, end)
    assert (empty["total_requests"], empty["total_cost"], empty["breakdown"], empty["daily"]) == (
        0,
        0.0,
        {},
        [],
    )


def test_admin_usage_lists_keys_with_filters(store: UsageStore) -> None:
    store.write_batch(
        [
            rec(n=1, key="k1", model="a", cost=0.5),
            rec(n=2, key="k1", model="b", cost=0.25),
            rec(n=3, key="k2", model="a", cost=1.0),
            rec(NOW - 86_400 * 3, 4, key="k2", model="a", cost=8.0),
        ]
    )
    every = store.admin_usage(TODAY, TODAY)
    assert (every["total_requests"], every["total_cost"]) == (3, 1.75)
    assert [
        (k["key_id"], k["requests"], k["cost"], sorted(k["breakdown"])) for k in every["keys"]
    ] == [
        ("k1", 2, 0.75, ["a", "b"]),
        ("k2", 1, 1.0, ["a"]),
    ]
    by_model = store.admin_usage(date(2025, 3, 1), TODAY, model="a")
    assert [(k["key_id"], k["cost"]) for k in by_model["keys"]] == [("k1", 0.5), ("k2", 9.0)]
    one = store.admin_usage(date(2025, 3, 1), TODAY, key_id="k1")
    assert [k["key_id"] for k in one["keys"]] == ["k1"]


def test_daily_usage_is_one_row_per_day_key_and_model(store: UsageStore) -> None:
    store.write_batch(
        [
            rec(n=1, key="k1", model="a", cost=0.5),
            rec(n=2, key="k1", model="a", cost=0.25, status=500, outcome="upstream_error"),
            rec(n=3, key="k2", model="b", cost=1.0),
            rec(NOW - 86_400 * 2, 4, key="k1", model="a", cost=8.0),
            rec(NOW - 86_400 * 40, 5, key="k1", model="a"),  # before the period
        ]
    )
    rows = store.daily_usage(date(2025, 3, 1), TODAY)
    assert [(r["date"], r["key_id"], r["model"], r["requests"], r["errors"]) for r in rows] == [
        ("2025-03-13", "k1", "a", 1, 0),
        ("2025-03-15", "k1", "a", 2, 1),
        ("2025-03-15", "k2", "b", 1, 0),
    ]
    assert [(r["total_tokens"], r["cost"]) for r in rows] == [(15, 8.0), (30, 0.75), (15, 1.0)]
    assert [r["date"] for r in store.daily_usage(date(2025, 3, 1), TODAY, key_id="k2")] == [
        "2025-03-15"
    ]
    assert store.daily_usage(TODAY, TODAY, model="zzz") == []


def test_key_stats(store: UsageStore) -> None:
    store.add_key("managed", hash_key(new_key()))
    store.write_batch(
        [
            rec(NOW - 86_400, 1, key="managed", cost=2.0),
            rec(NOW - 60, 2, key="managed", cost=0.5),
            rec(NOW - 30, 3, key="config-key", cost=0.25),
        ]
    )
    stats = {s["key_id"]: s for s in store.key_stats(["config-key", "idle"])}
    assert sorted(stats) == ["config-key", "idle", "managed"]
    m = stats["managed"]
    assert (m["created"], m["first_used"], m["last_used"]) == (NOW, NOW - 86_400, NOW - 60)
    assert (m["requests"], m["total_tokens"], m["cost"]) == (2, 30, 2.5)
    assert m["today"] == {"requests": 1, "total_tokens": 15, "cost": 0.5}
    assert stats["idle"]["last_used"] is None and stats["idle"]["requests"] == 0


def test_default_period_is_the_current_month() -> None:
    assert default_period(NOW) == (date(2025, 3, 1), TODAY)


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
    assert [x.request_id for x in await r.call(UsageStore.records)] == ["req_9"]
    old_day = datetime.fromtimestamp(old, UTC).date()
    kept = await r.backend.summary("k1", old_day, TODAY)
    assert (kept["total_requests"], kept["total_cost"]) == (6, 6.0)
    clock.now += 25 * 86_400
    assert await r.prune() == 1


async def test_the_writer_prunes_on_its_own(make_recorder: MakeRecorder) -> None:
    r = await make_recorder(flush_interval=0.02, retention_days=1, clock=Clock())
    r.record(rec(NOW - 3 * 86_400, 1))
    r.record(rec(NOW, 2))

    async def pruned() -> bool:
        return r.written == 2 and raw_count(r.config.path) == 1

    await eventually(pruned)


def test_restore_counters_for_the_limiter(store: UsageStore) -> None:
    today = day_start(TODAY)
    store.write_batch(
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
    assert store.restore_counters(today, month) == {
        "k1": RestoredCounters(requests_today=2, tokens_today=130, cost=5.75),
        "k2": RestoredCounters(requests_today=1, tokens_today=15, cost=2.0),
    }
    # A day reset at 01:30 UTC: today starts mid-day, yesterday's 23:00 record is out
    assert store.totals_since(today + 5400)["k1"] == KeyTotals(1, 10, 0.25)
    # Past the raw retention, whole days still come from the roll-ups
    store.prune(today)
    assert store.totals_since(month)["k1"] == KeyTotals(4, 160, 5.75)
    assert store.totals_since(0)["k1"].cost == 21.75


# --- keys and tiers -------------------------------------------------------------------------


def test_managed_keys_add_list_revoke(db: str) -> None:
    clock = Clock()
    k1, k2 = hash_key(new_key()), hash_key(new_key())
    with UsageStore(db, clock=clock) as s:
        gen = s.keys_generation()
        added = s.add_key("app", k1, description="the app", models=["openai/*"], tier="free")
        assert (added.created_at, added.models, added.tier) == (NOW, ("openai/*",), "free")
        s.add_key("temp", k2, expires_at=NOW + 100)
        assert s.keys_generation() > gen
        with pytest.raises(KeyConflict):
            s.add_key("app", hash_key(new_key()))
        with pytest.raises(KeyConflict):
            s.add_key("other", k1)
        with pytest.raises(ValueError):
            s.add_key("bad id!", hash_key(new_key()))
        with pytest.raises(ValueError):
            s.add_key("plain", "sha256:nothex")
        assert {h: k.id for h, k in s.valid_keys().items()} == {k1: "app", k2: "temp"}
        assert s.next_key_change() == NOW + 100
        clock.now = NOW + 100
        assert list(s.valid_keys()) == [k1]  # expired

        clock.now = NOW + 200
        assert s.revoke_key("app", "leaked") == NOW + 200
        assert s.revoke_key("toml-key") == NOW + 200  # a key from the config file
        clock.now = NOW + 300
        assert s.revoke_key("app") == NOW + 200  # the first revocation stands
        assert s.valid_keys() == {}
    with UsageStore(db, clock=clock) as s:  # survives a restart
        assert s.revoked_ids() == {"app", "toml-key"}
        assert [(k.id, k.revoked_at) for k in s.list_keys()] == [("app", NOW + 200), ("temp", None)]
        assert [k.id for k in s.list_keys(include_revoked=False)] == ["temp"]
        assert s.get_key("app") is not None and s.get_key("nope") is None


def test_rotation_keeps_the_old_hash_for_the_grace_period(store: UsageStore) -> None:
    clock = store.clock
    assert isinstance(clock, Clock)
    old, new = hash_key(new_key()), hash_key(new_key())
    store.add_key("app", old)
    rotated = store.rotate_key("app", new, grace=3600)
    assert rotated.hash == new and store.get_key("app") == rotated
    assert set(store.valid_keys()) == {old, new}
    assert store.next_key_change() == NOW + 3600
    clock.now = NOW + 3599
    assert set(store.valid_keys()) == {old, new}
    clock.now = NOW + 3600
    assert set(store.valid_keys()) == {new}
    with pytest.raises(KeyConflict):
        store.add_key("reuse", old)  # a retired hash is not handed out again...
    store.prune(0)
    store.add_key("reuse", old)  # ...until its grace time is over and it was pruned
    with pytest.raises(UnknownKey):
        store.rotate_key("toml-key", hash_key(new_key()), grace=0)
    third = hash_key(new_key())
    store.rotate_key("app", third, grace=0)
    assert store.valid_keys()[third].id == "app" and new not in store.valid_keys()
    store.revoke_key("app")
    with pytest.raises(UnknownKey):
        store.rotate_key("app", hash_key(new_key()), grace=0)


async def test_key_changes_from_the_cli_reach_the_running_gateway(
    make_recorder: MakeRecorder,
) -> None:
    r = await make_recorder()
    h = hash_key(new_key())
    await r.call(UsageStore.add_key, "app", h, models=["demo/*"])
    gen = await r.call(UsageStore.keys_generation)
    assert (await r.backend.valid_keys())[h].models == ("demo/*",)
    with UsageStore(r.config.path) as cli:  # another connection, as `gateway keys revoke` has
        cli.revoke_key("app")
    assert await r.call(UsageStore.keys_generation) > gen
    assert await r.backend.valid_keys() == {}
    assert await r.backend.revoked_ids() == {"app"}


def test_tier_changes_and_state(db: str) -> None:
    clock = Clock()
    with UsageStore(db, clock=clock) as s:
        s.add_tier_change(
            "k1", "free", "pro", "7 clean days", state=TierState("k1", "pro", 0, "2025-03-15", NOW)
        )
        clock.now += 10
        s.add_tier_change("k2", None, "free", "first use")
        s.set_tier_state(TierState("k2", "free", 3, "2025-03-15", NOW))
        s.set_tier_state(TierState("k2", "free", 4, "2025-03-16", NOW + 86_400))
    with UsageStore(db, clock=clock) as s:
        changes = s.tier_changes()
        assert [(c.key_id, c.ts, c.from_tier, c.to_tier) for c in changes] == [
            ("k1", NOW, "free", "pro"),
            ("k2", NOW + 10, None, "free"),
        ]
        assert [c.reason for c in s.tier_changes("k1")] == ["7 clean days"]
        assert s.tier_changes(since=NOW + 5)[0].key_id == "k2"
        assert s.tier_states() == {
            "k1": TierState("k1", "pro", 0, "2025-03-15", NOW),
            "k2": TierState("k2", "free", 4, "2025-03-16", NOW + 86_400),
        }


def test_model_config_prices_default_to_price_in() -> None:
    m = ModelConfig(id="x", price_in=1.0)
    assert cost_of(m, Usage(prompt_tokens=2_000_000, cached_tokens=1_000_000)) == 2.0
