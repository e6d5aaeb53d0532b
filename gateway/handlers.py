"""One coroutine per endpoint; each reads top to bottom as the request path.

authenticate -> parse and check the body -> route the model -> forward: for each deployment in
order (fallbacks are this loop), translate, send with retries, and return the answer or pipe
the stream. Errors are raised as ``GatewayError`` and turned into OpenAI's envelope by the
middleware in ``app.py``, which also records usage and logs the request.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import date
from functools import partial
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from . import validate
from .auth import Principal
from .catalog import model_list, model_object
from .errors import (
    Forbidden,
    GatewayError,
    InvalidRequest,
    ModelNotFound,
    QuotaExceeded,
    RequestTimeout,
    ServiceUnavailable,
    UnsupportedMediaType,
    UpstreamTimeout,
    retry_after_seconds,
)
from .exchange import EXCHANGE, Exchange
from .limits import EndpointClass
from .metrics import Metrics
from .resilience import Breaker, Cutoff, Deadline, OutOfTime, weighted_order
from .runtime import STATE, Runtime
from .streaming import Answer, KeepAlive, StreamTimeouts, StreamWatch, pipe, prepare_sse
from .translate.base import (
    Endpoint,
    StreamInterrupted,
    Translator,
    UpstreamCall,
    Usage,
    translator_for,
)
from .translate.sse import encode
from .usage import cost_of, default_period

if TYPE_CHECKING:
    from .router import Deployment, Route
    from .schema.openai import JSONObject
    from .upstream import Upstream


async def chat_completions(request: web.Request) -> web.StreamResponse:
    rt, principal = authenticate(request)
    chat = validate.chat_request(await read_json(request))
    body: JSONObject = dict(chat)
    route = rt.router.resolve(chat["model"], principal, "chat")
    await admit(request, principal, route, body, "chat")
    return await forward(request, rt, route, body, "chat")


async def embeddings(request: web.Request) -> web.StreamResponse:
    rt, principal = authenticate(request)
    embed = validate.embedding_request(await read_json(request))
    body: JSONObject = dict(embed)
    route = rt.router.resolve(embed["model"], principal, "embeddings")
    await admit(request, principal, route, body, "embeddings")
    return await forward(request, rt, route, body, "embeddings")


async def image_generations(request: web.Request) -> web.StreamResponse:
    rt, principal = authenticate(request)
    body = validate.image_request(await read_json(request))
    route = rt.router.resolve(body["model"], principal, "images")
    await admit(request, principal, route, body, "images")
    return await forward(request, rt, route, body, "images")


async def audio_speech(request: web.Request) -> web.StreamResponse:
    rt, principal = authenticate(request)
    body = validate.speech_request(await read_json(request))
    route = rt.router.resolve(body["model"], principal, "speech")
    await admit(request, principal, route, body, "speech")
    return await forward(request, rt, route, body, "speech")


async def list_models(request: web.Request) -> web.Response:
    rt, principal = authenticate(request)
    await admit(request, principal, None, {}, "models")
    return json_response(model_list(rt.router, principal, request.query))


async def retrieve_model(request: web.Request) -> web.Response:
    rt, principal = authenticate(request)
    await admit(request, principal, None, {}, "models")
    name = request.match_info["model"]
    found = model_object(rt.router, principal, name)
    if found is None:
        if name in rt.router.models or name in rt.router.aliases:
            raise Forbidden(f"This API key may not use the model '{name}'.", param="model")
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    return json_response(found)


async def usage(request: web.Request) -> web.Response:
    """The caller's own usage: totals, per model and per day, for a period (this month)."""
    _, principal = authenticate(request)
    await admit(request, principal, None, {}, "usage")
    start, end = parse_period(request.query)
    return json_response(
        await request.app[STATE].usage.backend.summary(principal.key_id, start, end)
    )


async def forward(
    request: web.Request, rt: Runtime, route: Route, body: JSONObject, endpoint: Endpoint
) -> web.StreamResponse:
    """Try the route's deployments in order until one answers; stream or return its answer."""
    exchange = request[EXCHANGE]
    exchange.model = route.requested
    # only chat streams on request; speech always does; a stray "stream" elsewhere means nothing
    exchange.stream = endpoint == "speech" or (endpoint == "chat" and body.get("stream") is True)
    if exchange.stream:
        metrics = request.app[STATE].metrics
        metrics.in_flight_streams += 1
        try:
            return await forward_stream(request, rt, route, body, endpoint, exchange)
        finally:
            metrics.in_flight_streams -= 1
    answer = await open_upstream(request, rt, route, body, endpoint, exchange)
    translator = answer.translator
    try:
        out = translator.response_body(answer.head)
        # a request the upstream takes in parts (Gemini's 100-input embedding batches)
        while (call := translator.next_call()) is not None:
            out = translator.response_body(await send_next(request, rt, answer, call, exchange))
    finally:
        exchange.usage = translator.usage
    exchange.end_upstream()
    return web.Response(body=out, content_type="application/json")


async def forward_stream(
    request: web.Request,
    rt: Runtime,
    route: Route,
    body: JSONObject,
    endpoint: Endpoint,
    exchange: Exchange,
) -> web.StreamResponse:
    """Like `forward`, for answers that are piped. If the upstream takes long to answer at
    all, the client's stream starts early with keep-alive comments, so that proxies do not
    cut the connection; from then on, errors reach the client as an error event.

    The upstream is opened in this task; what must interrupt the wait (the server stopping,
    a keep-alive that found the client gone) cancels it, and the cancellation becomes that
    cause here. A cancellation from elsewhere (aiohttp's, when the client leaves) goes on.
    """
    s = rt.config.server
    loop = request.app[STATE].loop
    task = asyncio.current_task(loop)
    assert task is not None
    waiting, interrupted = True, False

    def interrupt(_: object = None) -> None:
        nonlocal interrupted
        # once, and not once the answer is in hand: then it is piped, and halted there
        if waiting and not interrupted:
            interrupted = True
            task.cancel()

    halted: asyncio.Future[GatewayError] = loop.create_future()
    halted.add_done_callback(interrupt)
    exchange.halted = halted
    keepalive = (
        KeepAlive(request, loop, s.keepalive_interval, interrupt) if endpoint == "chat" else None
    )
    answer: Answer | None = None
    error: GatewayError | None = None
    try:
        answer = await open_upstream(request, rt, route, body, endpoint, exchange)
    except GatewayError as e:
        error = e
    except BaseException as e:
        # only our own cancellation is handled here; another (aiohttp's, the client left) or
        # a bug goes on, and no comment may follow on this connection
        if not (isinstance(e, asyncio.CancelledError) and interrupted and task.cancelling() == 1):
            if keepalive is not None:
                keepalive.cancel()
            raise
        task.uncancel()
        gone = keepalive.failure if keepalive is not None else None
        if gone is not None:
            raise gone from None
        error = halted.result()
    finally:
        waiting = False
    try:
        response = await keepalive.stop() if keepalive is not None else None
    except BaseException:
        if answer is not None:  # the client left: close it, or the provider generates on
            answer.upstream.release()
        raise
    if error is not None:
        if response is None:
            raise error
        exchange.fail(error)
        await response.write(encode(error.body()))
        await response.write_eof()
        return response
    assert answer is not None
    p = answer.deployment.provider
    sse = endpoint == "chat"
    watch: StreamWatch | None = None
    try:
        if sse and response is None:
            response = await prepare_sse(request)
        timeouts = StreamTimeouts(
            idle=p.idle_timeout or s.idle_timeout,
            total=s.stream_timeout,
            keepalive=s.keepalive_interval if sse else math.inf,  # (no comments in audio)
        )
        watch = StreamWatch(loop, response, timeouts, p.name, answer.upstream)
        cutoff = budget_cutoff(rt, exchange, answer.deployment, answer.translator)
        halted.add_done_callback(lambda _: answer.upstream.abort())
        return await pipe(request, response, answer, exchange, watch, sse, cutoff)
    finally:
        if watch is not None:
            watch.stop()
        answer.upstream.release()
        exchange.usage = answer.translator.usage


def budget_cutoff(
    rt: Runtime, exchange: Exchange, deployment: Deployment, translator: Translator
) -> Callable[[], GatewayError | None] | None:
    """A check, run after each streamed chunk, that ends a stream whose real usage crosses
    the key's daily token quota or budget (when the config says to cut such streams).

    Within the output it reserved the stream cannot cross them, since admission counted
    that reservation against both, unless another request has since used more than it
    reserved: so the quota is looked at only once the stream outgrows its reservation or
    the key is overdrawn, not after every chunk.
    """
    ticket = exchange.ticket
    if ticket is None or not ticket.bounded or not rt.config.limits.cut_off_streams:
        return None
    model = deployment.model
    reserved = exchange.output_estimate
    prompt = exchange.prompt_estimate
    if cost_of(model, Usage(prompt_tokens=prompt, completion_tokens=reserved)) > (
        exchange.cost_estimate
    ):
        reserved = -1  # a fallback pricier than the model admission priced: check every chunk

    def over() -> GatewayError | None:
        output = translator.usage.estimate_output()
        if output <= reserved and ticket.reservation_holds():
            return None
        usage = Usage(prompt_tokens=prompt, completion_tokens=output)
        if ticket.exceeded(usage.total_tokens, cost_of(model, usage)):
            return QuotaExceeded(
                "This key's token quota or budget ran out during the stream; it was cut here."
            )
        return None

    return over


async def open_upstream(
    request: web.Request,
    rt: Runtime,
    route: Route,
    body: JSONObject,
    endpoint: Endpoint,
    exchange: Exchange,
) -> Answer:
    """The answer of the first deployment of the route that answers without error.

    Deployments whose breaker is open are skipped; a deployment that cannot express the
    request (a translation 400) or fails in a retryable way hands over to the next one. All
    of it happens within one deadline, the request timeout of the first deployment's
    provider: past it the client gets 504.
    """
    state = request.app[STATE]
    deployments = route.deployments
    weights = rt.router.weights.get(route.requested)
    if weights:
        deployments = tuple(weighted_order(deployments, weights))
    seconds = deployments[0].provider.request_timeout or rt.config.server.request_timeout
    loop = state.loop
    deadline = Deadline(loop, loop.time() + seconds, seconds)
    exchange.deadline = deadline
    failure: GatewayError | None = None
    for position, deployment in enumerate(deployments):
        breaker = state.breakers[deployment.id]
        if not breaker.allow():
            failure = failure or circuit_open(deployment)
            continue
        # a fallback says which model answered, in `model` as in X-Gateway-Model
        answering_as = route.requested if position == 0 else deployment.id
        translate = partial(translated, deployment, endpoint, answering_as, body)
        try:
            first = translate()
        except InvalidRequest as e:
            breaker.released()
            failure = failure or e
            continue
        exchange.start_upstream(deployment)
        if position:
            exchange.fallbacks += 1
        try:
            answer = await send(
                rt, deployment, first, translate, breaker, exchange, state.metrics, deadline
            )
        except GatewayError as e:
            if not e.may_fall_back or isinstance(e, OutOfTime):
                raise
            failure = e
            continue
        if position:
            state.metrics.fallbacks.inc((route.requested,))
        exchange.served = deployment
        return answer
    raise failure or ServiceUnavailable("No deployment could serve the request.")


def circuit_open(deployment: Deployment) -> ServiceUnavailable:
    return ServiceUnavailable(
        f"'{deployment.id}' is failing and paused (circuit open); try again shortly.",
        code="circuit_open",
    )


async def send_next(
    request: web.Request, rt: Runtime, answer: Answer, call: UpstreamCall, exchange: Exchange
) -> bytes:
    """The body of a further call of a request sent in parts: to the deployment that answered
    the first, with the same retries and deadline; a failure fails the whole request."""
    state = request.app[STATE]
    deployment = answer.deployment
    breaker = state.breakers[deployment.id]
    if not breaker.allow():
        raise circuit_open(deployment)
    assert exchange.deadline is not None  # set by open_upstream
    step = (answer.translator, call)
    sent = await send(
        rt, deployment, step, lambda: step, breaker, exchange, state.metrics, exchange.deadline
    )
    return sent.head


def translated(
    deployment: Deployment, endpoint: Endpoint, answering_as: str, body: JSONObject
) -> tuple[Translator, UpstreamCall]:
    """A fresh translator for one attempt (it holds that attempt's stream state), and the
    call it makes of the request."""
    translator = translator_for(deployment, endpoint, answering_as)
    return translator, translator.request(body)


async def send(
    rt: Runtime,
    deployment: Deployment,
    first: tuple[Translator, UpstreamCall],
    translate: Callable[[], tuple[Translator, UpstreamCall]],
    breaker: Breaker,
    exchange: Exchange,
    metrics: Metrics,
    deadline: Deadline,
) -> Answer:
    """Send one call to one deployment, retrying connection errors, 429 and 5xx with
    exponential backoff and full jitter (honouring Retry-After) until the deadline.

    An attempt succeeds once a non-stream answer is read whole, or once a stream has produced
    its first output for the client: a stream that opens with an error event, or sends no
    first token within the first-token timeout, failed like an HTTP error, since nothing has
    reached the client yet.
    """
    s = rt.config.server
    p = deployment.provider
    loop = deadline.loop
    task = asyncio.current_task(loop)
    assert task is not None
    first_token = p.first_token_timeout or s.first_token_timeout or p.request_timeout
    first_token = first_token or s.request_timeout
    upstream_client = rt.upstreams[p.name]
    translator, call = first
    attempt = 0
    settled = False
    try:
        while True:
            started = loop.time()
            if started >= deadline.at:
                raise deadline.passed()
            exchange.attempts += 1
            cutoff = min(deadline.at, started + first_token) if call.stream else deadline.at
            try:
                async with Cutoff(loop, task, cutoff):
                    answer = await attempt_once(upstream_client, call, translator, deployment)
            except TimeoutError:
                error: GatewayError = deadline.passed()
                if cutoff < deadline.at:
                    error = UpstreamTimeout(
                        f"provider '{p.name}' sent no first token within {first_token:g} s",
                        code="upstream_timeout",
                    )
                outcome = error.code or "error"
            except UpstreamRefused as e:
                error, outcome = e.error, str(e.status)
            except GatewayError as e:
                error, outcome = e, e.code or "error"
            else:
                metrics.upstream_attempts.inc((p.name, str(answer.upstream.status)))
                breaker.succeeded()
                settled = True
                return answer
            metrics.upstream_attempts.inc((p.name, outcome))
            if error.status >= 500:
                breaker.failed()
            else:
                breaker.succeeded()  # the provider is up; it refused this request
            settled = True
            if isinstance(error, OutOfTime) or not error.retryable or attempt >= s.retries:
                raise error
            delay = rt.backoff.delay(attempt, retry_after_seconds(error.headers.get("Retry-After")))
            if loop.time() + delay >= deadline.at:
                raise error  # the upstream's own answer says more than a timeout would
            await asyncio.sleep(delay)
            attempt += 1
            metrics.retries.inc((p.name,))
            if not breaker.allow():
                raise error
            settled = False
            translator, call = translate()
    finally:
        if not settled:
            breaker.released()


class UpstreamRefused(Exception):
    """The upstream answered with an error status."""

    def __init__(self, status: int, error: GatewayError) -> None:
        super().__init__(error.message)
        self.status = status
        self.error = error


async def attempt_once(
    upstream_client: Upstream, call: UpstreamCall, translator: Translator, deployment: Deployment
) -> Answer:
    """One request to the upstream: its answer, or the error it amounts to."""
    upstream = await upstream_client.send(call)
    if upstream.status >= 400:
        try:
            raw = await upstream.read()
        finally:
            upstream.release()
        raise UpstreamRefused(
            upstream.status, translator.response_error(upstream.status, raw, upstream.headers)
        )
    if not call.stream:
        try:
            return Answer(deployment, translator, upstream, await upstream.read(), None)
        finally:
            upstream.release()
    try:
        rest = upstream.chunks()
        async for chunk in rest:
            head = translator.response_chunk(chunk)
            if head:
                return Answer(deployment, translator, upstream, head, rest)
        return Answer(deployment, translator, upstream, translator.response_end(), None)
    except StreamInterrupted as e:
        if e.partial:  # the error comes after output: the stream is under way
            return Answer(deployment, translator, upstream, e.partial, failing(e.error))
        upstream.release()  # an error before any output: the attempt failed
        raise e.error from None
    except BaseException:
        upstream.release()
        raise


async def failing(error: GatewayError) -> AsyncIterator[bytes]:
    """The rest of a stream whose next event is an error."""
    raise error
    yield b""  # an async generator


# Output tokens reserved for a request that sets no max_tokens, on a model with no cap in the
# config: the reservation is released to the real count when the answer ends.
DEFAULT_OUTPUT_RESERVATION = 4096


async def admit(
    request: web.Request,
    principal: Principal,
    route: Route | None,
    body: JSONObject,
    endpoint: str,
) -> None:
    """Reserve the request's estimated tokens and cost against the key's limits, or raise 429.

    The estimate is the body's size in bytes / 4 for the input and, for a chat answer,
    ``max_tokens`` (else the model's cap, else DEFAULT_OUTPUT_RESERVATION) for each of its
    ``n`` choices.
    """
    exchange = request[EXCHANGE]
    prompt = output = 0
    cost = 0.0
    if route is not None:
        exchange.model = route.requested
        # the body as read, not Content-Length, which a chunked request does not send;
        # aiohttp keeps the bytes that read_json read, so nothing is read twice
        prompt = len(await request.read()) // 4
        model = route.deployments[0].model
        if endpoint == "chat":
            asked = body.get("max_completion_tokens") or body.get("max_tokens")
            output = (
                asked if isinstance(asked, int) else model.max_tokens or DEFAULT_OUTPUT_RESERVATION
            )
            choices = body.get("n")
            if isinstance(choices, int) and choices > 1:
                output *= choices
        cost = cost_of(model, Usage(prompt_tokens=prompt, completion_tokens=output))
    exchange.prompt_estimate = prompt
    exchange.output_estimate = output
    exchange.cost_estimate = cost
    limiter_class = endpoint_class(endpoint)
    state = request.app[STATE]
    try:
        wants = (principal.key_id, principal.limits, exchange.client_ip, limiter_class)
        if state.cluster is None:
            exchange.ticket = state.limiter.admit(*wants, prompt + output, cost)
        else:  # limits shared by the fleet, in Redis
            exchange.ticket = await state.cluster.admit(*wants, prompt + output, cost)
    except GatewayError:
        exchange.refused = True
        raise


def endpoint_class(endpoint: str) -> EndpointClass:
    """The limiter's bucket for an endpoint: chat, embeddings, or standard for the rest."""
    if endpoint == "chat":
        return "chat"
    if endpoint == "embeddings":
        return "embeddings"
    return "standard"


def unadmitted_headers(request: web.Request, exchange: Exchange) -> dict[str, str]:
    """X-RateLimit-* headers for a known key's request that ended before admission (a 400, a
    404), as they stand; none in a fleet, whose counters are in Redis."""
    state = request.app[STATE]
    if exchange.limits is None or exchange.refused or state.cluster is not None:
        return {}
    return state.limiter.peek(
        exchange.key_id, exchange.limits, exchange.client_ip, endpoint_class(exchange.endpoint)
    )


def parse_period(query: Mapping[str, str], now: float | None = None) -> tuple[date, date]:
    """`?start=YYYY-MM-DD&end=YYYY-MM-DD`, both days included; default: this month so far."""
    default_start, default_end = default_period(now or time.time())
    out = []
    for name, default in (("start", default_start), ("end", default_end)):
        raw = query.get(name)
        if not raw:
            out.append(default)
            continue
        try:
            out.append(date.fromisoformat(raw))
        except ValueError:
            raise InvalidRequest(
                f"'{name}' must be a date as YYYY-MM-DD, got '{raw[:40]}'.", param=name
            ) from None
    start, end = out
    if start > end:
        raise InvalidRequest("'start' must not be after 'end'.", param="start")
    return start, end


def authenticate(request: web.Request) -> tuple[Runtime, Principal]:
    exchange = request[EXCHANGE]
    rt = exchange.runtime
    principal = rt.keys.authenticate(request.headers)
    exchange.key_id = principal.key_id
    exchange.limits = principal.limits
    return rt, principal


async def read_json(request: web.Request) -> JSONObject:
    content_type = request.headers.get("Content-Type", "")
    if content_type and not content_type.lower().startswith("application/json"):
        raise UnsupportedMediaType(
            f"Unsupported Content-Type '{content_type[:80]}'; send 'application/json'."
        )
    # a client that sends its head and then stalls or trickles its body is not waited for
    # (no timer when the whole body came with the head, as it mostly does)
    try:
        if request.content.is_eof():
            raw = await request.read()
        else:
            async with asyncio.timeout(request[EXCHANGE].runtime.config.server.body_timeout):
                raw = await request.read()
    except TimeoutError:
        raise RequestTimeout(
            "The request body did not arrive in time.", headers={"Connection": "close"}
        ) from None
    return validate.parse_json_object(raw)


def json_response(obj: object) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")
