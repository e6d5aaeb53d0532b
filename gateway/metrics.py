"""Prometheus metrics, kept in plain dicts and rendered in the text exposition format (0.0.4).

No client library: the request path only adds to dict entries keyed by label values (one
event-loop thread, so no locks), and everything else (breakers, queue depth, memory) is read
when ``/metrics`` is scraped.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0)

Labels = tuple[str, ...]


@dataclass(slots=True)
class Counter:
    name: str
    help: str
    label_names: Labels
    values: dict[Labels, float] = field(default_factory=dict)

    def inc(self, labels: Labels, amount: float = 1.0) -> None:
        self.values[labels] = self.values.get(labels, 0.0) + amount

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} counter"
        for labels, value in sorted(self.values.items()):
            yield f"{self.name}{_labels(self.label_names, labels)} {_number(value)}"


@dataclass(slots=True)
class Histogram:
    name: str
    help: str
    label_names: Labels
    buckets: Sequence[float]
    # per label values: counts per bucket (cumulated at render), sum, count
    values: dict[Labels, tuple[list[int], list[float]]] = field(default_factory=dict)

    def observe(self, labels: Labels, value: float) -> None:
        entry = self.values.get(labels)
        if entry is None:
            entry = self.values[labels] = ([0] * (len(self.buckets) + 1), [0.0])
        counts, total = entry
        counts[bisect.bisect_left(self.buckets, value)] += 1
        total[0] += value

    def render(self) -> Iterable[str]:
        yield f"# HELP {self.name} {self.help}"
        yield f"# TYPE {self.name} histogram"
        for labels, (counts, total) in sorted(self.values.items()):
            running = 0
            for bound, n in zip((*self.buckets, float("inf")), counts, strict=True):
                running += n
                le = "+Inf" if bound == float("inf") else _number(bound)
                names = (*self.label_names, "le")
                yield f"{self.name}_bucket{_labels(names, (*labels, le))} {running}"
            yield f"{self.name}_sum{_labels(self.label_names, labels)} {_number(total[0])}"
            yield f"{self.name}_count{_labels(self.label_names, labels)} {running}"


def gauge(name: str, help: str, samples: Iterable[tuple[Labels, Labels, float]]) -> list[str]:
    """Lines of a gauge from (label names, label values, value) samples."""
    lines = [f"# HELP {name} {help}", f"# TYPE {name} gauge"]
    lines += [f"{name}{_labels(names, values)} {_number(v)}" for names, values, v in samples]
    return lines


class Metrics:
    """Everything the request path counts."""

    def __init__(self) -> None:
        self.requests = Counter(
            "gateway_requests_total",
            "Requests answered, by endpoint, model asked, provider that served, and status.",
            ("endpoint", "model", "provider", "status"),
        )
        self.duration = Histogram(
            "gateway_request_duration_seconds",
            "Time from a request's arrival to the end of its answer (streams included).",
            ("endpoint",),
            DURATION_BUCKETS,
        )
        self.ttft = Histogram(
            "gateway_time_to_first_token_seconds",
            "Time from a stream's request to its first content sent to the client.",
            ("model",),
            TTFT_BUCKETS,
        )
        self.tokens = Counter(
            "gateway_tokens_total",
            "Tokens used, by model asked, provider, and kind (prompt, completion, cached, "
            "cache_write, reasoning).",
            ("model", "provider", "kind"),
        )
        self.cost = Counter(
            "gateway_cost_total",
            "Cost of the requests at the configured prices, by model asked and provider.",
            ("model", "provider"),
        )
        self.rejections = Counter(
            "gateway_rate_limit_rejections_total",
            "Requests refused by the gateway's own limits, by reason.",
            ("reason",),
        )
        self.upstream_attempts = Counter(
            "gateway_upstream_attempts_total",
            "Requests sent to providers (retries included), by provider and outcome.",
            ("provider", "outcome"),
        )
        self.retries = Counter(
            "gateway_upstream_retries_total", "Retries of a deployment, by provider.", ("provider",)
        )
        self.fallbacks = Counter(
            "gateway_fallbacks_total",
            "Requests a later deployment served after an earlier one failed, by model asked.",
            ("model",),
        )
        self.in_flight_streams = 0

    def families(self) -> Iterable[Counter | Histogram]:
        return (
            self.requests,
            self.duration,
            self.ttft,
            self.tokens,
            self.cost,
            self.rejections,
            self.upstream_attempts,
            self.retries,
            self.fallbacks,
        )


def resident_memory_bytes() -> int:
    """The process's resident set size (0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _labels(names: Sequence[str], values: Sequence[str]) -> str:
    if not names:
        return ""
    inner = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(names, values, strict=True))
    return "{" + inner + "}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))
