"""``build(config)``: the aiohttp application, its routes, middleware and lifecycle. Wiring only."""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable
from random import getrandbits

from aiohttp import web
from multidict import istr

from . import admin, dashboard, handlers, ops
from .accesslog import ACCESS_LOG, AccessLog, access_log_ctx
from .config import Config
from .errors import GatewayError, MethodNotAllowed, NotFound, PayloadTooLarge
from .exchange import EXCHANGE, Exchange
from .runtime import STATE, GatewayState, state_ctx
from .usage import UsageRecord, cost_of

log = logging.getLogger("gateway")

API_PREFIXES = ("/v1", "/api/v1")
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# response header names as istr: the response's CIMultiDict takes them without a copy
REQUEST_ID = istr("X-Request-Id")
SERVER_TIMING = istr("Server-Timing")
GATEWAY_WARNING = istr("X-Gateway-Warning")
GATEWAY_PROVIDER = istr("X-Gateway-Provider")
GATEWAY_MODEL = istr("X-Gateway-Model")

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")

ENDPOINTS = {
    "chat_completions": "chat",
    "embeddings": "embeddings",
    "image_generations": "images",
    "audio_speech": "speech",
    "list_models": "models",
    "retrieve_model": "models",
    "usage": "usage",
}


def build(config: Config, *, access_log: AccessLog | None = None) -> web.Application:
    app = web.Application(
        middlewares=[gateway_middleware],
        client_max_size=config.server.max_body_bytes,
    )
    app[STATE] = GatewayState(config)
    app[ACCESS_LOG] = access_log or AccessLog(
        enabled=config.logging.access_log, text=config.logging.format == "text"
    )
    app.cleanup_ctx.append(state_ctx)
    app.cleanup_ctx.append(access_log_ctx)
    app.cleanup_ctx.append(ops.metrics_listener_ctx)
    app[ops.SYSTEMD] = ops.Systemd()
    app.cleanup_ctx.append(ops.systemd_ctx)
    app.on_response_prepare.append(_add_headers)

    for prefix in API_PREFIXES:
        app.router.add_post(f"{prefix}/chat/completions", handlers.chat_completions)
        app.router.add_post(f"{prefix}/embeddings", handlers.embeddings)
        app.router.add_post(f"{prefix}/images/generations", handlers.image_generations)
        app.router.add_post(f"{prefix}/audio/speech", handlers.audio_speech)
        app.router.add_get(f"{prefix}/models", handlers.list_models, allow_head=False)
        app.router.add_get(
            f"{prefix}/models/{{model:.+}}", handlers.retrieve_model, allow_head=False
        )
        app.router.add_get(f"{prefix}/usage", handlers.usage, allow_head=False)
    app.router.add_post("/api/v1/chat", handlers.chat_completions)
    admin.add_routes(app)
    dashboard.add_routes(app)
    ops.add_routes(app)
    return app


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id and runtime, every error as OpenAI's envelope, then usage and access log."""
    if request.path in QUIET_PATHS:
        return await _quiet(request, handler)
    state = request.app[STATE]
    rt = state.runtime
    rt.enter()
    exchange = Exchange(_request_id(request), rt, _client_ip(request, state))
    exchange.endpoint = ENDPOINTS.get(getattr(handler, "__name__", ""), "other")
    request[EXCHANGE] = exchange
    state.in_flight[id(exchange)] = exchange
    try:
        try:
            response = await handler(request)
        except GatewayError as e:
            exchange.fail(e)
            response = error_response(e)
            # its traceback's frames hold the error (and the request, its body): a cycle
            # that would wait for the collector, which runs seldom (serve.collect_less)
            e.__traceback__ = None
        except web.HTTPException as e:
            if e.status < 400:
                raise
            error = _from_http_exception(e, rt.config)
            exchange.fail(error)
            response = error_response(error)
        except Exception as e:
            transport = request.transport
            if isinstance(e, ConnectionError) and (transport is None or transport.is_closing()):
                exchange.client_closed = True  # the client left while the gateway wrote to it
                # nothing reaches it now; aiohttp ends a response to a gone client quietly,
                # where a raise would log a traceback for this routine event
                return web.Response(status=499)
            if request.writer.output_size > 0:
                exchange.error_code = "internal_error"
                raise  # the answer has begun: aiohttp logs it and drops the connection
            error = _unexpected(request, exchange.request_id)
            exchange.fail(error)
            response = error_response(error)
        exchange.status = response.status
        return response
    except asyncio.CancelledError:
        exchange.client_closed = True  # the client went away: its request is cancelled
        raise
    finally:
        rt.leave()
        # once aiohttp has handed the answer to the socket (the rest of this step): the client
        # need not wait for its usage record, metrics and log line; it stays in flight (for
        # a drain) until they are done
        state.loop.call_soon(_settle, request, exchange, state)


async def _quiet(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Health checks and scrapes: no accounting, and no log line unless refused or failed (a
    scrape with a wrong key is worth one; a probe every few seconds is not)."""
    started = time.perf_counter()
    error: GatewayError | None = None
    request_id = ""
    try:
        response = await handler(request)
    except GatewayError as e:
        error = e
    except web.HTTPException as e:
        if e.status < 400:
            raise
        error = _from_http_exception(e, request.app[STATE].config)
    except Exception:
        request_id = _request_id(request)
        error = _unexpected(request, request_id)
    latency = time.perf_counter() - started
    if error is None:
        response.headers[SERVER_TIMING] = f"gateway;dur={latency * 1000:.2f}"
        return response
    request_id = request_id or _request_id(request)
    response = error_response(error)
    response.headers[SERVER_TIMING] = f"gateway;dur={latency * 1000:.2f}"
    response.headers[REQUEST_ID] = request_id
    access_log = request.app[ACCESS_LOG]
    if access_log.enabled:
        access_log.write(
            {
                "ts": access_log.timestamp(time.time() - latency),
                "request_id": request_id,
                "method": request.method,
                "path": request.path,
                "status": error.status,
                "outcome": error.code or error.type,
                "key_id": None,
                "client_ip": _client_ip(request, request.app[STATE]),
                "latency_ms": round(latency * 1000, 2),
            }
        )
    return response


def _request_id(request: web.Request) -> str:
    """The client's X-Request-Id if it is a sane one, else a new id."""
    client_id = request.headers.get("X-Request-Id")
    return client_id if client_id and _CLIENT_REQUEST_ID.match(client_id) else _new_request_id()


def _client_ip(request: web.Request, state: GatewayState) -> str:
    forwarded = request.headers.get("X-Forwarded-For")
    return state.limiter.client_ip(request.remote, forwarded) or ""


def _settle(request: web.Request, exchange: Exchange, state: GatewayState) -> None:
    """Account for a request that has ended; never raises (it runs as a loop callback)."""
    try:
        _account(request, exchange, state)
    except Exception:
        log.exception("accounting failed for request %s", exchange.request_id)
    finally:
        del state.in_flight[id(exchange)]


def _account(request: web.Request, exchange: Exchange, state: GatewayState) -> None:
    """Record the request's usage and write its access log line."""
    latency_ms = (time.perf_counter() - exchange.started) * 1000
    ttft_ms = (exchange.first_byte_at - exchange.started) * 1000 if exchange.first_byte_at else None
    usage = exchange.usage
    deployment = exchange.deployment
    if (
        usage.streamed_chars
        and deployment is not None
        and (not usage.reported or exchange.outcome != "ok")
    ):
        # a stream that ended early never got the upstream's final count: estimate
        usage.prompt_tokens = usage.prompt_tokens or exchange.prompt_estimate
        usage.completion_tokens = usage.estimate_output()
    cost = cost_of(deployment.model, usage) if deployment is not None else 0.0
    status = exchange.status or (499 if exchange.client_closed else 500)
    provider = deployment.provider.name if deployment else ""
    m = state.metrics
    m.requests.inc((exchange.endpoint, exchange.model, provider, str(status)))
    m.duration.observe((exchange.endpoint,), latency_ms / 1000)
    if ttft_ms is not None:
        m.ttft.observe((exchange.model,), ttft_ms / 1000)
    if usage.prompt_tokens or usage.completion_tokens:
        model = exchange.model
        m.tokens.inc((model, provider, "prompt"), usage.prompt_tokens)
        m.tokens.inc((model, provider, "completion"), usage.completion_tokens)
        if usage.cached_tokens:
            m.tokens.inc((model, provider, "cached"), usage.cached_tokens)
        if usage.cache_write_tokens:
            m.tokens.inc((model, provider, "cache_write"), usage.cache_write_tokens)
        if usage.reasoning_tokens:
            m.tokens.inc((model, provider, "reasoning"), usage.reasoning_tokens)
        m.cost.inc((model, provider), cost)
    if exchange.refused:
        m.rejections.inc((exchange.outcome,))
    ticket = exchange.ticket
    if ticket is not None:  # admitted by the limiter: settle, and account for it
        ticket.settle(usage.total_tokens, cost)
        # positional: building a NamedTuple by keyword costs three times as much
        state.usage.record(
            UsageRecord(
                exchange.ts,
                exchange.request_id,
                exchange.key_id,
                exchange.client_ip,
                exchange.endpoint,
                exchange.model,
                deployment.provider.name if deployment else "",
                deployment.upstream_model if deployment else "",
                status,
                exchange.outcome,
                usage.prompt_tokens,
                usage.completion_tokens,
                usage.cached_tokens,
                usage.cache_write_tokens,
                usage.reasoning_tokens,
                cost,
                latency_ms,
                ttft_ms,
                exchange.stream,
            )
        )
    access_log = request.app[ACCESS_LOG]
    if not access_log.enabled:
        return
    access_log.write(
        {
            "ts": access_log.timestamp(exchange.ts),
            "request_id": exchange.request_id,
            "method": request.method,
            "path": request.path,
            "status": status,
            "outcome": exchange.outcome,
            "key_id": exchange.key_id or None,
            "client_ip": exchange.client_ip,
            "model": exchange.model or None,
            "provider": deployment.provider.name if deployment else None,
            "stream": exchange.stream,
            "prompt_tokens": usage.prompt_tokens,
            "completion_tokens": usage.completion_tokens,
            "cost": cost,
            "latency_ms": round(latency_ms, 2),
            "ttft_ms": round(ttft_ms, 2) if ttft_ms is not None else None,
            "attempts": exchange.attempts,
            "fallbacks": exchange.fallbacks,
        }
    )


def _unexpected(request: web.Request, request_id: str | None) -> GatewayError:
    """A bug or an unforeseen fault: its traceback goes to the log, the client gets a bare
    500 in the envelope (no exception text, which might hold anything)."""
    log.exception(
        "unexpected error answering %s %s (request %s)",
        request.method,
        request.path[:200],
        request_id or "-",
    )
    where = f" under request id {request_id}" if request_id else ""
    return GatewayError(
        f"The gateway failed to answer this request; the error is in its log{where}.",
        code="internal_error",
    )


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers,
    )


def _from_http_exception(e: web.HTTPException, config: Config) -> GatewayError:
    if isinstance(e, web.HTTPNotFound):
        return NotFound(
            "Unknown endpoint. See GET /v1/models and the API reference.",
            code="unknown_endpoint",
        )
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return MethodNotAllowed(f"Method not allowed; use {allowed}.", headers={"Allow": allowed})
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            "The request body is larger than the gateway accepts "
            f"({config.server.max_body_bytes} bytes)."
        )
    err = GatewayError(e.reason, code=None, status=e.status)
    err.type = "invalid_request_error" if e.status < 500 else "server_error"
    return err


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    exchange = request.get(EXCHANGE)
    if exchange is None:
        return
    headers = response.headers
    headers[REQUEST_ID] = exchange.request_id
    ticket = exchange.ticket
    if ticket is not None:
        headers.update(ticket.headers)
        if ticket.warning:
            headers[GATEWAY_WARNING] = ticket.warning
    elif exchange.limits is not None:
        headers.update(handlers.unadmitted_headers(request, exchange))
    # who answered; unknown (and not said) when keep-alives started a stream before that
    if exchange.served is not None:
        headers[GATEWAY_PROVIDER] = exchange.served.provider.name
        headers[GATEWAY_MODEL] = exchange.served.id
    # the gateway's own time and the upstream's, so that operators can see the overhead
    now = time.perf_counter()
    if exchange.upstream_started:
        upstream = (exchange.upstream_ended or now) - exchange.upstream_started
        own = now - exchange.started - upstream
        headers[SERVER_TIMING] = f"gateway;dur={own * 1000:.2f}, upstream;dur={upstream * 1000:.2f}"
    else:
        headers[SERVER_TIMING] = f"gateway;dur={(now - exchange.started) * 1000:.2f}"


def _new_request_id() -> str:
    # unique, not secret: 96 random bits without a getrandom() system call per request
    return f"req_{getrandbits(96):024x}"
