"""Upstreams that misbehave: retries, fallbacks, breakers, timeouts, keep-alives, disconnects.

Each test asserts what the client sees, how many upstream attempts were made, and what the
usage store recorded.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import time
from collections import Counter
from collections.abc import Callable
from email.utils import formatdate
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from .conftest import CLIENT_KEY, Fakes, Gateway, MakeGateway, gateway_toml
from .fakes.anthropic_upstream import anthropic_error
from .fakes.base import UPSTREAM_KEY, Behaviour, fixture_bytes, sse_events
from .streams import post_raw

MESSAGES: list[Any] = [{"role": "user", "content": "hi"}]
FALLBACK = """
[aliases.resilient]
models = ["openai/gpt-4o", "anthropic/claude-haiku"]
"""
RETRYING = "request_timeout = 5\nretries = 2\nretry_backoff = 0.01"
OVERLOADED = {
    "error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}
}


def dead_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


async def test_retries_5xx_then_succeeds(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    gateway.fake.next_json(503, OVERLOADED)
    gateway.fake.next_json(502, OVERLOADED)
    answer = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES
    )
    assert answer.choices[0].message.content
    assert len(gateway.fake.requests) == 3
    [record] = await gateway.records()
    assert (record.status, record.outcome, record.provider) == (200, "ok", "openai")


async def test_gives_up_after_the_configured_retries(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    for _ in range(3):
        gateway.fake.next_json(503, OVERLOADED)
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "server_error",
        "service_unavailable",
        None,
    )
    assert len(gateway.fake.requests) == 3
    [record] = await gateway.records()
    assert (record.status, record.outcome) == (503, "service_unavailable")


async def test_client_errors_are_not_retried(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    gateway.fake.next_json(
        400,
        {"error": {"message": "bad", "type": "invalid_request_error", "param": "x", "code": None}},
    )
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    # the upstream's own envelope, param included, reaches the client
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error",
        None,
        "x",
    )
    assert len(gateway.fake.requests) == 1


async def test_retry_after_is_honoured(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    gateway.fake.next_json(
        429,
        {
            "error": {
                "message": "slow down",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"Retry-After": "1"},
    )
    started = time.monotonic()
    answer = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES
    )
    assert time.monotonic() - started >= 1.0
    assert answer.choices[0].message.content
    assert len(gateway.fake.requests) == 2


async def test_retry_after_beyond_the_deadline_is_passed_to_the_client(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(server=RETRYING)
    gateway.fake.next_json(
        429,
        {
            "error": {
                "message": "slow down",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"Retry-After": "30"},
    )
    started = time.monotonic()
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started < 2
    assert caught.value.response.headers["retry-after"] == "30"
    # an OpenAI upstream's own 429 type ("requests" or "tokens") is passed on as it came
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "requests",
        "rate_limit_exceeded",
        None,
    )
    assert len(gateway.fake.requests) == 1


async def test_fallback_to_the_next_deployment(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra=FALLBACK, server=RETRYING)
    for _ in range(3):
        gateway.fake.next_json(500, OVERLOADED)
    raw = await gateway.aclient().chat.completions.with_raw_response.create(
        model="resilient", messages=MESSAGES
    )
    answer = raw.parse()
    assert raw.headers["x-gateway-provider"] == "anthropic"
    assert raw.headers["x-gateway-model"] == "anthropic/claude-haiku"
    assert answer.model == "anthropic/claude-haiku"  # the model that served it
    assert len(gateway.fake.requests) == 3
    assert len(gateway.anthropic.requests) == 1
    [record] = await gateway.records()
    assert (record.model, record.provider, record.status) == ("resilient", "anthropic", 200)


async def test_first_deployment_answers_as_the_requested_name(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra=FALLBACK)
    raw = await gateway.aclient().chat.completions.with_raw_response.create(
        model="resilient", messages=MESSAGES
    )
    assert raw.parse().model == "resilient"
    assert raw.headers["x-gateway-provider"] == "openai"
    assert raw.headers["x-gateway-model"] == "openai/gpt-4o"
    assert raw.headers["server-timing"].startswith("gateway;dur=")
    assert ", upstream;dur=" in raw.headers["server-timing"]


async def test_unreachable_provider_falls_back(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(extra=FALLBACK, server=RETRYING, openai_url=dead_url())
    answer = await gateway.aclient().chat.completions.create(model="resilient", messages=MESSAGES)
    assert answer.model == "anthropic/claude-haiku"
    assert gateway.state.breakers["openai/gpt-4o"].failures == 3


async def test_breaker_opens_skips_and_probes(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(
        extra=FALLBACK, server="retries = 0\nbreaker_failures = 2\nbreaker_cooldown = 0.3"
    )
    client = gateway.aclient()
    for _ in range(2):
        gateway.fake.next_json(500, OVERLOADED)
        answer = await client.chat.completions.create(model="resilient", messages=MESSAGES)
        assert answer.model == "anthropic/claude-haiku"
    assert gateway.state.breakers.states()["openai/gpt-4o"] == "open"
    # open: openai is not even tried
    await client.chat.completions.create(model="resilient", messages=MESSAGES)
    assert len(gateway.fake.requests) == 2
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 503
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "server_error",
        "circuit_open",
        None,
    )
    await asyncio.sleep(0.35)
    # half-open: one probe goes through, succeeds, and closes the breaker
    answer = await client.chat.completions.create(model="resilient", messages=MESSAGES)
    assert answer.model == "resilient"
    assert len(gateway.fake.requests) == 3
    assert gateway.state.breakers.states()["openai/gpt-4o"] == "closed"


async def test_weighted_balancing(make_gateway: MakeGateway, fakes: Fakes) -> None:
    extra = f"""
[[providers]]
name = "openai-b"
kind = "openai"
base_url = "{fakes.urls["openai"]}/v1"
api_key = "{UPSTREAM_KEY}"
models = [{{ id = "gpt-4o", upstream = "gpt-4o-2024-08-06" }}]

[aliases.balanced]
models = ["openai/gpt-4o", "openai-b/gpt-4o"]
weights = [3, 1]
"""
    gateway = await make_gateway(extra=extra)
    seen: Counter[str] = Counter()
    async with aiohttp.ClientSession() as session:
        for _ in range(200):
            async with session.post(
                gateway.base_url + "/chat/completions",
                json={"model": "balanced", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ) as resp:
                assert resp.status == 200
                seen[resp.headers["X-Gateway-Provider"]] += 1
    assert 120 <= seen["openai"] <= 180, seen
    assert seen["openai"] + seen["openai-b"] == 200


async def test_timeout_before_headers_is_504(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="request_timeout = 0.3\nretries = 0")
    gateway.fake.next_hang()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert caught.value.status_code == 504
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "server_error",
        "upstream_timeout",
        None,
    )
    assert time.monotonic() - started < 3
    [record] = await gateway.records()
    assert record.outcome == "upstream_timeout"


async def test_stream_idle_mid_stream_is_cut_with_an_error_event(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="retries = 0\nidle_timeout = 0.3")
    hold = asyncio.Event()  # never set: the last event never comes
    gateway.fake.next_stream("openai/chat-stream-text.sse", gate=hold)
    started = time.monotonic()
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    chunks = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            chunks.append(chunk)
    assert time.monotonic() - started < 3
    assert len(chunks) > 3
    assert (caught.value.type, caught.value.code) == ("server_error", "upstream_timeout")
    assert "went silent" in caught.value.message
    [record] = await gateway.records()
    assert record.outcome == "upstream_timeout" and record.stream


async def audio_then_silence(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
    """A speech upstream that sends the start of the audio and then nothing."""
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await response.prepare(request)
    await response.write(b"ID3" + bytes(61))
    await asyncio.sleep(30)
    return response


@pytest.mark.parametrize("limit", ["idle_timeout = 0.3", "stream_timeout = 0.5"])
async def test_audio_stream_that_goes_silent_is_cut(make_gateway: MakeGateway, limit: str) -> None:
    """Audio cannot carry an error event: past the idle or whole-stream limit the client's
    connection is cut after the bytes that came, and the request is an upstream timeout."""
    gateway = await make_gateway(server=f"retries = 0\n{limit}")
    gateway.fake.next_behaviour(audio_then_silence)
    started = time.monotonic()
    received = b""
    body = {"model": "openai/tts-1", "voice": "alloy", "input": "Hello there"}
    with pytest.raises(aiohttp.ClientPayloadError):
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                gateway.base_url + "/audio/speech",
                json=body,
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ) as response,
        ):
            assert (response.status, response.content_type) == (200, "audio/mpeg")
            async for chunk in response.content.iter_any():
                received += chunk
    assert time.monotonic() - started < 3
    assert received == b"ID3" + bytes(61)
    [record] = await gateway.records()
    assert (record.endpoint, record.outcome, record.stream) == ("speech", "upstream_timeout", True)


async def headers_then_silence(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
    """An upstream that accepts a stream and never sends its first event."""
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    await asyncio.sleep(30)
    return response


def events_of(raw: bytes) -> list[bytes]:
    return [e for e in raw.split(b"\n\n") if e]


async def test_no_first_token_falls_back_before_anything_is_sent(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(
        extra=FALLBACK, server="retries = 0\nfirst_token_timeout = 0.3\nrequest_timeout = 5"
    )
    gateway.fake.next_behaviour(headers_then_silence)
    started = time.monotonic()
    raw = await gateway.aclient().chat.completions.with_raw_response.create(
        model="resilient", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in raw.parse()]
    assert time.monotonic() - started < 3
    assert raw.headers["x-gateway-provider"] == "anthropic"
    assert raw.headers["x-gateway-model"] == "anthropic/claude-haiku"
    assert {c.model for c in chunks} == {"anthropic/claude-haiku"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert (len(gateway.fake.requests), len(gateway.anthropic.requests)) == (1, 1)
    [record] = await gateway.records()
    assert (record.status, record.outcome, record.provider) == (200, "ok", "anthropic")


async def test_no_first_token_anywhere_is_a_504_response(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(
        server="retries = 1\nretry_backoff = 0.01\nfirst_token_timeout = 0.3\nrequest_timeout = 5"
    )
    gateway.fake.next_behaviour(headers_then_silence)
    gateway.fake.next_behaviour(headers_then_silence)
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert status == 504, raw  # nothing had been sent: a real HTTP error, not 200 + event
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "upstream_timeout",
        None,
    )
    assert "no first token within 0.3 s" in error["message"]
    assert len(gateway.fake.requests) == 2  # the silent attempt was retried
    [record] = await gateway.records()
    assert (record.status, record.outcome) == (504, "upstream_timeout")


async def test_no_first_token_after_keep_alives_is_one_error_event(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(
        server="retries = 0\nkeepalive_interval = 0.1\nfirst_token_timeout = 0.45"
    )
    gateway.fake.next_behaviour(headers_then_silence)
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert status == 200, raw  # keep-alives had committed the headers
    events = events_of(raw)
    assert events[0] == b": keep-alive"
    assert [e for e in events if e != b": keep-alive"] == [events[-1]]
    error = json.loads(events[-1].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "upstream_timeout",
        None,
    )
    assert "no first token" in error["message"]
    [record] = await gateway.records()
    assert (record.status, record.outcome) == (200, "upstream_timeout")


async def test_keep_alives_then_fallback_name_the_serving_model_in_the_chunks(
    make_gateway: MakeGateway,
) -> None:
    # Once keep-alives went out, the headers were sent before anyone answered: they do not
    # name a provider (they would name the wrong one); each chunk's `model` names the one.
    gateway = await make_gateway(
        extra=FALLBACK,
        server="retries = 0\nkeepalive_interval = 0.1\nfirst_token_timeout = 0.35",
    )
    gateway.fake.next_behaviour(headers_then_silence)
    raw = await gateway.aclient().chat.completions.with_raw_response.create(
        model="resilient", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in raw.parse()]
    assert "x-gateway-provider" not in raw.headers
    assert "x-gateway-model" not in raw.headers
    assert chunks and {c.model for c in chunks} == {"anthropic/claude-haiku"}
    [record] = await gateway.records()
    assert (record.outcome, record.provider) == ("ok", "anthropic")


async def test_keep_alive_while_the_upstream_thinks(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="retries = 0\nkeepalive_interval = 0.1")
    events = sse_events(fixture_bytes("openai/chat-stream-include-usage-text-after-tool.sse"))

    async def slow_first_token(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await asyncio.sleep(0.5)  # thinking
        for event in events:
            await response.write(event)
        await response.write_eof()
        return response

    gateway.fake.next_behaviour(slow_first_token)
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert status == 200
    head = raw[: raw.index(b"data: ")]
    assert head.count(b": keep-alive\n\n") >= 3
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_keep_alive_before_the_upstream_even_answers(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="retries = 0\nkeepalive_interval = 0.1")

    async def slow_headers(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(0.5)
        gateway.fake.next_stream("openai/chat-stream-text.sse")
        return await gateway.fake._queued.pop()(request, body)

    gateway.fake.next_behaviour(slow_headers)
    # the SDK skips comments and still assembles the stream
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("I'm unable")


async def test_a_client_gone_during_keep_alives_ends_the_upstream_call_at_once(
    make_gateway: MakeGateway,
) -> None:
    # the upstream thinks for 30 s; the client reads one keep-alive and leaves: a next
    # keep-alive fails, and the wait for the upstream must end then, not at its first token
    gateway = await make_gateway(server="retries = 0\nkeepalive_interval = 0.1")
    asked, closed = asyncio.Event(), asyncio.Event()
    # comments, no output: the gateway still waits for a first token
    gateway.fake.next_behaviour(until_dropped(lambda _: b": thinking\n\n", 0.05, closed, asked))
    assert await first_line_then_leave(gateway, asked) == b": keep-alive\n"
    await asyncio.wait_for(closed.wait(), timeout=3)
    [record] = await gateway.records_once_written()
    assert (record.status, record.outcome, record.stream) == (499, "client_closed", True)


async def test_a_bug_while_a_stream_waits_leaves_no_keep_alive_behind(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    # an unforeseen error before the first keep-alive is a 500; the keep-alive timer must
    # not fire later and write an SSE answer onto the kept connection's next request
    from gateway import handlers

    async def broken(*_: object) -> None:
        await asyncio.sleep(0.05)
        raise RuntimeError("a bug")

    monkeypatch.setattr(handlers, "open_upstream", broken)
    gateway = await make_gateway(server="retries = 0\nkeepalive_interval = 0.3")
    headers = {"Authorization": f"Bearer {CLIENT_KEY}"}
    connector = aiohttp.TCPConnector(limit=1)  # one connection, kept alive between requests
    async with aiohttp.ClientSession(connector=connector) as session:
        body = {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
        async with session.post(
            gateway.base_url + "/chat/completions", json=body, headers=headers
        ) as resp:
            assert resp.status == 500
            assert (await resp.json())["error"]["code"] == "internal_error"
        await asyncio.sleep(0.5)  # past the keep-alive interval
        async with session.get(gateway.base_url + "/models", headers=headers) as resp:
            assert resp.status == 200
            assert resp.content_type == "application/json"
            assert (await asyncio.wait_for(resp.json(), 3))["object"] == "list"


async def test_keep_alive_stopped_as_a_comment_falls_due_writes_no_more(
    aiohttp_client: Any,
) -> None:
    # the upstream answered in the loop turn the next comment fell due: that comment may go
    # out, none after it (the stream watch keeps the connection alive from then on)
    from gateway.streaming import KeepAlive, prepare_sse

    async def handler(request: web.Request) -> web.StreamResponse:
        keepalive = KeepAlive(request, asyncio.get_running_loop(), 0.05, lambda: None)
        keepalive._due()  # a write falls due ...
        response = await keepalive.stop()  # ... as the answer arrives
        await asyncio.sleep(0.3)
        response = response or await prepare_sse(request)
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/", handler)
    client = await aiohttp_client(app)
    resp = await client.get("/")
    raw = await resp.read()
    assert raw.count(b": keep-alive\n\n") <= 1
    assert raw.endswith(b"data: [DONE]\n\n")


async def test_error_after_keep_alives_is_an_error_event(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="retries = 0\nkeepalive_interval = 0.1")

    async def slow_failure(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        await asyncio.sleep(0.35)
        return web.json_response(OVERLOADED, status=503)

    gateway.fake.next_behaviour(slow_failure)
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert status == 200  # the stream had started with keep-alives
    assert raw.startswith(b": keep-alive\n\n")
    assert raw.endswith(b'"code":"service_unavailable"}}\n\n')
    error = json.loads(events_of(raw)[-1].removeprefix(b"data: "))["error"]
    assert (error["type"], error["param"]) == ("server_error", None)


async def test_client_disconnect_cancels_the_upstream(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    closed = asyncio.Event()
    events = sse_events(fixture_bytes("openai/chat-stream-text.sse"))
    gateway.fake.next_behaviour(until_dropped(lambda i: events[min(i, 3)], 0.02, closed))
    await first_line_then_leave(gateway)  # the client goes away mid-stream
    await asyncio.wait_for(closed.wait(), timeout=3)
    [record] = await gateway.records_once_written()
    assert record.outcome == "client_closed"
    assert record.stream


def until_dropped(
    chunk: Callable[[int], bytes],
    every: float,
    closed: asyncio.Event,
    asked: asyncio.Event | None = None,
) -> Behaviour:
    """A fake upstream stream that writes chunk(i) every `every` seconds (for a minute at
    most) until the gateway drops the connection, which sets `closed`; `asked` is set when
    the request arrives."""

    async def stream(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        if asked is not None:
            asked.set()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            for i in range(round(60 / every)):
                await response.write(chunk(i))
                await asyncio.sleep(every)
        except (ConnectionError, asyncio.CancelledError):
            closed.set()
            raise
        return response

    return stream


async def first_line_then_leave(gateway: Gateway, wait: asyncio.Event | None = None) -> bytes:
    """Open a chat stream, read its first line, (wait for `wait`,) then close the connection."""
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gateway.base_url + "/chat/completions",
            json={"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        )
        assert resp.status == 200
        line = await resp.content.readline()
        if wait is not None:
            await asyncio.wait_for(wait.wait(), timeout=3)
        resp.close()
    return line


async def test_malformed_first_event_is_a_502_response(gateway: Gateway) -> None:
    gateway.fake.next_stream(events=[b"data: {not json}\n\n"])
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert status == 502
    error = json.loads(raw)["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "upstream_invalid_response",
        None,
    )


async def test_malformed_event_mid_stream_is_an_error_event(gateway: Gateway) -> None:
    events = sse_events(fixture_bytes("openai/chat-stream-text.sse"))
    gateway.fake.next_stream(events=[*events[:2], b"data: {not json}\n\n"])
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert status == 200
    out = events_of(raw)
    assert len(out) == 3
    assert all(b'"object":"chat.completion.chunk"' in e for e in out[:2])
    error = json.loads(out[-1].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "upstream_invalid_response",
        None,
    )


OPENAI_STREAM_ERROR = b'data: {"error": {"message": "The server had an error", "type": "server_error", "param": null, "code": null}}\n\n'


def openai_stream_error(type_: str, code: str | None) -> bytes:
    error = {"message": "no", "type": type_, "param": None, "code": code}
    return b"data: " + json.dumps({"error": error}).encode() + b"\n\n"


async def test_openai_stream_opening_rate_limited_is_a_429(gateway: Gateway) -> None:
    """An OpenAI-compatible upstream that says 200 and then, in its first event, that the
    request is rate limited: the client gets the 429 the upstream would have sent."""
    gateway.fake.next_stream(events=[openai_stream_error("rate_limit_exceeded", None)])
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.aclient().chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, stream=True
        )
    assert caught.value.status_code == 429
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        None,
    )
    assert caught.value.response.headers["Retry-After"] == "1"
    assert len(gateway.fake.requests) == 1
    [record] = await gateway.records()
    assert record.status == 429


async def test_stream_opening_with_an_error_event_is_retried(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    gateway.fake.next_stream(events=[OPENAI_STREAM_ERROR])
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "The capital of the UK is London."  # the next attempt's answer
    assert len(gateway.fake.requests) == 2
    [record] = await gateway.records()
    assert (record.status, record.outcome) == (200, "ok")


async def test_anthropic_stream_opening_overloaded_falls_back(make_gateway: MakeGateway) -> None:
    extra = """
[aliases.claude-first]
models = ["anthropic/claude-haiku", "openai/gpt-4o"]
"""
    gateway = await make_gateway(extra=extra, server=RETRYING)
    message_start = sse_events(fixture_bytes("anthropic/stream-text-basic.sse"))[0]
    overloaded = b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    for _ in range(3):
        gateway.anthropic.next_stream(events=[message_start, overloaded])
    raw = await gateway.aclient().chat.completions.with_raw_response.create(
        model="claude-first", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in raw.parse()]
    assert {c.model for c in chunks} == {"openai/gpt-4o"}
    assert raw.headers["x-gateway-model"] == "openai/gpt-4o"
    assert (len(gateway.anthropic.requests), len(gateway.fake.requests)) == (3, 1)


@pytest.mark.parametrize(
    ("model", "event", "status", "type_", "code"),
    [
        (
            "anthropic/claude-haiku",
            b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n',
            503,
            "server_error",
            "service_unavailable",
        ),
        (
            "anthropic/claude-haiku",
            b'event: error\ndata: {"type": "error", "error": {"type": "rate_limit_error", "message": "Slow down"}}\n\n',
            429,
            "rate_limit_error",
            "rate_limit_exceeded",
        ),
        ("openai/gpt-4o", OPENAI_STREAM_ERROR, 502, "server_error", "upstream_error"),
        (
            "openai/gpt-4o",
            openai_stream_error("insufficient_quota", None),
            429,
            "insufficient_quota",
            "insufficient_quota",
        ),
        (
            "openai/gpt-4o",
            openai_stream_error("tokens", "rate_limit_exceeded"),
            429,
            "tokens",
            "rate_limit_exceeded",
        ),
        (
            "openai/gpt-4o",
            openai_stream_error("invalid_request_error", "context_length_exceeded"),
            400,
            "invalid_request_error",
            "context_length_exceeded",
        ),
        (
            "openai/gpt-4o",
            openai_stream_error("overloaded", None),
            503,
            "server_error",
            "service_unavailable",
        ),
        (
            "openai/gpt-4o",
            openai_stream_error("something_new", None),
            502,
            "server_error",
            "upstream_error",
        ),
    ],
)
async def test_stream_whose_first_event_is_an_error_gets_that_status(
    gateway: Gateway, model: str, event: bytes, status: int, type_: str, code: str
) -> None:
    fake = gateway.anthropic if model.startswith("anthropic") else gateway.fake
    fake.next_stream(events=[event])
    got, raw = await post_raw(gateway, {"model": model, "messages": MESSAGES, "stream": True})
    assert got == status, raw  # a real HTTP error the SDKs retry or raise on, not 200 + event
    error = json.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["code"], error["param"]) == (type_, code, None)
    [record] = await gateway.records()
    assert record.status == status


async def test_disconnect_before_the_first_output_is_retried(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    # message_start and content_block_start carry nothing for the client yet
    gateway.anthropic.next_stream("anthropic/stream-text-basic.sse", cut_after=2)
    stream = await gateway.aclient().chat.completions.create(
        model="anthropic/claude-haiku", messages=MESSAGES, stream=True
    )
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text == "Hello there!"
    assert len(gateway.anthropic.requests) == 2


async def test_deadline_bounds_retries_and_fallbacks(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(
        extra=FALLBACK, server="request_timeout = 0.6\nretries = 5\nretry_backoff = 0.01"
    )
    for _ in range(6):
        gateway.fake.next_hang()
        gateway.anthropic.next_hang()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.aclient().chat.completions.create(model="resilient", messages=MESSAGES)
    took = time.monotonic() - started
    assert 0.5 < took < 1.5, took  # one deadline, not one per attempt or per deployment
    assert caught.value.status_code == 504
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "server_error",
        "upstream_timeout",
        None,
    )
    assert (len(gateway.fake.requests), len(gateway.anthropic.requests)) == (1, 0)
    [record] = await gateway.records()
    assert (record.status, record.outcome) == (504, "upstream_timeout")


async def test_retry_after_waits_stop_at_the_deadline(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="request_timeout = 1.5\nretries = 5\nretry_backoff = 0.01")
    for _ in range(6):
        gateway.fake.next_json(503, OVERLOADED, headers={"Retry-After": "1"})
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    took = time.monotonic() - started
    # waited once (1 s); a second wait would have ended past the deadline: the upstream's
    # own answer, with its Retry-After, goes to the client at once
    assert 0.9 < took < 1.5, took
    assert caught.value.status_code == 503
    assert (caught.value.type, caught.value.code) == ("server_error", "service_unavailable")
    assert caught.value.response.headers["retry-after"] == "1"
    assert len(gateway.fake.requests) == 2


async def test_stream_deadline_after_keep_alives_is_an_error_event(
    make_gateway: MakeGateway,
) -> None:
    gateway = await make_gateway(
        server="request_timeout = 0.6\nretries = 3\nretry_backoff = 0.01\nkeepalive_interval = 0.1"
    )
    for _ in range(4):
        gateway.fake.next_hang()
    started = time.monotonic()
    status, raw = await post_raw(
        gateway, {"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True}
    )
    assert time.monotonic() - started < 1.5
    assert status == 200
    events = events_of(raw)
    assert events[0] == b": keep-alive"
    error = json.loads(events[-1].removeprefix(b"data: "))["error"]
    assert (error["type"], error["code"], error["param"]) == (
        "server_error",
        "upstream_timeout",
        None,
    )
    assert "request timeout (0.6 s)" in error["message"]
    assert len(gateway.fake.requests) == 1


async def test_retry_after_as_an_http_date_is_honoured(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server=RETRYING)
    when = formatdate(time.time() + 2, usegmt=True)  # a whole second, 1 to 2 s from now
    gateway.fake.next_json(429, OVERLOADED, headers={"Retry-After": when})
    started = time.monotonic()
    answer = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES
    )
    assert time.monotonic() - started >= 0.9
    assert answer.choices[0].message.content
    assert len(gateway.fake.requests) == 2


async def test_anthropic_overloaded_then_fallback_is_recorded(make_gateway: MakeGateway) -> None:
    extra = """
[aliases.claude-first]
models = ["anthropic/claude-haiku", "openai/gpt-4o"]
"""
    gateway = await make_gateway(extra=extra, server=RETRYING)
    for _ in range(3):
        status, body = anthropic_error(529, "overloaded_error", "Overloaded")
        gateway.anthropic.next_json(status, body)
    answer = await gateway.aclient().chat.completions.create(
        model="claude-first", messages=MESSAGES
    )
    assert answer.model == "openai/gpt-4o"
    assert len(gateway.anthropic.requests) == 3


@pytest.mark.parametrize("trickle", [False, True])
async def test_a_stalled_or_trickled_body_gets_408(
    make_gateway: MakeGateway, trickle: bool
) -> None:
    gateway = await make_gateway(server="request_timeout = 5\nretries = 0\nbody_timeout = 0.5")
    url = gateway.server.make_url("/")
    reader, writer = await asyncio.open_connection(url.host, url.port)
    head = (
        "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {CLIENT_KEY}\r\nContent-Length: 1000\r\n\r\n"
    )
    writer.write(head.encode() + b'{"model": ')
    started = time.monotonic()

    async def trickling() -> None:
        while trickle:
            await asyncio.sleep(0.1)
            writer.write(b" ")

    dripping = asyncio.ensure_future(trickling())
    try:
        status_line = await asyncio.wait_for(reader.readline(), timeout=5)
        took = time.monotonic() - started
        rest = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout=5)
        length = int(rest.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
    finally:
        dripping.cancel()
        writer.close()
    assert status_line.startswith(b"HTTP/1.1 408"), status_line
    assert 0.4 < took < 2, took
    assert b"connection: close" in rest.lower()
    error = json.loads(body)["error"]
    assert (error["code"], error["type"], error["param"]) == (
        "request_timeout",
        "invalid_request_error",
        None,
    )
    assert set(error) == {"message", "type", "param", "code"}


async def test_a_providers_request_timeout_sets_the_deadline(
    make_gateway: MakeGateway, fakes: Fakes, tmp_path: Any
) -> None:
    toml = gateway_toml(
        fakes.urls,
        server="request_timeout = 30\nretries = 3\nretry_backoff = 0.01",
        db=str(tmp_path / "override.db"),
    ).replace('kind = "openai"\n', 'kind = "openai"\nrequest_timeout = 0.5\n', 1)
    gateway = await make_gateway(toml=toml)
    for _ in range(4):
        gateway.fake.next_hang()
    started = time.monotonic()
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)
    assert time.monotonic() - started < 1.5
    assert caught.value.status_code == 504
    assert (caught.value.type, caught.value.code) == ("server_error", "upstream_timeout")
    assert "0.5 s" in caught.value.message  # the provider's timeout, not the server's 30 s
    assert len(gateway.fake.requests) == 1


async def cutoff_outcome(
    timeout: Callable[[float], Any], work: float, cancel_from_outside_at: float | None = None
) -> str:
    """What leaves a block under `timeout(when)` (when = 0.05 s from now) whose body sleeps
    `work` seconds, the task perhaps cancelled from elsewhere too."""
    loop = asyncio.get_running_loop()

    async def body() -> str:
        try:
            async with timeout(loop.time() + 0.05):
                await asyncio.sleep(work)
        except TimeoutError:
            return "timeout"
        return "done"

    task = asyncio.ensure_future(body())
    if cancel_from_outside_at is not None:
        loop.call_at(loop.time() + cancel_from_outside_at, task.cancel)
    try:
        return await task
    except asyncio.CancelledError:
        return "cancelled"


@pytest.mark.parametrize(
    ("work", "outside", "expected"),
    [
        (0.0, None, "done"),  # in time
        (1.0, None, "timeout"),  # past the cutoff
        (1.0, 0.01, "cancelled"),  # cancelled from elsewhere before the cutoff
        (1.0, 0.05, "cancelled"),  # ... and in the same loop turn as it
    ],
)
async def test_cutoff_ends_a_block_as_asyncio_timeout_at_does(
    work: float, outside: float | None, expected: str
) -> None:
    from gateway.resilience import Cutoff

    def cutoff(when: float) -> Cutoff:
        task = asyncio.current_task()
        assert task is not None
        return Cutoff(asyncio.get_running_loop(), task, when)

    assert await cutoff_outcome(asyncio.timeout_at, work, outside) == expected
    assert await cutoff_outcome(cutoff, work, outside) == expected


@pytest.mark.parametrize("stream", [False, True])
async def test_a_failed_request_leaves_no_garbage_cycle(
    make_gateway: MakeGateway, stream: bool
) -> None:
    """The collector runs seldom (serve.collect_less): a failed request must be freed by
    reference counting, not wait in a cycle of its error's traceback holding its body."""
    gateway = await make_gateway(server="retries = 0")
    error = {"error": {"message": "boom", "type": "server_error", "param": None, "code": None}}
    client = gateway.aclient(max_retries=0)

    async def fail(times: int) -> None:
        for _ in range(times):
            gateway.fake.next_json(500, error)
            with pytest.raises(openai.APIStatusError):
                answer = await client.chat.completions.create(
                    model="openai/gpt-4o", messages=MESSAGES, stream=stream
                )
                async for _ in answer:  # type: ignore[union-attr]
                    pass

    await fail(2)  # (first-use caches)
    gc.collect()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await fail(10)
        gc.collect()
        frames = [o for o in gc.garbage if type(o).__name__ == "frame"]
        assert frames == []
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
