"""Sending requests to providers: one pooled HTTP session per provider, its credentials, timeouts.

Every provider is an ``Upstream``: ``send(call)`` returns an ``UpstreamResponse`` whose body is
read whole or iterated chunk by chunk as it arrives. HTTP failures become ``GatewayError``s
here, so the request path never sees a library exception.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Protocol

import aiohttp

from .config import ProviderConfig, ServerConfig
from .errors import GatewayError, ServiceUnavailable, UpstreamError, UpstreamTimeout
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
        # Whole non-stream responses must arrive within the timeout; streams may run longer
        # but never stay silent for longer than it (sock_read also bounds the wait for headers).
        idle = provider.idle_timeout or server.idle_timeout
        self._timeout_whole = aiohttp.ClientTimeout(
            total=timeout, sock_connect=server.connect_timeout, sock_read=timeout
        )
        # Streams are timed by the gateway (the request deadline and first-token timeout in
        # the handler, idle and total by the stream watch); these are outer bounds only.
        self._timeout_stream = aiohttp.ClientTimeout(
            total=server.stream_timeout + 1,
            sock_connect=server.connect_timeout,
            sock_read=max(timeout, idle) + 1,
        )
        self._timeout = timeout
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=60)
        self._session = aiohttp.ClientSession(
            connector=connector,
            headers=self._headers,
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def send(self, call: UpstreamCall) -> UpstreamResponse:
        assert self._session is not None, "upstream used before start()"
        try:
            resp = await self._session.post(
                self._base_url + call.path,
                data=call.body,
                timeout=self._timeout_stream if call.stream else self._timeout_whole,
            )
        except (TimeoutError, aiohttp.ClientError) as e:
            raise self._error(e) from e
        return _HTTPResponse(resp, self)

    def _error(self, e: Exception) -> GatewayError:
        if isinstance(e, aiohttp.ClientConnectorError):
            return ServiceUnavailable(
                f"provider '{self.name}' is unreachable", code="upstream_unreachable"
            )
        if isinstance(e, asyncio.TimeoutError):  # aiohttp's timeouts subclass it
            return UpstreamTimeout(
                f"provider '{self.name}' did not answer within {self._timeout:g} s",
                code="upstream_timeout",
            )
        return UpstreamError(
            f"provider '{self.name}' dropped the connection before the response was complete",
            code="upstream_connection_lost",
        )


class _HTTPResponse:
    __slots__ = ("_resp", "_upstream", "headers", "status")

    def __init__(self, resp: aiohttp.ClientResponse, upstream: HTTPUpstream) -> None:
        self._resp = resp
        self._upstream = upstream
        self.status = resp.status
        self.headers: Mapping[str, str] = resp.headers

    async def read(self) -> bytes:
        try:
            return await self._resp.read()
        except (TimeoutError, aiohttp.ClientError) as e:
            raise self._upstream._error(e) from e

    async def chunks(self) -> AsyncIterator[bytes]:
        content = self._resp.content
        while True:
            try:
                chunk = await content.readany()
            except (TimeoutError, aiohttp.ClientError) as e:
                # aiohttp drops what it buffered before the connection broke; hand it on
                # first, so that the client gets every byte that did arrive
                rest = _buffered(content)
                if rest:
                    yield rest
                raise self._upstream._error(e) from e
            if not chunk:
                return
            yield chunk

    def release(self) -> None:
        # Closing (not releasing) a response that was not read to the end drops its
        # connection, which is what stops an upstream generation the client abandoned.
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()

    def abort(self) -> None:
        self._resp.close()


def _buffered(content: aiohttp.StreamReader) -> bytes:
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
