"""Chat completions through the gateway to an OpenAI-compatible upstream, driven by the openai SDK."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai

from .conftest import CLIENT_KEY, Gateway
from .fakes.base import UPSTREAM_KEY, fixture_bytes, sse_events
from .fakes.openai_upstream import recorded_completions

MESSAGES = [{"role": "user", "content": "What's the weather like in SF?"}]


def recorded_stream_text(fixture: str) -> str:
    text = ""
    for event in sse_events(fixture_bytes(fixture)):
        data = event.strip().removeprefix(b"data: ")
        if data == b"[DONE]":
            continue
        for choice in json.loads(data)["choices"]:
            text += choice["delta"].get("content") or ""
    return text


async def test_non_stream_sync_sdk(gateway: Gateway) -> None:
    recorded = recorded_completions()[0]

    def call() -> openai.types.chat.ChatCompletion:
        return gateway.client().chat.completions.create(model="openai/gpt-4o", messages=MESSAGES)

    completion = await asyncio.to_thread(call)
    assert completion.model == "openai/gpt-4o"
    assert completion.id == recorded["id"]
    assert completion.choices[0].message.content == recorded["choices"][0]["message"]["content"]
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens == recorded["usage"]["prompt_tokens"]
    assert completion.usage.completion_tokens == recorded["usage"]["completion_tokens"]

    sent = gateway.fake.requests[-1]
    assert sent.body["model"] == "gpt-4o-2024-08-06"
    assert sent.body["messages"] == MESSAGES
    assert sent.headers["Authorization"] == f"Bearer {UPSTREAM_KEY}"
    assert all(CLIENT_KEY not in v for v in sent.headers.values())


async def test_non_stream_async_sdk_keeps_unknown_fields(gateway: Gateway) -> None:
    completion = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o",
        messages=MESSAGES,
        seed=7,
        temperature=0.5,
        extra_body={"some_vendor_option": {"x": [1, 2]}},
    )
    assert completion.model == "openai/gpt-4o"
    sent = gateway.fake.requests[-1].body
    assert sent["seed"] == 7
    assert sent["temperature"] == 0.5
    assert sent["some_vendor_option"] == {"x": [1, 2]}
    assert "stream_options" not in sent


async def test_stream_async_sdk_without_usage(gateway: Gateway) -> None:
    fixture = "openai/chat-stream-include-usage-text-after-tool.sse"
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == (
        recorded_stream_text(fixture)
    )
    assert all(c.model == "openai/gpt-4o" for c in chunks)
    # the gateway asked the upstream for usage, but the client did not: no usage chunk
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"
    sent = gateway.fake.requests[-1].body
    assert sent["stream"] is True
    assert sent["stream_options"] == {"include_usage": True}


async def test_stream_with_usage_when_client_asks(gateway: Gateway) -> None:
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    raw = fixture_bytes("openai/chat-stream-include-usage-text-after-tool.sse")
    usage_event = next(e for e in sse_events(raw) if b'"choices":[]' in e)
    expected = json.loads(usage_event.strip().removeprefix(b"data: "))["usage"]
    assert last.usage.prompt_tokens == expected["prompt_tokens"]
    assert last.usage.completion_tokens == expected["completion_tokens"]
    assert last.usage.total_tokens == expected["total_tokens"]


async def test_stream_sync_sdk(gateway: Gateway) -> None:
    gateway.fake.next_stream("openai/chat-stream-text.sse")

    def call() -> list[openai.types.chat.ChatCompletionChunk]:
        stream = gateway.client().chat.completions.create(
            model="openai/gpt-4o", messages=MESSAGES, stream=True
        )
        return list(stream)

    chunks = await asyncio.to_thread(call)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == recorded_stream_text("openai/chat-stream-text.sse")
    assert chunks[0].choices[0].delta.role == "assistant"


async def test_stream_is_piped_not_buffered(gateway: Gateway) -> None:
    """The client has the first chunk while the upstream still holds back its last one."""
    gate = asyncio.Event()
    gateway.fake.next_stream("openai/chat-stream-text.sse", gate=gate)
    stream = await gateway.aclient().chat.completions.create(
        model="openai/gpt-4o", messages=MESSAGES, stream=True
    )
    iterator = stream.__aiter__()
    first = await asyncio.wait_for(iterator.__anext__(), timeout=5)
    assert first.choices[0].delta.role == "assistant"
    assert not gate.is_set()  # the upstream has not sent its last event yet
    gate.set()
    rest = [c async for c in iterator]
    assert rest[-1].choices[0].finish_reason == "stop"


async def test_parallel_tool_calls_stream_accumulates(gateway: Gateway) -> None:
    gateway.fake.next_stream("openai/chat-stream-parallel-tool-calls.sse")
    async with gateway.aclient().chat.completions.stream(
        model="openai/gpt-4o", messages=MESSAGES
    ) as stream:
        final = await stream.get_final_completion()
    calls = final.choices[0].message.tool_calls
    assert calls is not None and len(calls) == 2
    assert calls[0].function.name == "GetWeatherArgs"
    assert json.loads(calls[0].function.arguments)["city"] == "Edinburgh"
    assert calls[1].function.name == "get_stock_price"
    assert final.choices[0].finish_reason == "tool_calls"
    assert final.model == "openai/gpt-4o"


async def test_alias_answers_with_the_requested_name(gateway: Gateway) -> None:
    completion = await gateway.aclient().chat.completions.create(model="gpt-4", messages=MESSAGES)
    assert completion.model == "gpt-4"
    assert gateway.fake.requests[-1].body["model"] == "gpt-4o-2024-08-06"


async def test_api_v1_prefix_and_chat_alias_and_x_api_key(gateway: Gateway) -> None:
    body = {"model": "openai/gpt-4o", "messages": MESSAGES}
    async with aiohttp.ClientSession() as session:
        for path in ("/api/v1/chat/completions", "/api/v1/chat", "/v1/chat/completions"):
            async with session.post(
                gateway.url + path, json=body, headers={"X-API-Key": CLIENT_KEY}
            ) as resp:
                assert resp.status == 200, path
                data = await resp.json()
                assert data["object"] == "chat.completion"
                assert data["model"] == "openai/gpt-4o"
                assert resp.headers["X-Request-Id"]


async def test_request_id_is_taken_from_the_client(gateway: Gateway) -> None:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.base_url + "/chat/completions",
            json={"model": "openai/gpt-4o", "messages": MESSAGES},
            headers={"Authorization": f"Bearer {CLIENT_KEY}", "X-Request-Id": "trace-123"},
        ) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["X-Request-Id"] == "trace-123"


async def test_embeddings_sync_sdk(gateway: Gateway) -> None:
    def call() -> openai.types.CreateEmbeddingResponse:
        return gateway.client().embeddings.create(
            model="openai/text-embedding-3-small", input=["hello world", "bye"]
        )

    result = await asyncio.to_thread(call)
    assert result.model == "openai/text-embedding-3-small"
    assert [d.index for d in result.data] == [0, 1]
    assert len(result.data[0].embedding) == 8
    assert result.usage.prompt_tokens == 3
    assert gateway.fake.requests[-1].body["model"] == "text-embedding-3-small"


async def test_a_stray_stream_flag_on_embeddings_changes_nothing(gateway: Gateway) -> None:
    """Only chat streams on request: elsewhere the answer is still patched and counted.
    (OpenAI itself refuses the field; the demo provider, like many local servers, ignores it.)"""
    result = await gateway.aclient().embeddings.create(
        model="demo/embed", input="hello world", extra_body={"stream": True}
    )
    assert result.model == "demo/embed"
    record = (await gateway.records())[-1]
    assert (record.endpoint, record.stream) == ("embeddings", False)
    assert record.prompt_tokens == result.usage.prompt_tokens > 0


async def test_images_sdk(gateway: Gateway) -> None:
    result = await gateway.aclient().images.generate(model="openai/gpt-image-1", prompt="a cat")
    assert result.data is not None
    assert result.data[0].b64_json == "aGVsbG8="
    assert gateway.fake.requests[-1].body == {"model": "gpt-image-1", "prompt": "a cat"}


async def test_speech_binary_is_streamed_through(gateway: Gateway) -> None:
    from .fakes.openai_upstream import SPEECH_CHUNKS

    async with gateway.aclient().audio.speech.with_streaming_response.create(
        model="openai/tts-1", voice="alloy", input="Hello there"
    ) as response:
        assert response.headers["content-type"] == "audio/mpeg"
        audio = b"".join([chunk async for chunk in response.iter_bytes()])
    assert audio == b"".join(SPEECH_CHUNKS)
    assert gateway.fake.requests[-1].body["voice"] == "alloy"


async def test_stream_events_pass_unchanged_unless_something_must_be_patched(
    gateway: Gateway,
) -> None:
    """An event that already names the model asked for reaches the client byte for byte (no
    re-encoding); one naming the upstream's model is patched; the usage chunk the gateway
    added is dropped; an event of two data lines is still framed right."""
    same = b'{"id": "c1", "object": "chat.completion.chunk", "model": "openai/gpt-4o", "choices": [{"index": 0, "delta": {"role": "assistant", "content": "caf\\u00e9"}, "finish_reason": null}]}'
    other = b'{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[{"index":0,"delta":{"content":" ok"},"finish_reason":"stop"}]}'
    usage = b'{"id":"c1","object":"chat.completion.chunk","model":"gpt-4o-2024-08-06","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}'
    split = (
        b'{"id":"c1","object":"chat.completion.chunk",\ndata: "model":"openai/gpt-4o","choices":[]}'
    )
    gateway.fake.next_stream(
        events=[b"data: " + d + b"\n\n" for d in (same, split, other, usage, b"[DONE]")]
    )
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            gateway.base_url + "/chat/completions",
            json={"model": "openai/gpt-4o", "messages": MESSAGES, "stream": True},
            headers={"Authorization": f"Bearer {CLIENT_KEY}"},
        ) as resp,
    ):
        assert resp.status == 200
        body = await resp.read()
    events = body.split(b"\n\n")
    assert events[0] == b"data: " + same
    assert json.loads(events[1].removeprefix(b"data: ")) == {
        "id": "c1",
        "object": "chat.completion.chunk",
        "model": "openai/gpt-4o",
        "choices": [],
    }
    assert json.loads(events[2].removeprefix(b"data: "))["model"] == "openai/gpt-4o"
    assert events[3:] == [b"data: [DONE]", b""]
    assert gateway.fake.requests[-1].body["stream_options"] == {"include_usage": True}


async def test_a_body_that_needs_no_patch_passes_byte_for_byte(gateway: Gateway) -> None:
    """A non-stream answer already naming the model asked for is not re-encoded; its usage
    is still counted."""
    raw = b'{"id": "c2", "object": "chat.completion", "created": 1, "model": "openai/gpt-4o", "choices": [{"index": 0, "message": {"role": "assistant", "content": "caf\\u00e9"}, "finish_reason": "stop"}], "usage": {"prompt_tokens": 7, "completion_tokens": 2, "total_tokens": 9}}'
    gateway.fake.next_json(200, raw)
    gateway.fake.next_json(200, raw.replace(b'"openai/gpt-4o"', b'"gpt-4o-2024-08-06"'))
    bodies = []
    async with aiohttp.ClientSession() as session:
        for _ in range(2):
            async with session.post(
                gateway.base_url + "/chat/completions",
                json={"model": "openai/gpt-4o", "messages": MESSAGES},
                headers={"Authorization": f"Bearer {CLIENT_KEY}"},
            ) as resp:
                assert resp.status == 200
                bodies.append(await resp.read())
    assert bodies[0] == raw
    assert bodies[1] != raw and json.loads(bodies[1]) == json.loads(raw)
    records = await gateway.records()
    assert [(r.prompt_tokens, r.completion_tokens) for r in records[-2:]] == [(7, 2), (7, 2)]
