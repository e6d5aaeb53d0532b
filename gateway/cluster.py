"""Rate limits and quotas shared by a fleet of gateway processes, through Redis.

Imported only when ``[cluster] redis_url`` is set. Every admission is one round trip: a Lua
script checks every bucket and quota the request touches and, only if all pass, takes from all
of them (Redis runs a script atomically, so processes cannot race). Redis's own clock (``TIME``)
drives refill and the daily and monthly resets, so clock skew between hosts does not matter.

- Request and token-per-minute buckets are GCRA: one key per bucket holding the time (ms) at
  which it will be full again.
- Daily requests and tokens, and budgets, are counters per period (``...:d:<day>``,
  ``...:m:<yyyymm>``, ``...:t``) that the admission raises by the request's estimate; the
  settlement (a second, later round trip off the request path) moves them to the real usage.
  Costs are counted in integer nano-units.

When Redis cannot be reached within ``redis_timeout``, ``on_redis_failure`` decides: "open"
(default) admits through the process's own in-memory limiter and counts the fault; "closed"
answers 503. Redis is tried again after a second; recovery needs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

from .config import ClusterConfig
from .errors import GatewayError, QuotaExceeded, RateLimited, ServiceUnavailable
from .limits import EffectiveLimits, EndpointClass, Limiter, Ticket, go_duration
from .resp import RedisConnection, RedisError, Script

log = logging.getLogger("gateway.cluster")

NANO = 1_000_000_000
WINDOW_MS = 60_000  # a per-minute bucket refills from empty in a minute
RETRY_REDIS_AFTER = 1.0  # seconds without Redis after it failed
SETTLE_EVERY = 0.05  # settlements are sent together, this often

# Admission. ARGV: prefix, reset offset (ms), buckets (count, then name, ms per unit, units
# each), quotas (count, then name, period "d"|"m"|"t", limit, amount each).
# Returns {1, day, month, bucket states..., quota values...} or {0, kind, wait_ms, index}.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local offset = tonumber(ARGV[2])
local day = math.floor((now - offset) / 86400000)
-- the civil month of a day number (days since 1970-01-01), after Howard Hinnant
local z = day + 719468
local era = math.floor(z / 146097)
local doe = z - era * 146097
local yoe = math.floor((doe - math.floor(doe / 1460) + math.floor(doe / 36524)
  - math.floor(doe / 146096)) / 365)
local doy = doe - (365 * yoe + math.floor(yoe / 4) - math.floor(yoe / 100))
local mp = math.floor((5 * doy + 2) / 153)
local m = mp < 10 and mp + 3 or mp - 9
local y = yoe + era * 400 + (m <= 2 and 1 or 0)
local month = y * 100 + m
local ends = {d = (day + 1) * 86400000 + offset}
local function period_key(name, period)
  if period == 'd' then return prefix .. name .. ':d:' .. day end
  if period == 'm' then return prefix .. name .. ':m:' .. month end
  return prefix .. name .. ':t'
end
local i = 3
local nb = tonumber(ARGV[i]); i = i + 1
local bk, btat = {}, {}
local refused, wait, which = nil, 0, 0
for b = 1, nb do
  local key = prefix .. ARGV[i]
  local per = tonumber(ARGV[i + 1])
  local n = tonumber(ARGV[i + 2])
  i = i + 3
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + n * per
  local allow_at = new_tat - 60000
  if n * per > 60000 then allow_at = tat end  -- bigger than the bucket: only when full
  if allow_at > now and allow_at - now > wait then
    refused, wait, which = 'bucket', allow_at - now, b
  end
  bk[b], btat[b] = key, new_tat
end
local nq = tonumber(ARGV[i]); i = i + 1
local qk, qamount, qused = {}, {}, {}
for q = 1, nq do
  local name, period = ARGV[i], ARGV[i + 1]
  local limit, amount = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  i = i + 4
  local key = period_key(name, period)
  local used = tonumber(redis.call('GET', key) or '0')
  if used + amount > limit then
    local w = -1
    if period == 'd' then w = ends.d - now end
    if period == 'm' then w = -2 end
    if refused ~= 'quota' or w > wait then refused, wait, which = 'quota', w, q end
  end
  qk[q], qamount[q], qused[q] = key, amount, used
end
if refused then return {0, refused, math.floor(wait), which} end
local out = {1, day, month, ends.d - now}
for b = 1, nb do
  redis.call('SET', bk[b], tostring(btat[b]), 'PX', math.ceil(btat[b] - now) + 1000)
  out[#out + 1] = math.floor(btat[b] - now)
end
for q = 1, nq do
  local v = redis.call('INCRBY', qk[q], qamount[q])
  if string.find(qk[q], ':d:', 1, true) then redis.call('EXPIRE', qk[q], 172800) end
  if string.find(qk[q], ':m:', 1, true) then redis.call('EXPIRE', qk[q], 3456000) end
  out[#out + 1] = v
end
return out
"""

# Settlement of many admissions at once. ARGV: prefix, then (full key suffix, delta) pairs for
# counters, then (bucket name, ms delta) pairs: moves each to the real usage.
SETTLE = """
local prefix = ARGV[1]
local nc = tonumber(ARGV[2])
local i = 3
for c = 1, nc do
  local key = prefix .. ARGV[i]
  if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, tonumber(ARGV[i + 1])) end
  i = i + 2
end
local nb = tonumber(ARGV[i]); i = i + 1
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
for b = 1, nb do
  local key = prefix .. ARGV[i]
  local tat = tonumber(redis.call('GET', key) or '0')
  local moved = tat + tonumber(ARGV[i + 1])
  if moved > now then
    redis.call('SET', key, tostring(moved), 'PX', math.ceil(moved - now) + 1000)
  end
  i = i + 2
end
return 1
"""


@dataclass(slots=True)
class _Bucket:
    name: str
    per: float  # ms per unit
    units: int
    limit: int  # per minute
    what: str


@dataclass(slots=True)
class _Quota:
    name: str
    period: str  # "d", "m", "t"
    limit: int
    amount: int
    what: str


@dataclass(slots=True, eq=False)
class RedisTicket:
    """An admission in Redis: its headers, and its settlement later."""

    _limiter: RedisLimiter
    _est_tokens: int
    _est_cost: float
    bounded: bool
    headers: dict[str, str] = field(default_factory=dict)
    warning: str | None = None
    _tokens_left: int | None = None  # the fleet's daily tokens left at admission
    _cost_left: float | None = None  # the fleet's budget left at admission
    # what to move at settlement: (counter key, reserved, kind), and the tpm bucket
    _counters: list[tuple[str, int, str]] = field(default_factory=list)
    _tpm_bucket: tuple[str, float] | None = None
    _settled: bool = False

    def settle(self, tokens: int, cost: float) -> None:
        if self._settled:
            return
        self._settled = True
        self._limiter._settle_soon(self, tokens, cost)

    def exceeded(self, tokens_so_far: int, cost_so_far: float) -> bool:
        """Whether real usage crosses the daily tokens or the budget, as of the admission
        (what the fleet had used then, plus this request's real usage)."""
        if self._tokens_left is not None and tokens_so_far > self._tokens_left + self._est_tokens:
            return True
        return self._cost_left is not None and cost_so_far > self._cost_left + self._est_cost


class RedisLimiter:
    def __init__(self, config: ClusterConfig, local: Limiter, day_reset_hour: int) -> None:
        self.config = config
        self.local = local
        self._offset_ms = day_reset_hour * 3_600_000
        assert config.redis_url is not None
        self._redis = RedisConnection(config.redis_url)
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)
        self._down_until = 0.0
        # settlements waiting to be sent: counter key -> delta, bucket -> ms
        self._counter_moves: dict[str, int] = {}
        self._bucket_moves: dict[str, float] = {}
        self._settler: asyncio.Task[None] | None = None
        self.failures = 0  # Redis calls that failed or timed out
        self.local_admissions = 0  # admissions decided locally while Redis was down
        self._failing = False

    async def start(self) -> None:
        self._settler = asyncio.ensure_future(self._settle_forever())

    async def close(self) -> None:
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler
        await self._send_settlements()
        await self._redis.close()

    @property
    def degraded(self) -> bool:
        return self._failing

    async def admit(
        self,
        key_id: str,
        limits: EffectiveLimits,
        ip: str | None,
        endpoint: EndpointClass,
        est_tokens: int,
        est_cost: float,
    ) -> RedisTicket | Ticket:
        buckets, quotas = self._checks(key_id, limits, ip, endpoint, est_tokens, est_cost)
        if not buckets and not quotas:
            return self.local.admit(key_id, limits, ip, endpoint, est_tokens, est_cost)
        if time.monotonic() < self._down_until:
            return self._without_redis(key_id, limits, ip, endpoint, est_tokens, est_cost)
        args: list[object] = [self.config.key_prefix, self._offset_ms, len(buckets)]
        for b in buckets:
            args += [b.name, repr(b.per), b.units]
        args.append(len(quotas))
        for q in quotas:
            args += [q.name, q.period, q.limit, q.amount]
        try:
            async with asyncio.timeout(self.config.redis_timeout):
                result = await self._admit.run(self._redis, args)
        except (RedisError, OSError, TimeoutError) as e:
            self._fault(e)
            return self._without_redis(key_id, limits, ip, endpoint, est_tokens, est_cost)
        if self._failing:
            self._failing = False
            log.info("redis is back: limits are shared again")
        assert isinstance(result, list)
        if int(result[0]) == 0:  # type: ignore[arg-type]
            raise self._refusal(result, buckets, quotas)
        return self._ticket(result, buckets, quotas, limits, est_tokens, est_cost)

    def _checks(
        self,
        key_id: str,
        limits: EffectiveLimits,
        ip: str | None,
        endpoint: EndpointClass,
        est_tokens: int,
        est_cost: float,
    ) -> tuple[list[_Bucket], list[_Quota]]:
        buckets: list[_Bucket] = []
        per_minute = limits.per_minute(endpoint)
        if per_minute:
            buckets.append(
                _Bucket(
                    f"k:{key_id}:b:{endpoint}",
                    WINDOW_MS / per_minute,
                    1,
                    per_minute,
                    f"requests per minute to {endpoint}",
                )
            )
        lc = self.local.config
        ip_limit = {"chat": lc.ip_chat_per_minute, "embeddings": lc.ip_embeddings_per_minute}.get(
            endpoint, lc.ip_standard_per_minute
        )
        if ip and ip_limit:
            buckets.append(
                _Bucket(
                    f"ip:{ip}:b:{endpoint}",
                    WINDOW_MS / ip_limit,
                    1,
                    ip_limit,
                    f"requests per minute from your IP address to {endpoint}",
                )
            )
        if limits.tokens_per_minute:
            tpm = limits.tokens_per_minute
            buckets.append(
                _Bucket(f"k:{key_id}:tpm", WINDOW_MS / tpm, est_tokens, tpm, "tokens per minute")
            )
        quotas: list[_Quota] = []
        if limits.requests_per_day:
            quotas.append(
                _Quota(f"k:{key_id}:rq", "d", limits.requests_per_day, 1, "requests per day")
            )
        if limits.tokens_per_day:
            quotas.append(
                _Quota(f"k:{key_id}:tk", "d", limits.tokens_per_day, est_tokens, "tokens per day")
            )
        if limits.budget:
            period = {"day": "d", "month": "m", "total": "t"}[limits.budget_period]
            quotas.append(
                _Quota(
                    f"k:{key_id}:cost",
                    period,
                    round(limits.budget * NANO),
                    round(est_cost * NANO),
                    f"budget per {limits.budget_period}",
                )
            )
        return buckets, quotas

    def _without_redis(
        self,
        key_id: str,
        limits: EffectiveLimits,
        ip: str | None,
        endpoint: EndpointClass,
        est_tokens: int,
        est_cost: float,
    ) -> Ticket:
        if self.config.on_redis_failure == "closed":
            raise ServiceUnavailable(
                "Rate limiting is unavailable; the gateway is refusing requests until it is back.",
                code="service_unavailable",
            )
        self.local_admissions += 1
        return self.local.admit(key_id, limits, ip, endpoint, est_tokens, est_cost)

    def _fault(self, error: BaseException) -> None:
        self.failures += 1
        self._down_until = time.monotonic() + RETRY_REDIS_AFTER
        if not self._failing:
            self._failing = True
            policy = (
                "limiting locally"
                if self.config.on_redis_failure == "open"
                else ("refusing requests")
            )
            log.error("redis unavailable (%s): %s", type(error).__name__ or "timeout", policy)

    def _refusal(
        self, result: list[Any], buckets: list[_Bucket], quotas: list[_Quota]
    ) -> GatewayError:
        kind, wait_ms, index = _text(result[1]), int(result[2]), int(result[3])
        headers: dict[str, str] = {}
        if kind == "bucket":
            b = buckets[index - 1]
            seconds = max(1, math.ceil(wait_ms / 1000))
            headers["Retry-After"] = str(seconds)
            return RateLimited(
                f"Rate limit reached: {b.limit} {b.what}. Try again in {seconds} s.",
                headers=headers,
            )
        q = quotas[index - 1]
        limit = q.limit / NANO if q.name.endswith(":cost") else q.limit
        if wait_ms > 0:
            headers["Retry-After"] = str(max(1, math.ceil(wait_ms / 1000)))
        else:
            headers["x-should-retry"] = "false"
        return QuotaExceeded(
            f"Quota reached: {limit:g} {q.what}. It resets "
            + ("at the next daily reset." if q.period == "d" else "with the next period."
               if q.period == "m" else "never: ask for a larger budget."),
            headers=headers,
        )  # fmt: skip

    def _ticket(
        self,
        result: list[Any],
        buckets: list[_Bucket],
        quotas: list[_Quota],
        limits: EffectiveLimits,
        est_tokens: int,
        est_cost: float,
    ) -> RedisTicket:
        day, month, day_left_ms = int(result[1]), int(result[2]), int(result[3])
        full_in = [int(v) for v in result[4 : 4 + len(buckets)]]
        used = [int(v) for v in result[4 + len(buckets) :]]
        ticket = RedisTicket(
            self, est_tokens, est_cost, bool(limits.tokens_per_day or limits.budget)
        )
        headers = ticket.headers
        for b, ms in zip(buckets, full_in, strict=True):
            remaining = max(0, math.floor((WINDOW_MS - ms) / b.per))
            if b.name.endswith(":tpm"):
                ticket._tpm_bucket = (b.name, b.per)
                headers["X-RateLimit-Limit-Tokens"] = str(b.limit)
                headers["X-RateLimit-Remaining-Tokens"] = str(remaining)
                headers["X-RateLimit-Reset-Tokens"] = go_duration(ms / 1000)
            elif b.name.startswith("k:"):
                headers["X-RateLimit-Limit-Requests"] = str(b.limit)
                headers["X-RateLimit-Remaining-Requests"] = str(remaining)
                headers["X-RateLimit-Reset-Requests"] = go_duration(ms / 1000)
                headers["X-RateLimit-Limit"] = str(b.limit)
                headers["X-RateLimit-Remaining"] = str(remaining)
                headers["X-RateLimit-Reset"] = str(math.ceil(ms / 1000))
        for q, value in zip(quotas, used, strict=True):
            suffix = f":d:{day}" if q.period == "d" else f":m:{month}" if q.period == "m" else ":t"
            kind = q.name.rsplit(":", 1)[1]  # rq, tk or cost
            ticket._counters.append((q.name + suffix, q.amount, kind))
            if q.name.endswith(":tk"):
                ticket._tokens_left = q.limit - value
                if "X-RateLimit-Limit-Tokens" not in headers:
                    headers["X-RateLimit-Limit-Tokens"] = str(q.limit)
                    headers["X-RateLimit-Remaining-Tokens"] = str(max(0, q.limit - value))
                    headers["X-RateLimit-Reset-Tokens"] = go_duration(day_left_ms / 1000)
                self._warn(ticket, value, q.limit, "daily tokens")
            elif q.name.endswith(":cost"):
                ticket._cost_left = (q.limit - value) / NANO
                self._warn(ticket, value, q.limit, "budget")
        return ticket

    def _warn(self, ticket: RedisTicket, used: int, limit: int, what: str) -> None:
        soft = self.local.config.soft_limit
        if limit and used >= soft * limit:
            ticket.warning = f"{round(100 * used / limit)}% of the {what} used"

    def _settle_soon(self, ticket: RedisTicket, tokens: int, cost: float) -> None:
        """Queue the move from the reservation to the real usage; sent with the others."""
        real = {"tk": tokens, "cost": round(cost * NANO)}
        for key, reserved, kind in ticket._counters:
            delta = real[kind] - reserved if kind in real else 0
            if delta:
                self._counter_moves[key] = self._counter_moves.get(key, 0) + delta
        if ticket._tpm_bucket is not None and tokens != ticket._est_tokens:
            name, per = ticket._tpm_bucket
            shift = (tokens - ticket._est_tokens) * per
            self._bucket_moves[name] = self._bucket_moves.get(name, 0.0) + shift

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(SETTLE_EVERY)
            await self._send_settlements()

    async def _send_settlements(self) -> None:
        if not self._counter_moves and not self._bucket_moves:
            return
        counters, self._counter_moves = self._counter_moves, {}
        buckets, self._bucket_moves = self._bucket_moves, {}
        args: list[object] = [self.config.key_prefix, len(counters)]
        for key, delta in counters.items():
            args += [key, delta]
        args.append(len(buckets))
        for name, shift in buckets.items():
            args += [name, repr(shift)]
        try:
            async with asyncio.timeout(self.config.redis_timeout * 4):
                await self._settle.run(self._redis, args)
        except (RedisError, OSError, TimeoutError) as e:
            self._fault(e)


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
