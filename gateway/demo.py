"""The built-in demo provider: answers in-process, in OpenAI's wire format, with no account.

It exists so that the shipped example config works on a fresh machine. It is an upstream like
any other (the request goes through auth, routing and the pass-through translator), only the
network is missing. Replies are deterministic: the same conversation gets the same answer, the
token counts are counted from the text, streams arrive word by word, ``max_tokens`` and ``stop``
are honoured; embeddings are unit vectors derived from the input; images are a small PNG of one
colour; speech is a WAV tone whose length follows the text.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import math
import struct
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson

from .config import ProviderConfig
from .schema.openai import JSONObject
from .tokens import count_tokens, split_tokens
from .translate.base import UpstreamCall
from .translate.sse import DONE, encode

# Pause between two streamed words, so that a terminal shows the stream as a stream.
WORD_DELAY = 0.01


class DemoResponse:
    def __init__(
        self,
        status: int,
        body: bytes | AsyncIterator[bytes],
        content_type: str = "application/json",
    ) -> None:
        self.status = status
        self.headers: Mapping[str, str] = {"Content-Type": content_type}
        self._body = body

    async def read(self) -> bytes:
        if isinstance(self._body, bytes):
            return self._body
        return b"".join([c async for c in self._body])

    async def chunks(self) -> AsyncIterator[bytes]:
        if isinstance(self._body, bytes):
            yield self._body
            return
        async for chunk in self._body:
            yield chunk

    def release(self) -> None:
        pass

    def abort(self) -> None:
        if not isinstance(self._body, bytes):
            self._body = _nothing()


class DemoUpstream:
    def __init__(self, provider: ProviderConfig) -> None:
        self.name = provider.name

    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send(self, call: UpstreamCall) -> DemoResponse:
        body: JSONObject = orjson.loads(call.body)
        if call.path == "/chat/completions":
            return _chat(body)
        if call.path == "/embeddings":
            return _embeddings(body)
        if call.path == "/images/generations":
            return _image(body)
        if call.path == "/audio/speech":
            return _speech(body)
        return _error(404, f"The demo provider has no {call.path} endpoint.")


async def _nothing() -> AsyncIterator[bytes]:
    return
    yield b""  # an empty async generator


def _error(status: int, message: str, param: str | None = None) -> DemoResponse:
    err = {"message": message, "type": "invalid_request_error", "param": param, "code": None}
    return DemoResponse(status, orjson.dumps({"error": err}))


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return ""


def _reply(messages: list[JSONObject]) -> str:
    last_user = next(
        (_text_of(m.get("content")) for m in reversed(messages) if m.get("role") == "user"), ""
    )
    said = " ".join(last_user.split())
    if len(said) > 200:
        said = said[:200] + "..."
    turns = sum(1 for m in messages if m.get("role") == "user")
    return (
        f'Hello from the gateway\'s demo provider. You said: "{said}". '
        f"This conversation has {turns} user message{'s' if turns != 1 else ''}; "
        "point the gateway at a real provider to get real answers."
    )


def _prompt_tokens(messages: list[JSONObject]) -> int:
    # 3 tokens of framing per message and 3 to prime the reply, as OpenAI's chat format has
    return 3 + sum(3 + count_tokens(_text_of(m.get("content"))) for m in messages)


def _chat(body: JSONObject) -> DemoResponse:
    messages: list[JSONObject] = body.get("messages") or []
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    stops = body.get("stop")
    stops = [stops] if isinstance(stops, str) else [s for s in stops or [] if isinstance(s, str)]
    text = _reply(messages)
    finish = "stop"
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    words = split_tokens(text)
    if isinstance(limit, int) and limit > 0:
        kept: list[str] = []
        used = 0
        for w in words:
            used += count_tokens(w)
            if used > limit:
                finish = "length"
                break
            kept.append(w)
        words = kept
        text = "".join(words)
    usage = {
        "prompt_tokens": _prompt_tokens(messages),
        "completion_tokens": count_tokens(text),
    }
    usage["total_tokens"] = usage["prompt_tokens"] + usage["completion_tokens"]
    digest = hashlib.sha256(orjson.dumps(messages)).hexdigest()[:24]
    base = {
        "id": f"chatcmpl-demo{digest}",
        "created": int(time.time()),
        "model": body.get("model", "demo"),
        "system_fingerprint": "fp_demo",
    }
    if body.get("stream") is not True:
        completion = {
            **base,
            "object": "chat.completion",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text, "refusal": None},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            ],
            "usage": usage,
        }
        return DemoResponse(200, orjson.dumps(completion))
    options = body.get("stream_options")
    include_usage = isinstance(options, dict) and options.get("include_usage") is True
    return DemoResponse(
        200, _stream(base, words, finish, usage, include_usage), "text/event-stream"
    )


async def _stream(
    base: JSONObject, words: list[str], finish: str, usage: JSONObject, include_usage: bool
) -> AsyncIterator[bytes]:
    def chunk(delta: JSONObject, finish_reason: str | None = None) -> bytes:
        c = {
            **base,
            "object": "chat.completion.chunk",
            "choices": [
                {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            ],
        }
        if include_usage:
            c["usage"] = None
        return encode(orjson.dumps(c))

    yield chunk({"role": "assistant", "content": "", "refusal": None})
    for w in words:
        await asyncio.sleep(WORD_DELAY)
        yield chunk({"content": w})
    yield chunk({}, finish)
    if include_usage:
        yield encode(
            orjson.dumps({**base, "object": "chat.completion.chunk", "choices": [], "usage": usage})
        )
    yield DONE


def _embeddings(body: JSONObject) -> DemoResponse:
    raw = body.get("input")
    inputs: list[Any] = (
        raw if isinstance(raw, list) and raw and not isinstance(raw[0], int) else [raw]
    )
    dims = body.get("dimensions")
    dims = dims if isinstance(dims, int) and 0 < dims <= 4096 else 16
    data = []
    tokens = 0
    for i, item in enumerate(inputs):
        text = item if isinstance(item, str) else orjson.dumps(item).decode()
        tokens += count_tokens(text) if isinstance(item, str) else len(item or [])
        vec = _unit_vector(text, dims)
        embedding: list[float] | str = vec
        if body.get("encoding_format") == "base64":
            embedding = base64.b64encode(struct.pack(f"<{dims}f", *vec)).decode()
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    return DemoResponse(
        200,
        orjson.dumps(
            {
                "object": "list",
                "data": data,
                "model": body.get("model", "demo"),
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
            }
        ),
    )


def _unit_vector(text: str, dims: int) -> list[float]:
    seed = hashlib.sha256(text.encode()).digest()
    raw: list[float] = []
    block = seed
    while len(raw) < dims:
        block = hashlib.sha256(block).digest()
        raw.extend((b - 127.5) / 127.5 for b in block)
    vec = raw[:dims]
    norm = math.sqrt(sum(v * v for v in vec)) or 1.0
    return [v / norm for v in vec]


def _image(body: JSONObject) -> DemoResponse:
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt:
        return _error(400, "prompt is required", "prompt")
    n = body.get("n")
    n = n if isinstance(n, int) else 1
    colour = hashlib.sha256(prompt.encode()).digest()[:3]
    png = base64.b64encode(_png(64, 64, colour)).decode()
    data = [{"b64_json": png, "revised_prompt": prompt} for _ in range(max(1, min(n, 4)))]
    return DemoResponse(200, orjson.dumps({"created": int(time.time()), "data": data}))


def _png(width: int, height: int, rgb: bytes) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    rows = b"".join(b"\x00" + rgb * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _speech(body: JSONObject) -> DemoResponse:
    text = body.get("input")
    if not isinstance(text, str) or not text:
        return _error(400, "input is required", "input")
    if body.get("response_format", "wav") not in ("wav", "pcm"):
        return _error(400, "The demo provider speaks only wav and pcm.", "response_format")
    return DemoResponse(200, _wav(text), "audio/wav")


async def _wav(text: str) -> AsyncIterator[bytes]:
    rate = 16000
    seconds = min(10.0, 0.06 * count_tokens(text) + 0.2)
    frames = int(rate * seconds)
    yield (
        b"RIFF"
        + struct.pack("<I", 36 + frames * 2)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16)
        + b"data"
        + struct.pack("<I", frames * 2)
    )
    step = rate // 10  # stream a tenth of a second at a time
    for start in range(0, frames, step):
        count = min(step, frames - start)
        samples = (
            int(6000 * math.sin(2 * math.pi * 440 * (start + i) / rate)) for i in range(count)
        )
        yield struct.pack(f"<{count}h", *samples)
        await asyncio.sleep(0)
