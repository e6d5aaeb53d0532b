"""The baseline: a bare aiohttp + uvloop reverse proxy that does nothing but forward.

Every POST goes to the same path on the upstream with the same body; the answer comes back
whole, or piped chunk by chunk when it is a stream. No auth, no parsing, no logging.
``python -m bench.bare_proxy --port 8000 --upstream http://127.0.0.1:9000``
"""

from __future__ import annotations

import argparse
from collections.abc import AsyncIterator

import aiohttp
import uvloop
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def forward(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    url = request.app[UPSTREAM] + request.path
    headers = {"Content-Type": "application/json"}
    async with request.app[SESSION].post(url, data=body, headers=headers) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if not content_type.startswith("text/event-stream"):
            raw = await upstream.read()
            return web.Response(
                status=upstream.status, body=raw, headers={"Content-Type": content_type}
            )
        response = web.StreamResponse(
            status=upstream.status, headers={"Content-Type": content_type}
        )
        await response.prepare(request)
        async for chunk in upstream.content.iter_any():
            await response.write(chunk)
        await response.write_eof()
        return response


async def session_ctx(app: web.Application) -> AsyncIterator[None]:
    connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=60)
    app[SESSION] = aiohttp.ClientSession(connector=connector, cookie_jar=aiohttp.DummyCookieJar())
    yield
    await app[SESSION].close()


def main() -> None:
    parser = argparse.ArgumentParser(description="bare pass-through proxy (the bench baseline)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--upstream", default="http://127.0.0.1:9000")
    ns = parser.parse_args()
    app = web.Application()
    app[UPSTREAM] = ns.upstream.rstrip("/")
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/{tail:.*}", forward)
    web.run_app(
        app,
        host="127.0.0.1",
        port=ns.port,
        access_log=None,
        backlog=4096,  # never limited by SYN drops: the baseline is an ideal proxy
        print=None,
        loop=uvloop.new_event_loop(),
    )


if __name__ == "__main__":
    main()
