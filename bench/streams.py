"""Streams: time to first token and total time of SSE streams, and many slow streams held open
at once. wrk cannot see inside a response, so these use ``httpclient.Connection``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .httpclient import Connection, Reply
from .loadgen import Load, percentile


@dataclass
class StreamResult:
    ok: int  # streams that ended with data: [DONE]
    errors: int
    seconds: float
    ttft: list[float] = field(default_factory=list)  # seconds, sorted
    total: list[float] = field(default_factory=list)

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    def ttft_ms(self, q: float) -> float:
        return percentile(self.ttft, q) * 1000

    def total_ms(self, q: float) -> float:
        return percentile(self.total, q) * 1000


def stream_result(replies: list[Reply], errors: int, seconds: float) -> StreamResult:
    """Streams that ended with 200 and [DONE] count; anything else is an error."""
    good = [r for r in replies if r.status == 200 and r.done]
    return StreamResult(
        ok=len(good),
        errors=errors + len(replies) - len(good),
        seconds=seconds,
        ttft=sorted(r.first_byte for r in good),
        total=sorted(r.total for r in good),
    )


@dataclass
class HoldResult:
    ok: int
    errors: int
    seconds: float
    most_held: int  # the most streams open and flowing at one time
    peak_rss_mb: float  # the server's largest RSS seen while they were open
    ramp_seconds: float = 0.0  # until the last stream was connected
    error_kinds: dict[str, int] = field(default_factory=dict)


async def hold_streams(
    load: Load,
    count: int,
    rss_mb: Callable[[], float],
    rate: float = 1000.0,
) -> HoldResult:
    """Open `count` slow streams (one connection each, `rate` a second) and hold them all.

    Every 0.1 s the sampler counts the streams whose first chunk arrived and that have not
    ended, and reads the server's RSS.
    """
    raw = load.raw()
    conns: list[Connection] = []
    result = HoldResult(0, 0, 0.0, 0, 0.0)

    def fail(kind: str) -> None:
        result.errors += 1
        result.error_kinds[kind] = result.error_kinds.get(kind, 0) + 1

    async def stream() -> None:
        try:
            conn = await Connection.open("127.0.0.1", load.port)
        except OSError as e:
            fail(f"connect: {e.strerror or type(e).__name__}")
            return
        conns.append(conn)
        result.ramp_seconds = time.perf_counter() - started
        try:
            reply = await asyncio.wait_for(conn.request(raw), 120)
        except (OSError, TimeoutError) as e:
            fail(type(e).__name__)
            return
        finally:
            conn.close()
        if reply.status == 200 and reply.done:
            result.ok += 1
        else:
            fail(f"status {reply.status}" if reply.status != 200 else "no [DONE]")

    async def sample() -> None:
        while True:
            held = sum(1 for c in conns if c.streaming)
            result.most_held = max(result.most_held, held)
            result.peak_rss_mb = max(result.peak_rss_mb, rss_mb())
            await asyncio.sleep(0.1)

    started = time.perf_counter()
    sampler = asyncio.ensure_future(sample())
    tasks = []
    batch = max(1, round(rate / 20))  # 20 batches a second
    for i in range(0, count, batch):
        tasks += [asyncio.ensure_future(stream()) for _ in range(min(batch, count - i))]
        await asyncio.sleep(batch / rate)
    await asyncio.gather(*tasks)
    sampler.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await sampler
    result.seconds = time.perf_counter() - started
    return result
