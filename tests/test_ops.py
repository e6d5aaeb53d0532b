"""Running it like a service: health, readiness, metrics, the access log, systemd."""

from __future__ import annotations

import asyncio
import logging
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
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from gateway.accesslog import AccessLog
from gateway.auth import hash_key, new_key

from .conftest import CLIENT_KEY, Fakes, Gateway, MakeGateway
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

[[keys]]
id = "daily"
hash = "{}"
limits = {{ requests_per_day = 1 }}
""".format(hash_key("gw-tiny-key-for-metrics"), hash_key("gw-daily-key-for-metrics"))
    )
    gateway = await make_gateway(extra=extra, server="retries = 1\nretry_backoff = 0.01")
    assert (await get(gateway.url + "/metrics"))[0] == 401
    assert (await get(gateway.url + "/metrics", CLIENT_KEY))[0] == 401
    async with aiohttp.ClientSession() as session:
        async with session.get(
            gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN}"}
        ) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
            before = samples(await resp.text())

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
    with pytest.raises(openai.RateLimitError) as limited:
        await tiny.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert (limited.value.type, limited.value.code) == ("rate_limit_error", "rate_limit_exceeded")
    # and by its daily quota, another reason
    daily = gateway.aclient(key="gw-daily-key-for-metrics")
    await daily.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    with pytest.raises(openai.RateLimitError) as quota:
        await daily.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert (quota.value.type, quota.value.code) == ("insufficient_quota", "insufficient_quota")

    await gateway.state.usage.flush()
    after = samples((await get(gateway.url + "/metrics", ADMIN))[1])

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    ok = {"endpoint": "chat", "model": "openai/gpt-4o", "provider": "openai", "status": "200"}
    # 2 + stream + retried + tiny's first + daily's first
    assert moved("gateway_requests_total", **ok) == 6
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
        == 2
    )
    assert moved("gateway_rate_limit_rejections_total", reason="rate_limit_exceeded") == 1
    assert moved("gateway_rate_limit_rejections_total", reason="insufficient_quota") == 1
    assert moved("gateway_upstream_retries_total", provider="openai") == 2  # once each
    assert moved("gateway_upstream_attempts_total", provider="openai", outcome="503") == 1
    assert moved("gateway_upstream_attempts_total", provider="openai", outcome="500") == 2
    assert moved("gateway_upstream_attempts_total", provider="openai", outcome="200") == 6
    assert moved("gateway_upstream_attempts_total", provider="anthropic", outcome="200") == 1
    assert moved("gateway_fallbacks_total", model="backup") == 1
    # tokens: the fake's recorded completion (14 prompt + 37 completion) five times, and its
    # recorded stream (78 + 9) once; the usage records say the same
    records = [r for r in await gateway.records() if r.provider == "openai" and r.status == 200]
    for kind, expected in (("prompt", 5 * 14 + 78), ("completion", 5 * 37 + 9)):
        assert sum(getattr(r, f"{kind}_tokens") for r in records) == expected
        counted = moved("gateway_tokens_total", model="openai/gpt-4o", provider="openai", kind=kind)
        assert counted == expected, kind
    cost = sum(r.cost for r in records)
    assert moved("gateway_cost_total", model="openai/gpt-4o", provider="openai") == pytest.approx(
        cost
    )
    assert moved("gateway_request_duration_seconds_count", endpoint="chat") == 9
    assert moved("gateway_time_to_first_token_seconds_count", model="openai/gpt-4o") == 1
    assert value(after, "gateway_in_flight_requests") == 0
    assert value(after, "gateway_in_flight_streams") == 0
    assert value(after, "gateway_breaker_state", deployment="openai/gpt-4o") == 0
    assert moved("gateway_usage_written_total") == len(await gateway.records()) - 0
    assert value(after, "gateway_usage_dropped_total") == 0
    assert value(after, "gateway_process_resident_memory_bytes") > 10_000_000


async def scrape(gateway: Gateway) -> dict[Any, float]:
    status, text = await get(gateway.url + "/metrics", ADMIN)
    assert status == 200
    return samples(text)


async def test_in_flight_streams_and_every_breaker_are_gauges(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(
        extra=ADMIN_TOML, server="retries = 0\nbreaker_failures = 2\nbreaker_cooldown = 0.001"
    )
    deployments = sorted(gateway.state.runtime.router.models)
    assert len(deployments) > 5

    def breakers(s: dict[Any, float]) -> dict[str, float]:
        return {
            dict(labels)["deployment"]: v
            for (name, labels), v in s.items()
            if name == "gateway_breaker_state"
        }

    # before any traffic every deployment is there, closed (0)
    assert breakers(await scrape(gateway)) == dict.fromkeys(deployments, 0)
    status, body = await get(gateway.url + "/admin/breakers", ADMIN)
    assert status == 200
    assert orjson.loads(body)["deployments"] == dict.fromkeys(deployments, "closed")

    # a stream held open upstream: one stream (and one request) in flight, then none
    client = gateway.aclient()
    gate, sent = asyncio.Event(), asyncio.Event()
    gateway.fake.next_stream("openai/chat-stream-text.sse", gate=gate, sent=sent)

    async def read_stream() -> None:
        stream = await client.chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, stream=True
        )
        async for _ in stream:
            pass

    streaming = asyncio.create_task(read_stream())
    await asyncio.wait_for(sent.wait(), 10)
    held = await scrape(gateway)
    assert value(held, "gateway_in_flight_streams") == 1
    assert value(held, "gateway_in_flight_requests") == 1  # the scrape itself is not counted
    gate.set()
    await asyncio.wait_for(streaming, 10)
    done = await scrape(gateway)
    assert value(done, "gateway_in_flight_streams") == 0
    assert value(done, "gateway_in_flight_requests") == 0

    # two failures open openai/gpt-4o's breaker (2); the others stay closed
    for _ in range(2):
        gateway.fake.next_json(500, {"error": {"message": "down", "type": "server_error"}})
        with pytest.raises(openai.InternalServerError):
            await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    opened = breakers(await scrape(gateway))
    assert opened == {**dict.fromkeys(deployments, 0), "openai/gpt-4o": 2}

    # after the cooldown the next request is the probe: half-open (1) while it is out
    probe_gate, probe_sent = asyncio.Event(), asyncio.Event()

    async def held_answer(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        probe_sent.set()
        await probe_gate.wait()
        return await gateway.fake.default(request, body)

    gateway.fake.next_behaviour(held_answer)
    probing = asyncio.create_task(
        client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    )
    await asyncio.wait_for(probe_sent.wait(), 10)
    assert breakers(await scrape(gateway))["openai/gpt-4o"] == 1
    probe_gate.set()
    await asyncio.wait_for(probing, 10)
    assert breakers(await scrape(gateway)) == dict.fromkeys(deployments, 0)


async def test_an_unwritable_usage_store_fails_readiness_and_fills_the_queue(
    make_gateway: MakeGateway, fakes: Fakes, tmp_path: Path
) -> None:
    from .conftest import gateway_toml

    toml = gateway_toml(fakes.urls, ADMIN_TOML, db=str(tmp_path / "usage.db"))
    gateway = await make_gateway(
        toml=toml.replace("flush_interval", "queue_max = 2\nflush_interval")
    )
    usage = gateway.state.usage
    client = gateway.aclient()
    await client.chat.completions.create(model="demo/echo", messages=MESSAGES)
    assert await usage.flush()
    before = await scrape(gateway)
    assert value(before, "gateway_usage_written_total") == 1
    assert (await get(gateway.url + "/readyz"))[0] == 200

    def read_only(store: Any, on: bool) -> None:  # as a full disk or a read-only mount would
        store.conn.execute(f"PRAGMA query_only = {'ON' if on else 'OFF'}")

    await usage.call(read_only, True)
    for _ in range(3):  # the queue holds 2: the third record is dropped, and counted
        await client.chat.completions.create(model="demo/echo", messages=MESSAGES)
    assert not await usage.flush()
    failing = await scrape(gateway)
    assert value(failing, "gateway_usage_queue_depth") == 2
    assert value(failing, "gateway_usage_dropped_total") == 1
    assert value(failing, "gateway_usage_written_total") == 1
    assert value(failing, "gateway_usage_store_failing") == 1
    status, body = await get(gateway.url + "/readyz")
    assert status == 503
    assert orjson.loads(body)["problems"] == ["the usage database cannot be written"]
    status, body = await get(gateway.url + "/healthz")
    assert (status, orjson.loads(body)["status"]) == (200, "ok")  # alive, just not ready

    await usage.call(read_only, False)
    assert await usage.flush()
    recovered = await scrape(gateway)
    assert value(recovered, "gateway_usage_queue_depth") == 0
    assert value(recovered, "gateway_usage_written_total") == 3
    assert value(recovered, "gateway_usage_dropped_total") == 1
    assert value(recovered, "gateway_usage_store_failing") == 0
    assert (await get(gateway.url + "/readyz"))[0] == 200
    assert len(await gateway.records()) == 3


async def test_separate_metrics_listener_needs_no_key(make_gateway: MakeGateway) -> None:
    port = free_port()
    gateway = await make_gateway(
        extra=ADMIN_TOML.replace("[admin]", f'[admin]\nmetrics_listen = "127.0.0.1:{port}"')
    )
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as resp:
            assert resp.status == 200 and "gateway_requests_total" in await resp.text()
            assert resp.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    assert (await get(f"http://127.0.0.1:{port}/healthz"))[0] == 200
    status, body = await get(gateway.url + "/metrics", ADMIN)  # not on the main listener
    error = orjson.loads(body)["error"]
    assert (status, error["type"], error["code"]) == (
        404,
        "invalid_request_error",
        "unknown_endpoint",
    )


async def test_each_worker_serves_and_logs_its_own_metrics_port(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """`serve --workers N` starts worker i with GATEWAY_WORKER=i: its listener is port + i,
    and the log line says so (not the configured port, which worker 0 holds)."""
    port = free_port()
    while not port_is_free(port + 1):
        port = free_port()
    monkeypatch.setenv("GATEWAY_WORKER", "1")
    caplog.set_level(logging.INFO, logger="gateway")
    await make_gateway(
        extra=ADMIN_TOML.replace("[admin]", f'[admin]\nmetrics_listen = "127.0.0.1:{port}"')
    )
    status, text = await get(f"http://127.0.0.1:{port + 1}/metrics")
    assert status == 200 and "gateway_requests_total" in text
    assert port_is_free(port)  # worker 0's port is not taken by worker 1
    said = [r.getMessage() for r in caplog.records if "metrics listening" in r.getMessage()]
    assert said == [f"metrics listening on http://127.0.0.1:{port + 1}/metrics"]


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


async def test_access_log_lines(make_gateway: MakeGateway, fakes: Fakes, tmp_path: Path) -> None:
    from gateway import config as config_module
    from gateway.app import build

    from .conftest import gateway_toml

    read_fd, write_fd = os.pipe()
    os.set_blocking(read_fd, False)
    path = tmp_path / "g.toml"
    path.write_text(gateway_toml(fakes.urls, ADMIN_TOML, db=str(tmp_path / "u.db")))
    app = build(config_module.load(path), access_log=AccessLog(write_fd))
    from aiohttp.test_utils import TestServer

    server = TestServer(app)
    await server.start_server()
    echoed: list[str] = []

    async def call(method: str, path: str, key: str, request_id: str, **kw: Any) -> int:
        headers = {"Authorization": f"Bearer {key}", "X-Request-Id": request_id}
        async with session.request(
            method, str(server.make_url(path)), headers=headers, **kw
        ) as resp:
            echoed.append(resp.headers.get("X-Request-Id", ""))
            return resp.status

    chat = {"json": {"model": "openai/gpt-4o", "messages": MESSAGES}}
    try:
        async with aiohttp.ClientSession() as session:
            assert await call("POST", "/v1/chat/completions", CLIENT_KEY, "trace-7", **chat) == 200
            assert await call("GET", "/v1/models", "gw-wrong", "trace-8") == 401
            # not a sane id (a space, too long): the gateway makes its own
            assert await call("GET", "/v1/models", CLIENT_KEY, "a b") == 200
            assert await call("GET", "/v1/models", CLIENT_KEY, "x" * 129) == 200
            # quiet paths: a refused scrape is logged, a health check or a good scrape is not
            assert await call("GET", "/metrics", "gw-wrong-admin", "scrape-1") == 401
            assert await call("GET", "/metrics", ADMIN, "scrape-2") == 200
            assert await call("GET", "/healthz", "", "probe-1") == 200
            assert await call("GET", "/nowhere", ADMIN, "lost-1") == 404
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
    assert [line["request_id"] for line in lines] == [
        "trace-7", "trace-8", echoed[2], echoed[3], "scrape-1", "lost-1"
    ]  # fmt: skip
    assert echoed[:2] == ["trace-7", "trace-8"] and echoed[4:] == [
        "scrape-1", "", "", "lost-1"
    ]  # fmt: skip
    assert re.fullmatch(r"req_[0-9a-f]{24}", echoed[2]) and echoed[3] != echoed[2]
    assert re.fullmatch(r"req_[0-9a-f]{24}", echoed[3])
    first, second, scrape_line = lines[0], lines[1], lines[4]
    assert (first["status"], first["key_id"], first["model"], first["provider"]) == (
        200,
        "test",
        "openai/gpt-4o",
        "openai",
    )
    assert first["prompt_tokens"] == 14 and first["completion_tokens"] == 37
    assert first["latency_ms"] > 0 and first["outcome"] == "ok"
    assert (second["status"], second["key_id"], second["outcome"]) == (401, None, "invalid_api_key")
    assert (scrape_line["path"], scrape_line["status"], scrape_line["outcome"]) == (
        "/metrics",
        401,
        "invalid_api_key",
    )
    assert scrape_line["client_ip"] == "127.0.0.1" and scrape_line["key_id"] is None
    assert (lines[5]["path"], lines[5]["status"]) == ("/nowhere", 404)
    text = data.decode()
    for secret in (CLIENT_KEY, ADMIN, "gw-wrong"):
        assert secret not in text


async def test_log_level_and_format_come_from_the_config(tmp_path: Path) -> None:
    """`[logging] format = "text"` and `level = "warning"`, then the defaults (JSON, info), in
    a real process: what reaches stderr (journald) in each case, and never a key."""
    key = new_key()
    base = (
        f'[storage]\npath = "{tmp_path / "u.db"}"\n'
        '[[providers]]\nname = "demo"\nkind = "demo"\nmodels = [{ id = "echo" }]\n'
        f'[[keys]]\nid = "app"\nhash = "{hash_key(key)}"\n{ADMIN_TOML}'
    )
    outputs = {}
    for name, logging_toml in (
        ("text", '[logging]\nformat = "text"\nlevel = "warning"\n'),
        ("json", ""),
    ):
        config = tmp_path / f"{name}.toml"
        config.write_text(base + logging_toml)
        gw = GatewayProcess(config)
        await gw.start()
        root = gw.url.removesuffix("/v1")
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gw.url + "/chat/completions",
                json={"model": "demo/echo", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {key}", "X-Request-Id": f"{name}-1"},
            ) as resp:
                assert resp.status == 200 and resp.headers["X-Request-Id"] == f"{name}-1"
            async with session.get(
                root + "/metrics", headers={"Authorization": f"Bearer {key}"}
            ) as resp:
                assert resp.status == 401
        gw.signal(signal.SIGTERM)
        code, stderr = await gw.stop()
        assert code == 0, stderr
        outputs[name] = stderr
        assert key not in stderr and ADMIN not in stderr

    text = outputs["text"].splitlines()
    chat_line = next(line for line in text if "POST /v1/chat/completions" in line)
    assert re.match(
        r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z 200 POST /v1/chat/completions ", chat_line
    )
    assert "request_id=text-1" in chat_line and "key_id=app" in chat_line
    assert any(re.search(r" 401 GET /metrics .*outcome=invalid_api_key", line) for line in text)
    assert "gateway listening" not in outputs["text"]  # info, below "warning"

    entries = [orjson.loads(line) for line in outputs["json"].splitlines()]  # every line JSON
    own = [e for e in entries if "logger" in e]
    access = [e for e in entries if "request_id" in e]
    assert any(e["level"] == "info" and "gateway listening" in e["message"] for e in own)
    assert [(e["request_id"], e["status"]) for e in access][:1] == [("json-1", 200)]
    assert [(e["path"], e["status"]) for e in access][1:] == [("/metrics", 401)]


def service_steps() -> list[str]:
    """The command lines of the README's "Run it as a service" install block."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Run it as a service") : readme.index("## Operating it")]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match
    return [line for line in match.group(1).splitlines() if line and not line.startswith("#")]


def test_the_service_install_steps_are_true(tmp_path: Path) -> None:
    """Every gateway command of the install steps exists with its options, the files they name
    exist, and their config edits, run on a copy, give a valid config with no demo in it."""
    steps = service_steps()
    gateway = "/opt/gateway/venv/bin/gateway"
    for line in steps:
        if gateway not in line:
            continue
        words = line.split(gateway, 1)[1].split("|")[0].rstrip(")").split()
        command = [w for w in words[:2] if not w.startswith("-") and "/" not in w]
        result = subprocess.run(
            [sys.executable, "-m", "gateway", *command, "--help"],
            capture_output=True, text=True, timeout=30, cwd=ROOT,
        )  # fmt: skip
        assert result.returncode == 0, (line, result.stderr)
        for option in re.findall(r" (--[a-z-]+)", line):
            assert option in result.stdout, (line, option)
    for name in re.findall(r"/opt/gateway/src/(\S+)", "\n".join(steps)):
        assert (ROOT / name).is_file(), name
    unit = (ROOT / "systemd/gateway.service").read_text()
    assert f"ExecStart={gateway} serve --config /etc/gateway/gateway.toml" in unit
    assert "http://127.0.0.1:8080/readyz" in "\n".join(steps)
    assert "port = 8080" in (ROOT / "config.example.toml").read_text()

    # the steps from copying the config to checking it, on a copy, as the README has them
    first = next(i for i, line in enumerate(steps) if line.startswith("install -m 0640"))
    last = next(i for i, line in enumerate(steps) if "check-config" in line)
    config, env = tmp_path / "gateway.toml", tmp_path / "env"
    script = "\n".join(
        line.replace("-g gateway ", "")  # no such group here
        .replace("/etc/gateway/gateway.toml", str(config))
        .replace("/etc/gateway/env", str(env))
        .replace("/opt/gateway/src/", f"{ROOT}/")
        .replace(gateway, f"{sys.executable} -m gateway")
        .replace("editor ", "echo OPENAI_API_KEY=sk-from-the-env-file >")  # the operator types
        for line in steps[first : last + 1]
    )
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", script],
        capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "providers: 1 active of 4" in result.stdout  # openai, its key from the env file
    admin_key = re.search(r"^\s+(gw-\S+)$", result.stderr, re.M)
    assert admin_key, result.stderr  # shown on the terminal
    from gateway.config import load

    loaded = load(config)
    assert loaded.admin.key_hash == hash_key(admin_key.group(1))
    assert loaded.storage.path == "/var/lib/gateway/gateway.db"
    assert "demo" not in {p.name for p in loaded.providers} and not loaded.keys
    assert "demo" not in loaded.aliases
    assert loaded.aliases["fast"].models == ("openai/gpt-4o-mini", "mistral/mistral-small")
    settings = [line for line in config.read_text().splitlines() if not line.startswith("#")]
    assert not [line for line in settings if "demo" in line]  # only comments mention it


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


def test_a_text_log_line_cannot_be_split_or_forged_by_the_path() -> None:
    """The path is URL-decoded: `%0A` in it must not start a second line that reads like
    another request, nor can a space fake a field."""
    from gateway.accesslog import _text_line

    forged = "/v1/x\n2026-01-01T00:00:00.000Z 200 POST /admin/keys key_id=admin"
    line = _text_line(
        {"ts": "2026-11-26T00:00:00.000Z", "status": 404, "method": "GET", "path": forged,
         "key_id": "app", "model": "a b"}
    ).decode()  # fmt: skip
    assert line.count("\n") == 1 and line.endswith("\n")
    assert line.startswith('2026-11-26T00:00:00.000Z 404 GET "/v1/x\\n2026-01-01')
    assert orjson.loads(line.split(" GET ", 1)[1].split('" ', 1)[0] + '"') == forged
    assert " key_id=app " in line and line.rstrip().endswith('model="a b"')
    plain = _text_line({"ts": "t", "status": 200, "method": "POST", "path": "/v1/chat"})
    assert plain == b"t 200 POST /v1/chat \n"
