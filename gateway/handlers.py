"""One coroutine per endpoint; each reads top to bottom as the request path.

authenticate -> parse and check the body -> route the model -> translate -> send upstream ->
return the response or pipe the stream. Errors are raised as ``GatewayError`` and turned into
OpenAI's envelope by the middleware in ``app.py``.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import orjson
from aiohttp import web

from . import validate
from .auth import Principal
from .catalog import model_list, model_object
from .errors import GatewayError, ModelNotFound, UnsupportedMediaType
from .exchange import EXCHANGE, Exchange
from .runtime import RUNTIME, Runtime
from .translate.base import Endpoint, StreamInterrupted, Translator, translator_for
from .translate.sse import encode

if TYPE_CHECKING:
    from .router import Route
    from .schema.openai import JSONObject
    from .upstream import UpstreamResponse


async def chat_completions(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME].current  # this request runs on this config to its end
    principal = authenticate(request, rt)
    body = validate.chat_request(await read_json(request))
    route = rt.router.resolve(body["model"], principal, "chat")
    return await forward(request, rt, route, dict(body), "chat")


async def embeddings(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME].current
    principal = authenticate(request, rt)
    body = validate.embedding_request(await read_json(request))
    route = rt.router.resolve(body["model"], principal, "embeddings")
    return await forward(request, rt, route, dict(body), "embeddings")


async def image_generations(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME].current
    principal = authenticate(request, rt)
    body = validate.image_request(await read_json(request))
    route = rt.router.resolve(body["model"], principal, "images")
    return await forward(request, rt, route, body, "images")


async def audio_speech(request: web.Request) -> web.StreamResponse:
    rt = request.app[RUNTIME].current
    principal = authenticate(request, rt)
    body = validate.speech_request(await read_json(request))
    route = rt.router.resolve(body["model"], principal, "speech")
    return await forward(request, rt, route, body, "speech")


async def list_models(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    principal = authenticate(request, rt)
    return json_response(model_list(rt.router, principal, request.query))


async def retrieve_model(request: web.Request) -> web.Response:
    rt = request.app[RUNTIME].current
    principal = authenticate(request, rt)
    name = request.match_info["model"]
    found = model_object(rt.router, principal, name)
    if found is None:
        raise ModelNotFound(f"The model '{name}' does not exist.", param="model")
    return json_response(found)


async def forward(
    request: web.Request, rt: Runtime, route: Route, body: JSONObject, endpoint: Endpoint
) -> web.StreamResponse:
    """Send the request to the route's deployment and answer with what comes back."""
    exchange = request[EXCHANGE]
    deployment = route.deployments[0]
    translator = translator_for(deployment, endpoint, route.requested)
    call = translator.request(body)
    exchange.start_upstream(route.requested, deployment)
    try:
        upstream = await rt.upstreams[deployment.provider.name].send(call)
        try:
            if upstream.status >= 400:
                raw = await upstream.read()
                raise translator.response_error(upstream.status, raw, upstream.headers)
            if call.stream:
                return await pipe(request, upstream, translator, endpoint, exchange)
            answer = translator.response_body(await upstream.read())
            exchange.end_upstream()
            return web.Response(body=answer, content_type="application/json")
        finally:
            upstream.release()
    finally:
        exchange.usage = translator.usage


async def pipe(
    request: web.Request,
    upstream: UpstreamResponse,
    translator: Translator,
    endpoint: Endpoint,
    exchange: Exchange,
) -> web.StreamResponse:
    """Pass the upstream's stream to the client chunk by chunk, as each chunk arrives.

    Once the first byte is out the status is sent, so a failure from here on reaches the
    client as an error event in OpenAI's shape (SSE) or as a cut connection (binary audio).
    """
    sse = endpoint == "chat"
    media_type = (
        "text/event-stream"
        if sse
        else upstream.headers.get("Content-Type", "application/octet-stream")
    )
    response = web.StreamResponse(
        headers={
            "Content-Type": media_type,
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",  # asks nginx-style proxies not to buffer the stream
        }
    )
    await response.prepare(request)
    try:
        async for chunk in upstream.chunks():
            out = translator.response_chunk(chunk)
            if out:
                if not exchange.first_byte_at:
                    exchange.first_byte_at = time.perf_counter()
                await response.write(out)
        out = translator.response_end()
        if out:
            await response.write(out)
    except (GatewayError, StreamInterrupted) as e:
        partial, error = (e.partial, e.error) if isinstance(e, StreamInterrupted) else (b"", e)
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
    exchange.end_upstream()
    await response.write_eof()
    return response


def authenticate(request: web.Request, rt: Runtime) -> Principal:
    principal = rt.keys.authenticate(request.headers)
    request[EXCHANGE].key_id = principal.key_id
    return principal


async def read_json(request: web.Request) -> JSONObject:
    content_type = request.headers.get("Content-Type", "")
    if content_type and not content_type.lower().startswith("application/json"):
        raise UnsupportedMediaType(
            f"Unsupported Content-Type '{content_type[:80]}'; send 'application/json'."
        )
    return validate.parse_json_object(await request.read())


def json_response(obj: object) -> web.Response:
    return web.Response(body=orjson.dumps(obj), content_type="application/json")
