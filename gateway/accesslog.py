"""The access log: one JSON line per request on stderr (where journald keeps it).

Lines are built on the request path but written by a background task in batches, so that a
slow stderr (a full pipe to journald) never blocks the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import orjson
from aiohttp import web

FLUSH_INTERVAL = 0.2
MAX_BUFFERED = 10_000  # lines; past it the oldest are dropped and counted


class AccessLog:
    def __init__(self, fd: int | None = None, *, enabled: bool = True, text: bool = False) -> None:
        self._fd = sys.stderr.fileno() if fd is None else fd
        self.enabled = enabled
        self._text = text
        self._lines: list[bytes] = []
        self.dropped = 0
        self._task: asyncio.Task[None] | None = None
        self._second = -1
        self._second_text = ""

    def timestamp(self, ts: float) -> str:
        """ISO 8601 UTC with milliseconds; the date and time are formatted once a second."""
        whole = int(ts)
        if whole != self._second:
            self._second = whole
            self._second_text = datetime.fromtimestamp(whole, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self._second_text}.{int((ts - whole) * 1000):03d}Z"

    def write(self, entry: dict[str, object]) -> None:
        if len(self._lines) >= MAX_BUFFERED:
            self._lines.pop(0)
            self.dropped += 1
        self._lines.append(_text_line(entry) if self._text else orjson.dumps(entry) + b"\n")

    async def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        self._flush_now()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            if self._lines:
                data, self._lines = b"".join(self._lines), []
                await loop.run_in_executor(None, self._write_all, data)

    def _flush_now(self) -> None:
        if self._lines:
            data, self._lines = b"".join(self._lines), []
            self._write_all(data)

    def _write_all(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self._fd, view)
                view = view[written:]
        except OSError:
            self.dropped += 1  # stderr is gone; nothing else can be done with the line


def _text_line(entry: dict[str, object]) -> bytes:
    """The entry for human eyes: time, status, method, path, then key=value pairs. A value a
    client chose (the path is URL-decoded) is quoted when it holds a space or a control
    character, so that no request can forge a second line or a field."""
    head = " ".join(_plain(entry.get(k)) for k in ("ts", "status", "method", "path"))
    rest = " ".join(
        f"{k}={_plain(v)}"
        for k, v in entry.items()
        if k not in ("ts", "status", "method", "path") and v is not None
    )
    return f"{head} {rest}\n".encode()


def _plain(value: object) -> str:
    text = str(value)
    if text.isprintable() and " " not in text and '"' not in text:
        return text
    return orjson.dumps(text).decode()


ACCESS_LOG = web.AppKey("access_log", AccessLog)


async def access_log_ctx(app: web.Application) -> AsyncIterator[None]:
    log = app[ACCESS_LOG]
    await log.start()
    yield
    await log.close()
