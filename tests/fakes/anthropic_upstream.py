"""A fake Anthropic Messages API replaying Anthropic's recorded wire format (fixtures/anthropic/).

``POST /v1/messages`` checks ``x-api-key`` and ``anthropic-version`` like the real API, checks
the body against the request schema (tests/schemas.py), and answers with recordings: the SDK's
HTTP snapshots for whole responses, the raw SSE captures for streams.
"""

from __future__ import annotations

import json
import re
from typing import Any

import yaml
from aiohttp import web

from ..schemas import anthropic_request_errors
from .base import UPSTREAM_KEY, FakeUpstream, event_data, fixture_bytes, sse_events


def snapshot(name: str) -> list[dict[str, Any]]:
    """The request/response pairs of one of Anthropic's SDK HTTP snapshots."""
    exchanges: list[dict[str, Any]] = json.loads(fixture_bytes(f"anthropic/{name}"))
    return exchanges


def cassette(name: str) -> tuple[int, bytes]:
    response = yaml.safe_load(fixture_bytes(f"anthropic/{name}"))["interactions"][0]["response"]
    return response["status"]["code"], json.dumps(response["parsed_body"]).encode()


def anthropic_error(status: int, type_: str, message: str) -> tuple[int, bytes]:
    body = {"type": "error", "error": {"type": type_, "message": message}, "request_id": "req_test"}
    return status, json.dumps(body).encode()


TOOL_ID = re.compile(r"[a-zA-Z0-9_-]+")


def tool_id_errors(body: dict[str, Any]) -> list[str]:
    """The pattern the real API enforces on tool ids, ^[a-zA-Z0-9_-]+$ (a 400 otherwise; the
    rule is not in specs/anthropic/messages.md), on tool_use blocks and their tool_results."""
    errors = []
    for i, message in enumerate(body.get("messages") or []):
        content = message.get("content") if isinstance(message, dict) else None
        for j, block in enumerate(content if isinstance(content, list) else []):
            key = {"tool_use": "id", "tool_result": "tool_use_id"}.get(block.get("type"))
            if key and not TOOL_ID.fullmatch(str(block.get(key))):
                errors.append(f"messages.{i}.content.{j}.{key}: must match ^[a-zA-Z0-9_-]+$")
    return errors


class FakeAnthropic(FakeUpstream):
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1/messages", self.handle)

    def auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("anthropic-version") != "2023-06-01":
            status, body = anthropic_error(
                400, "invalid_request_error", "anthropic-version: header is required"
            )
            return web.Response(status=status, body=body, content_type="application/json")
        if request.headers.get("x-api-key") != UPSTREAM_KEY:
            status, body = anthropic_error(401, "authentication_error", "invalid x-api-key")
            return web.Response(status=status, body=body, content_type="application/json")
        return None

    def schema_errors(self, request: web.Request, body: dict[str, Any]) -> list[str]:
        return anthropic_request_errors(body) + tool_id_errors(body)

    def bad_request(self, message: str) -> web.Response:
        status, body = anthropic_error(400, "invalid_request_error", message)
        return web.Response(status=status, body=body, content_type="application/json")

    def accumulate(self, raw_stream: bytes) -> dict[str, Any]:
        """The Message a recorded stream adds up to, as the non-stream API returns it."""
        message: dict[str, Any] = {}
        blocks: dict[int, dict[str, Any]] = {}
        partial: dict[int, str] = {}
        for event in sse_events(raw_stream):
            data = json.loads(event_data(event))
            kind = data["type"]
            if kind == "message_start":
                message = data["message"]
            elif kind == "content_block_start":
                blocks[data["index"]] = dict(data["content_block"])
            elif kind == "content_block_delta":
                block, delta = blocks[data["index"]], data["delta"]
                if delta["type"] == "text_delta":
                    block["text"] += delta["text"]
                elif delta["type"] == "input_json_delta":
                    partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
                elif delta["type"] == "thinking_delta":
                    block["thinking"] += delta["thinking"]
                elif delta["type"] == "signature_delta":
                    block["signature"] = delta["signature"]
            elif kind == "content_block_stop" and data["index"] in partial:
                blocks[data["index"]]["input"] = json.loads(partial[data["index"]] or "{}")
            elif kind == "message_delta":
                message.update(data["delta"])
                usage = {k: v for k, v in data["usage"].items() if v is not None}
                message["usage"] = {**message["usage"], **usage}
        message["content"] = [blocks[i] for i in sorted(blocks)]
        return message

    async def default(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        if body.get("stream"):
            self.next_stream("anthropic/stream-text-basic.sse")
            return await self._queued.pop()(request, body)
        return web.json_response(
            snapshot("sdk-http_nonstream-tool-use-roundtrip.json")[1]["response"]["body"]
        )
