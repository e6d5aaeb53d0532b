"""OpenAI clients using Anthropic models through the gateway, against Anthropic's recorded traffic.

The fake speaks the Messages API exactly as recorded (fixtures/anthropic/) and rejects requests
that break Anthropic's request schema; the recorded request bodies of the SDK's HTTP snapshots
are compared with what the gateway sends for the equivalent OpenAI conversation.
"""

from __future__ import annotations

import copy
import json
from typing import Any

import openai
import pytest

from .conftest import Gateway
from .fakes.anthropic_upstream import anthropic_error, cassette, snapshot
from .fakes.base import fixture_bytes, sse_events
from .streams import chunks_of, completion_of, deltas

MODEL = "anthropic/claude-haiku"  # upstream name "claude-haiku-4-5", max_tokens 1024


def without_caller(body: dict[str, Any]) -> dict[str, Any]:
    """A recorded request body minus the `caller` the SDK echoed back in tool_use blocks."""
    body = copy.deepcopy(body)
    for message in body["messages"]:
        if isinstance(message["content"], list):
            for block in message["content"]:
                block.pop("caller", None)
    return body


def openai_tools(anthropic_body: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t["name"],
                "description": t["description"],
                "parameters": t["input_schema"],
            },
        }
        for t in anthropic_body["tools"]
    ]


async def test_tool_round_trip_non_stream_sends_what_the_sdk_sent(gateway: Gateway) -> None:
    recorded = snapshot("sdk-http_nonstream-tool-use-roundtrip.json")
    first, second = recorded[0], recorded[1]
    gateway.anthropic.next_json(200, first["response"]["body"])
    gateway.anthropic.next_json(200, second["response"]["body"])
    client = gateway.aclient()
    tools = openai_tools(first["request"]["body"])
    messages: list[Any] = [{"role": "user", "content": "What's the weather in SF in Celsius?"}]

    answer = await client.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert gateway.anthropic.requests[0].body == first["request"]["body"]
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    call = choice.message.tool_calls[0]  # type: ignore[index]
    assert call.id == "toolu_013DU6hV4C1M8dJ32ybQFAFi"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    assert json.loads(call.function.arguments) == {"location": "SF", "units": "c"}  # type: ignore[union-attr]
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (597, 71)
    assert answer.model == MODEL
    assert answer.id == "msg_01M4x4hiFuUdHzu44ih9eCGh"

    result = second["request"]["body"]["messages"][2]["content"][0]["content"]
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    final = await client.chat.completions.create(model=MODEL, messages=messages, tools=tools)
    assert gateway.anthropic.requests[1].body == without_caller(second["request"]["body"])
    assert final.choices[0].message.content == (
        "The weather in SF is currently **20\u00b0C** (68\u00b0F) and **Sunny**!"
    )
    assert final.choices[0].finish_reason == "stop"


async def test_tool_round_trip_streamed_sends_what_the_sdk_sent(gateway: Gateway) -> None:
    recorded = snapshot("sdk-http_stream-tool-use-roundtrip.json")
    for exchange in recorded:
        gateway.anthropic.next_stream(events=sse_events(exchange["response"]["body"].encode()))
    client = gateway.aclient()
    tools = openai_tools(recorded[0]["request"]["body"])
    messages: list[Any] = [{"role": "user", "content": "What is the weather in SF?"}]
    async with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=tools
    ) as stream:
        first = await stream.get_final_completion()
    assert gateway.anthropic.requests[0].body == recorded[0]["request"]["body"]
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.id == "toolu_018acGYLtfR52q9yDbWaEdQZ"
    assert json.loads(call.function.arguments) == {"location": "San Francisco, CA", "units": "f"}
    assert first.choices[0].finish_reason == "tool_calls"

    result = recorded[1]["request"]["body"]["messages"][2]["content"][0]["content"]
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(exclude={"parsed_arguments"})],
        },
        {"role": "tool", "tool_call_id": call.id, "content": result},
    ]
    async with client.chat.completions.stream(
        model=MODEL, messages=messages, tools=tools
    ) as stream:
        final = await stream.get_final_completion()
    assert gateway.anthropic.requests[1].body == without_caller(recorded[1]["request"]["body"])
    assert final.choices[0].finish_reason == "stop"
    assert "68" in (final.choices[0].message.content or "")


async def test_tool_use_stream_gives_exact_chunks(gateway: Gateway) -> None:
    gateway.anthropic.next_stream("anthropic/stream-tool-use-only.sse")
    chunks = await chunks_of(
        gateway,
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "weather?"}],
            "stream_options": {"include_usage": True},
        },
    )
    args = ['{"', "loca", "tio", 'n": ', '"San Fr', "anci", 'sco, CA"', ', "', 'units": "f"}']
    assert deltas(chunks) == [
        ("role", "assistant"),
        ("tool", (0, "toolu_018acGYLtfR52q9yDbWaEdQZ", "get_weather")),
        *[("args", (0, a)) for a in args],
        ("finish", "tool_calls"),
        (
            "usage",
            {
                "prompt_tokens": 656,
                "completion_tokens": 74,
                "total_tokens": 730,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        ),
    ]
    assert {c["id"] for c in chunks} == {"msg_01AusY9WEbCaj3N7Tv5J4YjH"}
    assert {c["model"] for c in chunks} == {MODEL}


async def test_text_then_tool_use_stream(gateway: Gateway) -> None:
    gateway.anthropic.next_stream("anthropic/stream-text-then-tool-use.sse")
    chunks = await chunks_of(
        gateway, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    kinds = deltas(chunks)
    assert kinds[:3] == [
        ("role", "assistant"),
        ("content", "I"),
        ("content", "'ll check the current weather in Paris for you."),
    ]
    assert kinds[3] == ("tool", (0, "toolu_01NRLabsLyVHZPKxbKvkfSMn", "get_weather"))
    arguments = "".join(v[1] for k, v in kinds if k == "args")
    assert json.loads(arguments) == {"location": "Paris"}
    assert kinds[-1] == ("finish", "tool_calls")
    assert all(k != "usage" for k, _ in kinds)  # the client did not ask for usage


async def test_thinking_stream_becomes_reasoning_content(gateway: Gateway) -> None:
    fixture = "anthropic/stream-thinking-then-text.sse"
    gateway.anthropic.next_stream(fixture)
    chunks = await chunks_of(
        gateway, {"model": MODEL, "messages": [{"role": "user", "content": "x"}]}
    )
    accumulated = gateway.anthropic.accumulate(fixture_bytes(fixture))
    thinking = next(b for b in accumulated["content"] if b["type"] == "thinking")["thinking"]
    text = next(b for b in accumulated["content"] if b["type"] == "text")["text"]
    kinds = deltas(chunks)
    assert "".join(v for k, v in kinds if k == "reasoning") == thinking
    assert "".join(v for k, v in kinds if k == "content") == text
    first_text = next(i for i, (k, _) in enumerate(kinds) if k == "content")
    assert all(k != "reasoning" for k, _ in kinds[first_text:])
    assert kinds[-1] == ("finish", "stop")


@pytest.mark.parametrize(
    "fixture",
    [
        "anthropic/stream-text-basic.sse",
        "anthropic/stream-text-then-tool-use.sse",
        "anthropic/stream-tool-use-only.sse",
        "anthropic/stream-thinking-then-text.sse",
        "anthropic/stream-text-json-output.sse",
        "anthropic/stream-text-after-tool-result.sse",
    ],
)
async def test_streamed_and_whole_answers_agree(gateway: Gateway, fixture: str) -> None:
    """The SDK's accumulation of the stream equals the non-stream answer to the same turn."""
    gateway.anthropic.next_recording(fixture)
    gateway.anthropic.next_recording(fixture)
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "hello"}]
    whole = await client.chat.completions.create(model=MODEL, messages=messages)
    async with client.chat.completions.stream(
        model=MODEL, messages=messages, stream_options={"include_usage": True}
    ) as stream:
        streamed = await stream.get_final_completion()
    a, b = whole.choices[0], streamed.choices[0]
    assert a.finish_reason == b.finish_reason
    assert a.message.content == b.message.content
    assert [
        (c.id, c.function.name, json.loads(c.function.arguments))
        for c in a.message.tool_calls or []
    ] == [
        (c.id, c.function.name, json.loads(c.function.arguments))
        for c in b.message.tool_calls or []
    ]
    assert whole.usage == streamed.usage
    assert whole.id == streamed.id


async def test_request_translation(gateway: Gateway) -> None:
    await completion_of(
        gateway,
        {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": [{"type": "text", "text": "Use metric."}]},
                {"role": "user", "content": "Hi"},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look:"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                        },
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                    ],
                },
                {"role": "assistant", "content": "Nice cat."},
                {"role": "user", "content": "Thanks"},
            ],
            "max_completion_tokens": 50,
            "temperature": 0.2,
            "top_p": 1,  # OpenAI's default: means nothing, so it is not sent
            "stop": "END",
            "user": "user-42",
            "reasoning_effort": "low",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": {"type": "object"}},
            },
            "tool_choice": "required",
            "parallel_tool_calls": False,
            "tools": [
                {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
            ],
        },
    )
    sent = gateway.anthropic.requests[-1].body
    assert sent["system"] == [
        {"type": "text", "text": "Be brief."},
        {"type": "text", "text": "Use metric."},
    ]
    assert sent["messages"] == [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Hi"},
                {"type": "text", "text": "Look:"},
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        },
        {"role": "assistant", "content": "Nice cat."},
        {"role": "user", "content": "Thanks"},
    ]
    assert sent["max_tokens"] == 50
    assert sent["temperature"] == 0.2
    assert "top_p" not in sent
    assert sent["stop_sequences"] == ["END"]
    assert sent["metadata"] == {"user_id": "user-42"}
    assert sent["output_config"] == {
        "effort": "low",
        "format": {"type": "json_schema", "schema": {"type": "object"}},
    }
    assert sent["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
    assert sent["tools"] == [{"name": "f", "input_schema": {"type": "object"}}]
    assert sent["model"] == "claude-haiku-4-5"


async def test_max_tokens_default_and_named_tool_choice(gateway: Gateway) -> None:
    await completion_of(
        gateway,
        {
            "model": "anthropic/claude-sonnet",  # no max_tokens in its config
            "messages": [{"role": "user", "content": "x"}],
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
        },
    )
    sent = gateway.anthropic.requests[-1].body
    assert sent["max_tokens"] == 4096
    assert sent["tool_choice"] == {"type": "tool", "name": "f"}
    assert sent["tools"][0]["input_schema"] == {"type": "object", "properties": {}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": 2}, "n"),
        ({"temperature": 1.5}, "temperature"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"seed": 3}, "seed"),
        ({"presence_penalty": 0.5}, "presence_penalty"),
        ({"frobnicate": True}, "frobnicate"),
        ({"store": True}, "store"),
        # Claude models since Sonnet 4.5 refuse both; one of them alone is fine
        ({"temperature": 0.5, "top_p": 0.9}, "top_p"),
        ({"top_k": "3"}, "top_k"),
        ({"thinking": "on"}, "thinking"),
        ({"safety_identifier": 5}, "safety_identifier"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, "messages"),
        (
            {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": ""}]},
            "messages",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {
                                "type": "image_url",
                                "image_url": {"url": "data:image/tiff;base64,AAAA"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [
                            {
                                "id": "a",
                                "type": "function",
                                "function": {"name": "f", "arguments": "{oops"},
                            }
                        ],
                    }
                ]
            },
            "messages[0].tool_calls[0].function.arguments",
        ),
    ],
)
async def test_what_anthropic_cannot_do_is_a_400_naming_it(
    gateway: Gateway, extra: dict[str, Any], param: str
) -> None:
    extra = dict(extra)
    messages = extra.pop("messages", [{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().chat.completions.create(
            model=MODEL, messages=messages, extra_body=extra
        )
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert gateway.anthropic.requests == []


async def test_recorded_upstream_errors(gateway: Gateway) -> None:
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "x"}]
    status, body = cassette("pydantic-ai_error-400-invalid-request.cassette.yaml")
    gateway.anthropic.next_json(status, body)
    with pytest.raises(openai.BadRequestError) as bad:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert "effort level" in bad.value.message
    assert bad.value.type == "invalid_request_error"

    status, body = cassette("pydantic-ai_error-404-not-found.cassette.yaml")
    gateway.anthropic.next_json(status, body)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert missing.value.code == "model_not_found"
    assert missing.value.type == "invalid_request_error"  # OpenAI's type, not not_found_error

    rate_limited = snapshot("sdk-http_stream-429-429-then-200.json")[0]["response"]
    gateway.anthropic.next_json(
        rate_limited["status_code"], rate_limited["body"], headers={"Retry-After": "3"}
    )
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert (limited.value.type, limited.value.code) == ("rate_limit_error", "rate_limit_exceeded")
    assert limited.value.response.headers["retry-after"] == "3"

    status, body = anthropic_error(
        413, "request_too_large", "Request exceeds the maximum allowed number of bytes."
    )
    gateway.anthropic.next_json(status, body)
    with pytest.raises(openai.APIStatusError) as too_large:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert too_large.value.status_code == 413
    assert too_large.value.type == "invalid_request_error"
    assert too_large.value.code == "request_too_large"
    assert "maximum allowed number of bytes" in too_large.value.message

    status, body = anthropic_error(529, "overloaded_error", "Overloaded")
    gateway.anthropic.next_json(status, body)
    with pytest.raises(openai.InternalServerError) as overloaded:
        await client.chat.completions.create(model=MODEL, messages=messages)
    assert overloaded.value.status_code == 503
    assert (overloaded.value.type, overloaded.value.code) == ("server_error", "service_unavailable")


async def test_sdk_retries_an_overloaded_anthropic(gateway: Gateway) -> None:
    status, body = anthropic_error(529, "overloaded_error", "Overloaded")
    gateway.anthropic.next_json(status, body, headers={"Retry-After": "0"})
    client = gateway.aclient(max_retries=1)
    answer = await client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}]
    )
    assert answer.choices[0].message.content
    assert len(gateway.anthropic.requests) == 2


async def test_error_event_mid_stream(gateway: Gateway) -> None:
    events = sse_events(fixture_bytes("anthropic/stream-text-basic.sse"))[:4]
    events.append(
        b'event: error\ndata: {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}\n\n'
    )
    gateway.anthropic.next_stream(events=events)
    stream = await gateway.aclient().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk)
    assert seen and seen[0].choices[0].delta.role == "assistant"
    assert (caught.value.type, caught.value.code) == ("server_error", "service_unavailable")
    assert "Overloaded" in caught.value.message


async def test_disconnect_mid_stream(gateway: Gateway) -> None:
    gateway.anthropic.next_stream("anthropic/stream-text-basic.sse", cut_after=5)
    stream = await gateway.aclient().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert (caught.value.type, caught.value.code) == ("server_error", "upstream_connection_lost")


async def test_stream_ending_without_message_stop_is_an_error(gateway: Gateway) -> None:
    events = sse_events(fixture_bytes("anthropic/stream-text-basic.sse"))[:-1]
    gateway.anthropic.next_stream(events=events)
    stream = await gateway.aclient().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert (caught.value.type, caught.value.code) == ("server_error", "upstream_stream_incomplete")


async def test_provider_key_goes_in_x_api_key(gateway: Gateway) -> None:
    from .conftest import CLIENT_KEY
    from .fakes.base import UPSTREAM_KEY

    await gateway.aclient().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}]
    )
    headers = gateway.anthropic.requests[-1].headers
    assert headers["x-api-key"] == UPSTREAM_KEY
    assert headers["anthropic-version"] == "2023-06-01"
    assert "Authorization" not in headers
    assert all(CLIENT_KEY not in v for v in headers.values())


@pytest.mark.parametrize(
    ("extra", "sent_keys"),
    [
        ({"top_p": 0.9}, {"top_p": 0.9}),
        ({"temperature": 0.3}, {"temperature": 0.3}),
        ({"temperature": 0.3, "top_p": 1}, {"temperature": 0.3}),
    ],
)
async def test_temperature_or_top_p(
    gateway: Gateway, extra: dict[str, Any], sent_keys: dict[str, Any]
) -> None:
    await gateway.aclient().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body=extra
    )
    sent = gateway.anthropic.requests[-1].body
    assert {k: sent[k] for k in ("temperature", "top_p") if k in sent} == sent_keys


async def test_safety_identifier_becomes_metadata_user_id(gateway: Gateway) -> None:
    await gateway.aclient().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "x"}],
        user="old-style",
        extra_body={"safety_identifier": "hashed-user-7"},
    )
    assert gateway.anthropic.requests[-1].body["metadata"] == {"user_id": "hashed-user-7"}


async def test_tool_ids_from_elsewhere_are_made_valid_for_anthropic(gateway: Gateway) -> None:
    # ids another provider or a client made may hold what Anthropic refuses in a tool_use id
    odd = "call:42/a+b=="
    messages: list[Any] = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": odd, "type": "function", "function": {"name": "f", "arguments": "{}"}},
                {
                    "id": "toolu_ok-1",
                    "type": "function",
                    "function": {"name": "g", "arguments": "{}"},
                },
            ],
        },
        {"role": "tool", "tool_call_id": odd, "content": "sunny"},
        {"role": "tool", "tool_call_id": "toolu_ok-1", "content": "warm"},
    ]
    await gateway.aclient().chat.completions.create(model=MODEL, messages=messages)
    assert gateway.anthropic.violations == []
    sent = gateway.anthropic.requests[-1].body["messages"]
    uses = [b["id"] for b in sent[1]["content"]]
    results = [b["tool_use_id"] for b in sent[2]["content"]]
    assert uses == results
    assert uses[1] == "toolu_ok-1"  # valid ids are kept as they are
    assert uses[0] != odd


# What the README's translator section lists as dropped for Anthropic: none of it may reach
# the upstream raw (the fake refuses unknown fields, as the API does).
APPROXIMATED = {
    "model": MODEL,
    "messages": [
        {"role": "system", "content": "Be brief.", "name": "policy"},
        {
            "role": "user",
            "name": "alice",
            "content": [
                {"type": "text", "text": "Look:"},
                {
                    "type": "image_url",
                    "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"},
                },
            ],
        },
        {
            "role": "assistant",
            "content": [{"type": "text", "text": "A cat."}, {"type": "refusal", "refusal": "x"}],
        },
        {"role": "user", "content": "Thanks"},
    ],
    "metadata": {"team": "blue"},
    "store": False,
    "stream_options": None,
    "presence_penalty": 0,
    "logprobs": False,
    "service_tier": "auto",
    "tools": [
        {
            "type": "function",
            "function": {"name": "f", "strict": True, "parameters": {"type": "object"}},
        }
    ],
}


async def test_fields_without_a_counterpart_are_not_forwarded(gateway: Gateway) -> None:
    await completion_of(gateway, copy.deepcopy(APPROXIMATED))
    assert gateway.anthropic.violations == []
    sent = gateway.anthropic.requests[-1].body
    assert "metadata" not in sent  # OpenAI's metadata is a tag map; Anthropic's has user_id only
    assert sent["messages"][0]["content"][1]["source"] == {
        "type": "url",
        "url": "https://example.com/cat.jpg",
    }
    assert sent["messages"][1]["content"] == "A cat."
    assert sent["tools"][0]["strict"] is True  # Anthropic has strict tools of its own
