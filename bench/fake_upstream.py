"""A fake upstream fast enough never to be the bottleneck: uvloop, a bare HTTP/1.1 protocol and
response bytes built once at start-up, so a request costs a few microseconds and no JSON.

Routes (any prefix before them is ignored, so one server serves every provider of the bench):

- ``.../chat/completions``: OpenAI ``chat.completion``, or ``chat.completion.chunk`` server-sent
  events when the body asks for ``"stream": true`` (a usage chunk if ``include_usage`` is set);
- ``.../messages``: Anthropic Messages API, non-stream;
- a path starting ``/slow/<ms>/`` waits that many milliseconds before each of the 20 chunks of
  a stream; the usage chunk and ``[DONE]`` follow the last at once, as OpenAI sends them.

Run it alone with ``python -m bench.fake_upstream --port 9000``.
"""

from __future__ import annotations

import argparse
import asyncio
import re
from typing import cast

import orjson

STREAM_CHUNKS = 20
MODEL = "gpt-bench"
ANSWER = "Hello! The benchmark upstream answers every request with this same short reply."

_STREAM = re.compile(rb'"stream"\s*:\s*true')
_INCLUDE_USAGE = re.compile(rb'"include_usage"\s*:\s*true')
_SLOW = re.compile(rb"^/slow/(\d+)/")


def _http(status: str, content_type: bytes, body: bytes) -> bytes:
    return (
        f"HTTP/1.1 {status}\r\n".encode()
        + b"Content-Type: "
        + content_type
        + b"\r\nContent-Length: "
        + str(len(body)).encode()
        + b"\r\n\r\n"
        + body
    )


def chat_completion() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench0000000000000000000000",
            "object": "chat.completion",
            "created": 1_700_000_000,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": ANSWER, "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": 25,
                "completion_tokens": 17,
                "total_tokens": 42,
                "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
            },
            "system_fingerprint": "fp_bench",
        }
    )


def anthropic_message() -> bytes:
    return orjson.dumps(
        {
            "id": "msg_bench000000000000000000",
            "type": "message",
            "role": "assistant",
            "model": "claude-bench",
            "content": [{"type": "text", "text": ANSWER}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": 25, "output_tokens": 17},
        }
    )


def stream_events(include_usage: bool) -> list[bytes]:
    """The SSE events of one stream, each already framed as one HTTP/1.1 chunk."""
    words = ANSWER.split(" ")
    events: list[dict[str, object]] = []
    for i in range(STREAM_CHUNKS):
        delta: dict[str, object] = {}
        if i == 0:
            delta["role"] = "assistant"
        if i < STREAM_CHUNKS - 1:
            delta["content"] = (" " if i else "") + words[i % len(words)]
        events.append(
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": None if i < STREAM_CHUNKS - 1 else "stop",
            }
        )
    base = {
        "id": "chatcmpl-bench0000000000000000000000",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": MODEL,
        "system_fingerprint": "fp_bench",
    }
    datas = [orjson.dumps({**base, "choices": [choice]}) for choice in events]
    if include_usage:
        usage = {"prompt_tokens": 25, "completion_tokens": STREAM_CHUNKS, "total_tokens": 45}
        datas.append(orjson.dumps({**base, "choices": [], "usage": usage}))
    datas.append(b"[DONE]")
    return [_chunk(b"data: " + d + b"\n\n") for d in datas] + [b"0\r\n\r\n"]


def _content_length(head: bytes) -> int:
    at = head.find(b"\r\ncontent-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at + 2)
    return int(head[at + 17 : end if end >= 0 else len(head)])


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


CHAT = _http("200 OK", b"application/json", chat_completion())
MESSAGE = _http("200 OK", b"application/json", anthropic_message())
NOT_FOUND = _http("404 Not Found", b"application/json", b'{"error":{"message":"no route"}}')
STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
    b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
)
STREAM = {False: stream_events(False), True: stream_events(True)}


class FakeUpstream(asyncio.Protocol):
    """One client connection: parse requests by Content-Length, answer with prebuilt bytes."""

    def __init__(self) -> None:
        self.buf = bytearray()
        self.need: int | None = None  # body length of the request being read
        self.path = b""
        self.busy: asyncio.Task[None] | None = None  # a slow stream being written
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if self.busy is not None:
            self.busy.cancel()

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.busy is None:
            self.process()

    def process(self) -> None:
        buf = self.buf
        while self.busy is None:
            if self.need is None:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    return
                head = bytes(buf[:end]).lower()
                del buf[: end + 4]
                self.path = head.split(b" ", 2)[1]
                self.need = _content_length(head)
            if len(buf) < self.need:
                return
            body = bytes(buf[: self.need])
            del buf[: self.need]
            self.need = None
            self.respond(body)

    def respond(self, body: bytes) -> None:
        assert self.transport is not None
        path = self.path
        if path.endswith(b"/chat/completions"):
            if not _STREAM.search(body):
                self.transport.write(CHAT)
                return
            events = STREAM[_INCLUDE_USAGE.search(body) is not None]
            slow = _SLOW.match(path)
            if slow and int(slow.group(1)):
                self.busy = asyncio.ensure_future(self.slow_stream(events, int(slow.group(1))))
                return
            self.transport.write(STREAM_HEAD)
            for event in events:
                self.transport.write(event)
        elif path.endswith(b"/messages"):
            self.transport.write(MESSAGE)
        else:
            self.transport.write(NOT_FOUND)

    async def slow_stream(self, events: list[bytes], delay_ms: int) -> None:
        assert self.transport is not None
        self.transport.write(STREAM_HEAD)
        for event in events[:STREAM_CHUNKS]:
            await asyncio.sleep(delay_ms / 1000)
            self.transport.write(event)
        self.transport.write(b"".join(events[STREAM_CHUNKS:]))  # usage, [DONE], the end
        self.busy = None
        self.process()


async def serve(host: str, port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(FakeUpstream, host, port, backlog=8192, reuse_address=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="fast fake OpenAI/Anthropic upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9000)
    ns = parser.parse_args()
    try:
        import uvloop

        uvloop.run(serve(ns.host, ns.port))
    except ImportError:  # pragma: no cover - uvloop is a dependency of the gateway
        asyncio.run(serve(ns.host, ns.port))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
