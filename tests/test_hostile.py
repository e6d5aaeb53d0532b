"""Bad and hostile input: every case gets a clear 4xx or a closed connection, never a 500 or a
traceback, and holding connections without using them does not work."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.auth import hash_key, new_key

from .conftest import CLIENT_KEY, MakeGateway
from .test_cli import free_port

ROOT = Path(__file__).parent.parent
KEY = new_key()
ADMIN = new_key()
PATHS = [
    "/v1/chat/completions",
    "/api/v1/chat",
    "/v1/embeddings",
    "/v1/images/generations",
    "/v1/audio/speech",
]


class Running:
    def __init__(self, port: int, proc: subprocess.Popen[bytes]) -> None:
        self.port = port
        self.proc = proc

    def request(
        self, method: str, path: str, body: bytes = b"", headers: dict[str, str] | None = None
    ) -> tuple[int, bytes]:
        status, _, answer = self.exchange(method, path, body, {
            "Authorization": f"Bearer {KEY}", "Content-Type": "application/json",
            **(headers or {})})  # fmt: skip
        return status, answer

    def exchange(
        self, method: str, path: str, body: bytes, headers: dict[str, str]
    ) -> tuple[int, http.client.HTTPMessage, bytes]:
        """One request with exactly these headers: status, response headers, body."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        try:
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            return resp.status, resp.headers, resp.read()
        finally:
            conn.close()


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    tmp = tmp_path_factory.mktemp("hostile")
    config = tmp / "g.toml"
    config.write_text(f"""
[server]
max_body_bytes = 65536
header_timeout = 0.5
keepalive_timeout = 1.0

[storage]
path = "{tmp / "u.db"}"

[logging]
access_log = false

[admin]
key_hash = "{hash_key(ADMIN)}"

[[providers]]
name = "demo"
kind = "demo"
models = [
  {{ id = "echo" }},
  {{ id = "embed", capabilities = ["embeddings"] }},
  {{ id = "paint", capabilities = ["images"] }},
  {{ id = "voice", capabilities = ["speech"] }},
]

[[keys]]
id = "fuzz"
hash = "{hash_key(KEY)}"
""")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", str(config), "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )  # fmt: skip
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                break
        except OSError:
            time.sleep(0.05)
    yield Running(port, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr.decode()
    assert b"Traceback" not in stderr, stderr.decode()


def assert_clean_4xx(status: int, body: bytes) -> None:
    assert 400 <= status < 500, (status, body[:300])
    assert b"Traceback" not in body
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)
chat_like = st.fixed_dictionaries(
    {},
    optional={
        "model": st.sampled_from(["demo/echo", "demo/embed", "nope", ""]) | json_values,
        "messages": st.lists(
            st.fixed_dictionaries(
                {},
                optional={
                    "role": st.sampled_from(["user", "system", "robot"]) | json_values,
                    "content": json_values,
                },
            ),
            max_size=3,
        )
        | json_values,
        "stream": json_values,
        "max_tokens": json_values,
        "temperature": json_values,
        "input": json_values,
        "prompt": json_values,
        "tools": json_values,
        "n": json_values,
    },
)


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(path=st.sampled_from(PATHS), body=chat_like)
def test_random_json_never_breaks_an_endpoint(
    running: Running, path: str, body: dict[str, Any]
) -> None:
    status, answer = running.request("POST", path, json.dumps(body).encode())
    assert status < 500, (status, answer[:300])
    assert b"Traceback" not in answer
    if status >= 400:
        assert_clean_4xx(status, answer)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    path=st.sampled_from([*PATHS, "/v1/models", "/v1/usage", "/v1/nothing"]),
    raw=st.binary(max_size=300),
)
def test_random_bytes_never_break_an_endpoint(running: Running, path: str, raw: bytes) -> None:
    status, answer = running.request("POST", path, raw)
    assert status < 500, (status, answer[:300])
    assert b"Traceback" not in answer


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"[" * 100_000 + b"]" * 100_000, 413),  # bigger than max_body_bytes: never parsed
        (b'{"model": "demo/echo", "messages": ' + b"[" * 5000 + b"]" * 5000 + b"}", 400),
        (b'{"model": "demo/echo", "messages": [{"role": "user", "content": "\xff\xfe"}]}', 400),
        # a lone surrogate is not Unicode: refused, like invalid UTF-8
        (b'{"model": "demo/echo", "messages": [{"role": "user", "content": "\\ud800"}]}', 400),
        (b'\xef\xbb\xbf{"model": "demo/echo"}', 400),
        # a role that cannot be hashed (it was looked up in a set: a 500)
        (b'{"model": "demo/echo", "messages": [{"role": ["user"], "content": "hi"}]}', 400),
        (b'{"model": "demo/echo", "messages": [{"role": {"a": 1}, "content": "hi"}]}', 400),
    ],
)
def test_pathological_bodies(running: Running, body: bytes, code: int) -> None:
    status, answer = running.request("POST", "/v1/chat/completions", body)
    assert status == code, answer[:300]
    if code >= 400:
        assert_clean_4xx(status, answer)


def test_wrong_content_type_and_unknown_fields(running: Running) -> None:
    status, _answer = running.request("POST", "/v1/chat/completions", b"a=b",
                                     {"Content-Type": "application/x-www-form-urlencoded"})  # fmt: skip
    assert status == 415
    body = {"model": "demo/echo", "messages": [{"role": "user", "content": "hi"}], "frobnicate": 1}
    assert running.request("POST", "/v1/chat/completions", json.dumps(body).encode())[0] == 200


def test_huge_header_line_gets_400_and_a_closed_connection(running: Running) -> None:
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.split(b" ", 2)[1] in (b"400", b"431"), data[:100]


def test_slow_loris_connections_are_closed(running: Running) -> None:
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        closed = False
        for _ in range(50):
            time.sleep(0.1)
            try:
                s.sendall(b"X-Slow: 1\r\n")
            except OSError:
                closed = True
                break
            s.settimeout(0.01)
            try:
                if s.recv(1) == b"":
                    closed = True
                    break
            except TimeoutError:
                pass
    assert closed
    assert time.monotonic() - started < 3  # header_timeout 0.5 s, swept every ~0.1 s


def test_thousand_idle_connections_are_closed_and_memory_stays_bounded(running: Running) -> None:
    def rss() -> int:
        with open(f"/proc/{running.proc.pid}/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    before = rss()
    sockets = []
    try:
        for _ in range(1000):
            sockets.append(socket.create_connection(("127.0.0.1", running.port), timeout=5))
        time.sleep(0.3)
        assert rss() - before < 60_000_000  # well under 60 KB per idle connection
        time.sleep(1.5)  # past header_timeout: the gateway let go of them
        closed = 0
        for s in sockets:
            s.settimeout(0.5)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except (TimeoutError, OSError):
                pass
        assert closed == len(sockets)
    finally:
        for s in sockets:
            s.close()
    # still serving
    status, _ = running.request("GET", "/v1/models")
    assert status == 200


# --- the admin API and the dashboard -----------------------------------------------------------

FORM = "application/x-www-form-urlencoded"
ADMIN_PATHS = [
    "/admin/usage",
    "/admin/keys",
    "/admin/keys/fuzz-made/revoke",
    "/admin/keys/fuzz-made/rotate",
    "/admin/breakers",
]
DASHBOARD_PATHS = [
    "/dashboard",
    "/dashboard/login",
    "/dashboard/keys",
    "/dashboard/keys/fuzz-made",
    "/dashboard/keys/fuzz-made/revoke",
    "/dashboard/keys/fuzz-made/rotate",
    "/dashboard/usage",
    "/dashboard/live.json",
    "/dashboard/static/dashboard.css",
]
# header values http.client can send: printable Latin-1, no line breaks
header_text = st.text(
    alphabet=st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\x7f"),
    max_size=60,
)
content_types = (
    st.sampled_from(
        [
            FORM,
            f"{FORM}; charset=latin-1",
            f"{FORM}; charset=no-such-charset",
            "multipart/form-data",
            "multipart/form-data; boundary=xyz",
            "application/json",
            "text/plain",
        ]
    )
    | header_text
)
# a path segment of any text, percent-encoded as a client would send it
segments = st.text(max_size=20).map(lambda s: quote(s.encode("utf-8", "surrogatepass"), safe=""))


BAD_URLS = ["http://[", "http://[::1", "http://a]b/", "http://[zz]/"]  # urlsplit raises


@pytest.mark.parametrize("header", ["Origin", "Referer"])
@pytest.mark.parametrize("url", BAD_URLS)
def test_an_unparsable_origin_is_another_site(
    running: Running, session: tuple[str, str], header: str, url: str
) -> None:
    cookie, csrf = session
    for path, form in (("/dashboard/login", {"key": "x"}), ("/dashboard/keys", {"csrf": csrf})):
        status, _, answer = running.exchange(
            "POST", path, urlencode(form).encode(),
            {"Content-Type": FORM, "Cookie": cookie, header: url},
        )  # fmt: skip
        assert status == 403 and b"another site" in answer, (path, status, answer[:200])


def dashboard_login(running: Running) -> tuple[str, str]:
    """A dashboard session's cookie and its CSRF token."""
    status, headers, _ = running.exchange(
        "POST", "/dashboard/login", urlencode({"key": ADMIN}).encode(), {"Content-Type": FORM}
    )
    assert status == 303, status
    cookie = headers["Set-Cookie"].split(";")[0]
    status, _, page = running.exchange("GET", "/dashboard", b"", {"Cookie": cookie})
    match = re.search(rb'name="csrf" value="([^"]+)"', page)
    assert status == 200 and match
    return cookie, match.group(1).decode()


@pytest.fixture(scope="module")
def session(running: Running) -> tuple[str, str]:
    return dashboard_login(running)


@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        (FORM, b"key=\xff\xfe\xfd"),  # not UTF-8
        (FORM, b"csrf=x&id=caf\xe9"),
        (f"{FORM}; charset=no-such-charset", b"key=abc"),
        ("multipart/form-data", b"--x\r\n\r\n"),  # no boundary
        ("multipart/form-data; boundary=x", b"\xff--x\r\ngarbage"),
    ],
)
@pytest.mark.parametrize("path", ["/dashboard/login", "/dashboard/keys"])
def test_undecodable_dashboard_forms_get_400(
    running: Running, session: tuple[str, str], path: str, content_type: str, body: bytes
) -> None:
    cookie, _ = session
    status, headers, answer = running.exchange(
        "POST", path, body, {"Content-Type": content_type, "Cookie": cookie}
    )
    assert status == 400, (status, answer[:300])
    assert headers.get_content_type() == "text/html"
    assert b"could not be read" in answer and b"Traceback" not in answer


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
    path=st.sampled_from(ADMIN_PATHS)
    | st.tuples(segments, st.sampled_from(["/rotate", "/revoke", ""])).map(
        lambda t: f"/admin/keys/{t[0]}{t[1]}"
    )
    | segments.map(lambda s: "/admin/" + s),
    query=st.dictionaries(st.sampled_from(["start", "end", "key", "model"]), st.text(max_size=12)),
    body=st.binary(max_size=200)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.fixed_dictionaries(
        {}, optional={"id": json_values, "models": json_values, "tier": json_values,
                      "grace_seconds": json_values, "description": json_values}
    ).map(lambda v: json.dumps(v).encode()),
    auth=st.sampled_from(["admin", "none", "client"]) | header_text,
    content_type=content_types,
)  # fmt: skip
def test_the_admin_api_answers_garbage_with_a_json_4xx(
    running: Running,
    method: str,
    path: str,
    query: dict[str, str],
    body: bytes,
    auth: str,
    content_type: str,
) -> None:
    headers = {"Content-Type": content_type}
    if auth != "none":
        key = {"admin": ADMIN, "client": KEY}.get(auth, auth)
        headers["Authorization"] = f"Bearer {key}"
    url = path + ("?" + urlencode(query) if query else "")
    status, response_headers, answer = running.exchange(method, url, body, headers)
    assert status < 500, (status, answer[:300])
    assert response_headers.get_content_type() == "application/json", answer[:300]
    parsed = json.loads(answer)  # always JSON, errors in OpenAI's envelope
    if status >= 400:
        assert_clean_4xx(status, answer)
    else:
        assert "error" not in parsed
    assert ADMIN.encode() not in answer


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    method=st.sampled_from(["GET", "POST"]),
    path=st.sampled_from(DASHBOARD_PATHS)
    | st.tuples(segments, st.sampled_from(["", "/revoke", "/rotate"])).map(
        lambda t: f"/dashboard/keys/{t[0]}{t[1]}"
    )
    | segments.map(lambda s: "/dashboard/static/" + s),
    form=st.dictionaries(
        st.sampled_from(["csrf", "key", "id", "models", "tier", "description", "grace_seconds",
                         "confirm"]) | st.text(max_size=8),
        st.text(max_size=30),
        max_size=6,
    ),
    raw=st.none() | st.binary(max_size=200),
    with_csrf=st.booleans(),
    content_type=content_types,
    origin=st.sampled_from(["this", "none", "null", *BAD_URLS]) | header_text,
    extra=st.dictionaries(
        st.sampled_from(["Referer", "X-Forwarded-Host", "X-Forwarded-For", "X-Forwarded-Proto",
                         "X-Request-Id", "Accept", "Cookie"]),
        header_text,
        max_size=3,
    ),
)  # fmt: skip
def test_the_dashboard_answers_garbage_without_a_500(
    running: Running,
    session: tuple[str, str],
    method: str,
    path: str,
    form: dict[str, str],
    raw: bytes | None,
    with_csrf: bool,
    content_type: str,
    origin: str,
    extra: dict[str, str],
) -> None:
    cookie, csrf = session
    if with_csrf:
        form = {**form, "csrf": csrf}
    if path.endswith("/fuzz/revoke") or path.endswith("/fuzz/rotate"):
        return  # the other tests' key stays
    body = raw if raw is not None else urlencode(form).encode()
    headers = {"Content-Type": content_type, "Cookie": cookie, **extra}
    if origin != "none":
        headers["Origin"] = {"this": f"http://127.0.0.1:{running.port}"}.get(origin, origin)
    status, _, answer = running.exchange(method, path, body, headers)
    assert status < 500, (status, answer[:300])
    assert b"Traceback" not in answer and ADMIN.encode() not in answer
    # the session survived (nothing above may log it out)
    assert running.exchange("GET", "/dashboard", b"", {"Cookie": session[0]})[0] == 200


@pytest.mark.parametrize("key_id", ["a" * 65, "b" * 5000, "name\n", "-lead", "sp ace", "caf\u00e9"])
def test_key_ids_are_short_plain_names(running: Running, key_id: str) -> None:
    status, answer = running.request(
        "POST", "/admin/keys", json.dumps({"id": key_id}).encode(),
        {"Authorization": f"Bearer {ADMIN}"},
    )  # fmt: skip
    assert_clean_4xx(status, answer)
    assert json.loads(answer)["error"]["param"] == "id"
    assert len(answer) < 400  # a long id is not echoed back


def test_a_key_id_of_64_characters_is_fine(running: Running) -> None:
    status, answer = running.request(
        "POST", "/admin/keys", json.dumps({"id": "x" * 64}).encode(),
        {"Authorization": f"Bearer {ADMIN}"},
    )  # fmt: skip
    assert status == 201, answer


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("description", "d" * 201),
        ("description", {"not": "text"}),
        ("models", ["m"] * 101),
        ("models", ["m" * 201]),
        ("tier", "t" * 5000),
        ("tier", ["t" * 5000]),
    ],
    ids=[
        "long-description",
        "object-description",
        "101-models",
        "long-model",
        "long-tier",
        "list-tier",
    ],
)
def test_key_fields_are_bounded(running: Running, field: str, value: object) -> None:
    status, answer = running.request(
        "POST", "/admin/keys", json.dumps({"id": "bounded", field: value}).encode(),
        {"Authorization": f"Bearer {ADMIN}"},
    )  # fmt: skip
    assert_clean_4xx(status, answer)
    assert status == 400
    assert json.loads(answer)["error"]["param"] == field
    assert len(answer) < 400  # a long value is not echoed back


def test_key_fields_at_their_bounds_are_fine(running: Running) -> None:
    body = {"id": "at-bounds", "description": "d" * 200, "models": ["m" * 200] + ["*"] * 99}
    admin = {"Authorization": f"Bearer {ADMIN}"}
    status, answer = running.request("POST", "/admin/keys", json.dumps(body).encode(), admin)
    assert status == 201, answer
    _, listed = running.request("GET", "/admin/keys", b"", admin)
    [key] = [k for k in json.loads(listed)["data"] if k["id"] == "at-bounds"]
    assert (key["description"], key["models"]) == (body["description"], body["models"])


async def test_an_unexpected_error_is_a_json_500_and_a_logged_traceback(
    make_gateway: MakeGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A fault nothing foresaw (here: the usage database and the breakers blow up) is answered
    in the envelope, with nothing of the exception in it; the traceback goes to the log."""
    gateway = await make_gateway(extra=f'[admin]\nkey_hash = "{hash_key(ADMIN)}"\n')
    secret = "sk-secret-in-an-exception"

    async def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError(secret)

    def broken_states() -> None:
        raise KeyError(secret)

    monkeypatch.setattr(gateway.state.usage.backend, "admin_usage", broken)
    monkeypatch.setattr(gateway.state.usage.backend, "summary", broken)
    monkeypatch.setattr(gateway.state.breakers, "states", broken_states)
    admin = {"Authorization": f"Bearer {ADMIN}"}
    client = {"Authorization": f"Bearer {CLIENT_KEY}"}
    async with aiohttp.ClientSession() as session:
        for path, headers in (
            ("/admin/usage", admin),
            ("/admin/breakers", admin),
            ("/v1/usage", client),
            ("/metrics", admin),  # a quiet path
            ("/readyz", {}),
        ):
            async with session.get(
                gateway.url + path, headers={**headers, "X-Request-Id": "trace-500"}
            ) as resp:
                answer = await resp.read()
                assert resp.status == 500, (path, answer)
                assert resp.content_type == "application/json", path
            error = json.loads(answer)["error"]
            assert set(error) == {"message", "type", "param", "code"}
            assert (error["type"], error["code"]) == ("server_error", "internal_error")
            assert secret.encode() not in answer and b"Traceback" not in answer
            assert b"RuntimeError" not in answer and b"KeyError" not in answer
            if path not in ("/metrics", "/readyz"):
                assert resp.headers["X-Request-Id"] == "trace-500"
                assert "trace-500" in error["message"]
    logged = [r for r in caplog.records if r.getMessage().startswith("unexpected error")]
    assert len(logged) == 5
    assert all(r.exc_info is not None and r.levelname == "ERROR" for r in logged)
    assert "GET /admin/usage (request trace-500)" in logged[0].getMessage()
    assert isinstance(logged[0].exc_info[1], RuntimeError)  # type: ignore[index]
    # the gateway still serves
    answer = await gateway.aclient().chat.completions.create(
        model="demo/echo", messages=[{"role": "user", "content": "hi"}]
    )
    assert answer.choices[0].message.content
