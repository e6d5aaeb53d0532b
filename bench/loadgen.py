"""Closed-loop load: N keep-alive connections send the same request back to back for S seconds.

``wrk`` (C, from the system packages) does it when it is there; otherwise the built-in
generator on ``httpclient.Connection`` does, which costs more CPU per request on the load
core and so can cap the request rate of the fastest targets: the output says which one ran.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from .httpclient import Connection, Reply, build_request
from .procs import pin_argv


@dataclass(frozen=True)
class Load:
    """One request to send: where, and the exact bytes."""

    port: int
    path: str
    body: bytes
    headers: dict[str, str]

    def raw(self) -> bytes:
        return build_request(f"127.0.0.1:{self.port}", self.path, self.body, self.headers)


@dataclass
class LoadResult:
    ok: int  # responses with a 2xx status
    errors: int  # other statuses, connection errors, timeouts
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def percentile(ordered: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of an already sorted list; NaN when it is empty."""
    if not ordered:
        return float("nan")
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


def ensure_wrk(allow_install: bool) -> tuple[str | None, str]:
    """The wrk binary, installing Debian's package when missing and allowed; and what happened."""
    found = shutil.which("wrk")
    if found:
        return found, "wrk (already installed)"
    if not allow_install:
        return None, "built-in asyncio generator (wrk missing, install not allowed)"
    if shutil.which("apt-get") is None:
        return None, "built-in asyncio generator (wrk missing, no apt-get)"
    install = ["apt-get", "install", "-y", "-qq", "wrk"]
    for argv in (install, ["apt-get", "update", "-qq"], install):
        try:
            subprocess.run(argv, capture_output=True, timeout=300, check=False)
        except (OSError, subprocess.TimeoutExpired):
            break
        found = shutil.which("wrk")
        if found:
            return found, "wrk (installed now with apt-get)"
    return None, "built-in asyncio generator (wrk missing, apt-get install wrk failed)"


class Generator(Protocol):
    async def run(self, seconds: float) -> LoadResult: ...

    def close(self) -> None: ...


def generator(
    load: Load, connections: int, wrk: str | None, core: int | None, tmp: Path
) -> Generator:
    if wrk is not None:
        return Wrk(wrk, load, connections, core, tmp)
    return Builtin(load, connections)


_WRK_SCRIPT = """
local f = io.open("{body}", "rb")
wrk.body = f:read("*a")
f:close()
wrk.method = "POST"
{headers}
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("BENCH %d %d %d %d %d %d %d %.1f %.1f\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


class Wrk:
    """One wrk run per call: it opens its connections anew each time."""

    def __init__(self, wrk: str, load: Load, connections: int, core: int | None, tmp: Path):
        body = tmp / "wrk-body.json"
        body.write_bytes(load.body)
        headers = "\n".join(f'wrk.headers["{k}"] = "{v}"' for k, v in load.headers.items())
        script = tmp / "wrk.lua"
        script.write_text(_WRK_SCRIPT.format(body=body, headers=headers))
        self.argv = [*pin_argv(core), wrk, "-t1", f"-c{connections}", "--timeout", "10s"]
        self.argv += ["-s", str(script), f"http://127.0.0.1:{load.port}{load.path}"]

    async def run(self, seconds: float) -> LoadResult:
        proc = await asyncio.create_subprocess_exec(
            *self.argv,
            f"-d{max(1, round(seconds))}s",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        out, _ = await proc.communicate()
        return parse_wrk(out.decode(errors="replace"))

    def close(self) -> None:
        pass


def parse_wrk(output: str) -> LoadResult:
    """The numbers the bench's Lua ``done`` hook printed (durations in microseconds)."""
    for line in output.splitlines():
        if line.startswith("BENCH "):
            n = line.split()[1:]
            requests, duration_us = int(n[0]), int(n[1])
            connect, read, write, status, timeout = (int(x) for x in n[2:7])
            return LoadResult(
                ok=requests - status,
                errors=connect + read + write + status + timeout,
                seconds=duration_us / 1e6,
                p50_ms=float(n[7]) / 1000,
                p99_ms=float(n[8]) / 1000,
            )
    raise RuntimeError("wrk printed no result:\n" + output[-2000:])


class Builtin:
    """Closed-loop clients on ``httpclient.Connection``; connections stay open between runs."""

    def __init__(self, load: Load, connections: int) -> None:
        self.clients = Clients(load, connections)

    async def run(self, seconds: float) -> LoadResult:
        replies, errors, elapsed = await self.clients.run(seconds)
        latencies = sorted(r.total for r in replies if 200 <= r.status < 300)
        return LoadResult(
            ok=len(latencies),
            errors=errors + len(replies) - len(latencies),
            seconds=elapsed,
            p50_ms=percentile(latencies, 50) * 1000,
            p99_ms=percentile(latencies, 99) * 1000,
        )

    def close(self) -> None:
        self.clients.close()


class Clients:
    """`count` keep-alive connections, each sending the same request back to back."""

    def __init__(self, load: Load, count: int, timeout: float = 30) -> None:
        self.load = load
        self.raw = load.raw()
        self.timeout = timeout
        self.conns: list[Connection | None] = [None] * count

    async def run(self, seconds: float) -> tuple[list[Reply], int, float]:
        """Every reply received within `seconds`, the failed requests, the time taken."""
        replies: list[Reply] = []
        errors = 0
        deadline = time.perf_counter() + seconds

        async def client(i: int) -> None:
            nonlocal errors
            while time.perf_counter() < deadline:
                conn = self.conns[i]
                try:
                    if conn is None or not conn.usable:
                        conn = self.conns[i] = await Connection.open("127.0.0.1", self.load.port)
                    replies.append(await asyncio.wait_for(conn.request(self.raw), self.timeout))
                except (OSError, TimeoutError):
                    errors += 1
                    if conn is not None:
                        conn.close()
                    self.conns[i] = None

        started = time.perf_counter()
        await asyncio.gather(*(client(i) for i in range(len(self.conns))))
        return replies, errors, time.perf_counter() - started

    def close(self) -> None:
        for conn in self.conns:
            if conn is not None:
                conn.close()
        self.conns = [None] * len(self.conns)
