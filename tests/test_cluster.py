"""A fleet of gateway processes sharing limits through a real Redis server."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import secrets
import shutil
import signal
import sqlite3
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway.auth import hash_key, new_key
from gateway.config import ClusterConfig, LimitsConfig, TierConfig, loads
from gateway.errors import QuotaExceeded, RateLimited, ServiceUnavailable
from gateway.limits import EffectiveLimits, Limiter
from gateway.resp import RedisConnection, RedisError

from .conftest import MakeGateway
from .test_cli import free_port
from .test_lifecycle import GatewayProcess

ROOT = Path(__file__).parent.parent
PG_DEFAULT_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
KEY = new_key()


class RedisServer:
    """A private redis-server on a free loopback port, which a test may kill and restart."""

    def __init__(self, persist_dir: Path | None = None) -> None:
        self.port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.persist_dir = persist_dir  # keeps its data over a SHUTDOWN and start, if given

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed (.ci/run installs it)"
        persist = ["--dir", str(self.persist_dir)] if self.persist_dir else []
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--protected-mode", "no", *persist],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise AssertionError("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    async def call(self, *args: object) -> Any:
        """One command on a connection of its own."""
        conn = RedisConnection(self.url)
        try:
            return await conn.call(*args)
        finally:
            await conn.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here (.ci/run installs it from Debian)")
    server = RedisServer()
    server.start()
    yield server
    server.stop()


def fleet_config(
    tmp_path: Path,
    redis_url: str,
    limits: str,
    policy: str = "open",
    timeout: float = 2.0,
    storage: str | None = None,
) -> Path:
    """A fleet's config. The generous Redis timeout keeps a busy test machine from tripping
    the fail-open policy (which would rightly let a process decide alone)."""
    path = tmp_path / "fleet.toml"
    path.write_text(f"""
[storage]
{storage or f'path = "{tmp_path / "usage.db"}"'}

[cluster]
redis_url = "{redis_url}"
on_redis_failure = "{policy}"
redis_timeout = {timeout}

[[providers]]
name = "demo"
kind = "demo"
models = [{{ id = "embed", capabilities = ["embeddings"] }}]

[[keys]]
id = "fleet"
hash = "{hash_key(KEY)}"
limits = {{ {limits} }}
""")
    return path


@pytest.fixture
async def pg_url() -> AsyncIterator[str]:
    """A fresh schema on the test PostgreSQL server, as a URL with its search_path."""
    asyncpg = pytest.importorskip("asyncpg", reason="asyncpg is not installed (.[test] has it)")
    server = os.environ.get("GATEWAY_TEST_POSTGRES_URL") or PG_DEFAULT_URL
    schema = f"cluster_{secrets.token_hex(4)}"
    try:
        conn = await asyncpg.connect(server, timeout=5)
    except Exception as e:  # any failure to reach the server means: no server here
        pytest.skip(f"no PostgreSQL server ({type(e).__name__}); .ci/run starts one")
    try:
        await conn.execute(f"CREATE SCHEMA {schema}")
    finally:
        await conn.close()
    yield f"{server}{'&' if '?' in server else '?'}search_path={schema}"
    conn = await asyncpg.connect(server, timeout=5)
    try:
        await conn.execute(f"DROP SCHEMA {schema} CASCADE")
    finally:
        await conn.close()


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def embed(session: aiohttp.ClientSession, url: str) -> int:
    async with session.post(url + "/embeddings", json={"model": "demo/embed", "input": "x"},
                            headers={"Authorization": f"Bearer {KEY}"}) as resp:  # fmt: skip
        await resp.read()
        return resp.status


async def refused(session: aiohttp.ClientSession, url: str) -> tuple[int, dict[str, Any]]:
    """The status and the error envelope's contents of an embeddings request that fails."""
    async with session.post(url + "/embeddings", json={"model": "demo/embed", "input": "x"},
                            headers={"Authorization": f"Bearer {KEY}"}) as resp:  # fmt: skip
        return resp.status, (await resp.json())["error"]


async def start_fleet(config: Path, n: int) -> list[GatewayProcess]:
    fleet = [GatewayProcess(config) for _ in range(n)]
    await asyncio.gather(*(g.start() for g in fleet))
    return fleet


async def stop_fleet(fleet: list[GatewayProcess]) -> list[tuple[int, str]]:
    for g in fleet:
        if g.proc is not None and g.proc.returncode is None:
            g.signal(signal.SIGTERM)
    return [await g.stop() for g in fleet]


async def test_three_processes_share_one_limit(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    fleet = await start_fleet(
        fleet_config(tmp_path, redis_server.url, "embeddings_per_minute = 12"), 3
    )
    try:
        urls = itertools.cycle([g.url for g in fleet])
        sequential = [await embed(session, next(urls)) for _ in range(15)]
        assert sequential.count(200) == 12  # not 36: one limit for the fleet
        assert sequential[12:] == [429, 429, 429]
        status, error = await refused(session, next(urls))
        assert (status, error["type"], error["code"], error["param"]) == (
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
            None,
        )
    finally:
        results = await stop_fleet(fleet)
    assert all(code == 0 for code, _ in results), results


async def test_concurrent_clients_across_the_fleet(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    # a daily quota does not refill while the test runs: exactly 20, however long it takes
    config = fleet_config(tmp_path, redis_server.url, "requests_per_day = 20")
    fleet = await start_fleet(config, 3)
    try:
        urls = [g.url for g in fleet]
        statuses = await asyncio.gather(*(embed(session, urls[i % 3]) for i in range(60)))
        assert statuses.count(200) == 20
        assert statuses.count(429) == 40
    finally:
        await stop_fleet(fleet)


async def test_redis_down_fail_open_then_back(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    config = fleet_config(tmp_path, redis_server.url, "embeddings_per_minute = 5", timeout=0.2)
    [gw] = await start_fleet(config, 1)
    try:
        assert [await embed(session, gw.url) for _ in range(6)].count(200) == 5
        redis_server.stop()
        started = time.monotonic()
        # the process limits on its own: its local bucket is full, so 5 more pass
        during = [await embed(session, gw.url) for _ in range(6)]
        assert during.count(200) == 5 and during[-1] == 429
        assert time.monotonic() - started < 5  # no request hung on the dead Redis
        redis_server.start()  # an empty Redis, on the same port
        await asyncio.sleep(1.2)  # Redis is tried again a second after it failed
        after = [await embed(session, gw.url) for _ in range(6)]
        assert after.count(200) == 5
    finally:
        [(code, stderr)] = await stop_fleet([gw])
    assert code == 0
    assert "redis unavailable" in stderr and "redis is back" in stderr


async def test_redis_down_fail_closed(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    config = fleet_config(
        tmp_path, redis_server.url, "embeddings_per_minute = 5", policy="closed", timeout=0.2
    )
    [gw] = await start_fleet(config, 1)
    try:
        assert await embed(session, gw.url) == 200
        redis_server.stop()
        status, error = await refused(session, gw.url)
        assert (status, error["type"], error["code"], error["param"]) == (
            503,
            "server_error",
            "service_unavailable",
            None,
        )
    finally:
        await stop_fleet([gw])


async def test_workers_share_a_port(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    config = fleet_config(tmp_path, redis_server.url, "embeddings_per_minute = 8")
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", str(port),
        "--workers", "2", cwd=ROOT, stderr=subprocess.PIPE,
    )  # fmt: skip
    assert proc.stderr is not None
    lines: list[str] = []

    async def read_stderr() -> None:  # all along, so that the pipe never fills
        assert proc.stderr is not None
        async for line in proc.stderr:
            lines.append(line.decode())

    reading = asyncio.ensure_future(read_stderr())

    async def stopped() -> str:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), timeout=30)
        await reading
        return "".join(lines)

    def listening() -> int:
        return sum("gateway listening on" in line for line in lines)

    url = f"http://127.0.0.1:{port}/v1"
    try:
        # a worker can take seconds to start on a busy machine, while the other already
        # answers every probe: wait for both to say they listen, not for a number of probes
        deadline = time.monotonic() + 60
        while listening() < 2 and proc.returncode is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert listening() == 2, f"the workers did not both start:\n{await stopped()}"
        pids: set[int] = set()
        for _ in range(200):  # new connections land on either worker
            async with (
                aiohttp.ClientSession() as fresh,
                fresh.get(f"http://127.0.0.1:{port}/healthz") as r,
            ):
                pids.add((await r.json())["pid"])
            if len(pids) == 2:
                break
        assert len(pids) == 2, f"one worker answered every probe:\n{await stopped()}"
        statuses = []
        for _ in range(10):
            async with aiohttp.ClientSession() as fresh:  # new connections: either worker
                statuses.append(await embed(fresh, url))
        assert statuses.count(200) == 8
    finally:
        stderr = await stopped()
    assert proc.returncode == 0, stderr


def test_a_worker_waits_for_another_holding_a_new_database(tmp_path: Path) -> None:
    # Workers starting together on a new file: while one holds the write lock (migrating),
    # SQLite refuses the other's switch to WAL at once, without waiting busy_timeout.
    from gateway.usage_store import UsageStore

    path = tmp_path / "usage.db"
    holder = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    holder.execute("CREATE TABLE early (x)")
    holder.execute("BEGIN IMMEDIATE")
    release = threading.Timer(0.3, holder.execute, ["COMMIT"])
    release.start()
    try:
        started = time.monotonic()
        with UsageStore(str(path), busy_timeout=5) as store:
            assert store.schema_version() > 0
        assert time.monotonic() - started >= 0.25  # it waited for the lock
    finally:
        release.join()
        holder.close()


def test_workers_without_redis_are_refused(tmp_path: Path) -> None:
    config = tmp_path / "g.toml"
    config.write_text('[[providers]]\nname = "demo"\nkind = "demo"\nmodels = [{ id = "echo" }]\n')
    result = subprocess.run(
        [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--workers", "2"],
        capture_output=True, text=True, timeout=30, cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 2
    assert "--workers needs [cluster] redis_url" in result.stderr


def test_nothing_about_redis_is_imported_without_a_cluster(tmp_path: Path) -> None:
    # the example config as shipped (its [cluster] commented out), one request through the
    # limiter, in a fresh interpreter: neither the cluster limiter nor its Redis client loaded
    (tmp_path / "gateway.toml").write_text((ROOT / "config.example.toml").read_text())
    code = """
import asyncio, sys
import aiohttp
from aiohttp.test_utils import TestServer
from gateway.app import build
from gateway.config import load

async def main():
    server = TestServer(build(load("gateway.toml")))
    await server.start_server()
    async with aiohttp.ClientSession() as s, s.post(
        str(server.make_url("/v1/chat/completions")),
        json={"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}]},
        headers={"Authorization": "Bearer gw-demo-not-a-secret"},
    ) as r:
        print(r.status, r.headers.get("X-RateLimit-Limit-Requests"))
    await server.close()
    print(sorted(m for m in sys.modules if m in ("gateway.cluster", "gateway.resp", "redis")))
    print("gateway.limits" in sys.modules)

asyncio.run(main())
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=60, cwd=tmp_path, env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    # served and limited (60 a minute from [limits]), and the check itself can see modules
    assert result.stdout.splitlines() == ["200 60", "[]", "True"], result.stdout + result.stderr


def test_the_example_cluster_table_is_true_to_the_config() -> None:
    example = (ROOT / "config.example.toml").read_text()
    block = example[example.index("# [cluster]") :].split("\n\n")[0]
    config = loads("\n".join(line.removeprefix("# ") for line in block.splitlines()))
    assert config.cluster == ClusterConfig(redis_url="redis://127.0.0.1:6379/0")  # defaults
    for field in ("redis_url", "on_redis_failure", "redis_timeout", "key_prefix"):
        assert f"# {field} = " in block


async def test_admission_script_quotas_budgets_and_settlement(redis_server: RedisServer) -> None:
    from gateway.cluster import RedisLimiter

    local = Limiter(LimitsConfig())
    cluster = RedisLimiter(ClusterConfig(redis_url=redis_server.url), local, 0)
    await cluster.start()
    try:
        limits = EffectiveLimits(tokens_per_day=1000, budget=0.01, budget_period="day",
                                 chat_per_minute=100)  # fmt: skip
        first = await cluster.admit("k", limits, None, "chat", 600, 0.004)
        assert first.headers["X-RateLimit-Limit-Requests"] == "100"
        assert first.headers["X-RateLimit-Remaining-Requests"] == "99"
        assert first.headers["X-RateLimit-Remaining-Tokens"] == "400"
        with pytest.raises(QuotaExceeded) as caught:  # 600 held in flight + 600 > 1000
            await cluster.admit("k", limits, None, "chat", 600, 0.001)
        # room comes back when the request in flight settles: insufficient_quota, for now
        assert caught.value.code == caught.value.type == "insufficient_quota"
        assert caught.value.status == 429
        assert caught.value.headers["Retry-After"] == "1"
        assert "in flight" in caught.value.message
        first.settle(100, 0.001)  # the real usage was much smaller: room again
        await asyncio.sleep(0.2)
        second = await cluster.admit("k", limits, None, "chat", 600, 0.004)
        assert second.headers["X-RateLimit-Remaining-Tokens"] == "300"
        with pytest.raises(QuotaExceeded) as held:  # budget: 0.001 + 0.004 + 0.006 > 0.01
            await cluster.admit("k", limits, None, "chat", 10, 0.006)
        assert held.value.headers["Retry-After"] == "1"  # 0.004 of it is held in flight
        second.settle(900, 0.009)  # all used for good: only the next day gives room
        await asyncio.sleep(0.2)
        with pytest.raises(QuotaExceeded) as spent:
            await cluster.admit("k", limits, None, "chat", 10, 0.0001)
        assert (spent.value.status, spent.value.type, spent.value.code) == (
            429,
            "insufficient_quota",
            "insufficient_quota",
        )
        assert int(spent.value.headers["Retry-After"]) > 60  # the daily reset
        with pytest.raises(QuotaExceeded) as never:  # more than the whole quota
            await cluster.admit("other", limits, None, "chat", 2000, 0.0)
        assert never.value.headers["x-should-retry"] == "false"
        assert 0 < int(never.value.headers["Retry-After"]) <= 86400  # the key's day begins again
        bucket = EffectiveLimits(embeddings_per_minute=2)
        await cluster.admit("b", bucket, None, "embeddings", 0, 0)
        await cluster.admit("b", bucket, None, "embeddings", 0, 0)
        with pytest.raises(RateLimited) as limited:
            await cluster.admit("b", bucket, None, "embeddings", 0, 0)
        assert limited.value.headers["Retry-After"] == "30"
        assert (limited.value.status, limited.value.type, limited.value.code) == (
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
        )
    finally:
        await cluster.close()


async def test_admission_without_redis_fails_fast(tmp_path: Path) -> None:
    from gateway.cluster import RedisLimiter

    dead = f"redis://127.0.0.1:{free_port()}/0"
    local = Limiter(LimitsConfig())
    limits = EffectiveLimits(chat_per_minute=1)
    opened = RedisLimiter(ClusterConfig(redis_url=dead, redis_timeout=0.1), local, 0)
    await opened.start()
    started = time.monotonic()
    ticket: Any = await opened.admit("k", limits, None, "chat", 1, 0.0)  # decided locally
    assert ticket.headers["X-RateLimit-Limit-Requests"] == "1"
    with pytest.raises(RateLimited):  # the local bucket holds: limits still apply
        await opened.admit("k", limits, None, "chat", 1, 0.0)
    assert time.monotonic() - started < 1
    assert opened.failures >= 1 and opened.degraded
    await opened.close()
    closed = RedisLimiter(
        ClusterConfig(redis_url=dead, redis_timeout=0.1, on_redis_failure="closed"), local, 0
    )
    await closed.start()
    with pytest.raises(ServiceUnavailable):
        await closed.admit("k2", limits, None, "chat", 1, 0.0)
    await closed.close()


async def test_a_flushed_redis_seeds_quotas_from_the_usage_store(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession
) -> None:
    config = fleet_config(tmp_path, redis_server.url, "requests_per_day = 5")
    [gw] = await start_fleet(config, 1)
    try:
        assert [await embed(session, gw.url) for _ in range(3)] == [200, 200, 200]
        assert await redis_server.call("FLUSHALL") == b"OK"  # or a restart without its data
        # 3 of 5 were used today, as the usage database says: 2 left, not a fresh 5
        assert [await embed(session, gw.url) for _ in range(3)] == [200, 200, 429]
    finally:
        [(code, stderr)] = await stop_fleet([gw])
    assert code == 0, stderr
    # the same for a process that starts on an empty Redis with usage in its database
    await redis_server.call("FLUSHALL")
    [gw] = await start_fleet(config, 1)
    try:
        assert await embed(session, gw.url) == 429
    finally:
        await stop_fleet([gw])


async def test_a_fleet_on_postgresql_seeds_from_everyones_usage(
    tmp_path: Path, redis_server: RedisServer, session: aiohttp.ClientSession, pg_url: str
) -> None:
    storage = f'url = "{pg_url}"\nflush_interval = 0.05'
    config = fleet_config(tmp_path, redis_server.url, "requests_per_day = 6", storage=storage)
    fleet = await start_fleet(config, 2)
    try:
        a, b = (g.url for g in fleet)
        assert [await embed(session, url) for url in (a, b, a, b)] == [200, 200, 200, 200]
        await asyncio.sleep(0.5)  # each process has written its records to the shared database
        await redis_server.call("FLUSHALL")
        # the seed counts the whole fleet's 4, not only the seeding process's 2
        assert [await embed(session, url) for url in (a, b, a, b)] == [200, 200, 429, 429]
    finally:
        results = await stop_fleet(fleet)
    assert all(code == 0 for code, _ in results), results


async def test_settling_below_the_estimate_refills_the_token_bucket(
    redis_server: RedisServer,
) -> None:
    from gateway.cluster import RedisLimiter

    cluster = RedisLimiter(ClusterConfig(redis_url=redis_server.url), Limiter(LimitsConfig()), 0)
    await cluster.start()
    try:
        limits = EffectiveLimits(tokens_per_minute=1000)
        first = await cluster.admit("k", limits, None, "chat", 900, 0.0)
        assert first.headers["X-RateLimit-Remaining-Tokens"] == "100"
        first.settle(0, 0.0)  # nothing was used: the bucket is full again
        await asyncio.sleep(0.2)
        again = await cluster.admit("k", limits, None, "chat", 900, 0.0)
        assert again.headers["X-RateLimit-Remaining-Tokens"] == "100"
        again.settle(1900, 0.0)  # 1000 more than reserved: the bucket owes a minute
        await asyncio.sleep(0.2)
        with pytest.raises(RateLimited):
            await cluster.admit("k", limits, None, "chat", 1, 0.0)
    finally:
        await cluster.close()


async def test_settlements_wait_for_redis_and_apply_once(tmp_path: Path) -> None:
    from gateway.cluster import RedisLimiter

    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed here (.ci/run installs it from Debian)")
    redis = RedisServer(persist_dir=tmp_path)
    redis.start()
    config = ClusterConfig(redis_url=redis.url, redis_timeout=0.1)
    cluster = RedisLimiter(config, Limiter(LimitsConfig()), 0)
    await cluster.start()
    limits = EffectiveLimits(tokens_per_day=1000)

    async def day_tokens(key_id: str) -> tuple[int, int | None]:
        [key] = await redis.call("KEYS", f"gw:k:{key_id}:tk:d:*[0-9]")
        held = await redis.call("GET", key + b":h")
        return int(await redis.call("GET", key)), None if held is None else int(held)

    try:
        ticket = await cluster.admit("k", limits, None, "chat", 600, 0.0)
        assert await day_tokens("k") == (600, 600)
        # Redis goes away (with its data saved) before the settlement is sent
        with contextlib.suppress(RedisError):
            await redis.call("SHUTDOWN", "SAVE")
        redis.proc.wait(timeout=10)  # type: ignore[union-attr]
        ticket.settle(100, 0.0)
        await asyncio.sleep(0.3)
        assert cluster.failures >= 1  # the settlement could not be sent
        redis.start()  # back, with the day's counters from its dump
        await asyncio.sleep(1.5)  # retried a second after the failure
        assert await day_tokens("k") == (100, None)  # applied: 600 reserved became 100 used
        # Redis stalls after receiving a settlement: it times out here, applies it later,
        # and the copy sent again is skipped
        other = await cluster.admit("s", limits, None, "chat", 600, 0.0)
        assert redis.proc is not None
        redis.proc.send_signal(signal.SIGSTOP)
        failures = cluster.failures
        other.settle(50, 0.0)
        await asyncio.sleep(0.8)
        assert cluster.failures > failures
        redis.proc.send_signal(signal.SIGCONT)
        await asyncio.sleep(1.5)
        assert await day_tokens("s") == (50, None)  # not 50 - 550
        assert cluster.settlements_lost == 0
    finally:
        await cluster.close()
        if redis.proc is not None:
            redis.proc.send_signal(signal.SIGCONT)
        redis.stop()


def test_rediss_urls_connect_with_tls() -> None:
    plain = RedisConnection("redis://127.0.0.1:6379/0")
    assert plain.ssl is None
    tls = RedisConnection("rediss://:secret@cache.internal:6380/2")
    assert isinstance(tls.ssl, ssl.SSLContext)
    assert tls.ssl.verify_mode == ssl.CERT_REQUIRED and tls.ssl.check_hostname
    assert (tls.host, tls.port, tls.db, tls.password) == ("cache.internal", 6380, 2, "secret")
    unverified = RedisConnection("rediss://cache.internal/0?ssl_cert_reqs=none")
    assert unverified.ssl is not None and unverified.ssl.verify_mode == ssl.CERT_NONE
    assert unverified.port == 6379
    with pytest.raises(ValueError, match="ssl_cert_reqs"):
        RedisConnection("rediss://cache.internal/0?ssl_cert_reqs=maybe")


async def test_rediss_speaks_tls_to_the_server(redis_server: RedisServer) -> None:
    # a plain Redis does not answer a TLS handshake: the connection fails, it does not hang
    conn = RedisConnection(f"rediss://127.0.0.1:{redis_server.port}/0")
    with pytest.raises((OSError, RedisError, TimeoutError)):
        async with asyncio.timeout(5):
            await conn.call("PING")
    await conn.close()


async def test_tier_upgrades_count_the_fleets_decisions(redis_server: RedisServer) -> None:
    from gateway.cluster import RedisLimiter

    wall = [1_700_000_000.0]
    local = Limiter(LimitsConfig(), wall=lambda: wall[0])
    cluster = RedisLimiter(ClusterConfig(redis_url=redis_server.url), local, 0)
    tiers = {"free": TierConfig(upgrade_to="pro", upgrade_after_days=1)}
    limits = EffectiveLimits(chat_per_minute=1)
    try:
        (await cluster.admit("clean", limits, None, "chat", 1, 0.0)).settle(1, 0.0)
        (await cluster.admit("refused", limits, None, "chat", 1, 0.0)).settle(1, 0.0)
        with pytest.raises(RateLimited):
            await cluster.admit("refused", limits, None, "chat", 1, 0.0)
        wall[0] += 86_400
        upgrades = local.rollover({"clean": "free", "refused": "free"}, tiers)
        assert upgrades == [("clean", "free", "pro")]
    finally:
        await cluster.close()


async def test_redis_fault_metrics(
    make_gateway: MakeGateway, redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.cluster

    monkeypatch.setattr(gateway.cluster, "RETRY_REDIS_AFTER", 3600.0)  # no retry in this test
    admin = new_key()
    gw = await make_gateway(f"""
[admin]
key_hash = "{hash_key(admin)}"

[cluster]
redis_url = "{redis_server.url}"
redis_timeout = 0.5

[[keys]]
id = "limited"
hash = "{hash_key(KEY)}"
limits = {{ embeddings_per_minute = 100 }}
""")

    async def scrape() -> dict[str, float]:
        async with session.get(gw.url + "/metrics",
                               headers={"Authorization": f"Bearer {admin}"}) as r:  # fmt: skip
            assert r.status == 200
            text = await r.text()
        return {
            name: float(line.split()[-1])
            for line in text.splitlines()
            for name in ("failures_total", "local_admissions_total", "degraded", "lost_total")
            if line.startswith(f"gateway_cluster_redis_{name}")
            or line.startswith(f"gateway_cluster_{name}")
            or line.startswith(f"gateway_cluster_settlements_{name}")
        }

    async with aiohttp.ClientSession() as session:
        assert await embed(session, gw.base_url) == 200  # through Redis
        await asyncio.sleep(0.2)  # its settlement is sent
        assert await scrape() == {
            "failures_total": 0, "local_admissions_total": 0, "degraded": 0, "lost_total": 0
        }  # fmt: skip
        redis_server.stop()
        assert [await embed(session, gw.base_url) for _ in range(3)] == [200, 200, 200]
        # one failed call, then Redis is left alone: three admissions decided locally
        assert await scrape() == {
            "failures_total": 1, "local_admissions_total": 3, "degraded": 1, "lost_total": 0
        }  # fmt: skip


async def test_unsettled_usage_is_bounded_and_counted(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    import gateway.cluster

    monkeypatch.setattr(gateway.cluster, "MAX_UNSETTLED", 1)  # counter moves kept, at most
    config = ClusterConfig(redis_url=redis_server.url, redis_timeout=0.1)
    cluster = gateway.cluster.RedisLimiter(config, Limiter(LimitsConfig()), 0)
    await cluster.start()
    limits = EffectiveLimits(tokens_per_day=1000)
    assert redis_server.proc is not None
    try:
        first = await cluster.admit("a", limits, None, "chat", 600, 0.0)
        second = await cluster.admit("b", limits, None, "chat", 600, 0.0)
        redis_server.proc.send_signal(signal.SIGSTOP)  # Redis stops answering

        async def failures(n: int) -> None:
            async with asyncio.timeout(10):
                while cluster.failures < n:
                    await asyncio.sleep(0.02)

        first.settle(10, 0.0)
        await failures(1)  # sent, timed out: kept
        assert cluster.settlements_lost == 0
        second.settle(10, 0.0)
        await failures(2)  # both sent again a second later, timed out: one too many
        assert (cluster.failures, cluster.settlements_lost) == (2, 1)
    finally:
        redis_server.proc.send_signal(signal.SIGCONT)
        await cluster.close()


async def test_a_handshake_cut_by_a_timeout_leaves_no_half_set_up_connection() -> None:
    """A Redis that takes the connection but never answers AUTH: the caller's timeout must not
    leave a connection that counts as up yet is unauthenticated (or on database 0)."""
    heard: list[bytes] = []
    done = asyncio.Event()

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heard.append(await reader.read(1024))
        await done.wait()
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    conn = RedisConnection(f"redis://:secret@127.0.0.1:{port}/3")
    try:
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.2):
                await conn.call("PING")
        assert not conn.connected
        assert heard and b"AUTH" in heard[0] and b"SELECT" not in heard[0]
    finally:
        await conn.close()
        done.set()
        server.close()
        await server.wait_closed()
        await asyncio.sleep(0)  # the handler closes its side
