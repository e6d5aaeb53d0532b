"""Every error the gateway gives is OpenAI's envelope with the right status, type and code."""

from __future__ import annotations

import asyncio
import socket
import time
from email.utils import formatdate
from typing import Any

import aiohttp
import openai
import pytest
from aiohttp import web

from gateway.errors import from_upstream, retry_after_seconds

from .conftest import CLIENT_KEY, DEMO_ONLY_KEY, Gateway, MakeGateway
from .fakes.openai_upstream import cassette_error

MESSAGES = [{"role": "user", "content": "hi"}]
AUTH = {"Authorization": f"Bearer {CLIENT_KEY}"}


async def post(
    gateway: Gateway,
    path: str,
    data: bytes | dict[str, Any],
    headers: dict[str, str] | None = None,
) -> tuple[int, dict[str, Any], aiohttp.typedefs.LooseHeaders]:
    hdrs = {"Content-Type": "application/json", **AUTH, **(headers or {})}
    body = data if isinstance(data, bytes) else __import__("json").dumps(data).encode()
    async with aiohttp.ClientSession() as session:
        async with session.post(gateway.url + path, data=body, headers=hdrs) as resp:
            return resp.status, await resp.json(), resp.headers


def assert_envelope(
    body: dict[str, Any], type_: str, code: str | None, param: str | None = None
) -> dict[str, Any]:
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == type_
    assert error["code"] == code
    assert error["param"] == param
    assert isinstance(error["message"], str) and error["message"]
    return error


# --- authentication and permission -------------------------------------------------------------


async def test_missing_key_is_401(gateway: Gateway) -> None:
    status, body, _ = await post(
        gateway,
        "/v1/chat/completions",
        {"model": "openai/gpt-4o", "messages": MESSAGES},
        headers={"Authorization": ""},
    )
    assert status == 401
    assert_envelope(body, "invalid_request_error", "invalid_api_key")


async def test_wrong_key_is_401_and_never_echoed(gateway: Gateway) -> None:
    wrong = "gw-this-is-a-wrong-key-0123456789"
    with pytest.raises(openai.AuthenticationError) as caught:
        await gateway.aclient(key=wrong).chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES
        )  # type: ignore[arg-type]
    assert caught.value.status_code == 401
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error",
        "invalid_api_key",
        None,
    )
    assert wrong not in str(caught.value.body)
    assert "0123456789" not in str(caught.value.body)
    assert gateway.fake.requests == []


async def test_model_not_allowed_for_key_is_403(gateway: Gateway) -> None:
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await gateway.aclient(key=DEMO_ONLY_KEY).chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES
        )  # type: ignore[arg-type]
    assert caught.value.status_code == 403
    assert caught.value.code == "forbidden"
    assert caught.value.type == "permission_error"
    # the same key may use what it is allowed
    ok = await gateway.aclient(key=DEMO_ONLY_KEY).chat.completions.create(
        model="demo/echo", messages=MESSAGES
    )  # type: ignore[arg-type]
    assert ok.model == "demo/echo"


async def test_unknown_model_is_404_naming_it(gateway: Gateway) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.aclient().chat.completions.create(
            model="openai/gpt-9-ultra", messages=MESSAGES
        )  # type: ignore[arg-type]
    assert (caught.value.status_code, caught.value.type) == (404, "invalid_request_error")
    assert caught.value.code == "model_not_found"
    assert "openai/gpt-9-ultra" in caught.value.message
    assert caught.value.param == "model"


async def test_model_without_the_endpoint_capability_is_400(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().embeddings.create(model="openai/gpt-4o", input="x")
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error",
        "model_not_supported",
        "model",
    )


# --- malformed requests ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code", "param"),
    [
        (b"{not json", "invalid_json", None),
        (b"[1, 2]", "invalid_json", None),
        (b"", "invalid_request", None),
        (
            b'{"messages": [{"role": "user", "content": "hi"}]}',
            "missing_required_parameter",
            "model",
        ),
        (b'{"model": "openai/gpt-4o"}', "missing_required_parameter", "messages"),
        (b'{"model": 42, "messages": []}', "invalid_type", "model"),
        (b'{"model": "openai/gpt-4o", "messages": "hi"}', "invalid_type", "messages"),
        (b'{"model": "openai/gpt-4o", "messages": []}', "invalid_value", "messages"),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"content": "x"}]}',
            "missing_required_parameter",
            "messages[0].role",
        ),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"role": "robot", "content": "x"}]}',
            "invalid_value",
            "messages[0].role",
        ),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "stream": "yes"}',
            "invalid_type",
            "stream",
        ),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "temperature": "hot"}',
            "invalid_type",
            "temperature",
        ),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "temperature": 7}',
            "invalid_value",
            "temperature",
        ),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "max_tokens": 0}',
            "invalid_value",
            "max_tokens",
        ),
        (
            b'{"model": "openai/gpt-4o", "messages": [{"role": "user"}], "stream_options": {}}',
            "invalid_value",
            "stream_options",
        ),
    ],
)
async def test_bad_chat_bodies_are_400(
    gateway: Gateway, raw: bytes, code: str, param: str | None
) -> None:
    status, body, _ = await post(gateway, "/v1/chat/completions", raw)
    assert status == 400
    assert_envelope(body, "invalid_request_error", code, param)
    assert gateway.fake.requests == []


async def test_bad_request_surfaces_as_sdk_bad_request(gateway: Gateway) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, temperature=9
        )  # type: ignore[arg-type]
    assert (caught.value.type, caught.value.code, caught.value.param) == (
        "invalid_request_error",
        "invalid_value",
        "temperature",
    )


async def test_wrong_content_type_is_415(gateway: Gateway) -> None:
    status, body, _ = await post(
        gateway,
        "/v1/chat/completions",
        b"model=x",
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert status == 415
    assert_envelope(body, "invalid_request_error", "unsupported_media_type")


async def test_body_over_the_cap_is_413(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway()
    small = await make_gateway(server="max_body_bytes = 2048")
    big = {"model": "openai/gpt-4o", "messages": [{"role": "user", "content": "x" * 5000}]}
    status, body, _ = await post(small, "/v1/chat/completions", big)
    assert status == 413
    assert_envelope(body, "invalid_request_error", "request_too_large")
    status, _, _ = await post(gateway, "/v1/chat/completions", big)
    assert status == 200


async def test_unknown_endpoint_is_404_envelope(gateway: Gateway) -> None:
    status, body, _ = await post(gateway, "/v1/completions/legacy", {"model": "x"})
    assert status == 404
    assert_envelope(body, "invalid_request_error", "unknown_endpoint")
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/v1/chat/completions", headers=AUTH) as resp:
            assert resp.status == 405
            assert_envelope(await resp.json(), "invalid_request_error", "method_not_allowed")


# --- upstream failures -------------------------------------------------------------------------


async def test_upstream_400_is_passed_through(gateway: Gateway) -> None:
    status, raw = cassette_error("openai/pydantic-ai_error-400-unsupported-value.cassette.yaml")
    gateway.fake.next_json(status, raw)
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert (caught.value.type, caught.value.code) == ("invalid_request_error", "unsupported_value")
    assert caught.value.param == "messages[0].role"


async def test_upstream_404_is_passed_through(gateway: Gateway) -> None:
    status, raw = cassette_error("openai/pydantic-ai_error-404-model-not-found.cassette.yaml")
    gateway.fake.next_json(status, raw)
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert (caught.value.type, caught.value.code) == ("invalid_request_error", "model_not_found")


async def test_upstream_429_is_429_with_retry_after(gateway: Gateway) -> None:
    gateway.fake.next_json(
        429,
        {
            "error": {
                "message": "Rate limit reached",
                "type": "requests",
                "param": None,
                "code": "rate_limit_exceeded",
            }
        },
        headers={"Retry-After": "7"},
    )
    status, body, headers = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert status == 429
    assert_envelope(body, "requests", "rate_limit_exceeded")
    assert headers["Retry-After"] == "7"


def test_retry_after_seconds_reads_seconds_and_http_dates() -> None:
    now = 1445412470.0  # Wed, 21 Oct 2015 07:27:50 GMT
    assert retry_after_seconds("3", now) == 3.0
    assert retry_after_seconds("1.5", now) == 1.5
    assert retry_after_seconds("Wed, 21 Oct 2015 07:28:00 GMT", now) == 10.0
    assert retry_after_seconds("Wed, 21 Oct 2015 07:27:00 GMT", now) == 0.0  # past: at once
    assert retry_after_seconds("-1", now) == 0.0  # not a valid delay; at once, as a past date
    for bad in (None, "", "soon", "nan", "inf"):
        assert retry_after_seconds(bad, now) is None


def test_an_upstream_server_errors_retry_after_is_whole_seconds_or_none() -> None:
    def sent(retry_after: str | None) -> str | None:
        return from_upstream(503, "busy", provider="p", retry_after=retry_after).headers.get(
            "Retry-After"
        )

    assert 119 <= int(sent(formatdate(time.time() + 120, usegmt=True)) or 0) <= 121
    assert sent(formatdate(time.time() - 60, usegmt=True)) == "1"  # gone by: at once, said as 1
    assert sent("-5") == "1"
    assert sent("2.1") == "3"  # rounded up: never sooner than the upstream said
    # unlike a 429, a 503 that said nothing (or nothing readable) is not given a wait
    assert sent("soon") is None
    assert sent(None) is None


async def test_upstream_quota_429_without_a_code_says_insufficient_quota(gateway: Gateway) -> None:
    gateway.fake.next_json(
        429,
        {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}},
    )
    status, body, headers = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert status == 429
    assert_envelope(body, "insufficient_quota", "insufficient_quota")
    assert headers["Retry-After"] == "1"


@pytest.mark.parametrize(
    ("upstream", "status", "code"),
    [
        (500, 502, "upstream_error"),
        (502, 502, "upstream_error"),
        (503, 503, "service_unavailable"),
        (504, 504, "upstream_timeout"),
        (418, 400, None),
    ],
)
async def test_upstream_server_errors(
    gateway: Gateway, upstream: int, status: int, code: str | None
) -> None:
    gateway.fake.next_json(upstream, b"<html>oops</html>")
    got, body, _ = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert got == status
    error = body["error"]
    assert error["code"] == code
    assert error["type"] == ("server_error" if status >= 500 else "invalid_request_error")
    assert error["param"] is None


async def test_upstream_rejecting_our_credentials_is_not_the_clients_401(gateway: Gateway) -> None:
    gateway.fake.next_json(
        401,
        {
            "error": {
                "message": "Incorrect API key provided: sk-up***",
                "type": "invalid_request_error",
                "param": None,
                "code": "invalid_api_key",
            }
        },
    )
    status, body, _ = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert status == 502
    error = assert_envelope(body, "server_error", "upstream_auth_failed")
    assert "sk-up" not in error["message"]


async def test_unreachable_upstream_is_503(make_gateway: MakeGateway) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    gateway = await make_gateway(openai_url=f"http://127.0.0.1:{dead_port}")
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.aclient().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert caught.value.code == "upstream_unreachable"
    assert caught.value.type == "server_error"


async def test_upstream_closing_without_an_answer_is_502_after_retries(
    make_gateway: MakeGateway,
) -> None:
    """The provider takes the request and hangs up: each attempt fails as a lost connection
    (not a wait for the read timeout), and the client gets OpenAI's envelope."""
    gateway = await make_gateway(server="retries = 1\nretry_backoff = 0\nrequest_timeout = 30")

    async def hang_up(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.close()
        return web.Response()

    for _ in range(2):
        gateway.fake.next_behaviour(hang_up)
    started = time.monotonic()
    status, body, _ = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert status == 502
    error = assert_envelope(body, "server_error", "upstream_connection_lost")
    assert error["param"] is None
    assert len(gateway.fake.requests) == 2  # the first attempt and its one retry
    assert time.monotonic() - started < 10  # not the 30 s request timeout


async def test_upstream_timeout_is_504(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="request_timeout = 0.3")
    gateway.fake.next_hang()
    status, body, _ = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert status == 504
    assert_envelope(body, "server_error", "upstream_timeout")


async def test_stream_cut_mid_way_ends_with_an_error_event(gateway: Gateway) -> None:
    gateway.fake.next_stream("openai/chat-stream-text.sse", cut_after=3)
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )  # type: ignore[arg-type]
    received = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert (caught.value.type, caught.value.code) == ("server_error", "upstream_connection_lost")
    assert "before the response was complete" in caught.value.message


async def test_stream_upstream_error_before_start_is_plain_error(gateway: Gateway) -> None:
    gateway.fake.next_json(
        503,
        {"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}},
    )
    with pytest.raises(openai.InternalServerError) as caught:
        await gateway.aclient().chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, stream=True
        )  # type: ignore[arg-type]
    assert caught.value.status_code == 503
    assert (caught.value.type, caught.value.code) == ("server_error", "service_unavailable")


async def test_errors_never_leak_the_upstream_key(gateway: Gateway) -> None:
    from .fakes.base import UPSTREAM_KEY

    gateway.fake.next_json(500, {"error": {"message": "internal", "type": "server_error"}})
    _, body, headers = await post(
        gateway, "/v1/chat/completions", {"model": "openai/gpt-4o", "messages": MESSAGES}
    )
    assert UPSTREAM_KEY not in str(body)
    assert all(UPSTREAM_KEY not in v for v in headers.values())
    await asyncio.sleep(0)
