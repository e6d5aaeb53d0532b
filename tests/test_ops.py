"""Running it like a service: health, readiness, metrics, the access log, systemd."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.accesslog import AccessLog
from gateway.auth import hash_key, new_key

from .conftest import CLIENT_KEY, Fakes, MakeGateway
from .test_cli import free_port
from .test_lifecycle import GatewayProcess

ROOT = Path(__file__).parent.parent
ADMIN = new_key()
ADMIN_TOML = f'[admin]\nkey_hash = "{hash_key(ADMIN)}"\n'
MESSAGES: list[Any] = [{"role": "user", "content": "What's the weather like in SF?"}]


async def get(url: str, key: str | None = None) -> tuple[int, str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as resp:
        return resp.status, await resp.text()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus exposition, parsed by Prometheus's own client library."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(all_samples: dict[Any, float], name: str, **labels: str) -> float:
    return all_samples.get((name, tuple(sorted(labels.items()))), 0.0)


async def test_health_and_readiness(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    for path in ("/healthz", "/readyz", "/metrics"):  # quiet, but timed like every response
        async with aiohttp.ClientSession() as session, session.get(gateway.url + path) as resp:
            assert re.fullmatch(r"gateway;dur=\d+\.\d\d", resp.headers["Server-Timing"]), path
    status, body = await get(gateway.url + "/healthz")
    assert (status, orjson.loads(body)) == (200, {"status": "ok", "pid": os.getpid()})
    status, body = await get(gateway.url + "/readyz")
    assert status == 200 and orjson.loads(body)["status"] == "ready"
    for deployment in gateway.state.runtime.router.models:
        breaker = gateway.state.breakers[deployment]
        for _ in range(5):
            breaker.failed()
    status, body = await get(gateway.url + "/readyz")
    assert status == 503
    assert orjson.loads(body)["problems"] == ["every deployment's circuit breaker is open"]


async def test_metrics_move_by_exactly_the_traffic(make_gateway: MakeGateway) -> None:
    extra = (
        ADMIN_TOML
        + """
[aliases.backup]
models = ["openai/gpt-4o", "anthropic/claude-haiku"]

[[keys]]
id = "tiny"
hash = "{}"
limits = {{ chat_per_minute = 1 }}
""".format(hash_key("gw-tiny-key-for-metrics"))
    )
    gateway = await make_gateway(extra=extra, server="retries = 1\nretry_backoff = 0.01")
    assert (await get(gateway.url + "/metrics"))[0] == 401
    assert (await get(gateway.url + "/metrics", CLIENT_KEY))[0] == 401
    status, before_text = await get(gateway.url + "/metrics", ADMIN)
    assert status == 200
    before = samples(before_text)

    client = gateway.aclient()
    await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    stream = await client.chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    async for _ in stream:
        pass
    # one retry (503 then 200)
    gateway.fake.next_json(503, {"error": {"message": "busy", "type": "server_error"}})
    await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    # a fallback: openai fails twice, anthropic serves
    for _ in range(2):
        gateway.fake.next_json(500, {"error": {"message": "down", "type": "server_error"}})
    await client.chat.completions.create(model="backup", messages=MESSAGES)
    # a refusal by the gateway's own limits
    tiny = gateway.aclient(key="gw-tiny-key-for-metrics")
    await tiny.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError):
        await tiny.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)

    await gateway.state.usage.flush()
    after = samples((await get(gateway.url + "/metrics", ADMIN))[1])

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"endpoint": "chat", "model": "openai/gpt-4o", "provider": "openai", "status": "200"}
    assert moved("gateway_requests_total", **ok) == 5  # 2 + stream + retried + tiny's first
    assert (
        moved(
            "gateway_requests_total",
            endpoint="chat",
            model="backup",
            provider="anthropic",
            status="200",
        )
        == 1
    )
    assert (
        moved(
            "gateway_requests_total",
            endpoint="chat",
            model="openai/gpt-4o",
            provider="",
            status="429",
        )
        == 1
    )
    assert moved("gateway_rate_limit_rejections_total", reason="rate_limit_exceeded") == 1
    assert moved("gateway_upstream_retries_total", provider="openai") == 2  # once each
    assert moved("gateway_upstream_attempts_total", provider="openai", outcome="503") == 1
    assert moved("gateway_upstream_attempts_total", provider="openai", outcome="500") == 2
    assert moved("gateway_upstream_attempts_total", provider="openai", outcome="200") == 5
    assert moved("gateway_upstream_attempts_total", provider="anthropic", outcome="200") == 1
    assert moved("gateway_fallbacks_total", model="backup") == 1
    # tokens: the recorded completion (14 + 37) four times, and the recorded stream once
    records = [r for r in await gateway.records() if r.provider == "openai" and r.status == 200]
    prompt = sum(r.prompt_tokens for r in records)
    assert (
        moved("gateway_tokens_total", model="openai/gpt-4o", provider="openai", kind="prompt")
        == prompt
    )
    cost = sum(r.cost for r in records)
    assert moved("gateway_cost_total", model="openai/gpt-4o", provider="openai") == pytest.approx(
        cost
    )
    assert moved("gateway_request_duration_seconds_count", endpoint="chat") == 7
    assert moved("gateway_time_to_first_token_seconds_count", model="openai/gpt-4o") == 1
    assert value(after, "gateway_in_flight_requests") == 0
    assert value(after, "gateway_in_flight_streams") == 0
    assert value(after, "gateway_breaker_state", deployment="openai/gpt-4o") == 0
    assert moved("gateway_usage_written_total") == len(await gateway.records()) - 0
    assert value(after, "gateway_usage_dropped_total") == 0
    assert value(after, "gateway_process_resident_memory_bytes") > 10_000_000


async def test_separate_metrics_listener_needs_no_key(make_gateway: MakeGateway) -> None:
    port = free_port()
    gateway = await make_gateway(
        extra=ADMIN_TOML.replace("[admin]", f'[admin]\nmetrics_listen = "127.0.0.1:{port}"')
    )
    status, text = await get(f"http://127.0.0.1:{port}/metrics")
    assert status == 200 and "gateway_requests_total" in text
    assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    assert (await get(gateway.url + "/metrics", ADMIN))[0] == 404  # not on the main listener


async def test_access_log_lines(make_gateway: MakeGateway, fakes: Fakes, tmp_path: Path) -> None:
    from gateway import config as config_module
    from gateway.app import build

    from .conftest import gateway_toml

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    path = tmp_path / "g.toml"
    path.write_text(gateway_toml(fakes.urls, db=str(tmp_path / "u.db")))
    app = build(config_module.load(path), access_log=AccessLog(write_fd))
    from aiohttp.test_utils import TestServer

    server = TestServer(app)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(
                str(server.make_url("/v1/chat/completions")),
                json={"model": "openai/gpt-4o", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-Id": "trace-7"},
            ) as resp:
                assert resp.status == 200
            async with session.get(
                str(server.make_url("/v1/models")), headers={"Authorization": "Bearer gw-wrong"}
            ) as resp:
                assert resp.status == 401
        await asyncio.sleep(0.5)  # the log is written in batches, 0.2 s apart
        data = b""
        while True:
            try:
                data += os.read(read_fd, 65536)
            except BlockingIOError:
                break
    finally:
        await server.close()
        os.close(read_fd)
    lines = [orjson.loads(line) for line in data.splitlines()]
    first, second = lines[0], lines[1]
    assert first["request_id"] == "trace-7"
    assert (first["status"], first["key_id"], first["model"], first["provider"]) == (
        200,
        "test",
        "openai/gpt-4o",
        "openai",
    )
    assert first["prompt_tokens"] == 14 and first["completion_tokens"] == 37
    assert first["latency_ms"] > 0 and first["outcome"] == "ok"
    assert (second["status"], second["key_id"], second["outcome"]) == (401, None, "invalid_api_key")
    assert CLIENT_KEY not in data.decode() and "gw-wrong" not in data.decode()


def test_systemd_unit_verifies() -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed here")
    gateway_bin = shutil.which("gateway") or f"{sys.executable} -m gateway"
    unit = (
        (ROOT / "systemd/gateway.service")
        .read_text()
        .replace("/opt/gateway/venv/bin/gateway", gateway_bin.split()[0])
    )
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "gateway.service"
        path.write_text(unit)
        result = subprocess.run(
            [analyze, "verify", str(path)], capture_output=True, text=True, timeout=60
        )
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip() == "", result.stderr
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "StateDirectory=gateway",
        "User=gateway",
    ):
        assert line in unit


async def test_systemd_notifications(tmp_path: Path) -> None:
    sock_path = tmp_path / "notify.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.setblocking(False)
    config = tmp_path / "g.toml"
    config.write_text(
        f'[storage]\npath = "{tmp_path / "u.db"}"\n[[providers]]\nname = "demo"\n'
        'kind = "demo"\nmodels = [{ id = "echo" }]\n'
    )
    old = {k: os.environ.get(k) for k in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")}
    os.environ.update({"NOTIFY_SOCKET": str(sock_path), "WATCHDOG_USEC": "200000"})
    gw = GatewayProcess(config)
    try:
        await gw.start()
        assert gw.proc is not None
        os.environ.pop("WATCHDOG_PID", None)
        await asyncio.sleep(0.6)
        gw.signal(signal.SIGTERM)
        code, stderr = await gw.stop()
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    messages = []
    while True:
        try:
            messages.append(sock.recv(1024).decode())
        except BlockingIOError:
            break
    sock.close()
    assert code == 0, stderr
    assert messages[0] == "READY=1"
    assert messages.count("WATCHDOG=1") >= 2
    assert messages[-1] == "STOPPING=1"
