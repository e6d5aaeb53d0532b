"""GET /v1/models and /v1/models/{id}: OpenAI's list shape plus what clients choose by."""

from __future__ import annotations

from typing import Any

import aiohttp
import openai
import pytest

from .conftest import CLIENT_KEY, DEMO_ONLY_KEY, Gateway


async def get(gateway: Gateway, path: str, key: str = CLIENT_KEY) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + path, headers={"Authorization": f"Bearer {key}"}) as r:
            return r.status, await r.json()


async def test_sdk_lists_models_with_extra_fields(gateway: Gateway) -> None:
    page = await gateway.aclient().models.list()
    ids = [m.id for m in page.data]
    assert ids == [
        "openai/gpt-4o",
        "openai/text-embedding-3-small",
        "openai/gpt-image-1",
        "openai/tts-1",
        "anthropic/claude-haiku",
        "anthropic/claude-sonnet",
        "google/gemini-flash",
        "google/gemini-pro",
        "google/embedding",
        "demo/echo",
        "demo/embed",
        "gpt-4",
    ]
    gpt = page.data[0]
    assert gpt.object == "model"
    assert gpt.owned_by == "openai"
    extra = gpt.model_dump()
    assert extra["context_window"] == 128000
    assert extra["max_tokens"] == 16384
    assert extra["pricing"]["input"] == 2.5 and extra["pricing"]["output"] == 10.0
    assert extra["capabilities"] == ["chat", "tools", "vision", "json"]
    alias = page.data[-1].model_dump()
    assert alias["alias_for"] == ["openai/gpt-4o", "demo/echo"]


async def test_key_sees_only_its_models(gateway: Gateway) -> None:
    status, body = await get(gateway, "/v1/models", DEMO_ONLY_KEY)
    assert status == 200
    assert [m["id"] for m in body["data"]] == ["demo/echo", "demo/embed", "gpt-4"]
    # an alias shows only the deployments the key may use
    assert body["data"][-1]["alias_for"] == ["demo/echo"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ("provider=demo", ["demo/echo", "demo/embed"]),
        (
            "capability=embeddings",
            ["openai/text-embedding-3-small", "google/embedding", "demo/embed"],
        ),
        (
            "min_context=10000",
            [
                "openai/gpt-4o",
                "anthropic/claude-haiku",
                "anthropic/claude-sonnet",
                "google/gemini-flash",
                "google/gemini-pro",
                "gpt-4",
            ],
        ),
        (
            "max_price_in=0.5",
            [
                "openai/text-embedding-3-small",
                "openai/gpt-image-1",
                "openai/tts-1",
                "anthropic/claude-sonnet",
                "google/gemini-flash",
                "google/gemini-pro",
                "google/embedding",
                "demo/embed",
            ],
        ),
        (
            "capability=chat&max_price_in=1",
            [
                "anthropic/claude-haiku",
                "anthropic/claude-sonnet",
                "google/gemini-flash",
                "google/gemini-pro",
                "demo/echo",
            ],
        ),
    ],
)
async def test_filters(gateway: Gateway, query: str, expected: list[str]) -> None:
    status, body = await get(gateway, f"/api/v1/models?{query}")
    assert status == 200
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == expected


async def test_bad_filter_is_400(gateway: Gateway) -> None:
    status, body = await get(gateway, "/v1/models?min_context=lots")
    assert status == 400
    assert body["error"]["param"] == "min_context"


async def test_retrieve_model(gateway: Gateway) -> None:
    model = await gateway.aclient().models.retrieve("openai/gpt-4o")
    assert model.id == "openai/gpt-4o"
    assert model.owned_by == "openai"
    # a model the key may not use is forbidden (as a request to it is), an unknown one is not found
    with pytest.raises(openai.PermissionDeniedError) as forbidden:
        await gateway.aclient(key=DEMO_ONLY_KEY).models.retrieve("openai/gpt-4o")
    assert (forbidden.value.status_code, forbidden.value.code) == (403, "forbidden")
    with pytest.raises(openai.NotFoundError) as caught:
        await gateway.aclient().models.retrieve("nope/nothing")
    assert (caught.value.status_code, caught.value.code) == (404, "model_not_found")
    assert caught.value.type == "invalid_request_error"
    assert "nope/nothing" in caught.value.message


async def test_models_need_a_key(gateway: Gateway) -> None:
    status, body = await get(gateway, "/v1/models", key="")
    assert status == 401
    assert (body["error"]["type"], body["error"]["code"]) == (
        "invalid_request_error",
        "invalid_api_key",
    )
