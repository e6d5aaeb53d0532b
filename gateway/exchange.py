"""What the gateway knows about one request while it runs: who, which model, timings, usage.

The middleware creates it; the handler fills it in; logging and usage accounting read it when
the response is done.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from .errors import GatewayError
    from .router import Deployment
    from .translate.base import Usage


class Exchange:
    __slots__ = (
        "client_closed",
        "deployment",
        "error_code",
        "first_byte_at",
        "key_id",
        "model",
        "request_id",
        "started",
        "status",
        "upstream_ended",
        "upstream_started",
        "usage",
    )

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.started = time.perf_counter()
        self.key_id: str | None = None
        self.model: str | None = None  # as the client asked for it
        self.deployment: Deployment | None = None
        self.status = 0
        self.usage: Usage | None = None
        self.error_code: str | None = None
        self.client_closed = False
        self.upstream_started = 0.0
        self.upstream_ended = 0.0
        self.first_byte_at = 0.0  # when the first streamed byte went to the client

    def start_upstream(self, requested: str, deployment: Deployment) -> None:
        self.model = requested
        self.deployment = deployment
        self.upstream_started = time.perf_counter()

    def end_upstream(self) -> None:
        if self.upstream_ended == 0.0:
            self.upstream_ended = time.perf_counter()

    def fail(self, error: GatewayError) -> None:
        self.error_code = error.code
        self.end_upstream()


EXCHANGE = web.RequestKey("exchange", Exchange)
