"""Micro-benchmark of the limiter: microseconds per admit + settle, every limit kind on.

    python -m bench.limiter_micro [--iterations 200000] [--repeat 3]

Requests rotate over 1,000 keys and 5,000 client addresses, with per-minute, per-day, token
and budget limits and per-IP limits all set (high enough that nothing is refused, so every
iteration takes the full admission path). Real clocks are used: reading them is part of the
cost. Each figure is the mean over the iterations of the fastest of ``--repeat`` runs, which
filters out other load on the machine; ``baseline_ns`` (one empty loop iteration plus a dict
lookup) puts the numbers in proportion to the machine's speed. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import time

from gateway.config import LimitsConfig
from gateway.limits import EffectiveLimits, Limiter

KEYS = 1_000
ADDRESSES = 5_000

# High enough that 200k iterations in a second or two are never refused.
LIMITS = EffectiveLimits(
    chat_per_minute=1_000_000,
    embeddings_per_minute=1_000_000,
    standard_per_minute=1_000_000,
    requests_per_day=10_000_000,
    tokens_per_minute=10**9,
    tokens_per_day=10**12,
    budget=1e9,
    budget_period="month",
)
CONFIG = LimitsConfig(
    ip_chat_per_minute=1_000_000,
    ip_embeddings_per_minute=1_000_000,
    ip_standard_per_minute=1_000_000,
)


def _admit_settle(limiter: Limiter, keys: list[str], ips: list[str], n: int) -> float:
    limits = LIMITS
    start = time.perf_counter()
    for i in range(n):
        ticket = limiter.admit(keys[i % KEYS], limits, ips[i % ADDRESSES], "chat", 900, 0.004)
        ticket.settle(850, 0.0038)
    return time.perf_counter() - start


def _admit_headers_settle(limiter: Limiter, keys: list[str], ips: list[str], n: int) -> float:
    limits = LIMITS
    start = time.perf_counter()
    for i in range(n):
        ticket = limiter.admit(keys[i % KEYS], limits, ips[i % ADDRESSES], "chat", 900, 0.004)
        _ = ticket.headers
        ticket.settle(850, 0.0038)
    return time.perf_counter() - start


def _baseline(n: int) -> float:
    table = {"k": 1}
    start = time.perf_counter()
    for _ in range(n):
        table.get("k")
    return time.perf_counter() - start


def run(iterations: int = 200_000, repeat: int = 3) -> dict[str, float | int]:
    keys = [f"key-{i}" for i in range(KEYS)]
    ips = [f"198.51.{i // 250}.{i % 250}" for i in range(ADDRESSES)]
    limiter = Limiter(CONFIG)
    _admit_settle(limiter, keys, ips, 20_000)  # warm up: every key and address seen once
    plain = min(_admit_settle(limiter, keys, ips, iterations) for _ in range(repeat))
    headers = min(_admit_headers_settle(limiter, keys, ips, iterations) for _ in range(repeat))
    base = min(_baseline(iterations) for _ in range(repeat))
    return {
        "iterations": iterations,
        "admit_settle_us": round(plain / iterations * 1e6, 3),
        "admit_headers_settle_us": round(headers / iterations * 1e6, 3),
        "baseline_ns": round(base / iterations * 1e9, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", type=int, default=200_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    result = run(args.iterations, args.repeat)
    print(
        f"admit+settle: {result['admit_settle_us']} us, "
        f"with headers: {result['admit_headers_settle_us']} us "
        f"(baseline {result['baseline_ns']} ns)"
    )
    print(json.dumps(result))


if __name__ == "__main__":
    main()
