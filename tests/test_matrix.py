"""One test matrix, three providers: the openai SDK uses OpenAI, Anthropic and Gemini models
through the gateway the same way, and gets the same kind of answers.

Each provider's fake serves its own recordings; where no recording exists for a case (a length
stop, a rate-limit error), the fake's answer is written in that provider's documented format.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import openai
import pytest

from .conftest import Gateway
from .fakes.anthropic_upstream import anthropic_error
from .fakes.base import FakeUpstream, fixture_bytes, sse_events
from .fakes.gemini_upstream import google_error
from .fakes.openai_upstream import cassette_error


@dataclass(frozen=True)
class Provider:
    model: str
    fake: Callable[[Gateway], FakeUpstream]
    tool_call: str  # a recorded stream that calls a tool
    after_tool: str  # a recorded stream answering after the tool result
    length_stop: Callable[[], bytes]  # a non-stream answer cut by max_tokens
    rate_limited: Callable[[], tuple[int, bytes]]
    system_sent: Callable[[dict[str, Any]], Any]  # where the system prompt went
    turns_sent: Callable[[dict[str, Any]], int]


def _anthropic_length() -> bytes:
    return json.dumps(
        {
            "id": "msg_len",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "Once upon"}],
            "stop_reason": "max_tokens",
            "stop_sequence": None,
            "usage": {"input_tokens": 5, "output_tokens": 2},
        }
    ).encode()


def _gemini_length() -> bytes:
    return json.dumps(
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "Once upon"}], "role": "model"},
                    "finishReason": "MAX_TOKENS",
                    "index": 0,
                }
            ],
            "usageMetadata": {
                "promptTokenCount": 5,
                "candidatesTokenCount": 2,
                "totalTokenCount": 7,
            },
            "modelVersion": "gemini-2.0-flash",
            "responseId": "len1",
        }
    ).encode()


def _openai_length() -> bytes:
    from .fakes.openai_upstream import recorded_completions

    return json.dumps(
        next(r for r in recorded_completions() if r["choices"][0]["finish_reason"] == "length")
    ).encode()


PROVIDERS = {
    "openai": Provider(
        model="openai/gpt-4o",
        fake=lambda g: g.fake,
        tool_call="openai/chat-stream-include-usage-tool-call.sse",
        after_tool="openai/chat-stream-include-usage-text-after-tool.sse",
        length_stop=_openai_length,
        rate_limited=lambda: (
            429,
            json.dumps(
                {
                    "error": {
                        "message": "Rate limit reached",
                        "type": "requests",
                        "param": None,
                        "code": "rate_limit_exceeded",
                    }
                }
            ).encode(),
        ),
        system_sent=lambda body: body["messages"][0],
        turns_sent=lambda body: len([m for m in body["messages"] if m["role"] != "system"]),
    ),
    "anthropic": Provider(
        model="anthropic/claude-haiku",
        fake=lambda g: g.anthropic,
        tool_call="anthropic/stream-tool-use-only.sse",
        after_tool="anthropic/stream-text-after-tool-result.sse",
        length_stop=_anthropic_length,
        rate_limited=lambda: anthropic_error(
            429,
            "rate_limit_error",
            "Number of request tokens has exceeded your per-minute rate limit",
        ),
        system_sent=lambda body: body["system"],
        turns_sent=lambda body: len(body["messages"]),
    ),
    "google": Provider(
        model="google/gemini-flash",
        fake=lambda g: g.gemini,
        tool_call="gemini/stream-function-call-thought-signature.sse",
        after_tool="gemini/stream-text-after-function-response.sse",
        length_stop=_gemini_length,
        rate_limited=lambda: google_error(429, "RESOURCE_EXHAUSTED", "Resource has been exhausted"),
        system_sent=lambda body: body["systemInstruction"],
        turns_sent=lambda body: len(body["contents"]),
    ),
}

providers = pytest.mark.parametrize("name", list(PROVIDERS))
TOOLS: list[Any] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"location": {"type": "string"}, "units": {"type": "string"}},
                "required": ["location"],
            },
        },
    }
]


@providers
async def test_plain_chat(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    answer = await gateway.aclient().chat.completions.create(
        model=p.model, messages=[{"role": "user", "content": "Hello"}]
    )
    assert answer.model == p.model
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].message.content
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage is not None and answer.usage.total_tokens > 0


@providers
async def test_streaming_with_usage(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    stream = await gateway.aclient().chat.completions.create(
        model=p.model,
        messages=[{"role": "user", "content": "Hello"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert (
        chunks[-1].usage.total_tokens
        == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    )


@providers
async def test_system_prompt_and_multi_turn(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    await gateway.aclient().chat.completions.create(
        model=p.model,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How are you?"},
        ],
    )
    body = p.fake(gateway).requests[-1].body
    assert "You are terse." in json.dumps(p.system_sent(body))
    assert p.turns_sent(body) == 3


@providers
@pytest.mark.parametrize("stream", [False, True])
async def test_tool_round_trip(gateway: Gateway, name: str, stream: bool) -> None:
    p = PROVIDERS[name]
    fake = p.fake(gateway)
    fake.next_recording(p.tool_call)
    fake.next_recording(p.after_tool)
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "What's the weather?"}]

    async def ask() -> openai.types.chat.ChatCompletion:
        if not stream:
            return await client.chat.completions.create(
                model=p.model, messages=messages, tools=TOOLS
            )
        async with client.chat.completions.stream(
            model=p.model, messages=messages, tools=TOOLS
        ) as s:
            return await s.get_final_completion()

    first = await ask()
    assert first.choices[0].finish_reason == "tool_calls"
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.id and call.function.name  # type: ignore[union-attr]
    assert isinstance(json.loads(call.function.arguments), dict)  # type: ignore[union-attr]
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {"name": call.function.name, "arguments": call.function.arguments},
                }
            ],
        },  # type: ignore[union-attr]
        {"role": "tool", "tool_call_id": call.id, "content": '{"temperature": "20C"}'},
    ]
    final = await ask()
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content
    sent = json.dumps(fake.requests[-1].body)
    assert "20C" in sent  # the tool result reached the provider


@providers
async def test_image_input(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    await gateway.aclient().chat.completions.create(
        model=p.model,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "What is this?"},
                    {
                        "type": "image_url",
                        "image_url": {"url": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg=="},
                    },
                ],
            }
        ],
    )
    assert "iVBORw0KGgoAAAANSUhEUg==" in json.dumps(p.fake(gateway).requests[-1].body)


@providers
async def test_json_schema_output(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    await gateway.aclient().chat.completions.create(
        model=p.model,
        messages=[{"role": "user", "content": "City?"}],
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "city", "schema": schema, "strict": True},
        },
    )
    assert json.dumps(schema) in json.dumps(p.fake(gateway).requests[-1].body)


@providers
async def test_stop_sequences(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    await gateway.aclient().chat.completions.create(
        model=p.model, messages=[{"role": "user", "content": "Count"}], stop=["7", "END"]
    )
    assert '["7", "END"]' in json.dumps(p.fake(gateway).requests[-1].body)


@providers
async def test_length_finish(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    p.fake(gateway).next_json(200, p.length_stop())
    answer = await gateway.aclient().chat.completions.create(
        model=p.model, messages=[{"role": "user", "content": "Tell a story"}], max_tokens=2
    )
    assert answer.choices[0].finish_reason == "length"
    assert "2" in json.dumps(p.fake(gateway).requests[-1].body)


@providers
async def test_upstream_rate_limit(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    status, body = p.rate_limited()
    p.fake(gateway).next_json(status, body, headers={"Retry-After": "1"})
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.aclient().chat.completions.create(
            model=p.model, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.status_code == 429
    assert caught.value.code == "rate_limit_exceeded"
    # an OpenAI upstream's own type is passed on; the others' become OpenAI's rate_limit_error
    assert caught.value.type == ("requests" if name == "openai" else "rate_limit_error")
    assert caught.value.param is None


@providers
async def test_upstream_bad_request(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    if name == "openai":
        status, body = cassette_error(
            "openai/pydantic-ai_error-400-unsupported-value.cassette.yaml"
        )
    elif name == "anthropic":
        status, body = anthropic_error(400, "invalid_request_error", "messages: bad")
    else:
        status, body = google_error(400, "INVALID_ARGUMENT", "Invalid value at contents")
    p.fake(gateway).next_json(status, body)
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().chat.completions.create(
            model=p.model, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.type == "invalid_request_error"


@providers
async def test_mid_stream_failure(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    events = len(sse_events(fixture_bytes(p.after_tool)))
    p.fake(gateway).next_stream(p.after_tool, cut_after=min(4, events - 1))  # after output began
    stream = await gateway.aclient().chat.completions.create(
        model=p.model, messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert caught.value.code in ("upstream_connection_lost", "upstream_stream_incomplete")


@providers
@pytest.mark.parametrize("which", ["tool_call", "after_tool"])
async def test_stream_and_whole_answer_agree(gateway: Gateway, name: str, which: str) -> None:
    p = PROVIDERS[name]
    fixture = p.tool_call if which == "tool_call" else p.after_tool
    fake = p.fake(gateway)
    fake.next_recording(fixture)
    fake.next_recording(fixture)
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "What's the weather?"}]
    whole = await client.chat.completions.create(model=p.model, messages=messages, tools=TOOLS)
    async with client.chat.completions.stream(
        model=p.model, messages=messages, tools=TOOLS, stream_options={"include_usage": True}
    ) as stream:
        streamed = await stream.get_final_completion()

    def essence(answer: openai.types.chat.ChatCompletion) -> Any:
        choice = answer.choices[0]
        calls = [
            (c.id, c.function.name, json.loads(c.function.arguments))  # type: ignore[union-attr]
            for c in choice.message.tool_calls or []
        ]
        return choice.message.content, calls, choice.finish_reason, answer.usage

    assert essence(whole) == essence(streamed)
    assert essence(whole)[2] == ("tool_calls" if which == "tool_call" else "stop")
    assert whole.usage is not None and whole.usage.total_tokens > 0


@providers
async def test_json_object_output(gateway: Gateway, name: str) -> None:
    p = PROVIDERS[name]
    ask = gateway.aclient().chat.completions.create(
        model=p.model,
        messages=[{"role": "user", "content": "A JSON object with a city, please."}],
        response_format={"type": "json_object"},
    )
    if name == "anthropic":
        # Anthropic's structured output needs a schema; there is no "any JSON object" mode
        with pytest.raises(openai.BadRequestError) as caught:
            await ask
        assert caught.value.param == "response_format"
        assert p.fake(gateway).requests == []
        return
    await ask
    body = p.fake(gateway).requests[-1].body
    if name == "openai":
        assert body["response_format"] == {"type": "json_object"}
    else:
        assert body["generationConfig"]["responseMimeType"] == "application/json"
        assert "responseJsonSchema" not in body["generationConfig"]


CACHED_ANSWERS: dict[str, tuple[dict[str, Any], list[bytes]]] = {
    # (whole answer, stream events) reporting 30 cached input tokens out of 100 in all
    "anthropic": (
        {
            "id": "msg_cache",
            "type": "message",
            "role": "assistant",
            "model": "claude-haiku-4-5",
            "content": [{"type": "text", "text": "Hi"}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {
                "input_tokens": 60,
                "cache_read_input_tokens": 30,
                "cache_creation_input_tokens": 10,
                "output_tokens": 2,
            },
        },
        [
            b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_cache",'
            b'"type":"message","role":"assistant","model":"claude-haiku-4-5","content":[],'
            b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":60,'
            b'"cache_read_input_tokens":30,"cache_creation_input_tokens":10,"output_tokens":1}}}\n\n',
            b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
            b'"content_block":{"type":"text","text":""}}\n\n',
            b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
            b'"delta":{"type":"text_delta","text":"Hi"}}\n\n',
            b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
            b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
            b'"end_turn","stop_sequence":null},"usage":{"output_tokens":2}}\n\n',
            b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
        ],
    ),
    "google": (
        {
            "candidates": [
                {
                    "content": {"parts": [{"text": "Hi"}], "role": "model"},
                    "finishReason": "STOP",
                    "index": 0,
                }
            ],
            # promptTokenCount includes the cached content
            "usageMetadata": {
                "promptTokenCount": 100,
                "cachedContentTokenCount": 30,
                "candidatesTokenCount": 2,
                "totalTokenCount": 102,
            },
            "responseId": "cache1",
        },
        [],
    ),
}
CACHED_ANSWERS["google"][1].append(
    b"data: " + json.dumps(CACHED_ANSWERS["google"][0]).encode() + b"\r\n\r\n"
)


@pytest.mark.parametrize("name", list(CACHED_ANSWERS))
@pytest.mark.parametrize("stream", [False, True])
async def test_cached_tokens_in_prompt_tokens_details(
    gateway: Gateway, name: str, stream: bool
) -> None:
    p = PROVIDERS[name]
    whole, events = CACHED_ANSWERS[name]
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "Hello"}]
    if stream:
        p.fake(gateway).next_stream(events=events)
        chunks = [
            c
            async for c in await client.chat.completions.create(
                model=p.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
            )
        ]
        usage = chunks[-1].usage
    else:
        p.fake(gateway).next_json(200, whole)
        usage = (await client.chat.completions.create(model=p.model, messages=messages)).usage
    assert usage is not None
    assert usage.prompt_tokens == 100
    assert usage.prompt_tokens_details is not None
    assert usage.prompt_tokens_details.cached_tokens == 30
    assert usage.completion_tokens == 2
    assert usage.total_tokens == 102


@pytest.mark.parametrize("name", ["anthropic", "google"])
async def test_translated_chunks_leave_as_upstream_events_arrive(
    gateway: Gateway, name: str
) -> None:
    p = PROVIDERS[name]
    recorded = sse_events(fixture_bytes(p.after_tool))
    # up to and including the first event with text, then the rest held back in one write
    first_text = next(i for i, e in enumerate(recorded) if b'"text' in e and b'"text":""' not in e)
    held = asyncio.Event()
    p.fake(gateway).next_stream(
        events=[*recorded[: first_text + 1], b"".join(recorded[first_text + 1 :])], gate=held
    )
    stream = await gateway.aclient().chat.completions.create(
        model=p.model, messages=[{"role": "user", "content": "x"}], stream=True
    )
    text = []
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if not text:
                # the upstream is still holding the rest of its answer back
                assert not held.is_set()
                held.set()
            text.append(chunk.choices[0].delta.content)
    assert held.is_set() and len(text) > 1


async def test_gemini_tool_call_goes_on_with_gemini_and_then_anthropic(gateway: Gateway) -> None:
    """The ids handed out for Gemini's calls (thought signature inside) work when the client
    sends them back to Gemini, and when the same conversation moves to an Anthropic model."""
    gemini, anthropic = PROVIDERS["google"], PROVIDERS["anthropic"]
    recorded = sse_events(fixture_bytes(gemini.tool_call))
    signature = json.loads(recorded[0].removeprefix(b"data: "))["candidates"][0]["content"][
        "parts"
    ][0]["thoughtSignature"]
    gateway.gemini.next_recording(gemini.tool_call)
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "What's the weather?"}]
    first = await client.chat.completions.create(model=gemini.model, messages=messages, tools=TOOLS)
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert re.fullmatch(r"[a-zA-Z0-9_-]+", call.id)
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": call.id,
                    "type": "function",
                    "function": {
                        "name": call.function.name,  # type: ignore[union-attr]
                        "arguments": call.function.arguments,  # type: ignore[union-attr]
                    },
                }
            ],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Mexico"},
    ]

    gateway.gemini.next_recording(gemini.after_tool)
    await client.chat.completions.create(model=gemini.model, messages=messages, tools=TOOLS)
    contents = gateway.gemini.requests[-1].body["contents"]
    assert contents[1]["parts"][0]["thoughtSignature"] == signature  # byte for byte
    call_id = contents[1]["parts"][0]["functionCall"]["id"]
    assert contents[2]["parts"][0]["functionResponse"]["id"] == call_id
    assert gateway.gemini.violations == []

    gateway.anthropic.next_recording(anthropic.after_tool)
    answer = await client.chat.completions.create(
        model=anthropic.model, messages=messages, tools=TOOLS
    )
    assert answer.choices[0].message.content
    assert gateway.anthropic.violations == []
    sent = gateway.anthropic.requests[-1].body["messages"]
    assert sent[1]["content"][0]["id"] == sent[2]["content"][0]["tool_use_id"] == call.id
