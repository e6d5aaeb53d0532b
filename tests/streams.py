"""Reading what the gateway streams, as raw OpenAI chunks, and checking them against the spec."""

from __future__ import annotations

import json
from typing import Any

import aiohttp

from .conftest import CLIENT_KEY, Gateway
from .schemas import openai_errors


async def post_raw(gateway: Gateway, body: dict[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.base_url + "/chat/completions",
            json=body,
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        ) as resp,
    ):
        return resp.status, await resp.read()


async def chunks_of(gateway: Gateway, body: dict[str, Any]) -> list[dict[str, Any]]:
    """The chat.completion.chunk objects of a streamed answer, each checked against the spec,
    ending with "[DONE]"."""
    status, raw = await post_raw(gateway, {**body, "stream": True})
    assert status == 200, raw
    out: list[dict[str, Any]] = []
    assert raw.endswith(b"data: [DONE]\n\n"), raw[-200:]
    for event in raw.split(b"\n\n"):
        if not event:
            continue
        assert event.startswith(b"data: "), event
        data = event[6:]
        if data == b"[DONE]":
            continue
        chunk = json.loads(data)
        assert openai_errors("CreateChatCompletionStreamResponse", chunk) == []
        out.append(chunk)
    return out


async def completion_of(gateway: Gateway, body: dict[str, Any]) -> dict[str, Any]:
    status, raw = await post_raw(gateway, body)
    assert status == 200, raw
    completion: dict[str, Any] = json.loads(raw)
    assert openai_errors("CreateChatCompletionResponse", completion) == []
    return completion


def deltas(chunks: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """Each chunk as (kind, value): role, content, reasoning, tool (id, name), args, finish, usage."""
    out: list[tuple[str, Any]] = []
    for chunk in chunks:
        if not chunk["choices"]:
            out.append(("usage", chunk["usage"]))
            continue
        choice = chunk["choices"][0]
        delta = choice["delta"]
        if "role" in delta:
            out.append(("role", delta["role"]))
        if delta.get("content"):
            out.append(("content", delta["content"]))
        if delta.get("reasoning_content"):
            out.append(("reasoning", delta["reasoning_content"]))
        for call in delta.get("tool_calls") or []:
            if "id" in call:
                out.append(("tool", (call["index"], call["id"], call["function"]["name"])))
            if call["function"].get("arguments"):
                out.append(("args", (call["index"], call["function"]["arguments"])))
        if choice["finish_reason"]:
            out.append(("finish", choice["finish_reason"]))
    return out
