"""Piping a stream to the client: translated chunk by chunk as it arrives, kept alive, timed.

A stream is piped once its upstream has produced a first output for the client (``Answer``);
waiting for that, and the first-token timeout, are the handler's business. ``StreamWatch`` is
one timer per piped stream, the only clock on its reads. It sends an SSE comment
(``: keep-alive``) whenever the client has heard nothing for ``keepalive`` seconds (never in
audio), and ends the stream when the upstream goes silent (``idle``) or runs past the
whole-stream limit (``total``): it closes the upstream connection, which ends the read in
``pipe``, and ``pipe`` reports the timeout instead of the cut (an error event; audio, which
cannot hold one, ends cut).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

from .errors import GatewayError, UpstreamTimeout
from .translate.base import StreamInterrupted, Translator
from .translate.sse import KEEPALIVE, encode

if TYPE_CHECKING:
    from .exchange import Exchange
    from .router import Deployment
    from .upstream import UpstreamResponse

SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",  # asks nginx-style proxies not to buffer the stream
}


@dataclass(frozen=True, slots=True)
class Answer:
    """What a deployment answered: a non-stream body read whole, or a stream's first output
    for the client (``head``) and the rest of its chunks (``rest``, None if it ended)."""

    deployment: Deployment
    translator: Translator
    upstream: UpstreamResponse
    head: bytes
    rest: AsyncIterator[bytes] | None


@dataclass(frozen=True, slots=True)
class StreamTimeouts:
    idle: float
    total: float
    keepalive: float


class StreamWatch:
    __slots__ = (
        "_handle",
        "_keepalive",
        "_last_client",
        "_last_upstream",
        "_loop",
        "_response",
        "_started",
        "_tick_every",
        "_timeouts",
        "_upstream",
        "error",
        "provider",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        response: web.StreamResponse | None,
        timeouts: StreamTimeouts,
        provider: str,
        upstream: UpstreamResponse,
    ) -> None:
        self._loop = loop
        now = self._loop.time()
        self._started = self._last_client = self._last_upstream = now
        self._response = response
        self._upstream = upstream
        self._timeouts = timeouts
        self.provider = provider
        self.error: GatewayError | None = None
        self._keepalive: asyncio.Future[None] | None = None
        smallest = min(timeouts.keepalive, timeouts.idle)
        self._tick_every = max(0.02, min(1.0, smallest / 4))
        self._handle = self._loop.call_later(self._tick_every, self._tick)

    def upstream_chunk(self) -> None:
        self._last_upstream = self._loop.time()

    def client_write(self) -> None:
        self._last_client = self._loop.time()

    def stop(self) -> None:
        self._handle.cancel()

    def _tick(self) -> None:
        now = self._loop.time()
        t = self._timeouts
        if now - self._last_upstream > t.idle:
            self._expire(f"went silent for {t.idle:g} s in the middle of the stream")
        elif now - self._started > t.total:
            self._expire(f"did not finish the stream within {t.total:g} s")
        else:
            if now - self._last_client >= t.keepalive and self._response is not None:
                self._last_client = now
                self._keepalive = asyncio.ensure_future(_write_quietly(self._response, KEEPALIVE))
            self._handle = self._loop.call_later(self._tick_every, self._tick)

    def _expire(self, what: str) -> None:
        self.error = UpstreamTimeout(f"provider '{self.provider}' {what}", code="upstream_timeout")
        self._upstream.abort()


class KeepAlive:
    """While a stream waits for its upstream's first output: an SSE comment every `interval`
    seconds, so that proxies do not cut the connection; the first one commits the response
    (200 and its headers). A write that fails (the client left) is kept in ``failure`` and
    reported through `interrupt`, then raised by ``stop``.

    One timer on the loop; a task only for a write that is due, so that a stream whose
    upstream answers in time costs no more than the timer.
    """

    __slots__ = (
        "_interrupt",
        "_interval",
        "_loop",
        "_request",
        "_stopped",
        "_timer",
        "_writing",
        "failure",
        "response",
    )

    def __init__(
        self,
        request: web.Request,
        loop: asyncio.AbstractEventLoop,
        interval: float,
        interrupt: Callable[[], None],
    ) -> None:
        self._request = request
        self._interval = interval
        self._interrupt = interrupt
        self._loop = loop
        self._timer = self._loop.call_later(interval, self._due)
        self._writing: asyncio.Task[None] | None = None
        self._stopped = False
        self.response: web.StreamResponse | None = None
        self.failure: BaseException | None = None

    def _due(self) -> None:
        self._writing = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        if self._stopped:  # due in the loop turn that stopped it
            return
        try:
            if self.response is None:
                self.response = await prepare_sse(self._request)
            await self.response.write(KEEPALIVE)
        except Exception as e:
            self.failure = e
            self._interrupt()
            return
        if not self._stopped:
            self._timer = self._loop.call_later(self._interval, self._due)

    async def stop(self) -> web.StreamResponse | None:
        """No more comments: the response they began (None if none began), once a write
        under way has ended; raises that write's failure."""
        self._stopped = True
        self._timer.cancel()
        if self._writing is not None and not self._writing.done():
            await self._writing
        if self.failure is not None:
            raise self.failure
        return self.response

    def cancel(self) -> None:
        self._stopped = True
        self._timer.cancel()
        if self._writing is not None:
            self._writing.cancel()


async def _write_quietly(response: web.StreamResponse, data: bytes) -> None:
    # the client may have left or the stream ended meanwhile; pipe() notices on its own
    with contextlib.suppress(ConnectionError, RuntimeError):
        await response.write(data)


async def prepare_sse(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers=SSE_HEADERS)
    await response.prepare(request)
    return response


async def pipe(
    request: web.Request,
    response: web.StreamResponse | None,
    answer: Answer,
    exchange: Exchange,
    watch: StreamWatch,
    sse: bool,
    cutoff: Callable[[], GatewayError | None] | None = None,
) -> web.StreamResponse:
    """Pass the upstream's stream to the client, translated, as each chunk arrives.

    Once the first byte is out the status is sent, so a failure from here on reaches the
    client as an error event in OpenAI's shape (SSE) or as a cut connection (binary audio).
    """
    upstream, translator = answer.upstream, answer.translator
    if response is None:
        headers = (
            SSE_HEADERS
            if sse
            else {
                "Content-Type": upstream.headers.get("Content-Type", "application/octet-stream"),
                "Cache-Control": "no-cache",
            }
        )
        response = web.StreamResponse(headers=headers)
        await response.prepare(request)
    try:
        exchange.first_byte_at = time.perf_counter()
        await response.write(answer.head)
        if answer.rest is not None:
            async for chunk in answer.rest:
                watch.upstream_chunk()
                out = translator.response_chunk(chunk)
                if out:
                    await response.write(out)
                    watch.client_write()
                    if cutoff is not None:
                        stop = cutoff()
                        if stop is not None:
                            upstream.abort()
                            raise stop
            out = translator.response_end()
            if out:
                await response.write(out)
    except (GatewayError, StreamInterrupted) as e:
        partial, error = (e.partial, e.error) if isinstance(e, StreamInterrupted) else (b"", e)
        if watch.error is not None:
            partial, error = b"", watch.error  # the watch cut the upstream: say why
        elif exchange.halted is not None and exchange.halted.done():
            partial, error = b"", exchange.halted.result()  # the server is stopping
        exchange.fail(error)
        if not sse:
            # nothing can be said inside an audio body: cut the connection
            if request.transport is not None:
                request.transport.close()
            return response
        await response.write(partial + encode(error.body()))
    except ConnectionResetError:
        exchange.client_closed = True
        return response
    finally:
        watch.stop()
    exchange.end_upstream()
    await response.write_eof()
    return response
