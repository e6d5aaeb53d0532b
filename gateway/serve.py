"""Running the application: listen, reload on SIGHUP, drain on SIGTERM and SIGINT, and keep
clients that hold connections without sending requests (slow-loris) from piling up.

aiohttp's ``run_app`` does most of this but gives no hold on the server's connections, which
the connection guard needs, and cancels what is still running at the shutdown timeout, which
would leave a stream's client without a word; this is the same sequence with both added.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
from collections.abc import Callable

from aiohttp import web

from .config import Config
from .errors import ServiceUnavailable
from .runtime import STATE, GatewayState
from .usage_types import UsageStoreError

log = logging.getLogger("gateway")

# Seconds the streams told to stop at the drain timeout get to send their error event and end,
# and then what is still running (a non-stream request) gets before it is cancelled.
HALT_GRACE = 1.0


class ConnectionGuard:
    """Closes connections that sent no complete request head within ``header_timeout`` of
    opening (or of their last request), or stayed idle between requests longer than
    ``keepalive_timeout``: a client cannot hold a connection without using it."""

    def __init__(self, server: web.Server, header_timeout: float, keepalive_timeout: float):
        self._server = server
        self._header_timeout = header_timeout
        self._keepalive_timeout = keepalive_timeout
        self._seen: dict[int, tuple[int, float]] = {}  # handler id -> (requests, since)
        self.closed = 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        every = max(0.05, min(self._header_timeout, self._keepalive_timeout) / 4)
        while True:
            await asyncio.sleep(every)
            self.sweep(loop.time())

    def sweep(self, now: float) -> None:
        live = list(self._server.connections)
        seen: dict[int, tuple[int, float]] = {}
        for handler in live:
            # aiohttp's own counters: requests whose head was read, and the one in progress
            count = getattr(handler, "_request_count", None)
            busy = getattr(handler, "_current_request", None) is not None
            if count is None:  # pragma: no cover - an aiohttp without them: no guard
                return
            before = self._seen.get(id(handler))
            if before is None or before[0] != count or busy:
                seen[id(handler)] = (count, now)
                continue
            limit = self._header_timeout if count == 0 else self._keepalive_timeout
            if now - before[1] > limit:
                handler.force_close()
                transport = getattr(handler, "transport", None)
                if transport is not None:
                    transport.close()
                self.closed += 1
                continue
            seen[id(handler)] = before
        self._seen = seen


def serve(
    app: web.Application,
    config: Config,
    host: str,
    port: int,
    *,
    reuse_port: bool,
    on_ready: Callable[[], None],
    loop: asyncio.AbstractEventLoop | None = None,
) -> None:
    """Serve `app` until SIGTERM or SIGINT, then let requests in flight finish."""
    loop = loop or asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(_serve(app, config, host, port, reuse_port, on_ready))
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def collect_less() -> None:
    """What start-up built lives as long as the process: the cycle collector need not walk
    it again and again (``gc.freeze``). A request frees nearly all it allocates by reference
    counting, so the youngest generation is collected after 50,000 net allocations, not 700:
    under nonstream-32, 700 cost 6% of the CPU; under 200 concurrent streams, whose live
    objects number ~20,000, 5,000 set off a collection every ~120 streams that walked them
    all (~3 ms): 20 us per stream, 400 ms of 20,000 streams, now 11 ms."""
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)


async def _serve(
    app: web.Application,
    config: Config,
    host: str,
    port: int,
    reuse_port: bool,
    on_ready: Callable[[], None],
) -> None:
    s = config.server
    runner = web.AppRunner(
        app,
        access_log=None,
        handler_cancellation=True,  # a client that leaves cancels its request at once
        shutdown_timeout=HALT_GRACE,  # drain() has waited shutdown_timeout already
        keepalive_timeout=s.keepalive_timeout,
    )
    try:
        await runner.setup()  # opens the usage database, the metrics listener, Redis
    except (OSError, UsageStoreError) as e:
        log.error("cannot start: %s", e)
        await runner.cleanup()
        raise SystemExit(1) from None
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    state = app[STATE]
    reloading: list[asyncio.Future[bool]] = []

    def reload() -> None:
        log.info("SIGHUP: reloading %s", state.config.source)
        reloading[:] = [asyncio.ensure_future(state.reload())]

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, reload)
    # many clients connecting at once must not be turned away by a short accept queue
    site = web.TCPSite(runner, host, port, backlog=4096, reuse_port=reuse_port)
    try:
        await site.start()
    except OSError as e:
        log.error("cannot listen on %s:%d: %s", host, port, e.strerror)
        await runner.cleanup()
        raise SystemExit(1) from None
    assert runner.server is not None
    guard = ConnectionGuard(runner.server, s.header_timeout, s.keepalive_timeout)
    guarding = asyncio.ensure_future(guard.run())
    collect_less()
    on_ready()
    await stop.wait()
    log.info("stopping: finishing the requests in flight (up to %g s)", s.shutdown_timeout)
    guarding.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await guarding
    await drain(runner, state, s.shutdown_timeout)
    # cancels what is left after a short grace, closes the connections, runs the cleanups
    await runner.cleanup()


async def drain(runner: web.AppRunner, state: GatewayState, timeout: float) -> None:
    """Stop listening and let the requests in flight finish for up to `timeout` seconds; then
    end the streams still running with a ``server_shutdown`` error event, so that their
    clients know why and their usage is recorded as such (not as a client that left)."""
    for site in list(runner.sites):
        await site.stop()
    if runner.server is not None:
        runner.server.pre_shutdown()  # idle keep-alive connections close now, busy ones after
    loop = asyncio.get_running_loop()
    if await _settled(state, loop.time() + timeout):
        return
    shutdown = ServiceUnavailable(
        "The gateway is shutting down and could not finish this stream in time; try again.",
        code="server_shutdown",
    )
    halted = 0
    for exchange in list(state.in_flight.values()):
        if exchange.halted is not None and not exchange.halted.done():
            exchange.halted.set_result(shutdown)
            halted += 1
    log.warning("drain timeout: ending %d stream(s) still running", halted)
    await _settled(state, loop.time() + HALT_GRACE)


async def _settled(state: GatewayState, until: float) -> bool:
    """Whether every request in flight ended before the loop's clock reached `until`."""
    loop = asyncio.get_running_loop()
    while state.in_flight and loop.time() < until:
        await asyncio.sleep(0.05)
    return not state.in_flight
