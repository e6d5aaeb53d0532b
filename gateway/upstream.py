"""Sending requests to providers: one pooled HTTP session per provider, its credentials, timeouts.

Every provider is an ``Upstream``: ``send(call)`` returns an ``UpstreamResponse`` whose body is
read whole or iterated chunk by chunk as it arrives. HTTP failures become ``GatewayError``s
here, so the request path never sees a library exception.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from typing import Protocol

from aiohttp.client_exceptions import ClientError
from aiohttp.client_proto import ResponseHandler
from aiohttp.http import RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader

from .config import ProviderConfig, ServerConfig
from .errors import GatewayError, ServiceUnavailable, UpstreamError, UpstreamTimeout
from .http_client import ConnectFailed, Pool
from .translate.base import UpstreamCall

ANTHROPIC_VERSION = "2023-06-01"


class UpstreamResponse(Protocol):
    status: int
    headers: Mapping[str, str]

    async def read(self) -> bytes: ...

    def chunks(self) -> AsyncIterator[bytes]: ...

    def release(self) -> None: ...

    def abort(self) -> None:
        """Drop the connection now: a pending read ends with an error."""


class Upstream(Protocol):
    name: str

    async def start(self) -> None: ...

    async def send(self, call: UpstreamCall) -> UpstreamResponse: ...

    async def close(self) -> None: ...


def auth_headers(kind: str, api_key: str | None) -> dict[str, str]:
    """The headers that carry the provider's credentials, in the provider's own way."""
    if not api_key:
        return {"anthropic-version": ANTHROPIC_VERSION} if kind == "anthropic" else {}
    if kind == "anthropic":
        return {"x-api-key": api_key, "anthropic-version": ANTHROPIC_VERSION}
    if kind == "gemini":
        return {"x-goog-api-key": api_key}
    return {"Authorization": f"Bearer {api_key}"}


class HTTPUpstream:
    """A provider reached over HTTP through one keep-alive connection pool."""

    def __init__(self, provider: ProviderConfig, api_key: str | None, server: ServerConfig):
        self.name = provider.name
        self._base_url = provider.base_url.rstrip("/")
        self._headers = {
            "Content-Type": "application/json",
            **auth_headers(provider.kind, api_key),
            **provider.headers,
        }
        timeout = provider.request_timeout or server.request_timeout
        # The handler bounds a call up to a whole non-stream body, or up to a stream's first
        # output, by the request's deadline and the first-token timeout; from there the
        # stream watch times the stream (idle, total). Every read of a non-stream answer is
        # also bounded here, an outer bound.
        self._read_whole = timeout
        self._connect_timeout = server.connect_timeout
        self._timeout = timeout
        self._pool: Pool | None = None

    async def start(self) -> None:
        self._pool = Pool(self._base_url, self._headers, connect_timeout=self._connect_timeout)

    async def close(self) -> None:
        if self._pool is not None:
            await self._pool.close()

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        pool = self._pool
        assert pool is not None, "upstream used before start()"
        stream = call.stream
        try:
            proto, message, payload = await pool.post(
                call.path, call.body, None if stream else self._read_whole
            )
        except (TimeoutError, OSError, ClientError, HttpProcessingError, ConnectFailed) as e:
            raise self._error(e) from e
        return _HTTPResponse(self, pool, proto, message, payload)

    def _error(self, e: BaseException) -> GatewayError:
        if isinstance(e, ConnectFailed):
            return ServiceUnavailable(
                f"provider '{self.name}' is unreachable", code="upstream_unreachable"
            )
        if isinstance(e, TimeoutError):  # aiohttp's read timeout subclasses it
            return UpstreamTimeout(
                f"provider '{self.name}' did not answer within {self._timeout:g} s",
                code="upstream_timeout",
            )
        return UpstreamError(
            f"provider '{self.name}' dropped the connection before the response was complete",
            code="upstream_connection_lost",
        )


class _HTTPResponse:
    __slots__ = ("_done", "_payload", "_pool", "_proto", "_upstream", "headers", "status")

    def __init__(
        self,
        upstream: HTTPUpstream,
        pool: Pool,
        proto: ResponseHandler,
        message: RawResponseMessage,
        payload: StreamReader,
    ) -> None:
        self._upstream = upstream
        self._pool = pool
        self._proto = proto
        self._payload = payload
        self._done = False
        self.status = message.code
        self.headers: Mapping[str, str] = message.headers

    async def read(self) -> bytes:
        try:
            return await self._payload.read()
        except (TimeoutError, OSError, ClientError) as e:
            raise self._upstream._error(e) from e

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._payload
        while True:
            try:
                chunk = await content.readany()
            except (TimeoutError, OSError, ClientError) as e:
                # the reader drops what it buffered before the connection broke; hand it on
                # first, so that the client gets every byte that did arrive
                rest = _buffered(content)
                if rest:
                    yield rest
                raise self._upstream._error(e) from e
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        # Closing (not keeping) a connection whose answer was not read to the end is what
        # stops an upstream generation the client abandoned.
        if not self._done:
            self._done = True
            self._pool.release(self._proto, self._payload)

    def abort(self) -> None:
        if self._done:  # handed back already: it may be another call's connection now
            return
        self._done = True
        self._pool.abort(self._proto, self._payload)


def _buffered(content: StreamReader) -> bytes:
    try:
        buffer = content._buffer  # no public way to read past a stored exception
        data = b"".join(buffer)[content._buffer_offset :]
    except AttributeError:  # pragma: no cover - a different aiohttp
        return b""
    buffer.clear()
    return data


def make_upstream(provider: ProviderConfig, api_key: str | None, server: ServerConfig) -> Upstream:
    if provider.kind == "demo":
        from .demo import DemoUpstream

        return DemoUpstream(provider)
    return HTTPUpstream(provider, api_key, server)
