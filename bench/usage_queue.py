"""The request-path cost of ``UsageRecorder.record()`` with the real writer running.

``python -m bench.usage_queue [--rate 10000] [--seconds 3] [--flush-interval 1.0]``

Every tick (10 ms) a burst of rate/100 requests is recorded, as a handler would: build the
``UsageRecord``, call ``record()``. The burst is timed both ways (record() alone and build +
record), the event loop's lateness per tick shows what the writer thread costs the loop, and
the queue depth is sampled. At the end the recorder is closed and every record must be on disk.
Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from gateway.config import StorageConfig
from gateway.usage import UsageRecord, UsageRecorder

TICK = 0.01


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p * len(ordered)))]


async def run(rate: int, seconds: float, flush_interval: float, path: str) -> dict[str, object]:
    recorder = UsageRecorder(StorageConfig(path=path, flush_interval=flush_interval))
    await recorder.start()
    per_tick = max(1, round(rate * TICK))
    record_us: list[float] = []
    build_us: list[float] = []
    lag_ms: list[float] = []
    max_depth = 0
    n = 0
    loop = asyncio.get_running_loop()
    started = loop.time()
    next_tick = started
    while loop.time() - started < seconds:
        now = time.time()
        # half the bursts time record() alone, half build + record, so neither pays for the other
        if len(record_us) <= len(build_us):
            batch = [
                UsageRecord(now, f"req_{n + i}", "bench", "127.0.0.1", "chat", "demo/echo",
                            "demo", "echo", 200, "ok", 812, 190, 512, 0, 64, 0.00123, 42.0,
                            7.5, True)
                for i in range(per_tick)
            ]  # fmt: skip
            t0 = time.perf_counter_ns()
            for r in batch:
                recorder.record(r)
            record_us.append((time.perf_counter_ns() - t0) / per_tick / 1000)
        else:
            t0 = time.perf_counter_ns()
            for i in range(per_tick):
                recorder.record(
                    UsageRecord(now, f"req_{n + i}", "bench", "127.0.0.1", "chat", "demo/echo",
                                "demo", "echo", 200, "ok", 812, 190, 512, 0, 64, 0.00123, 42.0,
                                7.5, True)
                )  # fmt: skip
            build_us.append((time.perf_counter_ns() - t0) / per_tick / 1000)
        n += per_tick
        max_depth = max(max_depth, recorder.depth)
        next_tick += TICK
        await asyncio.sleep(max(0.0, next_tick - loop.time()))
        lag_ms.append(max(0.0, loop.time() - next_tick) * 1000)
    elapsed = loop.time() - started
    depth_at_end = recorder.depth
    transactions = await recorder.call(lambda s: s.transactions)
    await recorder.close()
    with sqlite3.connect(path) as conn:
        on_disk = conn.execute("SELECT count(*) FROM usage").fetchone()[0]
    bound = rate * flush_interval + 5_000  # one interval's records plus one batch in flight
    return {
        "bench": "usage_queue",
        "loop": type(loop).__module__.split(".")[0],
        "rate_per_s": round(n / elapsed),
        "seconds": round(elapsed, 2),
        "records": n,
        "record_us_mean": round(statistics.fmean(record_us), 3),
        "record_us_p99": round(_percentile(record_us, 0.99), 3),
        "build_and_record_us_mean": round(statistics.fmean(build_us), 3),
        "build_and_record_us_p99": round(_percentile(build_us, 0.99), 3),
        "loop_lag_ms_p50": round(_percentile(lag_ms, 0.5), 3),
        "loop_lag_ms_p99": round(_percentile(lag_ms, 0.99), 3),
        "max_depth": max_depth,
        "depth_at_end": depth_at_end,
        "transactions": transactions,
        "dropped": recorder.dropped,
        "written": on_disk,
        "kept_up": recorder.dropped == 0 and max_depth <= bound and on_disk == n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--rate", type=int, default=10_000, help="records per second")
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--flush-interval", type=float, default=1.0)
    parser.add_argument("--uvloop", action=argparse.BooleanOptionalAction, default=True)
    ns = parser.parse_args()
    new_loop = None
    if ns.uvloop:
        try:
            import uvloop

            new_loop = uvloop.new_event_loop
        except ImportError:  # the gateway runs without it too
            pass
    with tempfile.TemporaryDirectory() as tmp:
        coro = run(ns.rate, ns.seconds, ns.flush_interval, str(Path(tmp) / "usage.db"))
        if new_loop is not None:
            with asyncio.Runner(loop_factory=new_loop) as runner:
                result = runner.run(coro)
        else:
            result = asyncio.run(coro)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
