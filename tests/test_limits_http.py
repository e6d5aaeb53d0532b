"""Rate limits, quotas and budgets as clients meet them: over loopback, with the openai SDK."""

from __future__ import annotations

import asyncio
import email.utils
import json
import logging
import time
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.auth import hash_key, new_key
from gateway.config import ModelConfig
from gateway.handlers import budget_cutoff
from gateway.limits import Limiter, Ticket
from gateway.translate.base import Usage

from .conftest import CLIENT_KEY, Fakes, Gateway, MakeGateway, gateway_toml
from .fakes.base import event_data, fixture_bytes, sse_events

MESSAGES: list[Any] = [{"role": "user", "content": "What's the weather like in SF?"}]
LIMITED = new_key()
OTHER = new_key()


def keys(limits: str = "", tier: str | None = None) -> str:
    tier_line = f'tier = "{tier}"\n' if tier else ""
    return f"""
[[keys]]
id = "limited"
hash = "{hash_key(LIMITED)}"
{tier_line}
[keys.limits]
{limits}

[[keys]]
id = "other"
hash = "{hash_key(OTHER)}"
{tier_line}
[keys.limits]
{limits}
"""


async def chat(
    gateway: Gateway, key: str, headers: dict[str, str] | None = None, **extra: Any
) -> tuple[int, dict[str, Any], Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.base_url + "/chat/completions",
            json={"model": "openai/gpt-4o", "messages": MESSAGES, **extra},
            headers={"Authorization": f"Bearer {key}", **(headers or {})},
        ) as resp,
    ):
        body = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body, checked(resp.status, resp.headers)


def checked(status: int, headers: Any) -> Any:
    """The response's headers, once it is seen that a 429 among them says when to try again:
    so every 429 these tests meet is checked for Retry-After in whole seconds."""
    if status == 429:
        assert int(headers["Retry-After"]) >= 1
    return headers


Result = tuple[int, dict[str, Any], Any]


async def chat_chunked(gateway: Gateway, key: str, body: bytes) -> Result:
    """POST a chat body with Transfer-Encoding: chunked, so without Content-Length."""

    async def pieces() -> AsyncIterator[bytes]:
        for start in range(0, len(body), 16):
            yield body[start : start + 16]

    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.base_url + "/chat/completions",
            data=pieces(),
            headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
        ) as resp,
    ):
        assert resp.request_info.headers.get("Transfer-Encoding") == "chunked"
        body_out = await resp.json() if resp.content_type == "application/json" else {}
        return resp.status, body_out, checked(resp.status, resp.headers)


async def all_admitted_first(
    gateway: Gateway, requests: list[Coroutine[Any, Any, Result]]
) -> list[Result]:
    """Run the requests at once, holding every admitted one at the upstream until each of them
    was admitted or refused: no settlement frees room for a later admission, whatever the
    machine's speed."""
    gate = asyncio.Event()

    async def held(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await gate.wait()
        return await gateway.fake.default(request, body)

    for _ in requests:
        gateway.fake.next_behaviour(held)
    before = len(gateway.fake.requests)
    tasks = [asyncio.ensure_future(r) for r in requests]
    while len(gateway.fake.requests) - before + sum(t.done() for t in tasks) < len(tasks):
        await asyncio.sleep(0.01)
    gate.set()
    return list(await asyncio.gather(*tasks))


class StoppedClock:
    """The limiter's monotonic clock, stopped until `start`: requests made while it is stopped
    all happen at one instant, however long the machine takes to serve them."""

    def __init__(self) -> None:
        self.at = time.monotonic()
        self.since: float | None = None

    def __call__(self) -> float:
        return self.at if self.since is None else self.at + time.monotonic() - self.since

    def start(self) -> None:
        self.since = time.monotonic()


def stop_clock(gateway: Gateway, wall: datetime | None = None) -> StoppedClock:
    """Run the gateway's limiter on a `StoppedClock`, and on a wall clock fixed at `wall`."""
    clock = StoppedClock()
    at = wall.timestamp() if wall is not None else None
    gateway.state.limiter = Limiter(
        gateway.state.config.limits, clock=clock, wall=time.time if at is None else lambda: at
    )
    return clock


async def test_n_plus_one_requests_give_one_429_with_headers(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra=keys("chat_per_minute = 3"))
    stop_clock(gateway)  # the four requests come at one instant: exact numbers, no races
    results = [await chat(gateway, LIMITED) for _ in range(4)]
    assert [status for status, _, _ in results] == [200, 200, 200, 429]
    _, _, first = results[0]
    assert first["X-RateLimit-Limit-Requests"] == "3"
    assert first["X-RateLimit-Remaining-Requests"] == "2"
    assert first["X-RateLimit-Reset-Requests"] == "20s"
    assert first["X-RateLimit-Limit"] == "3"
    assert first["X-RateLimit-Remaining"] == "2"
    assert first["X-RateLimit-Reset"] == "20"
    assert results[2][2]["X-RateLimit-Remaining-Requests"] == "0"
    assert results[2][2]["X-RateLimit-Reset-Requests"] == "1m0s"
    _status, body, headers = results[3]
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "rate_limit_error"
    assert body["error"]["param"] is None
    assert headers["Retry-After"] == "20"  # until one request's worth has refilled
    assert headers["X-RateLimit-Remaining-Requests"] == "0"
    assert headers["X-RateLimit-Reset-Requests"] == "1m0s"
    # the refused request was never sent upstream, and is not billed
    assert len(gateway.fake.requests) == 3
    assert len(await gateway.records()) == 3


async def test_keys_and_ips_have_their_own_buckets(make_gateway: MakeGateway) -> None:
    extra = (
        keys("chat_per_minute = 1")
        + """
[limits]
ip_chat_per_minute = 1
trusted_proxies = ["127.0.0.1"]
"""
    )
    gateway = await make_gateway(extra=extra)
    assert (await chat(gateway, LIMITED, {"X-Forwarded-For": "10.0.0.1"}))[0] == 200
    assert (await chat(gateway, LIMITED, {"X-Forwarded-For": "10.0.0.2"}))[0] == 429  # key empty
    assert (await chat(gateway, OTHER, {"X-Forwarded-For": "10.0.0.2"}))[0] == 200  # its own key
    # a third key from an IP that used its one request is refused by the IP bucket
    status, body, _ = await chat(gateway, CLIENT_KEY, {"X-Forwarded-For": "10.0.0.1"})
    assert status == 429
    assert (body["error"]["type"], body["error"]["code"]) == (
        "rate_limit_error",
        "rate_limit_exceeded",
    )
    assert "IP" in body["error"]["message"] or "address" in body["error"]["message"]
    assert (await chat(gateway, CLIENT_KEY, {"X-Forwarded-For": "10.0.0.3"}))[0] == 200
    records = await gateway.records()
    assert {r.client_ip for r in records} == {"10.0.0.1", "10.0.0.2", "10.0.0.3"}


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra="[limits]\nip_chat_per_minute = 1\n")
    assert (await chat(gateway, CLIENT_KEY, {"X-Forwarded-For": "10.0.0.1"}))[0] == 200
    # spoofing another address does not buy a fresh bucket: the peer is 127.0.0.1 either way
    assert (await chat(gateway, CLIENT_KEY, {"X-Forwarded-For": "10.0.0.9"}))[0] == 429


async def test_sdk_retry_waits_for_retry_after(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra=keys("chat_per_minute = 60"))
    clock = stop_clock(gateway)  # the 60 requests empty the bucket however long they take
    client = gateway.aclient(key=LIMITED, max_retries=1)
    for _ in range(60):
        await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    clock.start()
    started = time.monotonic()
    # refused once with Retry-After: 1 (one request's worth of refill), then served
    answer = await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    elapsed = time.monotonic() - started
    assert answer.choices[0].message.content
    assert gateway.state.metrics.rejections.values == {("rate_limit_exceeded",): 1.0}
    assert len(gateway.fake.requests) == 61
    assert elapsed >= 1.0  # the SDK waited what Retry-After said before trying again


async def test_token_quota_counts_real_usage_and_says_insufficient_quota(
    make_gateway: MakeGateway,
) -> None:
    # the recorded completion uses 14 + 37 = 51 tokens; the estimate reserves more (max_tokens)
    # each request reserves about 75 (its body / 4, plus max_tokens): the 4th does not fit
    gateway = await make_gateway(extra=keys("tokens_per_day = 200"))
    stop_clock(gateway, wall=datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    for _ in range(3):
        status, _, headers = await chat(gateway, LIMITED, max_tokens=50)
        assert status == 200
    status, body, headers = await chat(gateway, LIMITED, max_tokens=50)
    assert status == 429
    assert body["error"]["code"] == "insufficient_quota"
    assert body["error"]["type"] == "insufficient_quota"
    assert headers["Retry-After"] == str(12 * 3600)  # until the daily reset
    records = await gateway.records()
    assert sum(r.prompt_tokens + r.completion_tokens for r in records) == 153


async def test_streams_are_counted_with_their_real_usage(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra=keys("tokens_per_day = 100000"))
    stream = await gateway.aclient(key=LIMITED).chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    async for _ in stream:
        pass
    [record] = await gateway.records()
    raw = fixture_bytes("openai/chat-stream-include-usage-text-after-tool.sse")
    usage_event = next(e for e in sse_events(raw) if b'"choices":[]' in e)
    usage = json.loads(event_data(usage_event))["usage"]
    assert (record.prompt_tokens, record.completion_tokens) == (
        usage["prompt_tokens"],
        usage["completion_tokens"],
    )
    status, _, headers = await chat(gateway, LIMITED, max_tokens=10)
    assert status == 200
    # what the stream used, plus this request's reservation, is gone from the day's tokens
    remaining = int(headers["X-RateLimit-Remaining-Tokens"])
    assert remaining <= 100000 - usage["total_tokens"] - 10


async def test_fifty_concurrent_requests_against_room_for_ten(make_gateway: MakeGateway) -> None:
    body = {"model": "openai/gpt-4o", "messages": MESSAGES, "max_tokens": 40}
    estimate = len(json.dumps(body).encode()) // 4 + 40  # what admission reserves
    quota = 10 * estimate + estimate // 2  # room for exactly 10 reservations
    gateway = await make_gateway(extra=keys(f"tokens_per_day = {quota}"))

    requests = [chat(gateway, LIMITED, max_tokens=40) for _ in range(50)]
    results = await all_admitted_first(gateway, requests)
    admitted = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] == 429]
    assert len(admitted) == 10
    assert len(refused) == 40
    # the quota is held by requests in flight, not yet used: still insufficient_quota, and
    # worth trying again as soon as they settle
    for _status, error, headers in refused:
        assert (error["error"]["type"], error["error"]["code"]) == (
            "insufficient_quota",
            "insufficient_quota",
        )
        assert headers["Retry-After"] == "1"
    records = [r for r in await gateway.records() if r.key_id == "limited"]
    used = sum(r.prompt_tokens + r.completion_tokens for r in records)
    # the documented bound: the quota plus what admitted requests used beyond their reservation
    overshoot = sum(max(0, r.prompt_tokens + r.completion_tokens - estimate) for r in records)
    assert used <= quota + overshoot
    assert used == 10 * 51  # the recorded completion's usage, each time


async def test_soft_limit_warning_counts_real_usage_not_reservations(
    make_gateway: MakeGateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.limits")
    # the soft limit is 100 tokens; each request reserves over 600 and really uses 51
    extra = keys("tokens_per_day = 2000") + "[limits]\nsoft_limit = 0.05\n"
    gateway = await make_gateway(extra=extra)
    warnings = []
    for _ in range(4):
        status, _, headers = await chat(gateway, LIMITED, max_tokens=600)
        assert status == 200
        warnings.append(headers.get("X-Gateway-Warning"))
    assert warnings[:2] == [None, None]  # 0, then 51 used: a reservation is no usage
    assert warnings[2] is not None and "(102 of 2000 tokens)" in warnings[2]
    assert warnings[3] is not None and "(153 of 2000 tokens)" in warnings[3]
    logged = [r.getMessage() for r in caplog.records if "soft limit" in r.getMessage()]
    assert len(logged) == 1 and "key limited " in logged[0] and "102 of 2000" in logged[0]


async def test_budget_cuts_a_stream_mid_way(make_gateway: MakeGateway) -> None:
    # a model whose configured cap (1 output token) is far below what it really writes: the
    # reservation fits the budget, the real answer does not, and the stream is cut
    extra = (
        keys('budget = 0.04\nbudget_period = "day"')
        + """
[[providers]]
name = "pricey"
kind = "demo"
models = [{ id = "talker", max_tokens = 1, price_in = 1000.0, price_out = 1000.0 }]
"""
    )
    gateway = await make_gateway(extra=extra)
    stream = await gateway.aclient(key=LIMITED).chat.completions.create(
        model="pricey/talker", messages=[{"role": "user", "content": "hello"}], stream=True
    )
    words = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            words.append(chunk.choices[0].delta.content or "")
    assert (caught.value.type, caught.value.code) == ("insufficient_quota", "insufficient_quota")
    assert 3 < len(words) < 40  # some of the answer arrived, not all of it
    [record] = await gateway.records()
    assert record.outcome == "insufficient_quota"
    assert record.cost > 0.03


async def test_a_stream_within_its_reservation_is_not_held_against_the_quota_per_chunk(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # admission counted the stream's whole reservation (max_tokens) against the budget: until
    # its output outgrows that, no chunk can cross the budget, and none is checked
    extra = (
        keys('budget = 10.0\nbudget_period = "day"')
        + """
[[providers]]
name = "pricey"
kind = "demo"
models = [
  { id = "talker", max_tokens = 1000, price_in = 1.0, price_out = 1.0 },
  { id = "chatty", max_tokens = 1, price_in = 1.0, price_out = 1.0 },
]
"""
    )
    checks = []
    exceeded = Ticket.exceeded

    def counted(self: Ticket, tokens: int, cost: float) -> bool:
        checks.append(tokens)
        return exceeded(self, tokens, cost)

    monkeypatch.setattr(Ticket, "exceeded", counted)
    gateway = await make_gateway(extra=extra)
    client = gateway.aclient(key=LIMITED)
    messages: Any = [{"role": "user", "content": "hello"}]
    stream = await client.chat.completions.create(
        model="pricey/talker", messages=messages, stream=True
    )
    words = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len(words) > 5 and checks == []
    # a model whose cap (1 token) is below what it writes: past it, every chunk is checked
    stream = await client.chat.completions.create(
        model="pricey/chatty", messages=messages, stream=True
    )
    words = [chunk.choices[0].delta.content or "" async for chunk in stream if chunk.choices]
    assert len(words) > 5 and len(checks) > 3
    assert checks == sorted(checks)  # the stream's usage so far, growing


def test_a_pricier_fallback_or_an_overdrawn_key_is_checked_every_chunk() -> None:
    # admission priced the first deployment; a pricier fallback can cross the budget within
    # the reserved tokens, so its stream is checked from its first chunk
    holds = [True]
    ticket = SimpleNamespace(
        bounded=True, exceeded=lambda tokens, cost: cost > 0.5, reservation_holds=lambda: holds[0]
    )
    rt: Any = SimpleNamespace(config=SimpleNamespace(limits=SimpleNamespace(cut_off_streams=True)))
    exchange: Any = SimpleNamespace(
        ticket=ticket, prompt_estimate=100, output_estimate=1000, cost_estimate=0.0011
    )
    translator: Any = SimpleNamespace(usage=Usage(streamed_chars=400))  # 100 tokens so far
    cheap: Any = SimpleNamespace(model=ModelConfig("cheap", price_in=1.0, price_out=1.0))
    pricey: Any = SimpleNamespace(model=ModelConfig("pricey", price_in=5000.0, price_out=5000.0))
    over = budget_cutoff(rt, exchange, cheap, translator)
    assert over is not None and over() is None
    over = budget_cutoff(rt, exchange, pricey, translator)
    assert over is not None and over() is not None  # 200 tokens at 5000/M = 1.0 > 0.5
    # within the reservation, once the key is overdrawn (another request used more than it
    # reserved), every chunk is checked again
    holds[0] = False
    checked = []
    ticket.exceeded = lambda tokens, cost: checked.append(tokens) or False
    over = budget_cutoff(rt, exchange, cheap, translator)
    assert over is not None and over() is None and checked == [200]


async def test_limits_survive_a_restart(
    make_gateway: MakeGateway, fakes: Fakes, tmp_path: Path
) -> None:
    toml = gateway_toml(
        fakes.urls, keys("requests_per_day = 2"), "retries = 0", str(tmp_path / "shared.db")
    )
    one = await make_gateway(toml=toml)
    assert (await chat(one, LIMITED))[0] == 200
    assert (await chat(one, LIMITED))[0] == 200
    await one.state.usage.flush()
    two = await make_gateway(toml=toml)  # a new gateway on the same database
    status, body, _ = await chat(two, LIMITED)
    assert status == 429
    assert (body["error"]["type"], body["error"]["code"]) == (
        "insufficient_quota",
        "insufficient_quota",
    )


async def test_reload_changes_tier_and_keeps_what_was_used(make_gateway: MakeGateway) -> None:
    tiers = """
[tiers.free]
requests_per_day = 2

[tiers.pro]
requests_per_day = 4
"""
    gateway = await make_gateway(extra=keys(tier="free") + tiers)
    for _ in range(2):
        assert (await chat(gateway, LIMITED))[0] == 200
    assert (await chat(gateway, LIMITED))[0] == 429
    path = Path(gateway.state.config.source)
    path.write_text(path.read_text().replace('tier = "free"', 'tier = "pro"'))
    assert await gateway.state.reload()
    # two more, not four: the day's two requests still count
    assert [(await chat(gateway, LIMITED))[0] for _ in range(3)] == [200, 200, 429]


@pytest.mark.parametrize("endpoint", ["/v1/models", "/v1/models/openai/gpt-4o"])
async def test_standard_endpoints_have_their_own_bucket(
    make_gateway: MakeGateway, endpoint: str
) -> None:
    gateway = await make_gateway(extra=keys("standard_per_minute = 1\nchat_per_minute = 5"))
    async with aiohttp.ClientSession() as session:
        statuses = []
        for _ in range(2):
            async with session.get(
                gateway.url + endpoint, headers={"Authorization": f"Bearer {LIMITED}"}
            ) as r:
                statuses.append(r.status)
                checked(r.status, r.headers)
    assert statuses == [200, 429]
    assert (await chat(gateway, LIMITED))[0] == 200  # chat has its own bucket


async def test_chunked_bodies_reserve_their_size_against_the_quota(
    make_gateway: MakeGateway,
) -> None:
    body = json.dumps({"model": "openai/gpt-4o", "messages": MESSAGES, "max_tokens": 40}).encode()
    estimate = len(body) // 4 + 40  # what admission must reserve, Content-Length or not
    quota = 10 * estimate + estimate // 2  # room for exactly 10 reservations
    gateway = await make_gateway(extra=keys(f"tokens_per_day = {quota}"))

    requests = [chat_chunked(gateway, LIMITED, body) for _ in range(50)]
    results = await all_admitted_first(gateway, requests)
    admitted = [r for r in results if r[0] == 200]
    assert len(admitted) == 10
    assert len(admitted) * estimate <= quota  # the reservations never exceeded the quota
    assert {
        (r[0], r[1]["error"]["type"], r[1]["error"]["code"]) for r in results if r[0] != 200
    } == {(429, "insufficient_quota", "insufficient_quota")}
    remaining = {int(r[2]["X-RateLimit-Remaining-Tokens"]) for r in admitted}
    assert min(remaining) == quota - 10 * estimate


async def test_n_choices_reserve_n_times_the_output(make_gateway: MakeGateway) -> None:
    one = {"model": "openai/gpt-4o", "messages": MESSAGES, "max_tokens": 40}
    prompt = len(json.dumps({**one, "n": 3}).encode()) // 4
    estimate = prompt + 3 * 40
    quota = 3 * estimate + estimate // 2  # room for 3 answers of three choices (9 of one)
    gateway = await make_gateway(extra=keys(f"tokens_per_day = {quota}"))

    requests = [chat(gateway, LIMITED, max_tokens=40, n=3) for _ in range(10)]
    results = await all_admitted_first(gateway, requests)
    assert [r[0] for r in results].count(200) == 3
    assert {(r[1]["error"]["type"], r[1]["error"]["code"]) for r in results if r[0] == 429} == {
        ("insufficient_quota", "insufficient_quota")
    }


def assert_limit_headers(headers: Any, requests: tuple[str, str], tokens: tuple[str, str]) -> None:
    """The X-RateLimit-* headers carry (limit, remaining) for requests and for tokens."""
    assert (headers["X-RateLimit-Limit-Requests"], headers["X-RateLimit-Remaining-Requests"]) == (
        requests
    )
    assert (headers["X-RateLimit-Limit"], headers["X-RateLimit-Remaining"]) == requests
    assert headers["X-RateLimit-Reset-Requests"]
    assert int(headers["X-RateLimit-Reset"]) >= 0
    assert (headers["X-RateLimit-Limit-Tokens"], headers["X-RateLimit-Remaining-Tokens"]) == (
        tokens
    )
    assert headers["X-RateLimit-Reset-Tokens"]


async def test_every_answer_to_a_key_carries_the_rate_limit_headers(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(extra=keys("chat_per_minute = 5\ntokens_per_day = 100000"))
    stop_clock(gateway)
    auth = {"Authorization": f"Bearer {LIMITED}"}
    async with aiohttp.ClientSession() as session:
        # refused before admission (a 400, a 404): nothing is taken, the headers still come
        async with session.post(
            gateway.base_url + "/chat/completions", json={"model": "openai/gpt-4o"}, headers=auth
        ) as r:
            assert r.status == 400
            assert_limit_headers(r.headers, ("5", "5"), ("100000", "100000"))
        async with session.post(
            gateway.base_url + "/chat/completions",
            json={"model": "openai/nope", "messages": MESSAGES},
            headers=auth,
        ) as r:
            assert r.status == 404
            error = (await r.json())["error"]
            assert (error["type"], error["code"], error["param"]) == (
                "invalid_request_error",
                "model_not_found",
                "model",
            )
            assert_limit_headers(r.headers, ("5", "5"), ("100000", "100000"))
        async with session.post(
            gateway.base_url + "/chat/completions",
            data=b"{not json",
            headers={**auth, "Content-Type": "application/json"},
        ) as r:
            assert r.status == 400
            assert_limit_headers(r.headers, ("5", "5"), ("100000", "100000"))

    # an upstream error, after admission
    gateway.fake.next_json(500, {"error": {"message": "boom", "type": "server_error"}})
    status, _, headers = await chat(gateway, LIMITED)
    assert status == 502
    assert headers["X-RateLimit-Remaining-Requests"] == "4"
    assert headers["X-RateLimit-Limit-Tokens"] == "100000"

    # a stream
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.base_url + "/chat/completions",
            json={"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True},
            headers=auth,
        ) as r,
    ):
        assert r.status == 200
        assert r.content_type == "text/event-stream"
        assert r.headers["X-RateLimit-Remaining-Requests"] == "3"
        assert r.headers["X-RateLimit-Limit-Tokens"] == "100000"
        await r.read()

    for _ in range(3):
        assert (await chat(gateway, LIMITED))[0] == 200
    status, _, headers = await chat(gateway, LIMITED)  # and a 429
    assert status == 429
    assert headers["X-RateLimit-Remaining-Requests"] == "0"
    assert headers["X-RateLimit-Limit-Tokens"] == "100000"
    assert headers["Retry-After"] == "12"


async def test_headers_name_the_most_constraining_limit(make_gateway: MakeGateway) -> None:
    extra = (
        keys("chat_per_minute = 10", tier="small")
        + """
[tiers.small]
requests_per_day = 3
tokens_per_day = 100000

[limits]
ip_chat_per_minute = 2
trusted_proxies = ["127.0.0.1"]
"""
    )
    gateway = await make_gateway(extra=extra)
    stop_clock(gateway, wall=datetime(2026, 3, 10, 12, 0, tzinfo=UTC))
    # key bucket 9 left, the IP's 1, the tier's day 2: the IP's bucket
    _, _, headers = await chat(gateway, LIMITED, {"X-Forwarded-For": "10.0.0.1"})
    assert (headers["X-RateLimit-Limit-Requests"], headers["X-RateLimit-Remaining-Requests"]) == (
        "2",
        "1",
    )
    assert headers["X-RateLimit-Reset-Requests"] == "30s"
    # from another address: key 8, IP 1, day 1; the day takes longer to come back
    _, _, headers = await chat(gateway, LIMITED, {"X-Forwarded-For": "10.0.0.2"})
    assert (headers["X-RateLimit-Limit-Requests"], headers["X-RateLimit-Remaining-Requests"]) == (
        "3",
        "1",
    )
    assert headers["X-RateLimit-Reset-Requests"] == "12h0m0s"
    assert headers["X-RateLimit-Reset"] == str(12 * 3600)
    status, _, headers = await chat(gateway, LIMITED, {"X-Forwarded-For": "10.0.0.1"})
    assert status == 200
    assert headers["X-RateLimit-Remaining-Requests"] == "0"
    # the tokens family: the tier's daily tokens, as no tokens-per-minute limit applies
    assert headers["X-RateLimit-Limit-Tokens"] == "100000"
    assert int(headers["X-RateLimit-Remaining-Tokens"]) < 100000 - 2 * 51


@pytest.mark.parametrize(
    ("retry_after", "lowest", "highest"),
    [
        ("7", 7, 7),
        ("1.2", 2, 2),  # whole seconds, rounded up
        ("0", 1, 1),  # never less than 1
        (None, 1, 1),  # an upstream 429 without one still says when
        ("soon", 1, 1),
        ("http-date", 100, 121),  # an HTTP date, about 2 minutes ahead
    ],
)
async def test_upstream_429s_carry_retry_after_in_whole_seconds(
    make_gateway: MakeGateway, retry_after: str | None, lowest: int, highest: int
) -> None:
    gateway = await make_gateway(extra=keys("chat_per_minute = 5"))
    if retry_after == "http-date":
        retry_after = email.utils.formatdate(time.time() + 120, usegmt=True)
    gateway.fake.next_json(
        429,
        {"error": {"message": "Slow down", "type": "requests", "code": "rate_limit_exceeded"}},
        headers={"Retry-After": retry_after} if retry_after is not None else None,
    )
    status, body, headers = await chat(gateway, LIMITED)
    assert status == 429
    # the upstream's own type ("requests") is passed on, as from any OpenAI upstream
    assert (body["error"]["type"], body["error"]["code"]) == ("requests", "rate_limit_exceeded")
    assert lowest <= int(headers["Retry-After"]) <= highest
    assert headers["X-RateLimit-Limit-Requests"] == "5"  # the key's own limits, as ever


async def test_quota_429s_say_when_the_quota_comes_back(make_gateway: MakeGateway) -> None:
    noon = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)  # 12 h to the daily reset
    gateway = await make_gateway(extra=keys("tokens_per_day = 1000"))
    stop_clock(gateway, wall=noon)
    # larger than the whole quota: never passes; the SDKs are told not to retry
    status, body, headers = await chat(gateway, LIMITED, max_tokens=5000)
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert headers["x-should-retry"] == "false"
    assert headers["Retry-After"] == str(12 * 3600)  # until the daily reset
    # used up: until the daily reset
    for _ in range(8):
        assert (await chat(gateway, LIMITED, max_tokens=10))[0] == 200
    status, body, headers = await chat(gateway, LIMITED, max_tokens=600)
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    assert headers["Retry-After"] == str(12 * 3600)
    assert "x-should-retry" not in headers

    # a monthly budget spent: until the month's end (one answer costs about $0.0004)
    gateway = await make_gateway(extra=keys('budget = 0.0003\nbudget_period = "month"'))
    stop_clock(gateway, wall=noon)
    assert (await chat(gateway, LIMITED, max_tokens=10))[0] == 200
    status, body, headers = await chat(gateway, LIMITED, max_tokens=10)
    assert (status, body["error"]["type"], body["error"]["code"]) == (
        429,
        "insufficient_quota",
        "insufficient_quota",
    )
    month_left = datetime(2026, 4, 1, tzinfo=UTC) - noon
    assert headers["Retry-After"] == str(int(month_left.total_seconds()))
    assert "x-should-retry" not in headers
