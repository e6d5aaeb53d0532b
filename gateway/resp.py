"""A minimal Redis client: one pipelined connection speaking RESP2, for the cluster limiter.

The gateway needs four commands (AUTH, SELECT, EVALSHA, SCRIPT LOAD) on the request path, so a
general client library is more than it needs and costs far more per call (redis-py's asyncio
client measured ~200 us of CPU per EVALSHA here; this one ~15 us). Commands are written as
they come and replies are matched to them in order, which pipelines concurrent requests on one
connection for free.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import ssl
from urllib.parse import parse_qs, unquote, urlsplit

Reply = int | bytes | None | list["Reply"]


class RedisError(Exception):
    """A Redis error reply, or a connection that could not be used."""


class RedisConnection:
    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 6379
        # rediss://: TLS, verified against the system's CAs unless ?ssl_cert_reqs=none
        self.ssl: ssl.SSLContext | None = None
        if parts.scheme == "rediss":
            self.ssl = ssl.create_default_context()
            reqs = parse_qs(parts.query).get("ssl_cert_reqs", ["required"])[-1]
            if reqs == "none":
                self.ssl.check_hostname = False
                self.ssl.verify_mode = ssl.CERT_NONE
            elif reqs != "required":
                raise ValueError(f"ssl_cert_reqs: expected none or required, got {reqs!r}")
        self.password = unquote(parts.password) if parts.password else None
        self.username = unquote(parts.username) if parts.username else None
        path = parts.path.strip("/")
        self.db = int(path) if path else 0
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: collections.deque[asyncio.Future[Reply]] = collections.deque()
        self._connecting: asyncio.Lock | None = None
        self._outbox: list[bytes] = []  # commands written together at the end of the loop turn

    @property
    def connected(self) -> bool:
        return self._writer is not None and not self._writer.is_closing()

    async def connect(self) -> None:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self.connected:
                return
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.ssl)
            self._writer = writer
            self._reader_task = asyncio.ensure_future(self._read(reader))
            try:
                if self.password is not None:
                    auth = (self.username, self.password) if self.username else (self.password,)
                    await self.call("AUTH", *auth)
                if self.db:
                    await self.call("SELECT", self.db)
            except BaseException:  # (a timeout too) never keep a half-set-up connection:
                self.reset()  # unauthenticated, or on database 0 while the fleet uses another
                raise

    async def call(self, *args: object) -> Reply:
        """Send one command and wait for its reply (an error reply raises RedisError)."""
        if not self.connected:
            await self.connect()
        writer = self._writer
        assert writer is not None
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Reply] = loop.create_future()
        self._waiting.append(future)
        if not self._outbox:
            loop.call_soon(self._flush, writer)
        self._outbox.append(encode(args))
        return await future

    def _flush(self, writer: asyncio.StreamWriter) -> None:
        # the commands of one loop turn go out in one write (one system call)
        data, self._outbox = b"".join(self._outbox), []
        if not writer.is_closing():
            writer.write(data)

    def reset(self) -> None:
        """Drop the connection; the next call connects again, calls waiting now fail."""
        writer, self._writer = self._writer, None
        if writer is not None:
            writer.close()
        if self._reader_task is not None:
            self._reader_task.cancel()
            self._reader_task = None
        self._fail_all(RedisError("connection closed"))

    async def close(self) -> None:
        self.reset()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        buffer = bytearray()
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    raise RedisError("Redis closed the connection")
                buffer += data
                while buffer:
                    parsed = parse(buffer, 0)
                    if parsed is None:
                        break  # an incomplete reply: read more
                    reply, end = parsed
                    del buffer[:end]
                    future = self._waiting.popleft()
                    if future.done():  # its caller gave up (a timeout)
                        continue
                    if isinstance(reply, RedisError):
                        future.set_exception(reply)
                    else:
                        future.set_result(reply)
        except (OSError, RedisError, IndexError, ValueError) as e:  # ValueError: a garbled reply
            self._fail_all(e if isinstance(e, RedisError) else RedisError(str(e)))
            if self._writer is not None:
                self._writer.close()
            self._writer = None

    def _fail_all(self, error: RedisError) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)


class Script:
    """A Lua script run with EVALSHA, loaded once (again after a Redis restart)."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def run(self, conn: RedisConnection, args: list[object]) -> Reply:
        try:
            return await conn.call("EVALSHA", self.sha, 0, *args)
        except RedisError as e:
            if not str(e).startswith("NOSCRIPT"):
                raise
        await conn.call("SCRIPT", "LOAD", self.source)
        return await conn.call("EVALSHA", self.sha, 0, *args)


def encode(args: tuple[object, ...]) -> bytes:
    parts = [arg if isinstance(arg, bytes) else str(arg).encode() for arg in args]
    return b"*%d\r\n" % len(parts) + b"".join([b"$%d\r\n%s\r\n" % (len(p), p) for p in parts])


def parse(buf: bytearray, pos: int) -> tuple[Reply | RedisError, int] | None:
    """One reply from `buf` at `pos`: (reply, end), or None if it is not all there yet."""
    end = buf.find(b"\r\n", pos)
    if end < 0:
        return None
    kind, line = buf[pos : pos + 1], bytes(buf[pos + 1 : end])
    after = end + 2
    if kind == b"+":
        return line, after
    if kind == b"-":
        return RedisError(line.decode(errors="replace")), after
    if kind == b":":
        return int(line), after
    if kind == b"$":
        size = int(line)
        if size < 0:
            return None, after
        if len(buf) < after + size + 2:
            return None
        return bytes(buf[after : after + size]), after + size + 2
    if kind == b"*":
        count = int(line)
        if count < 0:
            return None, after
        items: list[Reply] = []
        for _ in range(count):
            parsed = parse(buf, after)
            if parsed is None:
                return None
            item, after = parsed
            if isinstance(item, RedisError):
                raise item
            items.append(item)
        return items, after
    raise RedisError(f"unexpected reply from Redis: {bytes(buf[pos : pos + 20])!r}")
