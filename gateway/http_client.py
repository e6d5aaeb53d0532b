"""A lean HTTP/1.1 client for calls to providers: one keep-alive connection pool per provider.

``aiohttp.ClientSession`` does much per request that a provider call never needs (URL
parsing, cookies, redirects, tracing, proxies, payload objects, a timer per request): about
half of the gateway's own CPU above a bare proxy went there. This client keeps only what a
call needs: a POST of bytes already built, with headers rendered once per path, over pooled
keep-alive connections (plain or TLS). It reuses aiohttp's response protocol
(``ResponseHandler``: the C HTTP parser, chunked and content-length bodies, decompression,
the read timeout, connection-loss errors), so answers are parsed exactly as before, and a
body is an aiohttp ``StreamReader`` read as it arrives, never buffered whole.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from base64 import b64encode
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, unquote, urlsplit

from aiohttp.client_exceptions import ClientConnectionError
from aiohttp.client_proto import ResponseHandler
from aiohttp.client_reqrep import ClientRequest
from aiohttp.http import SERVER_SOFTWARE, RawResponseMessage
from aiohttp.streams import StreamReader

READ_BUFSIZE = 2**16  # what ClientSession reads into a body's buffer before pausing
KEEPALIVE_SECONDS = 60.0  # an idle connection is closed after this long
DNS_TTL = 300.0  # seconds a host's addresses are kept
MAX_IDLE = 256  # idle connections kept per provider; more are closed when released
_PATH_SAFE = "/:?=&%@+,;!$'()*~-._"  # already-encoded paths and queries pass unchanged


class _Connection(ResponseHandler):
    """aiohttp's response protocol, minus two costs per body chunk.

    The body's reader asks the protocol to resume reading after every chunk it hands out,
    paused or not, and the protocol then feeds its parser an empty read and resumes the
    transport: for an SSE stream, one such round per event. A connection that never paused
    has nothing to resume (its parser was never paused either); one that ever paused keeps
    aiohttp's behaviour for good, since its parser can stay paused past the resume.

    The read timeout (set for non-stream answers; a stream's reads are timed by its watch):
    aiohttp cancels its timer and starts a new one on every read (on uvloop a libuv timer
    handle opened and closed per chunk of a body that trickles in). Here a read only moves
    the deadline on; the one timer, when it fires early, waits again for what is left.
    """

    _ever_paused = False
    _read_deadline = 0.0  # loop time at which the current read timeout runs out

    def pause_reading(self) -> None:
        self._ever_paused = True
        super().pause_reading()

    def resume_reading(self, *args: Any, **kwargs: Any) -> None:
        if self._ever_paused:
            super().resume_reading(*args, **kwargs)

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._drop_timeout()
            return
        deadline = self._read_deadline = self._loop.time() + timeout
        handle = self._read_timeout_handle
        if handle is None or handle.when() > deadline:  # (a shorter timeout than the last)
            if handle is not None:
                handle.cancel()
            self._read_timeout_handle = self._loop.call_at(deadline, self._read_due)

    def _read_due(self) -> None:
        left = self._read_deadline - self._loop.time()
        if left > 0.001:  # data came meanwhile (a timer may also fire a tick early)
            self._read_timeout_handle = self._loop.call_at(self._read_deadline, self._read_due)
            return
        self._read_timeout_handle = None
        self._on_read_timeout()


def _send(proto: ResponseHandler, head: bytes, body: bytes) -> None:
    """Write a request on the loop's turn after the one that made it (a loop callback).

    Requests begun in one turn of a busy loop then leave back to back, and a provider on the
    same host (vLLM, llama.cpp, Ollama) wakes once for the lot and answers them in one go.
    Written at once, each found it asleep, and each wake-up cost the gateway a few
    microseconds of kernel time in its write (bench/README.md, "Wake-ups": ~10 µs a request
    at 32 connections). aiohttp's ClientSession, on Python 3.11, also writes a turn later.
    """
    transport = proto.transport
    if transport is None or transport.is_closing():
        return  # closed later in the turn that made it: its read fails on its own
    try:
        if len(body) < 16384:
            transport.write(head + body)
        else:  # no copy of a large body
            transport.writelines((head, body))
    except Exception as e:  # no caller to raise to: fail its read, as a lost connection would
        proto.set_exception(ClientConnectionError(f"the request could not be sent: {e}"), e)
        transport.abort()


class ConnectFailed(Exception):
    """The provider's host could not be reached (refused, unresolvable, TLS failure)."""


class ConnectTimeout(TimeoutError):
    """No connection within the connect timeout."""


class Pool:
    """Keep-alive connections to one origin (scheme, host, port) under a base URL."""

    def __init__(
        self,
        base_url: str,
        headers: Mapping[str, str],
        *,
        connect_timeout: float,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        url = urlsplit(base_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self._host = url.hostname
        self._tls = url.scheme == "https"
        self._port = url.port or (443 if self._tls else 80)
        if self._tls and ssl_context is None:
            ssl_context = ssl.create_default_context()  # the system's CAs, as aiohttp's default
        self._ssl_context = ssl_context
        self._prefix = url.path.rstrip("/")
        self._connect_timeout = connect_timeout
        netloc = f"[{self._host}]" if ":" in self._host else self._host
        if url.port is not None:
            netloc += f":{url.port}"
        defaults = {"Host": netloc, "User-Agent": SERVER_SOFTWARE}
        # Accept, and the encodings aiohttp can decompress here: what ClientSession sent
        defaults.update((str(k), v) for k, v in ClientRequest.DEFAULT_HEADERS.items())
        if url.username is not None:  # credentials in the URL, as ClientSession sent them
            user_pass = f"{unquote(url.username)}:{unquote(url.password or '')}"
            defaults["Authorization"] = "Basic " + b64encode(user_pass.encode()).decode()
        sent: dict[str, tuple[str, str]] = {}  # by lower-case name: a configured one wins
        for name, value in (*defaults.items(), *headers.items()):
            if any(c in name + value for c in "\r\n\0"):
                raise ValueError(f"header {name!r} holds a line break")
            sent[name.lower()] = (name, value)
        self._header_block = "".join(f"{k}: {v}\r\n" for k, v in sent.values())
        self._heads: dict[str, bytes] = {}  # path -> request head up to Content-Length's value
        self._idle: list[tuple[ResponseHandler, float]] = []
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self._addresses: list[str] = []
        self._resolved_until = 0.0
        self._lookup: asyncio.Future[list[str]] | None = None

    async def post(
        self, path: str, body: bytes, read_timeout: float | None
    ) -> tuple[ResponseHandler, RawResponseMessage, StreamReader]:
        """Send `body` to the base URL + `path`; the connection, the response's status line
        and headers, and its body as it arrives. Hand the connection back with ``release``.

        `read_timeout` bounds every wait for data from the provider (the head, then each
        read of the body) as aiohttp's ``sock_read`` does.
        """
        head = self._heads.get(path)
        if head is None:
            target = quote(self._prefix + path, safe=_PATH_SAFE)
            head = f"POST {target} HTTP/1.1\r\n{self._header_block}Content-Length: ".encode()
            if len(self._heads) < 1024:  # paths vary only with the model name
                self._heads[path] = head
        proto = self._take()
        if proto is None:  # (not `or`: a ResponseHandler with nothing queued is falsy)
            proto = await self._connect()
        try:
            proto.read_timeout = read_timeout
            transport = proto.transport
            if transport is None:  # lost between the check and now
                raise ClientConnectionError("connection lost before the request was sent")
            head += b"%d\r\n\r\n" % len(body)
            proto._loop.call_soon(_send, proto, head, body)
            proto.start_timeout()
            message, payload = await proto.read()
        except BaseException:
            proto.close()  # the answer, if any, is never read: the connection is spent
            raise
        return proto, message, payload

    def release(self, proto: ResponseHandler, payload: StreamReader) -> None:
        """Keep the connection for the next call if its answer was read whole and it may be
        kept; else close it (which also stops an abandoned generation upstream)."""
        if (
            self._closed
            or not payload.is_eof()
            or proto.should_close
            or not proto.is_connected()
            or len(self._idle) >= MAX_IDLE
        ):
            proto.close()
            return
        loop = proto._loop  # (not asyncio.get_running_loop(): a getpid() system call each)
        self._idle.append((proto, loop.time()))
        if self._sweeper is None:
            self._sweeper = loop.call_later(KEEPALIVE_SECONDS, self._sweep)

    def abort(self, proto: ResponseHandler, payload: StreamReader) -> None:
        """Drop the connection now: a pending read of the body ends with an error."""
        if not payload.is_eof():
            payload.set_exception(ClientConnectionError("connection closed by the gateway"))
        proto.close()

    async def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        idle, self._idle = self._idle, []
        for proto, _ in idle:
            proto.close()

    def _take(self) -> ResponseHandler | None:
        """The most recently used idle connection that is still good."""
        idle = self._idle
        while idle:
            proto, _ = idle.pop()
            if proto.is_connected() and not proto.should_close:
                return proto
            proto.close()
        return None

    async def _connect(self) -> ResponseHandler:
        loop = asyncio.get_running_loop()
        ssl_context = self._ssl_context
        try:
            async with asyncio.timeout(self._connect_timeout):
                addresses = await self._resolve(loop)
                for i, address in enumerate(addresses):  # in order, as create_connection does
                    try:
                        _, proto = await loop.create_connection(
                            lambda: _Connection(loop),
                            address,
                            self._port,
                            ssl=ssl_context,
                            server_hostname=self._host if ssl_context is not None else None,
                        )
                        break
                    except OSError:
                        if i == len(addresses) - 1:
                            self._resolved_until = 0.0  # look the name up again next time
                            raise
        except TimeoutError:
            raise ConnectTimeout(f"no connection to {self._host}:{self._port}") from None
        except OSError as e:  # refused, unresolvable, TLS handshake or certificate
            raise ConnectFailed(f"cannot connect to {self._host}:{self._port}: {e}") from e
        # one parser for the connection's life: after a whole answer it is ready for the next
        # a body with neither length nor chunks runs to the close, as ClientSession reads it
        proto.set_response_params(read_until_eof=True, read_bufsize=READ_BUFSIZE)
        return proto

    async def _resolve(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        """The host's addresses, looked up at most every DNS_TTL seconds (as aiohttp's
        connector cached them), so that a burst of new connections is not a burst of
        lookups in the executor."""
        if loop.time() < self._resolved_until:
            return self._addresses
        if self._lookup is None:  # one lookup, however many connections wait for it
            self._lookup = asyncio.ensure_future(self._look_up(loop))
        return await asyncio.shield(self._lookup)

    async def _look_up(self, loop: asyncio.AbstractEventLoop) -> list[str]:
        try:
            infos = await loop.getaddrinfo(self._host, self._port, type=socket.SOCK_STREAM)
        finally:
            self._lookup = None
        addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
        if not addresses:
            raise OSError(f"no address for {self._host}")
        self._addresses, self._resolved_until = addresses, loop.time() + DNS_TTL
        return addresses

    def _sweep(self) -> None:
        """Close connections idle for longer than the keep-alive time."""
        loop = asyncio.get_running_loop()
        cutoff = loop.time() - KEEPALIVE_SECONDS
        keep = []
        for proto, since in self._idle:
            if since > cutoff and proto.is_connected():
                keep.append((proto, since))
            else:
                proto.close()
        self._idle = keep
        self._sweeper = loop.call_later(KEEPALIVE_SECONDS, self._sweep) if keep else None
