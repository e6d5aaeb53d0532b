"""What operators and their tools ask of a running gateway: health, readiness, metrics, logs,
and systemd's readiness and watchdog notifications.

``/healthz`` and ``/readyz`` are cheap and need no key. ``/metrics`` needs the admin key, unless
``[admin] metrics_listen`` names a separate listener, where it is served without one (and then
not on the main listener).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import sys
import time
from collections.abc import AsyncIterator

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from .accesslog import ACCESS_LOG
from .config import Config
from .metrics import gauge, resident_memory_bytes
from .resilience import BreakerState
from .runtime import STATE, GatewayState

BREAKER_VALUES = {"closed": 0, "half_open": 1, "open": 2}
METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


def breaker_states(state: GatewayState) -> dict[str, BreakerState]:
    """The breaker of every configured deployment, closed until it first fails (breakers are
    made on first use and outlive reloads: one of a removed deployment is left out)."""
    seen = state.breakers.states()
    return {d: seen.get(d, "closed") for d in sorted(state.runtime.router.models)}


async def healthz(request: web.Request) -> web.Response:
    """The process is alive and its event loop answers (and which process: with `--workers`
    there are several)."""
    return web.json_response({"status": "ok", "pid": os.getpid()})


async def readyz(request: web.Request) -> web.Response:
    """Config loaded, the usage writer's last write succeeded, and a provider not paused."""
    state = request.app[STATE]
    problems = []
    if state.usage.failing:
        problems.append("the usage database cannot be written")
    breakers = breaker_states(state)
    if not breakers:
        problems.append("no provider is configured and enabled")
    elif all(s == "open" for s in breakers.values()):
        problems.append("every deployment's circuit breaker is open")
    body = {
        "status": "not ready" if problems else "ready",
        "problems": problems,
        "providers": len(state.runtime.upstreams),
        "models": len(breakers),
    }
    return web.json_response(body, status=503 if problems else 200)


def render_metrics(state: GatewayState, access_log_dropped: int) -> str:
    m = state.metrics
    lines: list[str] = []
    for family in m.families():
        lines.extend(family.render())
    breakers = breaker_states(state)
    lines += gauge(
        "gateway_breaker_state",
        "Circuit breaker of each deployment: 0 closed, 1 half-open, 2 open.",
        [(("deployment",), (d,), BREAKER_VALUES[s]) for d, s in breakers.items()],
    )
    usage = state.usage
    singles = [
        ("gateway_in_flight_requests", "Requests being answered now.", len(state.in_flight)),
        ("gateway_in_flight_streams", "Streams being piped now.", m.in_flight_streams),
        ("gateway_usage_queue_depth", "Usage records waiting to be written.", usage.depth),
        ("gateway_usage_written_total", "Usage records written to the database.", usage.written),
        ("gateway_usage_dropped_total", "Usage records that will never be written.", usage.dropped),
        ("gateway_usage_store_failing", "1 while the usage database cannot be written.",
         int(usage.failing)),
        ("gateway_access_log_dropped_total", "Access log lines lost.", access_log_dropped),
        ("gateway_config_reloads_total", "Successful config reloads.", state.reloads),
        ("gateway_client_keys", "Client keys accepted now.", len(state.runtime.keys)),
        ("gateway_tracked_client_ips", "Client IPs with a rate-limit bucket.",
         state.limiter.tracked_ips),
        ("gateway_process_resident_memory_bytes", "Resident memory of the process.",
         resident_memory_bytes()),
        ("gateway_process_start_time_seconds", "Start time of the process (Unix seconds).",
         state.started_at),
    ]  # fmt: skip
    if state.cluster is not None:
        singles += [
            ("gateway_cluster_redis_failures_total", "Redis calls that failed or timed out.",
             state.cluster.failures),
            ("gateway_cluster_local_admissions_total",
             "Admissions decided by this process alone while Redis was unavailable.",
             state.cluster.local_admissions),
            ("gateway_cluster_degraded", "1 while Redis is unavailable.",
             int(state.cluster.degraded)),
            ("gateway_cluster_settlements_lost_total",
             "Usage counts dropped unsent because Redis stayed unavailable too long.",
             state.cluster.settlements_lost),
        ]  # fmt: skip
    for name, help_text, value in singles:
        kind = "counter" if name.endswith("_total") else "gauge"
        lines += [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", f"{name} {value}"]
    return "\n".join(lines) + "\n"


async def metrics(request: web.Request) -> web.Response:
    state = request.app[STATE]
    if state.config.admin.metrics_listen is not None:
        raise web.HTTPNotFound()  # served on the separate listener
    from .admin import admin_state  # the admin key guards it like /admin

    admin_state(request)
    return _metrics_response(request.app)


def _metrics_response(app: web.Application) -> web.Response:
    text = render_metrics(app[STATE], app[ACCESS_LOG].dropped)
    return web.Response(body=text.encode(), headers={
        "Content-Type": METRICS_CONTENT_TYPE, "Cache-Control": "no-store"})  # fmt: skip


def add_routes(app: web.Application) -> None:
    app.router.add_get("/healthz", healthz, allow_head=True)
    app.router.add_get("/readyz", readyz, allow_head=True)
    app.router.add_get("/metrics", metrics, allow_head=False)


async def metrics_listener_ctx(app: web.Application) -> AsyncIterator[None]:
    """The separate, keyless /metrics listener, when [admin] metrics_listen asks for one."""
    listen = app[STATE].config.admin.metrics_listen
    if listen is None:
        yield
        return
    host, _, port = listen.rpartition(":")
    # each worker of `serve --workers N` listens on its own port: the given one plus its index
    worker = int(os.environ.get("GATEWAY_WORKER", "0") or 0)
    side = web.Application()

    async def scrape(request: web.Request) -> web.Response:
        return _metrics_response(app)

    side.router.add_get("/metrics", scrape, allow_head=False)
    side.router.add_get("/healthz", healthz)
    side[STATE] = app[STATE]
    side.router.add_get("/readyz", readyz)
    runner = web.AppRunner(side, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host.strip("[]"), int(port) + worker)
    await site.start()
    logging.getLogger("gateway").info(
        "metrics listening on http://%s:%d/metrics", host, int(port) + worker
    )
    yield
    await runner.cleanup()


# --- logs -------------------------------------------------------------------------------------


class JSONFormatter(logging.Formatter):
    """One JSON object per log record, like the access log."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry).decode()


class BadRequestFilter(logging.Filter):
    """aiohttp logs a malformed request (a huge header line, garbage on the socket) with a
    traceback at error level; for the operator it is one line about a client's mistake."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, HttpProcessingError):
            record.levelno, record.levelname = logging.INFO, "INFO"
            record.msg = "refused a malformed request: %s"
            record.args = (str(error.message).split("\n")[0][:200],)
            record.exc_info = None
            record.exc_text = None
        return True


def configure_logging(config: Config, level_override: str | None = None) -> None:
    logging.getLogger("aiohttp.server").addFilter(BadRequestFilter())
    handler = logging.StreamHandler(sys.stderr)
    if config.logging.format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel((level_override or config.logging.level).upper())


# --- systemd ----------------------------------------------------------------------------------


def sd_notify(message: str) -> bool:
    """Tell systemd something (READY=1, WATCHDOG=1, ...) when it runs us as Type=notify."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):  # an abstract socket
        address = "\0" + address[1:]
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        try:
            sock.connect(address)
            sock.sendall(message.encode())
        except OSError:
            return False
    return True


class Systemd:
    """READY=1 once the gateway listens, WATCHDOG=1 pings from the event loop after that (if
    systemd asks for them), STOPPING=1 on the way out."""

    def __init__(self) -> None:
        self._ready = asyncio.Event()
        self._pinger: asyncio.Task[None] | None = None

    def ready(self) -> None:
        sd_notify("READY=1")
        self._ready.set()

    async def start(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC", "")
        pid = os.environ.get("WATCHDOG_PID", str(os.getpid()))
        if usec.isdigit() and pid == str(os.getpid()):
            self._pinger = asyncio.ensure_future(self._ping(int(usec) / 1e6 / 2))

    async def _ping(self, interval: float) -> None:
        await self._ready.wait()
        while True:
            sd_notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def stop(self) -> None:
        sd_notify("STOPPING=1")
        if self._pinger is not None:
            self._pinger.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pinger


SYSTEMD = web.AppKey("systemd", Systemd)


async def systemd_ctx(app: web.Application) -> AsyncIterator[None]:
    await app[SYSTEMD].start()
    yield
    await app[SYSTEMD].stop()
