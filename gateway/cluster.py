"""Rate limits and quotas shared by a fleet of gateway processes, through Redis.

Imported only when ``[cluster] redis_url`` is set. Every admission is one round trip: a Lua
script checks every bucket and quota the request touches and, only if all pass, takes from all
of them (Redis runs a script atomically, so processes cannot race). Redis's own clock (``TIME``)
drives refill and the daily and monthly resets, so clock skew between hosts does not matter.

- Request and token-per-minute buckets are GCRA: one key per bucket holding the time (ms) at
  which it will be full again.
- Daily requests and tokens, and budgets, are counters per period (``...:d:<day>``,
  ``...:m:<yyyymm>``, ``...:t``) that the admission raises by the request's estimate (and a
  ``...:h`` counter by what requests in flight hold); the settlement (a second, later round
  trip off the request path) moves them to the real usage. Costs count in integer nano-units.
- A counter Redis does not have (a new period, or Redis restarted or flushed) starts from the
  usage store's count for the period: the script says so, the process reads the store and
  calls again with the value, which the script sets only if the counter is still missing.
- Settlements go in batches with ids; a batch Redis did not confirm is sent again (Redis
  skips ids it has applied), up to ``MAX_UNSETTLED`` moves while Redis is away.

When Redis cannot be reached within ``redis_timeout``, ``on_redis_failure`` decides: "open"
(default) admits through the process's own in-memory limiter and counts the fault; "closed"
answers 503. Redis is tried again after a second; recovery needs nothing else.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import os
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .config import ClusterConfig
from .errors import GatewayError, QuotaExceeded, RateLimited, ServiceUnavailable
from .limits import EffectiveLimits, EndpointClass, Limiter, Ticket, go_duration
from .resp import RedisConnection, RedisError, Script
from .usage_types import RestoredCounters

if TYPE_CHECKING:
    from .usage import UsageRecorder

log = logging.getLogger("gateway.cluster")

NANO = 1_000_000_000
WINDOW_MS = 60_000  # a per-minute bucket refills from empty in a minute
RETRY_REDIS_AFTER = 1.0  # seconds without Redis after it failed
SETTLE_EVERY = 0.05  # settlements are sent together, this often

# Admission. ARGV: prefix, reset offset (ms), the day and month the seeds below are for (-1:
# none), buckets (count, then name, ms per unit, units each), quotas (count, then name, period
# "d"|"m"|"t", limit, amount, seed (-1: none), holds ("1": the amount is a reservation that
# the settlement releases) each).
# Returns {1, day, month, ms to the day's end, bucket states..., quota values...}, or
# {0, kind, wait_ms (-1: never), index, own} for a refusal ("own": by one of the key's own
# limits, not only its IP's), or {2, day, month} when a quota counter is missing here (Redis
# restarted or flushed, or a new period): call again with seeds from the usage store.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local prefix = ARGV[1]
local offset = tonumber(ARGV[2])
local seed_day, seed_month = tonumber(ARGV[3]), tonumber(ARGV[4])
local day = math.floor((now - offset) / 86400000)
-- the civil month of a day number (days since 1970-01-01), and back, after Howard Hinnant
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
local function first_day(yy, mm)
  if mm <= 2 then yy = yy - 1 end
  local e = math.floor(yy / 400)
  local ye = yy - e * 400
  local dy = math.floor((153 * ((mm + 9) % 12) + 2) / 5)
  return e * 146097 + ye * 365 + math.floor(ye / 4) - math.floor(ye / 100) + dy - 719468
end
local day_end = (day + 1) * 86400000 + offset
local function period_key(name, period)
  if period == 'd' then return prefix .. name .. ':d:' .. day end
  if period == 'm' then return prefix .. name .. ':m:' .. month end
  return prefix .. name .. ':t'
end
local function period_left(period)
  if period == 'd' then return day_end - now end
  if period == 'm' then
    local ny, nm = y, m + 1
    if nm > 12 then ny, nm = y + 1, 1 end
    return first_day(ny, nm) * 86400000 + offset - now
  end
  return -1
end
local ttl = {d = 172800, m = 3456000}
local refused, wait, which, own = nil, 0, 0, 0
-- the limit that refuses longest decides what the client is told; -1 is never
local function refuse(kind, w, index, mine)
  if mine then own = 1 end
  if not refused or (wait ~= -1 and (w == -1 or w > wait)) then
    refused, wait, which = kind, w, index
  end
end
local i = 5
local nb = tonumber(ARGV[i]); i = i + 1
local bk, btat = {}, {}
for b = 1, nb do
  local key = prefix .. ARGV[i]
  local per = tonumber(ARGV[i + 1])
  local n = tonumber(ARGV[i + 2])
  local mine = string.sub(ARGV[i], 1, 3) ~= 'ip:'
  i = i + 3
  local tat = tonumber(redis.call('GET', key) or '0')
  if tat < now then tat = now end
  local new_tat = tat + n * per
  local allow_at = new_tat - 60000
  if n * per > 60000 then allow_at = tat end  -- bigger than the bucket: only when full
  if allow_at > now then refuse('bucket', allow_at - now, b, mine) end
  bk[b], btat[b] = key, new_tat
end
local nq = tonumber(ARGV[i]); i = i + 1
local qk, qamount, qholds = {}, {}, {}
local unseeded = false
for q = 1, nq do
  local name, period = ARGV[i], ARGV[i + 1]
  local limit, amount, seed = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), ARGV[i + 4]
  local holds = ARGV[i + 5] == '1'
  local key = period_key(name, period)
  local raw = redis.call('GET', key)
  if not raw then
    local current = period == 't' or (period == 'd' and seed_day == day)
      or (period == 'm' and seed_month == month)
    if tonumber(seed) >= 0 and current then
      raw = seed
      if ttl[period] then
        redis.call('SET', key, seed, 'EX', ttl[period])
      else
        redis.call('SET', key, seed)
      end
    else
      unseeded = true
    end
  end
  local used = tonumber(raw or '0')
  if used + amount > limit then
    if amount > limit then
      refuse('quota', -1, q, true)
    else
      local held = holds and tonumber(redis.call('GET', key .. ':h') or '0') or 0
      if used - held + amount <= limit then
        refuse('held', 1000, q, true)  -- room again once requests in flight settle
      else
        refuse('quota', period_left(period), q, true)
      end
    end
  end
  qk[q], qamount[q], qholds[q] = key, ARGV[i + 3], holds and amount > 0
  i = i + 6
end
if unseeded then return {2, day, month} end
if refused then return {0, refused, math.floor(wait), which, own, day_end - now} end
local out = {1, day, month, day_end - now}
for b = 1, nb do
  redis.call('SET', bk[b], tostring(btat[b]), 'PX', math.ceil(btat[b] - now) + 1000)
  out[#out + 1] = math.floor(btat[b] - now)
end
for q = 1, nq do
  out[#out + 1] = redis.call('INCRBY', qk[q], qamount[q])
  if qholds[q] then
    redis.call('INCRBY', qk[q] .. ':h', qamount[q])
    redis.call('EXPIRE', qk[q] .. ':h', 900)  -- a process that died holding it lets go
  end
end
return out
"""

# Settlement of batches of admissions. ARGV: prefix, the number of batches, then per batch:
# its id, counters (count, then full key suffix, delta to the real usage, amount held to
# release each), tpm buckets (count, then name, ms to move each). A batch whose id Redis has
# seen is skipped: one sent again after a timeout (it may have arrived) is applied once.
SETTLE = """
local prefix = ARGV[1]
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local i = 3
for _ = 1, tonumber(ARGV[2]) do
  local fresh = redis.call('SET', prefix .. 'settled:' .. ARGV[i], '1', 'NX', 'EX', 600)
  i = i + 1
  local nc = tonumber(ARGV[i]); i = i + 1
  for c = 1, nc do
    local key = prefix .. ARGV[i]
    local delta, released = ARGV[i + 1], tonumber(ARGV[i + 2])
    i = i + 3
    -- a counter Redis lost is seeded again from the usage store, which has this usage
    if fresh and delta ~= '0' and redis.call('EXISTS', key) == 1 then
      redis.call('INCRBY', key, delta)
    end
    if fresh and released > 0 and redis.call('EXISTS', key .. ':h') == 1 then
      if redis.call('DECRBY', key .. ':h', released) <= 0 then redis.call('DEL', key .. ':h') end
    end
  end
  local nb = tonumber(ARGV[i]); i = i + 1
  for b = 1, nb do
    if fresh then
      local key = prefix .. ARGV[i]
      -- from the bucket as it is now: a time in the past is a full bucket, not a debt
      local tat = tonumber(redis.call('GET', key) or '0')
      if tat < now then tat = now end
      local moved = tat + tonumber(ARGV[i + 1])
      if moved > now then
        redis.call('SET', key, tostring(moved), 'PX', math.ceil(moved - now) + 1000)
      else
        redis.call('DEL', key)
      end
    end
    i = i + 2
  end
end
return 1
"""

# Settlements Redis may not have applied yet, at most (counters and buckets, all batches):
# past it the oldest batches are dropped and counted.
MAX_UNSETTLED = 100_000


@dataclass(slots=True)
class _Bucket:
    name: str
    per: float  # ms per unit
    units: int
    limit: int  # per minute
    what: str


@dataclass(slots=True)
class _Quota:
    name: str  # k:<key id>:rq (requests per day), :tk (tokens per day) or :cost (budget)
    period: str  # "d", "m", "t"
    limit: int
    amount: int
    what: str

    @property
    def kind(self) -> str:
        return self.name.rsplit(":", 1)[1]


@dataclass(slots=True)
class _Seeds:
    """A key's usage in the current periods, from the usage store, for counters Redis lacks."""

    day: int
    month: int
    values: list[int]  # one per quota


@dataclass(slots=True, eq=False)
class _Batch:
    """Settlements sent to Redis together. Redis keeps its id for a while, so a batch sent
    again after a failure that may have reached Redis (a timeout) is applied once."""

    id: str
    counters: dict[str, list[int]] = field(default_factory=dict)  # key -> [delta, to release]
    buckets: dict[str, float] = field(default_factory=dict)  # bucket -> ms to move
    since: float = field(default_factory=time.monotonic)
    sent: bool = False  # written to Redis at least once: only its id may be sent again

    @property
    def size(self) -> int:
        return len(self.counters) + len(self.buckets)


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

    def reservation_holds(self) -> bool:
        """Always: `exceeded` measures against what was left at admission, which counted
        the whole reservation."""
        return True

    def exceeded(self, tokens_so_far: int, cost_so_far: float) -> bool:
        """Whether real usage crosses the daily tokens or the budget, as of the admission
        (what the fleet had used then, plus this request's real usage)."""
        if self._tokens_left is not None and tokens_so_far > self._tokens_left + self._est_tokens:
            return True
        return self._cost_left is not None and cost_so_far > self._cost_left + self._est_cost


class RedisLimiter:
    def __init__(
        self,
        config: ClusterConfig,
        local: Limiter,
        day_reset_hour: int,
        usage: UsageRecorder | None = None,
    ) -> None:
        self.config = config
        self.local = local
        self.usage = usage  # seeds the counters Redis lacks; None: they start at 0
        self._offset_ms = day_reset_hour * 3_600_000
        assert config.redis_url is not None
        self._redis = RedisConnection(config.redis_url)
        self._admit = Script(ADMIT)
        self._settle = Script(SETTLE)
        self._down_until = 0.0
        # settlements not yet applied by Redis, oldest first; the last one may still grow
        self._batches: list[_Batch] = []
        self._batch_ids = itertools.count()
        self._batch_prefix = os.urandom(6).hex()
        self._seeding: dict[tuple[float, float], asyncio.Future[dict[str, RestoredCounters]]] = {}
        self._settler: asyncio.Task[None] | None = None
        self.failures = 0  # Redis calls that failed or timed out
        self.local_admissions = 0  # admissions decided locally while Redis was down
        self.settlements_lost = 0  # counter moves dropped because Redis stayed away too long
        self._failing = False

    async def start(self) -> None:
        self._settler = asyncio.ensure_future(self._settle_forever())

    async def close(self) -> None:
        if self._settler is not None:
            self._settler.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._settler
        await self._send_settlements(final=True)
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
        seeds: _Seeds | None = None
        for _ in range(3):  # a second pass seeds missing counters; a third if a day began
            try:
                async with asyncio.timeout(self.config.redis_timeout):
                    result = await self._admit.run(self._redis, self._args(buckets, quotas, seeds))
            except (RedisError, OSError, TimeoutError) as e:
                self._fault(e)
                return self._without_redis(key_id, limits, ip, endpoint, est_tokens, est_cost)
            assert isinstance(result, list)
            if int(result[0]) != 2:  # type: ignore[arg-type]
                break
            seeds = await self._seeds(key_id, limits, quotas, int(result[1]), int(result[2]))  # type: ignore[arg-type]
        else:
            log.error("redis: quota counters of key %s could not be seeded", key_id)
            return self._without_redis(key_id, limits, ip, endpoint, est_tokens, est_cost)
        self._recovered()
        if int(result[0]) == 0:  # type: ignore[arg-type]
            if int(result[4]):  # type: ignore[arg-type]
                self.local.mark_refused(key_id)  # for tier upgrades, judged per process
            raise self._refusal(result, buckets, quotas)
        self.local.mark_used(key_id)
        return self._ticket(result, buckets, quotas, limits, est_tokens, est_cost)

    def _args(
        self, buckets: list[_Bucket], quotas: list[_Quota], seeds: _Seeds | None
    ) -> list[object]:
        args: list[object] = [self.config.key_prefix, self._offset_ms]
        args += [-1, -1] if seeds is None else [seeds.day, seeds.month]
        args.append(len(buckets))
        for b in buckets:
            args += [b.name, repr(b.per), b.units]
        args.append(len(quotas))
        for index, q in enumerate(quotas):
            seed = -1 if seeds is None else seeds.values[index]
            args += [q.name, q.period, q.limit, q.amount, seed, int(q.kind != "rq")]
        return args

    async def _seeds(
        self, key_id: str, limits: EffectiveLimits, quotas: list[_Quota], day: int, month: int
    ) -> _Seeds:
        """What the key used in Redis's current day and budget period, per the usage store."""
        day_start = (day * 86_400_000 + self._offset_ms) / 1000
        since = {"day": day_start, "total": 0.0}.get(limits.budget_period)
        if since is None:  # the month, from the reset hour on its first day
            year, number = divmod(month, 100)
            start = datetime(year, number, 1, tzinfo=UTC).timestamp()
            since = start + self._offset_ms / 1000
        found = (await self._usage_since(day_start, since)).get(key_id)
        values = []
        for q in quotas:
            if found is None:
                values.append(0)
            elif q.kind == "rq":
                values.append(found.requests_today)
            elif q.kind == "tk":
                values.append(found.tokens_today)
            else:
                values.append(round(found.cost * NANO))
        return _Seeds(day, month, values)

    async def _usage_since(self, day_start: float, since: float) -> dict[str, RestoredCounters]:
        # one query for all the requests that find counters missing at once (a Redis restart)
        key = (day_start, since)
        query = self._seeding.get(key)
        if query is None:
            query = self._seeding[key] = asyncio.ensure_future(self._read_usage(day_start, since))
            query.add_done_callback(lambda _: self._seeding.pop(key, None))
        return await asyncio.shield(query)  # a client that leaves does not cancel the others'

    async def _read_usage(self, day_start: float, since: float) -> dict[str, RestoredCounters]:
        if self.usage is None:
            return {}
        try:
            await self.usage.flush()  # this process's finished requests count too
            return await self.usage.backend.restore_counters(day_start, since)
        except Exception:
            log.exception("redis: cannot read the usage store to seed counters; seeding 0")
            return {}

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
        if isinstance(error, TimeoutError):
            # a stalled or half-open socket may never be closed by the kernel (no reset
            # after a failover or partition): drop it, so the next try connects afresh
            self._redis.reset()
        self._down_until = time.monotonic() + RETRY_REDIS_AFTER
        if not self._failing:
            self._failing = True
            policy = (
                "limiting locally"
                if self.config.on_redis_failure == "open"
                else ("refusing requests")
            )
            log.error("redis unavailable (%s): %s", type(error).__name__ or "timeout", policy)

    def _recovered(self) -> None:
        if self._failing:
            self._failing = False
            log.info("redis is back: limits are shared again")

    def _refusal(
        self, result: list[Any], buckets: list[_Bucket], quotas: list[_Quota]
    ) -> GatewayError:
        kind, wait_ms, index = _text(result[1]), int(result[2]), int(result[3])
        headers: dict[str, str] = {}
        if wait_ms >= 0:
            headers["Retry-After"] = str(max(1, math.ceil(wait_ms / 1000)))
        else:  # no wait helps; the openai SDKs obey x-should-retry. Retry-After still says
            # when the key's day begins again, as every 429 carries one (as the local limiter)
            headers["x-should-retry"] = "false"
            headers["Retry-After"] = str(max(1, math.ceil(int(result[5]) / 1000)))
        if kind == "bucket":
            b = buckets[index - 1]
            return RateLimited(
                f"Rate limit reached: {b.limit} {b.what}. Try again in {headers['Retry-After']} s.",
                headers=headers,
            )
        q = quotas[index - 1]
        limit = q.limit / NANO if q.kind == "cost" else q.limit
        if kind == "held":
            return QuotaExceeded(
                f"You exceeded your {q.what} ({limit:g}) for now: requests in flight hold "
                "the rest of it. Please try again in 1s.",
                headers=headers,
            )
        if q.amount > q.limit:
            requested = q.amount / NANO if q.kind == "cost" else q.amount
            return QuotaExceeded(
                f"This request needs up to {requested:g}, more than the {q.what} of {limit:g}.",
                headers=headers,
            )
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
            ticket._counters.append((q.name + suffix, q.amount, q.kind))
            if q.kind == "tk":
                ticket._tokens_left = q.limit - value
                if "X-RateLimit-Limit-Tokens" not in headers:
                    headers["X-RateLimit-Limit-Tokens"] = str(q.limit)
                    headers["X-RateLimit-Remaining-Tokens"] = str(max(0, q.limit - value))
                    headers["X-RateLimit-Reset-Tokens"] = go_duration(day_left_ms / 1000)
                self._warn(ticket, value, q.limit, "daily tokens")
            elif q.kind == "cost":
                ticket._cost_left = (q.limit - value) / NANO
                self._warn(ticket, value, q.limit, "budget")
        return ticket

    def _warn(self, ticket: RedisTicket, used: int, limit: int, what: str) -> None:
        soft = self.local.config.soft_limit
        if limit and used >= soft * limit:
            ticket.warning = f"{round(100 * used / limit)}% of the {what} used"

    # --- settlements ----------------------------------------------------------------------

    def _settle_soon(self, ticket: RedisTicket, tokens: int, cost: float) -> None:
        """Queue the move from the reservation to the real usage; sent with the others."""
        real = {"tk": tokens, "cost": round(cost * NANO)}
        # a request counts 1 against the requests per day, whatever it used
        counters = [c for c in ticket._counters if c[2] in real]
        moves_bucket = ticket._tpm_bucket is not None and tokens != ticket._est_tokens
        if not counters and not moves_bucket:
            return
        batch = self._open_batch()
        for key, reserved, kind in counters:
            move = batch.counters.get(key)
            if move is None:
                move = batch.counters[key] = [0, 0]
            move[0] += real[kind] - reserved
            move[1] += reserved  # no longer held by a request in flight
        if moves_bucket:
            assert ticket._tpm_bucket is not None
            name, per = ticket._tpm_bucket
            shift = (tokens - ticket._est_tokens) * per
            batch.buckets[name] = batch.buckets.get(name, 0.0) + shift

    def _open_batch(self) -> _Batch:
        if self._batches and not self._batches[-1].sent:
            return self._batches[-1]
        batch = _Batch(f"{self._batch_prefix}:{next(self._batch_ids)}")
        self._batches.append(batch)
        return batch

    async def _settle_forever(self) -> None:
        while True:
            await asyncio.sleep(SETTLE_EVERY)
            await self._send_settlements()

    async def _send_settlements(self, final: bool = False) -> None:
        """Send every batch Redis has not confirmed; keep them until it has (bounded)."""
        if not self._batches or (time.monotonic() < self._down_until and not final):
            return
        timeout = self.config.redis_timeout * 4
        try:
            async with asyncio.timeout(timeout):
                await self._redis.connect()
        except (RedisError, OSError, TimeoutError) as e:
            self._fault(e)  # nothing was sent: the open batch keeps growing meanwhile
            return
        sending = list(self._batches)
        args: list[object] = [self.config.key_prefix, len(sending)]
        stale = time.monotonic() - WINDOW_MS / 1000
        for batch in sending:
            batch.sent = True
            if batch.since < stale:
                batch.buckets.clear()  # a per-minute bucket has refilled since: moot
            args += [batch.id, len(batch.counters)]
            for key, (delta, released) in batch.counters.items():
                args += [key, delta, released]
            args.append(len(batch.buckets))
            for name, shift in batch.buckets.items():
                args += [name, repr(shift)]
        try:
            async with asyncio.timeout(timeout):
                await self._settle.run(self._redis, args)
        except (RedisError, OSError, TimeoutError) as e:
            self._fault(e)  # it may have arrived: sent again under the same ids
            self._bound()
            return
        self._recovered()
        done = set(map(id, sending))
        self._batches = [b for b in self._batches if id(b) not in done]

    def _bound(self) -> None:
        size = sum(b.size for b in self._batches)
        while size > MAX_UNSETTLED and len(self._batches) > 1:
            dropped = self._batches.pop(0)
            size -= dropped.size
            self.settlements_lost += len(dropped.counters)
            log.error(
                "redis: dropped %d unsettled usage counts: Redis has been away too long",
                len(dropped.counters),
            )


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
