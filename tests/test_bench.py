"""The benchmark harness keeps working: a smoke run produces numbers, and its parts speak the
wire formats they claim to. No timing is ever asserted."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest

from bench.fake_upstream import FakeUpstream
from bench.httpclient import Connection
from bench.loadgen import Builtin, parse_wrk
from bench.payloads import chat_load, large_body
from bench.procs import compile_bytecode
from bench.report import Results, Row
from bench.runner import pick

ROOT = Path(__file__).parent.parent


def test_quick_run_writes_numbers(tmp_path: Path) -> None:
    argv = [
        sys.executable,
        "-m",
        "bench",
        "--quick",
        "--no-install",
        "--results-dir",
        str(tmp_path),
    ]
    argv += ["--scenario", "nonstream-32", "--scenario", "stream", "--streams", "20"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=50)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "targets" in done.stdout
    doc = json.loads((tmp_path / "latest.json").read_text())
    rows = {(r["target"], r["scenario"]): r for r in doc["rows"]}
    for target in ("upstream", "bare", "gateway"):
        for scenario in ("nonstream-32", "stream"):
            row = rows[(target, scenario)]
            assert row["rps"] > 0 and row["p50_ms"] > 0 and row["cpu_us"] > 0, row
    assert rows[("gateway", "nonstream-32")]["rps_x_bare"] > 0
    assert rows[("gateway", "startup")]["extra"]["ready_ms"] > 0
    assert {c["target"] for c in doc["checks"]} >= {"RSS after 256 conns <= 100 MB"}
    assert doc["meta"]["loadgen"]
    assert len(list(tmp_path.glob("*.json"))) == 2  # latest.json and a timestamped copy


@pytest.fixture
async def upstream_port() -> AsyncIterator[int]:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeUpstream, "127.0.0.1", 0)
    yield server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()


async def test_fake_upstream_speaks_openai_and_anthropic(upstream_port: int) -> None:
    base = f"http://127.0.0.1:{upstream_port}"
    async with aiohttp.ClientSession() as session:
        async with session.post(f"{base}/v1/chat/completions", data=large_body("m")) as resp:
            chat = await resp.json()
        assert chat["object"] == "chat.completion" and chat["usage"]["total_tokens"] > 0

        body = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
        async with session.post(f"{base}/x/v1/chat/completions", data=body) as resp:
            assert resp.headers["Content-Type"] == "text/event-stream"
            events = (await resp.read()).decode().split("\n\n")
        assert events[-2:] == ["data: [DONE]", ""]
        chunks = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert len([c for c in chunks if c["choices"]]) == 20
        assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 20

        async with session.post(f"{base}/v1/messages", data=b"{}") as resp:
            message = await resp.json()
        assert set(message) == {
            "id",
            "type",
            "role",
            "model",
            "content",
            "stop_reason",
            "stop_sequence",
            "usage",
        }
        assert message["type"] == "message" and message["stop_reason"] == "end_turn"
        assert message["content"][0]["type"] == "text"
        assert set(message["usage"]) == {"input_tokens", "output_tokens"}


async def test_a_paced_stream_sends_usage_and_done_with_its_last_chunk(upstream_port: int) -> None:
    # as OpenAI does: a proxy that asks for usage gets no longer a stream than one that does not
    body = b'{"model": "m", "stream": true, "stream_options": {"include_usage": true}}'
    reads: list[tuple[float, bytes]] = []
    loop = asyncio.get_running_loop()
    async with aiohttp.ClientSession() as session:
        async with session.post(
            f"http://127.0.0.1:{upstream_port}/slow/30/v1/chat/completions", data=body
        ) as resp:
            async for data in resp.content.iter_any():
                reads.append((loop.time(), data))
    events = b"".join(d for _, d in reads).split(b"\n\n")
    assert events[-2:] == [b"data: [DONE]", b""] and len(events) == 20 + 3
    last_content = next(i for i, (_, d) in enumerate(reads) if b'"finish_reason":"stop"' in d)
    usage_read = next(i for i, (_, d) in enumerate(reads) if b'"usage"' in d)
    assert reads[usage_read][0] - reads[last_content][0] < 0.015  # not after another pause
    assert reads[-1][0] - reads[0][0] >= 0.030 * 19  # the 20 chunks themselves are paced


def test_stream_ttft_target_is_read_where_no_proxy_is_saturated() -> None:
    results = Results()
    for scenario, added in (("stream-paced", (0.0, 0.4, 0.9)), ("stream", (0.0, 1.0, 12.0))):
        for target, ms in zip(("upstream", "bare", "gateway"), added, strict=True):
            results.add(Row(target, scenario, rps=100, p50_ms=20 + ms, cpu_us=100 + ms))
    results.compare()
    checks = {c.target.strip(): c for c in results.checks()}
    ttft = checks["stream added TTFT <= bare + 1 ms"]
    assert ttft.passed is True and ttft.measured == "0.900 ms (bare 0.400)"
    saturated = checks["back to back (saturated): added TTFT"]
    assert saturated.info and saturated.passed is None
    assert saturated.measured == "12.000 ms (bare 1.000)"
    assert checks["CPU/stream <= 1.3x bare"].measured == "1.11x"  # from the saturated run


async def test_builtin_generator_and_stream_client(upstream_port: int) -> None:
    gen = Builtin(chat_load(upstream_port, "m"), 4)
    try:
        result = await gen.run(0.2)
    finally:
        gen.close()
    assert result.ok > 0 and result.errors == 0 and result.p50_ms > 0

    conn = await Connection.open("127.0.0.1", upstream_port)
    try:
        reply = await conn.request(chat_load(upstream_port, "m", stream=True).raw())
    finally:
        conn.close()
    assert reply.status == 200 and reply.done and 0 < reply.first_byte <= reply.total


def test_parse_wrk() -> None:
    out = "Running 1s test\nBENCH 5000 1000000 0 0 0 10 0 250.0 900.5\n"
    result = parse_wrk(out)
    assert (result.ok, result.errors, result.rps) == (4990, 10, 4990.0)
    assert (result.p50_ms, result.p99_ms) == (0.25, 0.9005)


def test_bytecode_is_written_before_start_up_is_timed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    package = tmp_path / "benchpkg"
    (package / "sub").mkdir(parents=True)
    for source in (package / "__init__.py", package / "sub" / "mod.py"):
        source.write_text("X = 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert compile_bytecode("benchpkg", "no_such_module_here") == "compiled for benchpkg"
    assert list((package / "sub" / "__pycache__").glob("mod.*.pyc"))
    assert compile_bytecode("no_such_module_here").startswith("not compiled")


def test_bare_and_gateway_are_reported_from_the_same_repeat_the_median_ratio() -> None:
    # bare's second repeat caught a fast moment that gateway's did not: pairs, not bests
    rps = {"upstream": [900, 950, 920], "bare": [100, 160, 110], "gateway": [90, 95, 100]}
    runs = {t: [Row(t, "nonstream-32", rps=r) for r in rs] for t, rs in rps.items()}
    chosen = pick(runs)  # ratios 0.90, 0.59, 0.91: the median is the first repeat's
    assert [(row.target, row.rps) for row in chosen] == [
        ("upstream", 900),
        ("bare", 100),
        ("gateway", 90),
    ]
    assert "repeat 1 of 3" in chosen[1].note and "100, 160, 110" in chosen[1].note
    # without both proxies (the workers scenario): each target's fastest
    runs = {t: [Row(t, "workers", rps=r) for r in rs] for t, rs in {"gateway": [5, 7, 6]}.items()}
    assert [row.rps for row in pick(runs)] == [7]
