"""``build(config)``: the aiohttp application, its routes, middleware and lifecycle. Wiring only."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable

from aiohttp import web

from . import handlers
from .config import Config
from .errors import (
    GatewayError,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from .exchange import EXCHANGE, Exchange
from .runtime import RUNTIME, RuntimeHolder, runtime_ctx

log = logging.getLogger("gateway")

API_PREFIXES = ("/v1", "/api/v1")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_CLIENT_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


def build(config: Config) -> web.Application:
    app = web.Application(
        middlewares=[gateway_middleware],
        client_max_size=config.server.max_body_bytes,
    )
    app[RUNTIME] = RuntimeHolder(config)
    app.cleanup_ctx.append(runtime_ctx)
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
    app.router.add_post("/api/v1/chat", handlers.chat_completions)
    return app


@web.middleware
async def gateway_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Request id, and every error as OpenAI's envelope."""
    client_id = request.headers.get("X-Request-Id")
    exchange = Exchange(
        client_id if client_id and _CLIENT_REQUEST_ID.match(client_id) else _new_request_id()
    )
    request[EXCHANGE] = exchange
    try:
        response = await handler(request)
    except GatewayError as e:
        exchange.fail(e)
        response = error_response(e)
    except web.HTTPException as e:
        if e.status < 400:
            raise
        error = _from_http_exception(e)
        exchange.fail(error)
        response = error_response(error)
    exchange.status = response.status
    return response


def error_response(error: GatewayError) -> web.Response:
    return web.Response(
        status=error.status,
        body=error.body(),
        content_type="application/json",
        headers=error.headers,
    )


def _from_http_exception(e: web.HTTPException) -> GatewayError:
    if isinstance(e, web.HTTPNotFound):
        return NotFound(
            "Unknown endpoint. See GET /v1/models and the API reference.", code="unknown_endpoint"
        )
    if isinstance(e, web.HTTPMethodNotAllowed):
        allowed = ", ".join(sorted(e.allowed_methods))
        return MethodNotAllowed(f"Method not allowed; use {allowed}.", headers={"Allow": allowed})
    if isinstance(e, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge(
            f"The request body is larger than the gateway accepts ({e.text or 'too large'})."
        )
    err = GatewayError(e.reason, code=None, status=e.status)
    err.type = "invalid_request_error" if e.status < 500 else "server_error"
    return err


async def _add_headers(request: web.Request, response: web.StreamResponse) -> None:
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        response.headers["X-Request-Id"] = exchange.request_id


def _new_request_id() -> str:
    return "req_" + secrets.token_hex(12)
