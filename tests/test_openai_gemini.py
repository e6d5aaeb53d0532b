"""OpenAI clients using Gemini models through the gateway, against Google's recorded traffic.

The fake speaks the Gemini API as recorded (fixtures/gemini/) and rejects requests that break
the proto-derived request schema; the recorded multi-turn request bodies of pydantic-ai's
cassettes are compared with what the gateway sends for the equivalent OpenAI conversation.
"""

from __future__ import annotations

import base64
import json
import re
import struct
from typing import Any

import openai
import pytest
from aiohttp import web

from gateway.tokens import count_tokens

from .conftest import Gateway, MakeGateway
from .fakes.base import fixture_bytes, sse_events
from .fakes.gemini_upstream import cassette_requests, google_error, recorded_error
from .streams import chunks_of, completion_of, deltas

FLASH = "google/gemini-flash"  # upstream gemini-2.0-flash
PRO = "google/gemini-pro"  # upstream gemini-3-pro-preview


def strip_ids(contents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Contents without functionCall/functionResponse ids (each client makes its own)."""
    out = json.loads(json.dumps(contents))
    for content in out:
        for part in content["parts"]:
            for key in ("functionCall", "functionResponse"):
                if key in part:
                    part[key].pop("id", None)
    return out


async def test_three_turn_tool_conversation_sends_the_recorded_contents(gateway: Gateway) -> None:
    recorded = cassette_requests("pydantic-ai_stream-tools-3-turns.cassette.yaml")
    for _, _, raw in recorded:
        gateway.gemini.next_stream(events=sse_events(raw))
    first_body = recorded[0][1]
    tools = [
        {
            "type": "function",
            "function": {
                "name": d["name"],
                "description": d["description"],
                "parameters": {
                    "type": "object",
                    "properties": {
                        k: {"type": v["type"].lower(), "description": v["description"]}
                        for k, v in d["parameters"]["properties"].items()
                    },
                    "required": d["parameters"]["required"],
                },
            },
        }
        for d in first_body["tools"][0]["functionDeclarations"]
    ]
    client = gateway.aclient()
    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful chatbot."},
        {"role": "user", "content": "What is the temperature of the capital of France?"},
    ]
    answers = {"get_capital": "Paris", "get_temperature": "30\u00b0C"}
    for turn in range(3):
        async with client.chat.completions.stream(
            model=FLASH, messages=messages, tools=tools
        ) as stream:
            final = await stream.get_final_completion()
        sent = gateway.gemini.requests[turn]
        assert sent.path == "/v1beta/models/gemini-2.0-flash:streamGenerateContent"
        assert sent.query == {"alt": "sse"}
        expected = recorded[turn][1]
        assert strip_ids(sent.body["contents"]) == strip_ids(expected["contents"])
        assert sent.body["systemInstruction"]["parts"] == expected["systemInstruction"]["parts"]
        names = [d["name"] for d in sent.body["tools"][0]["functionDeclarations"]]
        assert names == ["get_capital", "get_temperature"]
        # ids the gateway sent back are the ones it handed out
        for content in sent.body["contents"]:
            for part in content["parts"]:
                if "functionResponse" in part:
                    assert part["functionResponse"]["id"].startswith("call_")
        message = final.choices[0].message
        if turn == 2:
            assert final.choices[0].finish_reason == "stop"
            assert "Paris" in (message.content or "")
            break
        assert final.choices[0].finish_reason == "tool_calls"
        call = message.tool_calls[0]  # type: ignore[index]
        messages += [
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call.model_dump(exclude={"parsed_arguments"})],
            },
            {
                "role": "tool",
                "tool_call_id": call.id,
                "content": json.dumps({"return_value": answers[call.function.name]}),
            },
        ]


async def test_thought_signature_survives_the_round_trip(gateway: Gateway) -> None:
    recorded = cassette_requests("pydantic-ai_stream-function-call-roundtrip.cassette.yaml")
    for _, _, raw in recorded:
        gateway.gemini.next_stream(events=sse_events(raw))
    signature = json.loads(sse_events(recorded[0][2])[0].removeprefix(b"data: "))["candidates"][0][
        "content"
    ]["parts"][0]["thoughtSignature"]
    client = gateway.aclient()
    messages: list[Any] = [
        {"role": "user", "content": "What is the capital of the user country? Call the tool"}
    ]
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_country",
                "description": "",
                "parameters": {"additionalProperties": False, "properties": {}, "type": "object"},
            },
        }
    ]
    async with client.chat.completions.stream(model=PRO, messages=messages, tools=tools) as stream:
        first = await stream.get_final_completion()
    call = first.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert call.function.name == "get_country"
    assert json.loads(call.function.arguments) == {}
    messages += [
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [call.model_dump(exclude={"parsed_arguments"})],
        },
        {"role": "tool", "tool_call_id": call.id, "content": "Mexico"},
    ]
    async with client.chat.completions.stream(model=PRO, messages=messages, tools=tools) as stream:
        final = await stream.get_final_completion()
    sent = gateway.gemini.requests[1].body["contents"]
    model_turn = sent[1]
    assert model_turn["role"] == "model"
    assert model_turn["parts"][0]["thoughtSignature"] == signature
    assert model_turn["parts"][0]["functionCall"]["name"] == "get_country"
    assert sent[2]["parts"][0]["functionResponse"] == {
        "id": model_turn["parts"][0]["functionCall"]["id"],
        "name": "get_country",
        "response": {"result": "Mexico"},
    }
    assert strip_ids(sent)[0] == recorded[1][1]["contents"][0]
    assert "Mexico" in (final.choices[0].message.content or "")


async def test_basic_stream_gives_exact_chunks(gateway: Gateway) -> None:
    gateway.gemini.next_stream("gemini/firebase_googleai_streaming-success-basic-reply-short.sse")
    chunks = await chunks_of(
        gateway,
        {
            "model": FLASH,
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True},
        },
    )
    assert deltas(chunks) == [
        ("role", "assistant"),
        ("content", "The"),
        ("content", " capital of Wyoming"),
        ("content", " is **Cheyenne**.\n"),
        ("finish", "stop"),
        (
            "usage",
            {
                "prompt_tokens": 7,
                "completion_tokens": 10,
                "total_tokens": 17,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0},
            },
        ),
    ]
    assert {c["model"] for c in chunks} == {FLASH}


async def test_thinking_and_function_call_stream(gateway: Gateway) -> None:
    gateway.gemini.next_stream(
        "gemini/firebase_googleai_streaming-success-thinking-function-call.sse"
    )
    chunks = await chunks_of(
        gateway,
        {
            "model": FLASH,
            "messages": [{"role": "user", "content": "x"}],
            "stream_options": {"include_usage": True},
        },
    )
    kinds = deltas(chunks)
    assert kinds[0] == ("role", "assistant")
    assert kinds[1][0] == "reasoning" and kinds[1][1].startswith("**Calculating the Days**")
    tool = next(v for k, v in kinds if k == "tool")
    assert tool[0] == 0 and tool[2] == "now"
    assert "__" in tool[1]  # the thought signature rides in the id
    assert re.fullmatch(r"[A-Za-z0-9_-]+", tool[1])
    assert ("args", (0, "{}")) in kinds
    assert kinds[-2] == ("finish", "tool_calls")
    usage = kinds[-1][1]
    assert usage["completion_tokens_details"]["reasoning_tokens"] > 0
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


@pytest.mark.parametrize(
    ("fixture", "finish"),
    [
        ("gemini/firebase_googleai_streaming-failure-prompt-blocked-safety.sse", "content_filter"),
        ("gemini/firebase_googleai_streaming-failure-recitation-no-content.sse", "content_filter"),
    ],
)
async def test_blocked_streams_end_with_content_filter(
    gateway: Gateway, fixture: str, finish: str
) -> None:
    gateway.gemini.next_stream(fixture)
    chunks = await chunks_of(
        gateway, {"model": FLASH, "messages": [{"role": "user", "content": "x"}]}
    )
    assert deltas(chunks)[-1] == ("finish", finish)


@pytest.mark.parametrize(
    "fixture",
    [
        "gemini/firebase_googleai_streaming-success-basic-reply-short.sse",
        "gemini/firebase_googleai_streaming-success-thinking-function-call.sse",
        "gemini/stream-function-call-thought-signature.sse",
        "gemini/stream-text-after-function-response.sse",
        "gemini/stream-text-usage-mid-stream.sse",
    ],
)
async def test_streamed_and_whole_answers_agree(gateway: Gateway, fixture: str) -> None:
    gateway.gemini.next_recording(fixture)
    gateway.gemini.next_recording(fixture)
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "hello"}]
    whole = await client.chat.completions.create(model=FLASH, messages=messages)
    async with client.chat.completions.stream(
        model=FLASH, messages=messages, stream_options={"include_usage": True}
    ) as stream:
        streamed = await stream.get_final_completion()
    a, b = whole.choices[0], streamed.choices[0]
    assert a.finish_reason == b.finish_reason
    assert a.message.content == b.message.content
    # without Gemini's responseId the gateway makes fresh ids for each answer
    same_ids = b'"responseId"' in fixture_bytes(fixture)
    assert [
        (c.id if same_ids else "", c.function.name, c.function.arguments)
        for c in a.message.tool_calls or []
    ] == [
        (c.id if same_ids else "", c.function.name, c.function.arguments)
        for c in b.message.tool_calls or []
    ]
    assert whole.usage == streamed.usage
    assert (whole.id == streamed.id) == same_ids


async def test_parallel_function_calls_and_candidates(gateway: Gateway) -> None:
    gateway.gemini.next_json(
        200,
        fixture_bytes("gemini/firebase_vertexai_unary-success-function-call-parallel-calls.json"),
    )
    completion = await completion_of(
        gateway, {"model": FLASH, "messages": [{"role": "user", "content": "sums"}]}
    )
    calls = completion["choices"][0]["message"]["tool_calls"]
    assert [json.loads(c["function"]["arguments"]) for c in calls] == [
        {"y": 1, "x": 2},
        {"y": 3, "x": 4},
        {"y": 5, "x": 6},
    ]
    assert len({c["id"] for c in calls}) == 3
    assert completion["choices"][0]["finish_reason"] == "tool_calls"


async def test_n_asks_for_candidates(gateway: Gateway) -> None:
    two = {
        "candidates": [
            {
                "content": {"parts": [{"text": "A"}], "role": "model"},
                "finishReason": "STOP",
                "index": 0,
            },
            {
                "content": {"parts": [{"text": "B"}], "role": "model"},
                "finishReason": "MAX_TOKENS",
                "index": 1,
            },
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
    }
    gateway.gemini.next_json(200, two)
    result = await gateway.aclient().chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "x"}], n=2
    )
    assert [(c.index, c.message.content, c.finish_reason) for c in result.choices] == [
        (0, "A", "stop"),
        (1, "B", "length"),
    ]
    assert gateway.gemini.requests[-1].body["generationConfig"]["candidateCount"] == 2


async def test_request_translation(gateway: Gateway) -> None:
    await completion_of(
        gateway,
        {
            "model": FLASH,
            "messages": [
                {"role": "system", "content": "Be brief."},
                {"role": "developer", "content": "Use metric."},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "Look:"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="},
                        },
                        {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg"}},
                        {
                            "type": "input_audio",
                            "input_audio": {"data": "UklGRg==", "format": "wav"},
                        },
                    ],
                },
                {"role": "assistant", "content": "Nice."},
                {"role": "user", "content": "More"},
                {"role": "user", "content": "please"},
            ],
            "max_tokens": 64,
            "temperature": 1.5,
            "top_p": 0.5,
            "stop": ["END"],
            "seed": 7,
            "presence_penalty": 0.2,
            "frequency_penalty": 0.1,
            "reasoning_effort": "medium",
            "response_format": {
                "type": "json_schema",
                "json_schema": {"name": "n", "schema": {"type": "object"}},
            },
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "f",
                        "description": "d",
                        "parameters": {
                            "type": "object",
                            "properties": {"a": {"type": "string"}},
                            "additionalProperties": False,
                        },
                    },
                }
            ],
            "tool_choice": {"type": "function", "function": {"name": "f"}},
            "user": "someone",
        },
    )
    sent = gateway.gemini.requests[-1]
    assert sent.path == "/v1beta/models/gemini-2.0-flash:generateContent"
    body = sent.body
    assert body["systemInstruction"] == {"parts": [{"text": "Be brief."}, {"text": "Use metric."}]}
    assert body["contents"] == [
        {
            "role": "user",
            "parts": [
                {"text": "Look:"},
                {"inlineData": {"mimeType": "image/png", "data": "iVBORw0KGgo="}},
                {"fileData": {"fileUri": "https://example.com/cat.jpg", "mimeType": "image/jpeg"}},
                {"inlineData": {"mimeType": "audio/wav", "data": "UklGRg=="}},
            ],
        },
        {"role": "model", "parts": [{"text": "Nice."}]},
        {"role": "user", "parts": [{"text": "More"}, {"text": "please"}]},
    ]
    assert body["generationConfig"] == {
        "maxOutputTokens": 64,
        "temperature": 1.5,
        "topP": 0.5,
        "seed": 7,
        "presencePenalty": 0.2,
        "frequencyPenalty": 0.1,
        "stopSequences": ["END"],
        "responseMimeType": "application/json",
        "responseJsonSchema": {"type": "object"},
        "thinkingConfig": {"thinkingBudget": 8192},
    }
    assert body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "f",
                    "description": "d",
                    "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"a": {"type": "string"}},
                        "additionalProperties": False,
                    },
                }
            ]
        }
    ]
    assert body["toolConfig"] == {
        "functionCallingConfig": {"mode": "ANY", "allowedFunctionNames": ["f"]}
    }
    assert sent.headers["x-goog-api-key"]


async def test_json_mode(gateway: Gateway) -> None:
    await completion_of(
        gateway,
        {
            "model": FLASH,
            "messages": [{"role": "user", "content": "x"}],
            "response_format": {"type": "json_object"},
            "tool_choice": "none",
        },
    )
    body = gateway.gemini.requests[-1].body
    assert body["generationConfig"] == {"responseMimeType": "application/json"}
    assert body["toolConfig"] == {"functionCallingConfig": {"mode": "NONE"}}


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"logprobs": True}, "logprobs"),
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"top_k": 0}, "top_k"),
        ({"seed": "7"}, "seed"),
        ({"stop": ["a", "b", "c", "d", "e", "f"]}, "stop"),
        (
            {"messages": [{"role": "tool", "tool_call_id": "nope", "content": "x"}]},
            "messages[0].tool_call_id",
        ),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "Be brief."}]}, "messages"),
        (
            {"messages": [{"role": "developer", "content": "x"}, {"role": "user", "content": ""}]},
            "messages",
        ),
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "file", "file": {"file_id": "f"}}]}
                ]
            },
            "messages[0].content[0]",
        ),
    ],
)
async def test_what_gemini_cannot_do_is_a_400_naming_it(
    gateway: Gateway, extra: dict[str, Any], param: str
) -> None:
    extra = dict(extra)
    messages = extra.pop("messages", [{"role": "user", "content": "x"}])
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().chat.completions.create(
            model=FLASH, messages=messages, extra_body=extra
        )
    assert caught.value.param == param
    assert caught.value.type == "invalid_request_error"
    assert gateway.gemini.requests == []


async def test_recorded_errors(gateway: Gateway) -> None:
    client = gateway.aclient()
    messages: list[Any] = [{"role": "user", "content": "x"}]

    status, body = recorded_error("firebase_vertexai_unary-failure-quota-exceeded.json")
    gateway.gemini.next_json(status, body)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model=FLASH, messages=messages)
    assert (limited.value.type, limited.value.code) == ("rate_limit_error", "rate_limit_exceeded")
    assert "Quota exceeded" in limited.value.message

    status, body = recorded_error("pydantic-ai_error-404-model-not-found.cassette.yaml")
    gateway.gemini.next_json(status, body)
    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model=FLASH, messages=messages)
    assert (missing.value.type, missing.value.code) == ("invalid_request_error", "model_not_found")

    # Google answers a bad API key with 400 INVALID_ARGUMENT: that is the operator's key,
    # so the client must not see a 400 that blames its request
    status, body = recorded_error("firebase_googleai_unary-failure-api-key.json")
    gateway.gemini.next_json(status, body)
    with pytest.raises(openai.APIStatusError) as auth:
        await client.chat.completions.create(model=FLASH, messages=messages)
    assert auth.value.status_code == 502
    assert (auth.value.type, auth.value.code) == ("server_error", "upstream_auth_failed")

    status, body = google_error(503, "UNAVAILABLE", "The model is overloaded.")
    gateway.gemini.next_json(status, body)
    with pytest.raises(openai.InternalServerError) as unavailable:
        await client.chat.completions.create(model=FLASH, messages=messages)
    assert unavailable.value.status_code == 503
    assert (unavailable.value.type, unavailable.value.code) == (
        "server_error",
        "service_unavailable",
    )


async def test_retry_info_becomes_retry_after(gateway: Gateway) -> None:
    body = {
        "error": {
            "code": 429,
            "message": "slow down",
            "status": "RESOURCE_EXHAUSTED",
            "details": [{"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "17s"}],
        }
    }
    gateway.gemini.next_json(429, body)
    with pytest.raises(openai.RateLimitError) as caught:
        await gateway.aclient().chat.completions.create(
            model=FLASH, messages=[{"role": "user", "content": "x"}]
        )
    assert caught.value.response.headers["retry-after"] == "17"
    assert (caught.value.type, caught.value.code) == ("rate_limit_error", "rate_limit_exceeded")


async def test_error_inside_a_stream(gateway: Gateway) -> None:
    events = sse_events(
        fixture_bytes("gemini/firebase_googleai_streaming-success-basic-reply-short.sse")
    )[:1]
    events.append(
        b'data: {"error": {"code": 503, "message": "overloaded", "status": "UNAVAILABLE"}}\r\n\r\n'
    )
    gateway.gemini.next_stream(events=events)
    stream = await gateway.aclient().chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "x"}], stream=True
    )
    seen = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            seen.append(chunk)
    assert [c.choices[0].delta.content for c in seen] == ["", "The"]
    assert (caught.value.type, caught.value.code) == ("server_error", "service_unavailable")


async def test_stream_without_finish_reason_is_incomplete(gateway: Gateway) -> None:
    events = sse_events(
        fixture_bytes("gemini/firebase_googleai_streaming-success-basic-reply-short.sse")
    )[:2]
    gateway.gemini.next_stream(events=events)
    stream = await gateway.aclient().chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "x"}], stream=True
    )
    with pytest.raises(openai.APIError) as caught:
        async for _ in stream:
            pass
    assert (caught.value.type, caught.value.code) == ("server_error", "upstream_stream_incomplete")


async def test_embeddings(gateway: Gateway) -> None:
    client = gateway.aclient()
    result = await client.embeddings.create(
        model="google/embedding", input=["hello world", "bye"], dimensions=4
    )
    sent = gateway.gemini.requests[-1]
    assert sent.path == "/v1beta/models/gemini-embedding-001:batchEmbedContents"
    assert sent.body == {
        "requests": [
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "hello world"}]},
                "outputDimensionality": 4,
            },
            {
                "model": "models/gemini-embedding-001",
                "content": {"parts": [{"text": "bye"}]},
                "outputDimensionality": 4,
            },
        ]
    }
    # the SDK asks for base64 (float32) by default and decodes it
    assert result.data[0].embedding == pytest.approx([0.1, 0.11, 0.12, 0.13])
    assert result.data[1].embedding == pytest.approx([0.2, 0.21, 0.22, 0.23])
    assert result.model == "google/embedding"
    # Gemini reports no token counts for embeddings: the gateway counts them itself
    assert result.usage.prompt_tokens == count_tokens("hello world") + count_tokens("bye")

    raw = await client.embeddings.with_raw_response.create(
        model="google/embedding", input="one", encoding_format="base64"
    )
    vector = json.loads(raw.content)["data"][0]["embedding"]
    assert struct.unpack("<4f", base64.b64decode(vector)) == pytest.approx((0.1, 0.11, 0.12, 0.13))

    with pytest.raises(openai.BadRequestError) as caught:
        await client.embeddings.create(model="google/embedding", input=[[1, 2, 3]])
    assert caught.value.param == "input"


async def test_function_declarations_follow_the_v1beta_proto(gateway: Gateway) -> None:
    await completion_of(
        gateway,
        {
            "model": FLASH,
            "messages": [{"role": "user", "content": "x"}],
            "tools": [
                {
                    "type": "function",
                    "function": {
                        "name": "lookup",  # no description
                        "strict": True,
                        "parameters": {
                            "$schema": "http://json-schema.org/draft-07/schema#",
                            "type": "object",
                            "properties": {"q": {"type": "string"}},
                            "required": ["q"],
                            "additionalProperties": False,
                        },
                    },
                },
                {"type": "function", "function": {"name": "ping", "description": "Ping."}},
            ],
        },
    )
    # the fake checks the body against the proto field table: description is REQUIRED there
    assert gateway.gemini.violations == []
    assert gateway.gemini.requests[-1].body["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "lookup",
                    "description": "",  # what the recorded pydantic-ai request sends
                    "parametersJsonSchema": {
                        "type": "object",
                        "properties": {"q": {"type": "string"}},
                        "required": ["q"],
                        "additionalProperties": False,  # as in the spec's own example
                    },
                },
                {"name": "ping", "description": "Ping."},
            ]
        }
    ]


def _finish_reasons() -> list[str]:
    table = json.loads(fixture_bytes("gemini/generativelanguage-v1beta-fields.json"))
    return [v["name"] for v in table["types"]["Candidate.FinishReason"]["values"]]


FILTERED = {
    "SAFETY",
    "RECITATION",
    "BLOCKLIST",
    "PROHIBITED_CONTENT",
    "SPII",
    "IMAGE_SAFETY",
    "IMAGE_PROHIBITED_CONTENT",
    "IMAGE_RECITATION",
    "LANGUAGE",
}
FAILED_CALLS = {"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL"}


def _answer(reason: str, parts: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "candidates": [
            {"content": {"parts": parts, "role": "model"}, "finishReason": reason, "index": 0}
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1, "totalTokenCount": 4},
        "responseId": "r1",
    }


@pytest.mark.parametrize("reason", _finish_reasons())
@pytest.mark.parametrize("stream", [False, True])
async def test_every_finish_reason_of_the_proto(
    gateway: Gateway, reason: str, stream: bool
) -> None:
    answer = _answer(reason, [{"text": "Hi"}])
    if stream:
        gateway.gemini.next_stream(events=[b"data: " + json.dumps(answer).encode() + b"\r\n\r\n"])
    else:
        gateway.gemini.next_json(200, answer)
    client = gateway.aclient(max_retries=0)
    messages: list[Any] = [{"role": "user", "content": "x"}]
    if reason in FAILED_CALLS:
        with pytest.raises(openai.APIError) as caught:
            if stream:
                async for _ in await client.chat.completions.create(
                    model=FLASH, messages=messages, stream=True
                ):
                    pass
            else:
                await client.chat.completions.create(model=FLASH, messages=messages)
        assert (caught.value.type, caught.value.code) == (
            "server_error",
            "upstream_invalid_function_call",
        )
        assert reason in caught.value.message
        if not stream:
            assert isinstance(caught.value, openai.APIStatusError)
            assert caught.value.status_code == 502  # the SDKs retry it
        return
    expected = (
        "length" if reason == "MAX_TOKENS" else "content_filter" if reason in FILTERED else "stop"
    )
    if stream:
        kinds = deltas(await chunks_of(gateway, {"model": FLASH, "messages": messages}))
        assert kinds[1:] == [("content", "Hi"), ("finish", expected)]
    else:
        final = await client.chat.completions.create(model=FLASH, messages=messages)
        assert final.choices[0].finish_reason == expected
        assert final.choices[0].message.content == "Hi"


@pytest.mark.parametrize("reason", ["STOP", "MAX_TOKENS", "SAFETY"])
async def test_function_calls_with_each_finish_reason(gateway: Gateway, reason: str) -> None:
    gateway.gemini.next_json(200, _answer(reason, [{"functionCall": {"name": "f", "args": {}}}]))
    final = await gateway.aclient().chat.completions.create(
        model=FLASH, messages=[{"role": "user", "content": "x"}]
    )
    expected = {"STOP": "tool_calls", "MAX_TOKENS": "length", "SAFETY": "content_filter"}
    assert final.choices[0].finish_reason == expected[reason]


async def test_blocked_prompt_without_candidates_answers_content_filter(
    gateway: Gateway,
) -> None:
    fixture = "gemini/firebase_googleai_streaming-failure-prompt-blocked-safety.sse"
    gateway.gemini.next_recording(fixture)  # as a whole answer: promptFeedback, no candidates
    completion = await completion_of(
        gateway, {"model": FLASH, "messages": [{"role": "user", "content": "x"}]}
    )
    assert "candidates" not in gateway.gemini.accumulate(fixture_bytes(fixture))
    assert completion["choices"][0]["finish_reason"] == "content_filter"
    assert completion["choices"][0]["message"]["content"] == ""


async def test_fields_without_a_counterpart_are_not_forwarded(gateway: Gateway) -> None:
    """What the README's translator section lists as dropped for Gemini never reaches the
    upstream raw (the fake refuses fields outside the proto, as the API does)."""
    await completion_of(
        gateway,
        {
            "model": FLASH,
            "messages": [
                {"role": "system", "content": "Be brief.", "name": "policy"},
                {
                    "role": "user",
                    "name": "alice",
                    "content": [
                        {"type": "text", "text": "Look:"},
                        {
                            "type": "image_url",
                            "image_url": {"url": "data:image/png;base64,iVBO", "detail": "high"},
                        },
                    ],
                },
            ],
            "user": "u-1",
            "safety_identifier": "hashed-u-1",
            "metadata": {"team": "blue"},
            "tools": [
                {
                    "type": "function",
                    "function": {"name": "f", "strict": True, "parameters": {"type": "object"}},
                }
            ],
        },
    )
    assert gateway.gemini.violations == []
    body = gateway.gemini.requests[-1].body
    assert set(body) == {"contents", "systemInstruction", "tools"}
    assert body["contents"][0]["parts"][1] == {
        "inlineData": {"mimeType": "image/png", "data": "iVBO"}
    }
    assert body["tools"][0]["functionDeclarations"][0] == {
        "name": "f",
        "description": "",
        "parametersJsonSchema": {"type": "object"},
    }


async def echo_embeddings(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    """batchEmbedContents answered with one vector per input that names it: "text 7" -> [7, 0.5]."""
    texts = [r["content"]["parts"][0]["text"] for r in body["requests"]]
    vectors = [{"values": [float(t.split()[1]), 0.5]} for t in texts]
    return web.json_response({"embeddings": vectors})


async def test_embeddings_beyond_one_batch_are_sent_in_several(gateway: Gateway) -> None:
    inputs = [f"text {i}" for i in range(250)]
    for _ in range(3):
        gateway.gemini.next_behaviour(echo_embeddings)
    result = await gateway.aclient().embeddings.create(
        model="google/embedding", input=inputs, encoding_format="float"
    )
    # batchEmbedContents takes at most 100 requests (the fake refuses more)
    sent = [r.body["requests"] for r in gateway.gemini.requests]
    assert [len(batch) for batch in sent] == [100, 100, 50]
    assert [r["content"]["parts"][0]["text"] for batch in sent for r in batch] == inputs
    assert [d.index for d in result.data] == list(range(250))
    assert [d.embedding for d in result.data] == [[float(i), 0.5] for i in range(250)]
    tokens = sum(count_tokens(t) for t in inputs)
    assert (result.usage.prompt_tokens, result.usage.total_tokens) == (tokens, tokens)
    [record] = await gateway.records()
    assert (record.status, record.prompt_tokens) == (200, tokens)


async def test_a_failed_batch_fails_the_whole_request(gateway: Gateway) -> None:
    gateway.gemini.next_behaviour(echo_embeddings)
    status, body = google_error(503, "UNAVAILABLE", "The model is overloaded.")
    gateway.gemini.next_json(status, body)
    with pytest.raises(openai.APIStatusError) as caught:
        await gateway.aclient().embeddings.create(
            model="google/embedding", input=[f"text {i}" for i in range(250)]
        )
    assert caught.value.status_code == 503
    assert caught.value.body == {  # the error alone: no embeddings of the first batch
        "message": "The model is overloaded.",
        "type": "server_error",
        "param": None,
        "code": "service_unavailable",
    }
    assert len(gateway.gemini.requests) == 2  # the third batch is not sent
    [record] = await gateway.records()
    assert record.status == 503


async def test_a_failed_batch_is_retried_alone(make_gateway: MakeGateway) -> None:
    gateway = await make_gateway(server="request_timeout = 5\nretries = 1\nretry_backoff = 0.01")
    gateway.gemini.next_behaviour(echo_embeddings)
    status, body = google_error(503, "UNAVAILABLE", "The model is overloaded.")
    gateway.gemini.next_json(status, body)
    gateway.gemini.next_behaviour(echo_embeddings)
    inputs = [f"text {i}" for i in range(150)]
    result = await gateway.aclient().embeddings.create(
        model="google/embedding", input=inputs, encoding_format="float"
    )
    assert [d.embedding[0] for d in result.data] == [float(i) for i in range(150)]
    firsts = [r.body["requests"][0]["content"]["parts"][0]["text"] for r in gateway.gemini.requests]
    assert firsts == ["text 0", "text 100", "text 100"]


async def test_embeddings_take_at_most_2048_inputs(gateway: Gateway) -> None:
    inputs = [f"text {i}" for i in range(2049)]
    with pytest.raises(openai.BadRequestError) as caught:
        await gateway.aclient().embeddings.create(model="google/embedding", input=inputs)
    assert caught.value.param == "input"
    assert "at most 2048" in caught.value.message
    assert gateway.gemini.requests == []


@pytest.mark.parametrize(
    ("call_id", "gemini_id", "signature"),
    [
        ("call_abc__c2ln-_w", "call_abc", "c2ln+/w="),  # URL-safe, unpadded, as handed out now
        ("call_abc~c2ln+/w=", "call_abc", "c2ln+/w="),  # the '~' form handed out before
        ("call_plain", "call_plain", None),
    ],
)
async def test_tool_call_ids_give_back_gemini_id_and_signature(
    gateway: Gateway, call_id: str, gemini_id: str, signature: str | None
) -> None:
    await completion_of(
        gateway,
        {
            "model": FLASH,
            "messages": [
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": call_id,
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": call_id, "content": "done"},
            ],
        },
    )
    contents = gateway.gemini.requests[-1].body["contents"]
    part = contents[1]["parts"][0]
    assert part["functionCall"]["id"] == gemini_id
    assert part.get("thoughtSignature") == signature
    assert contents[2]["parts"][0]["functionResponse"]["id"] == gemini_id
