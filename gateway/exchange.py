"""What the gateway knows about one request while it runs: who, which model, timings, usage.

The middleware creates it; the handler fills it in; the usage record, the access log line and
the timing headers are made from it when the response is done.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from aiohttp import web

from .translate.base import Usage

if TYPE_CHECKING:
    from .errors import GatewayError
    from .limits import Admission, EffectiveLimits
    from .resilience import Deadline
    from .router import Deployment
    from .runtime import Runtime


class Exchange:
    __slots__ = (
        "attempts",
        "client_closed",
        "client_ip",
        "cost_estimate",
        "deadline",
        "deployment",
        "endpoint",
        "error_code",
        "fallbacks",
        "first_byte_at",
        "halted",
        "key_id",
        "limits",
        "model",
        "output_estimate",
        "prompt_estimate",
        "refused",
        "request_id",
        "runtime",
        "served",
        "started",
        "status",
        "stream",
        "ticket",
        "ts",
        "upstream_ended",
        "upstream_started",
        "usage",
    )

    def __init__(self, request_id: str, runtime: Runtime, client_ip: str) -> None:
        self.request_id = request_id
        self.runtime = runtime  # the config this request runs on, to its end
        self.client_ip = client_ip
        self.ts = time.time()
        self.started = time.perf_counter()
        self.endpoint = ""
        self.stream = False
        self.key_id = ""
        self.limits: EffectiveLimits | None = None  # the key's, once authenticated
        self.model = ""  # as the client asked for it
        self.deployment: Deployment | None = None  # the one that served, or was tried last
        self.served: Deployment | None = None  # the one that answered, once it has
        self.deadline: Deadline | None = None  # for every upstream call, once the first is made
        self.status = 0
        self.usage = Usage()
        self.error_code: str | None = None
        self.client_closed = False
        self.attempts = 0  # upstream requests made, retries and fallbacks included
        self.fallbacks = 0
        self.upstream_started = 0.0
        self.upstream_ended = 0.0
        self.first_byte_at = 0.0  # when the first streamed content went to the client
        self.ticket: Admission | None = None  # the limiter's reservation, once admitted
        self.prompt_estimate = 0  # input tokens as estimated before sending
        self.output_estimate = 0  # output tokens the admission reserved
        self.cost_estimate = 0.0  # and the cost it reserved
        self.refused = False  # by the gateway's own limits
        # set by the server to end a stream it cannot wait for (shutdown), with the reason
        self.halted: asyncio.Future[GatewayError] | None = None

    def start_upstream(self, deployment: Deployment) -> None:
        self.deployment = deployment
        if not self.upstream_started:
            self.upstream_started = time.perf_counter()

    def end_upstream(self) -> None:
        if not self.upstream_ended:
            self.upstream_ended = time.perf_counter()

    def fail(self, error: GatewayError) -> None:
        self.error_code = error.code or error.type
        self.end_upstream()

    @property
    def outcome(self) -> str:
        if self.client_closed:
            return "client_closed"
        return self.error_code or "ok"


EXCHANGE = web.RequestKey("exchange", Exchange)
