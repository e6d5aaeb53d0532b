"""A minimal keep-alive HTTP/1.1 client on asyncio's protocol API, cheap enough to load a server
from one core and precise about time: when the first body byte and the last one arrived.

It sends prebuilt request bytes and parses only what timing needs: the status, the body length
(``Content-Length`` or chunked) and, for streams, whether ``data: [DONE]`` went by.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import cast


@dataclass(slots=True)
class Reply:
    status: int
    first_byte: float  # seconds from send to the first body byte
    total: float  # seconds from send to the end of the body
    done: bool  # an SSE stream ended with data: [DONE]


def build_request(host: str, path: str, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [f"POST {path} HTTP/1.1", f"Host: {host}", f"Content-Length: {len(body)}"]
    lines += [f"{k}: {v}" for k, v in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


class Connection(asyncio.Protocol):
    """One connection; ``request()`` sends and waits for the whole response (no pipelining)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.closed = asyncio.get_running_loop().create_future()
        self.waiter: asyncio.Future[Reply] | None = None
        self._reset()

    def _reset(self) -> None:
        self.in_head = True
        self.status = 0
        self.remaining = 0  # body bytes left (length mode) or in the current chunk
        self.chunked = False
        self.chunk_state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailer
        self.sent = 0.0
        self.first = 0.0
        self.tail = b""  # the last bytes of the stream, to spot [DONE] across chunks
        self.done = False
        self.keep_alive = True

    @classmethod
    async def open(cls, host: str, port: int) -> Connection:
        loop = asyncio.get_running_loop()
        _, protocol = await loop.create_connection(cls, host, port)
        return protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(exc or ConnectionResetError("connection closed"))

    @property
    def usable(self) -> bool:
        return self.keep_alive and not self.closed.done()

    @property
    def streaming(self) -> bool:
        """A response body is arriving and has not ended yet."""
        return self.first > 0 and self.waiter is not None and not self.waiter.done()

    async def request(self, raw: bytes) -> Reply:
        assert self.transport is not None and self.waiter is None
        self._reset()
        self.waiter = asyncio.get_running_loop().create_future()
        self.sent = time.perf_counter()
        self.transport.write(raw)
        try:
            return await self.waiter
        finally:
            self.waiter = None

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.in_head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            self._head(bytes(buf[:end]).lower())
            del buf[: end + 4]
        if self.chunked:
            self._chunks()
            return
        if buf and not self.first:
            self.first = time.perf_counter()
        if len(buf) >= self.remaining:
            del buf[: self.remaining]
            self._finish()

    def _head(self, head: bytes) -> None:
        self.in_head = False
        self.status = int(head[9:12])
        self.keep_alive = b"\r\nconnection: close" not in head
        self.chunked = b"\r\ntransfer-encoding: chunked" in head
        at = head.find(b"\r\ncontent-length:")
        if at >= 0:
            end = head.find(b"\r\n", at + 2)
            self.remaining = int(head[at + 17 : end if end >= 0 else len(head)])

    def _chunks(self) -> None:
        buf = self.buf
        while buf:
            if self.chunk_state == 0 or self.chunk_state == 3:
                end = buf.find(b"\r\n")
                if end < 0:
                    return
                line = bytes(buf[:end])
                del buf[: end + 2]
                if self.chunk_state == 3:
                    if not line:
                        self._finish()
                        return
                    continue
                self.remaining = int(line.split(b";", 1)[0], 16)
                self.chunk_state = 1 if self.remaining else 3
            elif self.chunk_state == 1:
                if not self.first:
                    self.first = time.perf_counter()
                data = bytes(buf[: self.remaining])
                del buf[: self.remaining]
                self.remaining -= len(data)
                seen = self.tail + data
                if b"data: [DONE]" in seen:
                    self.done = True
                self.tail = seen[-16:]
                if self.remaining == 0:
                    self.chunk_state = 2
            else:
                if len(buf) < 2:
                    return
                del buf[:2]
                self.chunk_state = 0

    def _finish(self) -> None:
        now = time.perf_counter()
        self.in_head = True
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            first = (self.first or now) - self.sent
            waiter.set_result(Reply(self.status, first, now - self.sent, self.done))
        if not self.keep_alive:
            self.close()
