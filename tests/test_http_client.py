"""The lean upstream HTTP client (gateway/http_client.py) against real aiohttp servers on
loopback: keep-alive reuse, chunked bodies as they arrive, abandoned answers, TLS, timeouts."""

from __future__ import annotations

import asyncio
import base64
import socket
import ssl
import subprocess
from collections.abc import AsyncIterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.client_exceptions import ClientConnectionError
from aiohttp.client_proto import ResponseHandler
from aiohttp.streams import StreamReader
from aiohttp.test_utils import TestServer

from gateway.http_client import ConnectFailed, Pool, _Connection


class Echo:
    """A server that answers POST /v1/echo with what it got, and records the client ports."""

    def __init__(self) -> None:
        self.ports: list[int] = []
        self.heads: list[dict[str, str]] = []
        self.release = asyncio.Event()
        self.dropped = asyncio.Event()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/v1/echo", self.echo)
        app.router.add_post("/v1/close", self.close)
        app.router.add_post("/v1/chunked", self.chunked)
        app.router.add_post("/v1/slow", self.slow)
        app.router.add_post("/v1/trickle", self.trickle)
        return app

    def _seen(self, request: web.Request) -> None:
        assert request.transport is not None
        self.ports.append(request.transport.get_extra_info("peername")[1])
        self.heads.append(dict(request.headers))

    async def echo(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=await request.read(), content_type="application/json")

    async def close(self, request: web.Request) -> web.Response:
        self._seen(request)
        return web.Response(body=b"{}", headers={"Connection": "close"})

    async def chunked(self, request: web.Request) -> web.StreamResponse:
        self._seen(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b"first")
        await self.release.wait()  # the client must have read "first" without the end
        try:
            for _ in range(50):
                await response.write(b"more")
                await asyncio.sleep(0.02)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            self.dropped.set()  # a write to a closed connection, or the handler cancelled
            raise
        await response.write_eof()
        return response

    async def slow(self, request: web.Request) -> web.Response:
        self._seen(request)
        await asyncio.sleep(1)
        return web.Response(body=b"{}")

    async def trickle(self, request: web.Request) -> web.StreamResponse:
        """12 chunks 50 ms apart; with ?stall, then 5 s of silence before the end."""
        self._seen(request)
        response = web.StreamResponse()
        response.enable_chunked_encoding()
        await response.prepare(request)
        for _ in range(12):
            await response.write(b"a")
            await asyncio.sleep(0.05)
        if "stall" in request.query:
            await asyncio.sleep(5)
        await response.write_eof()
        return response


@pytest.fixture
async def echo(aiohttp_server) -> AsyncIterator[tuple[Echo, TestServer]]:  # type: ignore[no-untyped-def]
    fake = Echo()
    server = await aiohttp_server(fake.app())
    yield fake, server


def base_url(server: TestServer, scheme: str = "http") -> str:
    return f"{scheme}://127.0.0.1:{server.port}/v1"


async def test_keeps_one_connection_alive_for_sequential_calls(
    echo: tuple[Echo, TestServer],
) -> None:
    fake, server = echo
    pool = Pool(base_url(server), {"X-Provider": "p1"}, connect_timeout=2)
    for i in range(20):
        proto, message, payload = await pool.post("/echo", b'{"n": %d}' % i, 5)
        assert message.code == 200
        assert await payload.read() == b'{"n": %d}' % i
        pool.release(proto, payload)
    await pool.close()
    assert len(fake.ports) == 20
    assert len(set(fake.ports)) == 1
    head = fake.heads[-1]
    assert head["X-Provider"] == "p1"
    assert head["Host"] == f"127.0.0.1:{server.port}"
    assert head["Content-Length"] == str(len(b'{"n": 19}'))


async def _two_spied_connections(pool: Pool, fail: bool = False) -> list[int]:
    """Open two kept-alive connections; the sizes of the writes made on them from now on
    (asyncio's transports, which the tests run on, let `write` be replaced; uvloop's not).
    With `fail`, each such write raises instead."""
    answers = await asyncio.gather(*(pool.post("/echo", b"{}", 5) for _ in range(2)))
    for proto, _, payload in answers:
        await payload.read()
        pool.release(proto, payload)
    writes: list[int] = []

    def spy(data: bytes, real: Any) -> None:
        writes.append(len(data))
        if fail:
            raise RuntimeError("the transport refused the write")
        real(data)

    for proto, _ in pool._idle:
        transport: Any = proto.transport
        transport.write = partial(spy, real=transport.write)
    return writes


async def test_requests_begun_in_one_turn_are_written_after_it_back_to_back(
    echo: tuple[Echo, TestServer],
) -> None:
    """As ClientSession writes them on Python 3.11: a local provider gets the lot at once."""
    _, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    writes = await _two_spied_connections(pool)
    bodies = [b'{"n": 1}', b'{"n": 22}']
    calls = [asyncio.ensure_future(pool.post("/echo", body, 5)) for body in bodies]
    await asyncio.sleep(0)  # both calls ran up to their wait for the answer
    assert writes == []
    answers = await asyncio.gather(*calls)
    # one write each (head and body together), in the order the calls began
    assert len(writes) == 2 and writes[1] - writes[0] == len(bodies[1]) - len(bodies[0])
    assert [await payload.read() for _, _, payload in answers] == bodies
    await pool.close()


async def test_a_connection_closed_before_its_turn_writes_nothing(
    echo: tuple[Echo, TestServer], caplog: pytest.LogCaptureFixture
) -> None:
    fake, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    writes = await _two_spied_connections(pool)
    seen = len(fake.ports)
    proto = pool._idle[-1][0]  # the one the next call takes
    call = asyncio.ensure_future(pool.post("/echo", b"{}", 5))
    await asyncio.sleep(0)
    proto.close()
    with pytest.raises(ClientConnectionError):
        await call
    await asyncio.sleep(0.05)
    assert writes == []
    assert len(fake.ports) == seen  # the provider never saw it
    assert not [r for r in caplog.records if r.levelname in ("WARNING", "ERROR")]
    await pool.close()


async def test_a_write_that_fails_on_its_turn_fails_the_call_at_once(
    echo: tuple[Echo, TestServer],
) -> None:
    """With no caller to raise to, the callback fails the call's read: an error now, not
    a wait for the read timeout, and the connection is not kept."""
    _, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    writes = await _two_spied_connections(pool, fail=True)
    proto = pool._idle[-1][0]
    started = asyncio.get_running_loop().time()
    with pytest.raises(ClientConnectionError, match="could not be sent"):
        await pool.post("/echo", b"{}", 30)
    assert asyncio.get_running_loop().time() - started < 5  # not the 30 s read timeout
    assert len(writes) == 1
    assert proto.transport is None or proto.transport.is_closing()
    assert all(idle is not proto for idle, _ in pool._idle)
    await pool.close()


async def test_an_answer_with_connection_close_is_not_reused(
    echo: tuple[Echo, TestServer],
) -> None:
    fake, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    for _ in range(3):
        proto, _, payload = await pool.post("/close", b"{}", 5)
        assert await payload.read() == b"{}"
        pool.release(proto, payload)
    await pool.close()
    assert len(set(fake.ports)) == 3


async def test_a_chunked_body_is_read_as_it_arrives_and_an_unread_one_drops_the_connection(
    echo: tuple[Echo, TestServer],
) -> None:
    fake, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    proto, message, payload = await pool.post("/chunked", b"{}", 5)
    assert message.chunked
    assert await asyncio.wait_for(payload.readany(), 2) == b"first"
    fake.release.set()
    assert await asyncio.wait_for(payload.readany(), 2) == b"more"
    pool.release(proto, payload)  # not read to the end: the connection must go
    await asyncio.wait_for(fake.dropped.wait(), 5)
    proto, _, payload = await pool.post("/echo", b"{}", 5)
    assert await payload.read() == b"{}"
    pool.release(proto, payload)
    await pool.close()
    assert fake.ports[0] != fake.ports[1]


async def test_a_body_read_slowly_pauses_the_connection_and_resumes_it_whole(
    echo: tuple[Echo, TestServer],
) -> None:
    # 1 MB echoed (the test server's largest body): far above the reader's high-water mark,
    # so the connection pauses while the reader dawdles, and must resume (the pool only
    # resumes a paused one)
    _, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    body = bytes(range(256)) * 4000
    proto, message, payload = await pool.post("/echo", body, 5)
    assert message.code == 200
    got, paused = [], False
    while chunk := await asyncio.wait_for(payload.readany(), 5):
        got.append(chunk)
        await asyncio.sleep(0.005)
        paused = paused or proto._reading_paused
    assert paused
    assert b"".join(got) == body
    pool.release(proto, payload)
    proto, _, payload = await pool.post("/echo", b"{}", 5)  # and the connection is kept
    assert await payload.read() == b"{}"
    pool.release(proto, payload)
    await pool.close()


async def test_a_stream_paused_by_thousands_of_tiny_chunks_is_read_to_its_end() -> None:
    # aiohttp pauses a connection when more than 4,096 unread HTTP chunks pile up (keep-alive
    # comments to a slow reader); its parser can stay paused past the resume, and only the
    # reader's resume after each chunk lets it go on: a connection that ever paused must keep
    # getting those, or the end of the stream waits for the read timeout
    go, done = asyncio.Event(), asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        await reader.readexactly(2)
        head = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        head += b"Transfer-Encoding: chunked\r\n\r\n"
        writer.write(head + b"5\r\n: k\n\n\r\n" * 4097)
        await go.wait()
        last = b'data: {"a":1}\n\ndata: [DONE]\n\n'
        writer.write(b"%x\r\n%s\r\n0\r\n\r\n" % (len(last), last))
        await writer.drain()
        await done.wait()
        writer.close()
        await writer.wait_closed()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    pool = Pool(f"http://127.0.0.1:{port}/v1", {}, connect_timeout=2)
    proto, _, payload = await pool.post("/x", b"{}", 3)
    await asyncio.sleep(0.3)  # the tiny chunks arrive, unread
    got = b""
    while len(got) < 5 * 4097:
        got += await payload.readany()
    go.set()
    rest = b""
    while chunk := await asyncio.wait_for(payload.readany(), 2):
        rest += chunk
    assert rest == b'data: {"a":1}\n\ndata: [DONE]\n\n'
    pool.release(proto, payload)
    await pool.close()
    done.set()
    server.close()
    await server.wait_closed()


async def test_abort_ends_a_pending_read(echo: tuple[Echo, TestServer]) -> None:
    _, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    proto, _, payload = await pool.post("/chunked", b"{}", 5)
    assert await payload.readany() == b"first"
    reading = asyncio.ensure_future(payload.readany())
    await asyncio.sleep(0.05)
    assert not reading.done()
    pool.abort(proto, payload)
    with pytest.raises(ClientConnectionError):
        await asyncio.wait_for(reading, 2)
    await pool.close()


async def test_read_timeout_and_refused_connection(echo: tuple[Echo, TestServer]) -> None:
    _, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    with pytest.raises(TimeoutError):
        await pool.post("/slow", b"{}", 0.2)
    await pool.close()
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    refused = Pool(f"http://127.0.0.1:{port}/v1", {}, connect_timeout=2)
    with pytest.raises(ConnectFailed):
        await refused.post("/echo", b"{}", 1)


async def read_all(payload: StreamReader) -> bytes:
    body = b""
    while chunk := await payload.readany():
        body += chunk
    return body


async def test_the_read_timeout_bounds_each_wait_not_the_whole_body(
    echo: tuple[Echo, TestServer], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, server = echo
    pool = Pool(base_url(server), {}, connect_timeout=2)
    loop = asyncio.get_running_loop()
    timers = 0
    call_at = loop.call_at

    def counted(when: float, callback: Any, *args: Any, **kwargs: Any) -> asyncio.TimerHandle:
        nonlocal timers
        owner = getattr(callback, "__self__", None)
        timers += isinstance(owner, ResponseHandler)  # the connection's read timers only
        return call_at(when, callback, *args, **kwargs)

    # 0.6 s of chunks 50 ms apart under a 0.2 s read timeout: read whole
    monkeypatch.setattr(loop, "call_at", counted)
    started = loop.time()
    proto, _, payload = await pool.post("/trickle", b"{}", 0.2)
    assert await asyncio.wait_for(read_all(payload), 3) == b"a" * 12
    assert loop.time() - started > 0.5
    monkeypatch.undo()
    # a timer per wait that ran out early (a few), not one per chunk (aiohttp's way: 14)
    assert timers <= 6, timers
    pool.release(proto, payload)
    # the same chunks, then 5 s of silence: the wait after the last chunk times out
    proto, _, payload = await pool.post("/trickle?stall", b"{}", 0.2)
    body = b""
    with pytest.raises(TimeoutError):
        while chunk := await asyncio.wait_for(payload.readany(), 3):
            body += chunk
            last = loop.time()
    assert body == b"a" * 12
    assert 0.15 < loop.time() - last < 1.5
    pool.release(proto, payload)
    await pool.close()


async def test_a_shorter_read_timeout_than_the_armed_one_runs_out_first() -> None:
    # a pooled connection can keep one call's long read timer into a call with a short one
    loop = asyncio.get_running_loop()
    conn = _Connection(loop)
    conn.read_timeout = 5.0
    conn.start_timeout()
    conn.read_timeout = 0.1
    conn.start_timeout()
    await asyncio.sleep(0.4)
    assert isinstance(conn.exception(), TimeoutError)


async def test_https_verifies_the_certificate_and_keeps_alive(
    aiohttp_server,  # type: ignore[no-untyped-def]
    tmp_path: Path,
) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=127.0.0.1"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    fake = Echo()
    server = await aiohttp_server(fake.app(), ssl=server_ctx)
    trusting = ssl.create_default_context(cafile=str(cert))
    pool = Pool(base_url(server, "https"), {}, connect_timeout=2, ssl_context=trusting)
    for _ in range(3):
        proto, _, payload = await pool.post("/echo", b'{"tls": true}', 5)
        assert await payload.read() == b'{"tls": true}'
        pool.release(proto, payload)
    await pool.close()
    assert len(fake.ports) == 3
    assert len(set(fake.ports)) == 1
    # the system's CAs do not know this certificate: the connection is refused
    untrusting = Pool(base_url(server, "https"), {}, connect_timeout=2)
    with pytest.raises(ConnectFailed):
        await untrusting.post("/echo", b"{}", 5)


async def test_a_body_without_length_runs_to_the_close_and_configured_headers_win() -> None:
    """An answer with neither Content-Length nor chunks is read until the upstream closes;
    a configured header replaces the default of the same name, whatever its case."""
    heads: list[bytes] = []

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await reader.readuntil(b"\r\n\r\n"))
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n")
        writer.write(b"data: one\n\n")
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.write(b"data: two\n\n")
        writer.close()

    server = await asyncio.start_server(answer, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        pool = Pool(f"http://127.0.0.1:{port}", {"user-agent": "mine/1"}, connect_timeout=2)
        proto, message, payload = await pool.post("/v1/x", b"{}", 5)
        assert message.code == 200
        assert await payload.read() == b"data: one\n\ndata: two\n\n"
        pool.release(proto, payload)
        assert not pool._idle  # a connection ended by its close is not kept
        await pool.close()
    finally:
        server.close()
        await server.wait_closed()
    head = heads[0].decode().lower()
    assert head.count("user-agent:") == 1 and "user-agent: mine/1\r\n" in head
    assert head.startswith("post /v1/x http/1.1\r\n")
    with pytest.raises(ValueError):
        Pool("http://127.0.0.1:1", {"X-Bad": "a\r\nInjected: 1"}, connect_timeout=1)


async def test_credentials_in_the_base_url_are_sent_as_basic_auth(
    echo: tuple[Echo, TestServer],
) -> None:
    fake, server = echo
    pool = Pool(f"http://us%40er:pa%3Ass@127.0.0.1:{server.port}/v1", {}, connect_timeout=2)
    proto, _, payload = await pool.post("/echo", b"{}", 5)
    assert await payload.read() == b"{}"
    pool.release(proto, payload)
    await pool.close()
    assert fake.heads[0]["Authorization"] == "Basic " + base64.b64encode(b"us@er:pa:ss").decode()


async def test_a_host_name_is_looked_up_once_for_many_connections(
    echo: tuple[Echo, TestServer],
) -> None:
    fake, server = echo
    loop = asyncio.get_running_loop()
    lookups: list[str] = []
    real = loop.getaddrinfo

    async def counting(host: str, *args: object, **kw: object) -> object:
        lookups.append(host)
        return await real(host, *args, **kw)  # type: ignore[arg-type]

    loop.getaddrinfo = counting  # type: ignore[method-assign,assignment]
    try:
        pool = Pool(f"http://localhost:{server.port}/v1", {}, connect_timeout=2)
        answers = await asyncio.gather(*(pool.post("/echo", b"{}", 5) for _ in range(4)))
        for proto, _, payload in answers:
            assert await payload.read() == b"{}"
            pool.release(proto, payload)
        await pool.close()
    finally:
        del loop.getaddrinfo
    assert len(set(fake.ports)) == 4  # four connections at once
    assert lookups == ["localhost"]
