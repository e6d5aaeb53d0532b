"""A fake Gemini Developer API replaying Google's recorded wire format (fixtures/gemini/).

``POST /v1beta/models/{model}:generateContent``, ``:streamGenerateContent?alt=sse`` and
``:batchEmbedContents``; the API key must come in ``x-goog-api-key``; generateContent bodies are
checked against the proto-derived field table (tests/schemas.py).
"""

from __future__ import annotations

import json
from typing import Any

import yaml
from aiohttp import web

from ..schemas import gemini_errors
from .base import UPSTREAM_KEY, FakeUpstream, event_data, fixture_bytes, sse_events


def google_error(status: int, rpc_status: str, message: str) -> tuple[int, bytes]:
    body = {"error": {"code": status, "message": message, "status": rpc_status}}
    return status, json.dumps(body).encode()


def recorded_error(name: str) -> tuple[int, bytes]:
    raw = fixture_bytes(f"gemini/{name}")
    if name.endswith(".yaml"):
        response = yaml.safe_load(raw)["interactions"][0]["response"]
        return response["status"]["code"], json.dumps(response["parsed_body"]).encode()
    return json.loads(raw)["error"]["code"], raw


def cassette_requests(name: str) -> list[tuple[str, dict[str, Any], bytes]]:
    """(uri, request body, raw SSE response) of each interaction of a recorded cassette."""
    interactions = yaml.safe_load(fixture_bytes(f"gemini/{name}"))["interactions"]
    return [
        (i["request"]["uri"], i["request"]["parsed_body"], i["response"]["body"]["string"].encode())
        for i in interactions
    ]


class FakeGemini(FakeUpstream):
    def routes(self, app: web.Application) -> None:
        app.router.add_post("/v1beta/models/{target}", self.handle)

    def auth_error(self, request: web.Request) -> web.Response | None:
        if request.headers.get("x-goog-api-key") == UPSTREAM_KEY:
            return None
        status, body = recorded_error("firebase_googleai_unary-failure-api-key.json")
        return web.Response(status=status, body=body, content_type="application/json")

    def is_stream(self, request: web.Request, body: dict[str, Any]) -> bool:
        return request.match_info["target"].endswith(":streamGenerateContent")

    def schema_errors(self, request: web.Request, body: dict[str, Any]) -> list[str]:
        target = request.match_info["target"]
        model, _, method = target.partition(":")
        if method == "batchEmbedContents":
            errors = []
            if len(body.get("requests", [])) > 100:
                errors.append("at most 100 requests can be in one batch")
            for i, item in enumerate(body.get("requests", [])):
                if set(item) - {"model", "content", "taskType", "title", "outputDimensionality"}:
                    errors.append(f"requests[{i}]: unknown fields")
                if item.get("model") != f"models/{model}":
                    errors.append(f"requests[{i}].model must be models/{model}")
                errors.extend(
                    gemini_errors("Content", item.get("content"), f"requests[{i}].content")
                )
            return errors
        if method not in ("generateContent", "streamGenerateContent"):
            return [f"unknown method {method}"]
        if method == "streamGenerateContent" and request.query.get("alt") != "sse":
            return ["streamGenerateContent without alt=sse answers a JSON array, not SSE"]
        errors = gemini_errors("GenerateContentRequest", body)
        for i, content in enumerate(body.get("contents", [])):
            if content.get("role") not in ("user", "model"):
                errors.append(f"contents[{i}].role must be user or model")
            if not content.get("parts"):
                errors.append(f"contents[{i}].parts must not be empty")
        return errors

    def bad_request(self, message: str) -> web.Response:
        status, body = google_error(400, "INVALID_ARGUMENT", message)
        return web.Response(status=status, body=body, content_type="application/json")

    def accumulate(self, raw_stream: bytes) -> dict[str, Any]:
        """The GenerateContentResponse a recorded stream adds up to."""
        out: dict[str, Any] = {}
        candidates: dict[int, dict[str, Any]] = {}
        for event in sse_events(raw_stream):
            data = json.loads(event_data(event))
            for key in ("usageMetadata", "modelVersion", "responseId", "promptFeedback"):
                if key in data:
                    out[key] = data[key]
            for c in data.get("candidates", []):
                index = c.get("index", 0)
                merged = candidates.setdefault(index, {"content": {"parts": [], "role": "model"}})
                parts = merged["content"]["parts"]
                for part in c.get("content", {}).get("parts", []):
                    last = parts[-1] if parts else None
                    if (
                        "text" in part
                        and last is not None
                        and "text" in last
                        and bool(last.get("thought")) == bool(part.get("thought"))
                    ):
                        last["text"] += part["text"]
                    else:
                        parts.append(dict(part))
                for key, value in c.items():
                    if key != "content":
                        merged[key] = value
        if candidates:
            out["candidates"] = [candidates[i] for i in sorted(candidates)]
        return out

    async def default(self, request: web.Request, body: dict[str, Any]) -> web.StreamResponse:
        method = request.match_info["target"].partition(":")[2]
        if method == "batchEmbedContents":
            return web.json_response(
                {
                    "embeddings": [
                        {"values": [round(0.1 * (i + 1) + 0.01 * k, 4) for k in range(4)]}
                        for i in range(len(body["requests"]))
                    ]
                }
            )
        if method == "streamGenerateContent":
            self.next_stream("gemini/firebase_googleai_streaming-success-basic-reply-short.sse")
            return await self._queued.pop()(request, body)
        return web.Response(
            body=fixture_bytes("gemini/firebase_googleai_unary-success-basic-reply-short.json"),
            content_type="application/json",
        )
