"""What every fake upstream shares: a real aiohttp server, a log of what it received, and a queue
of behaviours a test sets up (each serves one request, in order).

Each provider's fake (``openai_upstream``, ``anthropic_upstream``, ``gemini_upstream``) adds
its routes, its authentication check, a check of every request body against the provider's
published schema (a violation is answered the way the provider would, with a 400, and kept
in ``violations`` so that tests can fail on it), and ``accumulate``: the non-stream response
equivalent to a recorded stream, so that one recording serves both modes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

FIXTURES = Path(__file__).parent.parent / "fixtures"
UPSTREAM_KEY = "sk-upstream-test-key"

Behaviour = Callable[[web.Request, dict[str, Any]], Awaitable[web.StreamResponse]]


def fixture_bytes(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sse_events(raw: bytes) -> list[bytes]:
    """A recorded stream cut into its events, each with its own separator."""
    sep = b"\r\n\r\n" if b"\r\n\r\n" in raw else b"\n\n"
    parts = raw.split(sep)
    events = [p + sep for p in parts[:-1]]
    if parts[-1].strip():
        events.append(parts[-1])
    return events


def event_data(event: bytes) -> bytes:
    """The data field of one recorded event (single data line, as every recording has)."""
    for line in event.replace(b"\r\n", b"\n").split(b"\n"):
        if line.startswith(b"data:"):
            return line[5:].strip()
    return b""


@dataclass
class Received:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]


class FakeUpstream:
    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.violations: list[str] = []
        self._queued: list[Behaviour] = []

    # --- provider specifics -------------------------------------------------------------------

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def auth_error(self, request: web.Request) -> web.Response | None:
        """The provider's answer to missing or wrong credentials, or None if they are right."""
        raise NotImplementedError

    def schema_errors(self, request: web.Request, body: dict[str, Any]) -> list[str]:
        return []

    def bad_request(self, message: str) -> web.Response:
        raise NotImplementedError

    def accumulate(self, raw_stream: bytes) -> dict[str, Any]:
        raise NotImplementedError

    def is_stream(self, request: web.Request, body: dict[str, Any]) -> bool:
        return body.get("stream") is True

    async def default(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        raise NotImplementedError

    # --- behaviours a test queues ---------------------------------------------------------------

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
        fixture: str | None = None,
        *,
        events: list[bytes] | None = None,
        gate: asyncio.Event | None = None,
        sent: asyncio.Event | None = None,
        cut_after: int | None = None,
        delay: float = 0.0,
    ) -> None:
        """Replay a recorded stream (or the given raw events) one event per write.

        `sent` is set after the first event is written; `gate`, if given, must be set before
        the last event is written; `cut_after` drops the connection after that many events,
        as a crashed upstream would.
        """

        async def reply(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
            chunks = events if events is not None else sse_events(fixture_bytes(fixture or ""))
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream; charset=utf-8"}
            )
            await response.prepare(request)
            for i, chunk in enumerate(chunks):
                if cut_after is not None and i == cut_after:
                    assert request.transport is not None
                    request.transport.close()
                    return response
                if gate is not None and i == len(chunks) - 1:
                    await gate.wait()
                if delay:
                    await asyncio.sleep(delay)
                await response.write(chunk)
                if sent is not None and i == 0:
                    sent.set()
            await response.write_eof()
            return response

        self._queued.append(reply)

    def next_recording(self, fixture: str) -> None:
        """Serve a recorded stream as a stream, or its accumulation to a stream-less request."""

        async def reply(request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
            if self.is_stream(request, body):
                self.next_stream(fixture)
                return await self._queued.pop()(request, body)
            return web.json_response(self.accumulate(fixture_bytes(fixture)))

        self._queued.append(reply)

    def next_hang(self) -> None:
        """Accept the request and never answer."""

        async def reply(request: web.Request, _: dict[str, Any]) -> web.StreamResponse:
            await asyncio.sleep(3600)
            raise AssertionError("unreachable")

        self._queued.append(reply)

    def next_behaviour(self, behaviour: Behaviour) -> None:
        self._queued.append(behaviour)

    # --- the server ---------------------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application()
        self.routes(app)
        return app

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(
            Received(request.path, dict(request.query), dict(request.headers), body)
        )
        denied = self.auth_error(request)
        if denied is not None:
            return denied
        problems = self.schema_errors(request, body)
        if problems:
            self.violations.extend(problems)
            return self.bad_request("; ".join(problems))
        if self._queued:
            return await self._queued.pop(0)(request, body)
        return await self.default(request, body)
