"""A fake OpenAI-compatible upstream: a real aiohttp server replaying OpenAI's recorded wire format.

Responses come from ``tests/fixtures/openai/`` (real API recordings) unless a test queues a
different behaviour with one of the ``FakeOpenAI.next_*`` methods. Every request is kept in
``requests`` so that tests can check what the gateway sent.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import struct
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from aiohttp import web

FIXTURES = Path(__file__).parent.parent / "fixtures"
UPSTREAM_KEY = "sk-upstream-test-key"

Behaviour = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def recorded_completions() -> list[dict[str, Any]]:
    data = json.loads(fixture_bytes("openai/chat-nonstream-responses.json"))
    return [r["response"] for r in data["recordings"]]


def cassette_error(name: str) -> tuple[int, bytes]:
    """The status and JSON body of a recorded error response (a VCR cassette)."""
    interaction = yaml.safe_load(fixture_bytes(name))["interactions"][0]["response"]
    return interaction["status"]["code"], json.dumps(interaction["parsed_body"]).encode()


def sse_events(raw: bytes) -> list[bytes]:
    """A recorded stream cut into its events, each with its own separator."""
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
    parts = raw.split(sep)
    events = [p + sep for p in parts[:-1]]
    if parts[-1]:
        events.append(parts[-1])
    return events


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]


class FakeOpenAI:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self._queued: list[Behaviour] = []
        self.connections_closed = 0

    # --- behaviours a test can queue (each used by one request, in order) ---

    def next_json(
        self, status: int, body: bytes | dict[str, Any], headers: dict[str, str] | None = None
    ) -> None:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()

        async def reply(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
            return web.Response(
                status=status, body=raw, content_type="application/json", headers=headers
            )

        self._queued.append(reply)

    def next_stream(
        self,
        fixture: str,
        *,
        gate: asyncio.Event | None = None,
        sent: asyncio.Event | None = None,
        cut_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """Replay a recorded stream one event per write.

        `sent` is set after the first event is written; `gate`, if given, must be set
        before the last event is written; `cut_after` drops the connection after that many
        events, as a crashed upstream would.
        """

        async def reply(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
            events = sse_events(fixture_bytes(fixture))
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream; charset=utf-8"}
            )
            await response.prepare(request)
            for i, event in enumerate(events):
                if cut_after is not None and i == cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if gate is not None and i == len(events) - 1:
                    await gate.wait()
                if delay:
                    await asyncio.sleep(delay)
                await response.write(event)
                if sent is not None and i == 0:
                    sent.set()
            await response.write_eof()
            return response

        self._queued.append(reply)

    def next_hang(self) -> None:
        """Accept the request and never answer."""

        async def reply(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        self._queued.append(reply)

    def next_behaviour(self, behaviour: Behaviour) -> None:
        self._queued.append(behaviour)

    # --- the server ---

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        app.router.add_post("/v1/embeddings", self._handle)
        app.router.add_post("/v1/images/generations", self._handle)
        app.router.add_post("/v1/audio/speech", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Received(request.path, dict(request.headers), body))
        if request.headers.get("Authorization") != f"Bearer {UPSTREAM_KEY}":
            return web.json_response(
                {
                    "error": {
                        "message": "Incorrect API key provided: sk-****.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
                status=401,
            )
        if self._queued:
            return await self._queued.pop(0)(request, body)
        if request.path.endswith("/chat/completions"):
            return await self._chat(request, body)
        if request.path.endswith("/embeddings"):
            return web.json_response(_embeddings(body))
        if request.path.endswith("/images/generations"):
            return web.json_response(
                {
                    "created": int(time.time()),
                    "data": [{"b64_json": "aGVsbG8=", "revised_prompt": body["prompt"]}],
                }
            )
        return await _speech(request, body)

    async def _chat(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if body.get("stream"):
            self.next_stream("openai/chat-stream-include-usage-text-after-tool.sse")
            return await self._queued.pop(0)(request, body)
        return web.json_response(recorded_completions()[0])


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


async def _speech(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "audio/mpeg"})
    await response.prepare(request)
    for chunk in SPEECH_CHUNKS:
        await response.write(chunk)
        await asyncio.sleep(0.01)
    await response.write_eof()
    return response
