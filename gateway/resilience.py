"""Staying up when upstreams misbehave: circuit breakers, retry backoff (honouring
Retry-After), the request deadline, deployment order.

A ``Breaker`` per deployment counts consecutive failures (connection errors, timeouts, 5xx);
past ``failures`` it opens and the deployment is skipped for ``cooldown`` seconds; then one
probe request is let through (half-open): success closes it, failure opens it again.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Literal, TypeVar

from .errors import UpstreamTimeout

T = TypeVar("T")
BreakerState = Literal["closed", "open", "half_open"]


class Breaker:
    __slots__ = ("_clock", "_cooldown", "_limit", "_probing", "failures", "opened_at", "state")

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        self._limit = failures
        self._cooldown = cooldown
        self._clock = clock
        self.state: BreakerState = "closed"
        self.failures = 0
        self.opened_at = 0.0
        self._probing = False

    def allow(self) -> bool:
        """Whether a request may go to this deployment now (taking the probe if half-open)."""
        if self.state == "closed":
            return True
        if self.state == "open":
            if self._clock() - self.opened_at < self._cooldown:
                return False
            self.state = "half_open"
            self._probing = False
        if self._probing:
            return False  # one probe at a time
        self._probing = True
        return True

    def succeeded(self) -> None:
        self.state = "closed"
        self.failures = 0
        self._probing = False

    def failed(self) -> None:
        self.failures += 1
        if self.state == "half_open" or self.failures >= self._limit:
            self.state = "open"
            self.opened_at = self._clock()
        self._probing = False

    def released(self) -> None:
        """The request that took the probe ended without telling (e.g. the client left)."""
        self._probing = False


class Breakers:
    """One breaker per deployment id; they outlive config reloads."""

    def __init__(
        self, failures: int, cooldown: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._failures = failures
        self._cooldown = cooldown
        self._clock = clock
        self._by_id: dict[str, Breaker] = {}

    def reconfigure(self, failures: int, cooldown: float) -> None:
        self._failures, self._cooldown = failures, cooldown
        for b in self._by_id.values():
            b._limit, b._cooldown = failures, cooldown

    def __getitem__(self, deployment_id: str) -> Breaker:
        breaker = self._by_id.get(deployment_id)
        if breaker is None:
            breaker = self._by_id[deployment_id] = Breaker(
                self._failures, self._cooldown, self._clock
            )
        return breaker

    def states(self) -> dict[str, BreakerState]:
        # reading the state of an open breaker whose cooldown is over does not take the probe
        return {k: b.state for k, b in sorted(self._by_id.items())}


@dataclass(frozen=True, slots=True)
class Backoff:
    """Exponential backoff with full jitter: a random wait in [0, min(cap, base * 2**n))."""

    base: float
    cap: float
    rand: Callable[[], float] = random.random

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        window = min(self.cap, self.base * (2**attempt))
        wait = self.rand() * window
        # the upstream knows best when it can take the request again
        return float(max(wait, retry_after) if retry_after is not None else wait)


@dataclass(frozen=True, slots=True)
class Deadline:
    """When a request must have its answer (or its stream's first token), retries and
    fallbacks included."""

    loop: asyncio.AbstractEventLoop  # the request's
    at: float  # on that loop's clock
    seconds: float

    def passed(self) -> OutOfTime:
        return OutOfTime(
            f"no deployment answered within the request timeout ({self.seconds:g} s)",
            code="upstream_timeout",
        )


class Cutoff:
    """``asyncio.timeout_at(when)`` on a loop and task the caller already has, with the
    same outcome: past `when` the task is cancelled, and that cancellation leaves the block
    as ``TimeoutError`` unless the task was also cancelled from elsewhere.

    CPython 3.11's ``asyncio.get_running_loop`` and ``current_task`` each make a
    ``getpid()`` system call (to notice a fork), and ``timeout_at`` calls both; on the
    request path every system call counts (on this project's VMs the gateway spent ~10 us a
    request more than a bare proxy in the kernel, all of it in such calls).
    """

    __slots__ = ("_cancelling", "_expired", "_handle", "_loop", "_task", "_when")

    def __init__(self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[object], when: float):
        self._loop = loop
        self._task = task
        self._when = when
        self._handle: asyncio.Handle | None = None
        self._expired = False
        self._cancelling = 0

    async def __aenter__(self) -> None:
        self._cancelling = self._task.cancelling()
        loop = self._loop
        if self._when <= loop.time():
            self._handle = loop.call_soon(self._expire)
        else:
            self._handle = loop.call_at(self._when, self._expire)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._expired:
            self._expired = False
            if self._task.uncancel() <= self._cancelling and exc_type is asyncio.CancelledError:
                raise TimeoutError from exc

    def _expire(self) -> None:
        self._task.cancel()
        self._expired = True
        self._handle = None


class OutOfTime(UpstreamTimeout):
    """The request's deadline passed: no further retry or fallback."""


def weighted_order(
    items: Sequence[T], weights: Sequence[float], rand: Callable[[], float] = random.random
) -> list[T]:
    """`items` in a random order where each next item is drawn with probability proportional
    to its weight: the first is the load-balanced choice, the rest are its fallbacks."""
    pool = list(zip(items, weights, strict=True))
    out: list[T] = []
    while pool:
        total = sum(w for _, w in pool)
        point = rand() * total
        for i, (item, weight) in enumerate(pool):
            point -= weight
            if point < 0 or i == len(pool) - 1:
                out.append(item)
                pool.pop(i)
                break
    return out
