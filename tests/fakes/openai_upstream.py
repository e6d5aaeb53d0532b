"""A fake OpenAI-compatible upstream replaying OpenAI's recorded wire format (fixtures/openai/).

Requests are checked against the official OpenAPI document; chat requests without a queued
behaviour get the first recorded completion, or a recorded stream.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
from typing import Any

import yaml
from aiohttp import web

from ..schemas import openai_errors
from .base import UPSTREAM_KEY, FakeUpstream, event_data, fixture_bytes, sse_events

__all__ = ["UPSTREAM_KEY", "FakeOpenAI", "cassette_error", "recorded_completions"]

SCHEMA_OF_PATH = {
    "/v1/chat/completions": "CreateChatCompletionRequest",
    "/v1/embeddings": "CreateEmbeddingRequest",
    "/v1/images/generations": "CreateImageRequest",
    "/v1/audio/speech": "CreateSpeechRequest",
}


def recorded_completions() -> list[dict[str, Any]]:
    data = json.loads(fixture_bytes("openai/chat-nonstream-responses.json"))
    return [r["response"] for r in data["recordings"]]


def cassette_error(name: str) -> tuple[int, bytes]:
    """The status and JSON body of a recorded error response (a VCR cassette)."""
    interaction = yaml.safe_load(fixture_bytes(name))["interactions"][0]["response"]
    return interaction["status"]["code"], json.dumps(interaction["parsed_body"]).encode()


class FakeOpenAI(FakeUpstream):
    def routes(self, app: web.Application) -> None:
        for path, schema in SCHEMA_OF_PATH.items():
            app.router.add_post(path, self.handle)
            # the first check in a process loads the spec (~0.8 s) and blocks the loop the
            # gateway shares in tests: do it now, not inside a test's timeouts
            openai_errors(schema, {})

    def auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("Authorization") == f"Bearer {UPSTREAM_KEY}":
            return None
        error = {
            "message": "Incorrect API key provided: sk-****.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
        return web.json_response({"error": error}, status=401)

    def schema_errors(self, request: web.Request, body: dict[str, Any]) -> list[str]:
        return openai_errors(SCHEMA_OF_PATH[request.path], body)

    def bad_request(self, message: str) -> web.Response:
        error = {"message": message, "type": "invalid_request_error", "param": None, "code": None}
        return web.json_response({"error": error}, status=400)

    def accumulate(self, raw_stream: bytes) -> dict[str, Any]:
        """The chat.completion equivalent to a recorded chunk stream."""
        choices: dict[int, dict[str, Any]] = {}
        head: dict[str, Any] = {}
        usage = None
        for event in sse_events(raw_stream):
            data = event_data(event)
            if data == b"[DONE]":
                continue
            chunk = json.loads(data)
            head = head or chunk
            usage = chunk.get("usage") or usage
            for c in chunk["choices"]:
                choice = choices.setdefault(
                    c["index"],
                    {
                        "index": c["index"],
                        "message": {"role": "assistant", "content": None},
                        "logprobs": None,
                        "finish_reason": None,
                    },
                )
                message = choice["message"]
                delta = c["delta"]
                if delta.get("content"):
                    message["content"] = (message["content"] or "") + delta["content"]
                for call in delta.get("tool_calls") or []:
                    calls = message.setdefault("tool_calls", [])
                    if call["index"] >= len(calls):
                        calls.append(
                            {
                                "id": call["id"],
                                "type": "function",
                                "function": {"name": call["function"]["name"], "arguments": ""},
                            }
                        )
                    calls[call["index"]]["function"]["arguments"] += call["function"].get(
                        "arguments", ""
                    )
                if c.get("finish_reason"):
                    choice["finish_reason"] = c["finish_reason"]
        out = {
            "id": head["id"],
            "object": "chat.completion",
            "created": head["created"],
            "model": head["model"],
            "choices": [choices[i] for i in sorted(choices)],
        }
        if usage:
            out["usage"] = usage
        return out

    async def default(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            if body.get("stream"):
                self.next_stream("openai/chat-stream-include-usage-text-after-tool.sse")
                return await self._queued.pop()(request, body)
            return web.json_response(recorded_completions()[0])
        if request.path == "/v1/embeddings":
            return web.json_response(_embeddings(body))
        if request.path == "/v1/images/generations":
            data = [{"b64_json": "aGVsbG8=", "revised_prompt": body["prompt"]}]
            return web.json_response({"created": int(time.time()), "data": data})
        return await _speech(request)


def _embeddings(body: dict[str, Any]) -> dict[str, Any]:
    inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
    data = []
    for i, text in enumerate(inputs):
        digest = hashlib.sha256(str(text).encode()).digest()
        data.append({"object": "embedding", "index": i, "embedding": [b / 255 for b in digest[:8]]})
    tokens = sum(len(str(t).split()) for t in inputs)
    return {
        "object": "list",
        "data": data,
        "model": body["model"],
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }


SPEECH_CHUNKS = [b"ID3" + bytes(61), struct.pack(">64H", *range(64)), b"\xff\xfb" + bytes(126)]


async def _speech(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await response.prepare(request)
    for chunk in SPEECH_CHUNKS:
        await response.write(chunk)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response
