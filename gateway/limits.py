"""Rate limits, token quotas, budgets and tier upgrades for client keys, kept in memory.

Three kinds of limit, checked together by `Limiter.admit` before a request is forwarded:

* Request buckets per minute, per key and per client IP, one per endpoint class. They refill
  continuously; the burst is the per-minute limit. Stored as GCRA "theoretical arrival times"
  (one float per bucket): a bucket whose time has passed is full and may be forgotten.
* The key's tokens-per-minute bucket, charged with the request's estimated tokens at admission
  and corrected to the real count at settlement.
* Quotas per key: requests and tokens per UTC day (starting at ``day_reset_hour``) and a budget
  per day, UTC calendar month (from the reset hour on day 1) or in total.

Admission cannot overshoot. ``admit`` checks every limit the request touches and only then
takes from all of them, so a refusal takes nothing. A quota check counts settled usage, plus
what every request in flight holds, plus this request's estimate; so at the last admission
against a quota in a period, settled + held <= limit, and afterwards only requests already in
flight add usage. The bound, for daily tokens and for the budget alike:

    used at the end of a period <= limit + sum of max(0, real - held)
                                   over the requests in flight at its last admission

``held`` is what the request held at that admission: its estimate, or the usage it had
reported to `Ticket.exceeded` by then if that was more. Concurrency adds nothing to the bound:
50 admissions against room for 10 take exactly 10. A caller that asks ``exceeded`` after each
chunk and cuts the stream at the first True limits each stream's share of any overshoot to
what it delivered after its last check. Usage counts in the period in which it is settled, so
a request in flight over a reset counts in the new period. The tokens-per-minute bucket is
charged the same way, except that a request larger than the whole bucket passes when the
bucket is full and leaves it in debt.

Limits are passed to every call (`EffectiveLimits`) and never stored with the consumed
counters, which are keyed by key id: a reload that moves a key to another tier changes its
limits at its next request and keeps what it has used. A bucket keeps the time it needs to
refill, so under a new limit it is as full, as a fraction, as it was.

Every answer to a key carries X-RateLimit-* headers (`Ticket.headers`, `Limiter.peek`, the
refusals): per family, requests or tokens, they describe the limit with the fewest left. The
soft-limit warning counts settled usage only, never what is reserved.

Everything here is synchronous and O(1) per request, with no I/O; the atomicity of admission
rests on running on one event loop thread.
"""

from __future__ import annotations

import ipaddress
import logging
import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal, NoReturn, Protocol, TypeVar

from multidict import istr

from .config import BudgetPeriod, LimitsConfig, LimitSet, TierConfig
from .errors import QuotaExceeded, RateLimited

__all__ = [
    "EffectiveLimits",
    "EndpointClass",
    "KeyStreak",
    "Limiter",
    "Ticket",
    "TrustedProxies",
    "client_ip",
    "go_duration",
    "parse_trusted",
]

log = logging.getLogger("gateway.limits")

EndpointClass = Literal["chat", "embeddings", "standard"]
TrustedProxies = tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

_N = TypeVar("_N", int, float)

_WINDOW: Final = 60.0  # a per-minute bucket refills from empty in this many seconds
_DAY: Final = 86400
# Slack for float rounding at exact boundaries (seconds, tokens): the N-th request of a
# per-minute limit must pass even when N * (60 / N) rounds to a hair above 60.
_EPS: Final = 1e-6
_TAU: Final = _WINDOW + _EPS  # the most a per-minute bucket may owe, in seconds
_COST_SLACK: Final = 1.0 + 1e-9
_PRUNE_EVERY: Final = 60.0
# While other requests in flight hold the rest of a quota, the real wait is unknown: it ends
# when they settle, usually within seconds.
_IN_FLIGHT_WAIT: Final = 1.0
_EPOCH: Final = date(1970, 1, 1)
_ENDPOINT_INDEX: Final[Mapping[str, int]] = {"chat": 0, "embeddings": 1, "standard": 2}
_NEVER_RUN: Final = -(10**9)


# --- limits ---------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class EffectiveLimits:
    """One key's resolved limits; None means unlimited."""

    chat_per_minute: int | None = None
    embeddings_per_minute: int | None = None
    standard_per_minute: int | None = None
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    budget: float | None = None
    budget_period: BudgetPeriod = "month"

    @classmethod
    def resolve(
        cls, defaults: LimitsConfig, tier: TierConfig | None, key: LimitSet
    ) -> EffectiveLimits:
        """Field by field, the key's value, else the tier's, else ``[limits]``; 0 is unlimited.

        A budget period set nowhere is "month".
        """
        t: LimitSet = tier if tier is not None else LimitSet()
        d = defaults
        return cls(
            chat_per_minute=_limit(key.chat_per_minute, t.chat_per_minute, d.chat_per_minute),
            embeddings_per_minute=_limit(
                key.embeddings_per_minute, t.embeddings_per_minute, d.embeddings_per_minute
            ),
            standard_per_minute=_limit(
                key.standard_per_minute, t.standard_per_minute, d.standard_per_minute
            ),
            requests_per_day=_limit(key.requests_per_day, t.requests_per_day, d.requests_per_day),
            tokens_per_minute=_limit(
                key.tokens_per_minute, t.tokens_per_minute, d.tokens_per_minute
            ),
            tokens_per_day=_limit(key.tokens_per_day, t.tokens_per_day, d.tokens_per_day),
            budget=_limit(key.budget, t.budget, d.budget),
            budget_period=key.budget_period or t.budget_period or d.budget_period or "month",
        )

    def per_minute(self, endpoint: EndpointClass) -> int | None:
        if endpoint == "chat":
            return self.chat_per_minute
        if endpoint == "embeddings":
            return self.embeddings_per_minute
        return self.standard_per_minute


def _per_minute(limits: EffectiveLimits, ei: int) -> int | None:
    if ei == 0:
        return limits.chat_per_minute
    if ei == 1:
        return limits.embeddings_per_minute
    return limits.standard_per_minute


def _limit(*values: _N | None) -> _N | None:
    for v in values:
        if v is not None:
            return v if v > 0 else None
    return None


# --- client address -------------------------------------------------------------------------


def parse_trusted(proxies: Iterable[str]) -> TrustedProxies:
    """Addresses or networks ("10.0.0.0/8", "::1") whose X-Forwarded-For is believed."""
    return tuple(ipaddress.ip_network(p.strip(), strict=False) for p in proxies)


def client_ip(peer: str | None, forwarded_for: str | None, trusted: TrustedProxies) -> str | None:
    """The client's address: the right-most X-Forwarded-For entry that is not a trusted proxy.

    Walks from the socket peer leftwards through X-Forwarded-For while each hop is a trusted
    proxy, so entries a client wrote itself (left of what the first trusted proxy appended)
    are never reached. From an untrusted peer the header is ignored. An entry that is not an
    address stops the walk at the trusted proxy that passed it on. Ports, brackets and
    IPv4-mapped IPv6 forms are normalised away. Several X-Forwarded-For headers must be joined
    with "," in order.
    """
    if peer is None:
        return None
    addr = _parse_ip(peer)
    if addr is None:
        return peer
    if forwarded_for and _is_trusted(addr, trusted):
        for hop in reversed(forwarded_for.split(",")):
            hop_addr = _parse_ip(hop)
            if hop_addr is None:
                break
            addr = hop_addr
            if not _is_trusted(addr, trusted):
                break
    return str(addr)


def _parse_ip(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    s = text.strip()
    if s.startswith("["):  # [v6]:port
        end = s.find("]")
        s = s[1:end] if end > 0 else s
    elif s.count(":") == 1:  # v4:port
        s = s.partition(":")[0]
    try:
        addr = ipaddress.ip_address(s)
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def _is_trusted(
    addr: ipaddress.IPv4Address | ipaddress.IPv6Address, trusted: TrustedProxies
) -> bool:
    return any(addr in net for net in trusted)


# --- headers --------------------------------------------------------------------------------


def go_duration(seconds: float) -> str:
    """A duration as Go prints it, to the millisecond: "0s", "120ms", "1.5s", "6m0s", "1h2m3s".

    OpenAI's X-RateLimit-Reset-* headers use this format. Rounded up (past a microsecond of
    float noise), so that a wait is never shown shorter than it is.
    """
    ms = int(seconds * 1000.0 + 0.999) if seconds > 0 else 0
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    if ms < 60_000:
        return f"{ms / 1000:.3f}".rstrip("0") + "s" if ms % 1000 else f"{ms // 1000}s"
    m, ms = divmod(ms, 60_000)
    sec = f"{ms / 1000:.3f}".rstrip("0").rstrip(".") if ms % 1000 else str(ms // 1000)
    if m < 60:
        return f"{m}m{sec}s"
    h, m = divmod(m, 60)
    return f"{h}h{m}m{sec}s"


def _whole_seconds(seconds: float) -> int:
    """Seconds rounded up, past a microsecond of float noise; never negative."""
    return int(seconds + (1.0 - _EPS)) if seconds > 0 else 0


# (requests limit, remaining, reset; tokens limit, remaining, reset); a limit of 0 omits a family
_Snapshot = tuple[int, int, float, int, int, float]


# Header names as multidict's istr, which the response's CIMultiDict takes as they are (a
# plain str it copies into a new istr, for every header of every response).
_LIMIT_REQUESTS = istr("X-RateLimit-Limit-Requests")
_REMAINING_REQUESTS = istr("X-RateLimit-Remaining-Requests")
_RESET_REQUESTS = istr("X-RateLimit-Reset-Requests")
_LIMIT = istr("X-RateLimit-Limit")
_REMAINING = istr("X-RateLimit-Remaining")
_RESET = istr("X-RateLimit-Reset")
_LIMIT_TOKENS = istr("X-RateLimit-Limit-Tokens")
_REMAINING_TOKENS = istr("X-RateLimit-Remaining-Tokens")
_RESET_TOKENS = istr("X-RateLimit-Reset-Tokens")


def _rate_headers(
    req_limit: int,
    req_remaining: int,
    req_reset: float,
    tok_limit: int,
    tok_remaining: int,
    tok_reset: float,
) -> dict[str, str]:
    headers: dict[str, str]
    if req_limit:
        limit = str(req_limit)
        remaining = str(req_remaining) if req_remaining > 0 else "0"
        headers = {
            _LIMIT_REQUESTS: limit,
            _REMAINING_REQUESTS: remaining,
            _RESET_REQUESTS: go_duration(req_reset),
            _LIMIT: limit,
            _REMAINING: remaining,
            _RESET: str(_whole_seconds(req_reset)),
        }
    else:
        headers = {}
    if tok_limit:
        headers[_LIMIT_TOKENS] = str(tok_limit)
        headers[_REMAINING_TOKENS] = str(tok_remaining) if tok_remaining > 0 else "0"
        headers[_RESET_TOKENS] = go_duration(tok_reset)
    return headers


# --- state ----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeyStreak:
    """A run of clean days (used, never refused) for tier upgrades, as the caller persists it.

    ``through`` is the last day of the run: the UTC date on which that quota day began.
    """

    days: int
    through: date


@dataclass(slots=True, eq=False)
class _KeyState:
    """What one key has consumed; never its limits."""

    day: int  # the limiter's day sequence number that the day counters belong to
    month: int
    # bucket times per endpoint class and for tokens; a time in the past means a full bucket
    rpm: list[float] = field(default_factory=lambda: [-math.inf, -math.inf, -math.inf])
    tpm: float = -math.inf
    day_requests: int = 0
    day_tokens: int = 0
    day_cost: float = 0.0
    month_cost: float = 0.0
    total_cost: float = 0.0
    # reserved by requests in flight, counted against every period
    held_tokens: int = 0
    held_cost: float = 0.0
    # bumped when a request uses more than it reserved (or usage is restored): reservations
    # admitted before may no longer fit the daily tokens or the budget
    overdrawn: int = 0
    inflight: int = 0
    used: bool = False
    refused: bool = False
    run: int = 0  # clean days in a row, ending on day `run_through`
    run_through: int = _NEVER_RUN
    warned_tokens: int = -1
    warned_budget: int = -1

    def cost(self, period: BudgetPeriod) -> float:
        if period == "month":
            return self.month_cost
        if period == "day":
            return self.day_cost
        return self.total_cost


@dataclass(slots=True, eq=False)
class Ticket:
    """One admitted request's reservation. Settle it exactly once, in a ``finally``."""

    _limiter: Limiter
    _state: _KeyState
    _limits: EffectiveLimits
    _est_tokens: int
    # held now: the estimate, or more once usage passes it
    _tokens: int
    _cost: float
    _snapshot: _Snapshot
    _overdrawn: int  # the key's `overdrawn` at admission
    _settled: bool = False
    _headers: dict[str, str] | None = None
    # Soft-limit text for a response header, or None.
    warning: str | None = None

    @property
    def headers(self) -> dict[str, str]:
        """X-RateLimit-* headers as of the admission (built on first use)."""
        if self._headers is None:
            self._headers = _rate_headers(*self._snapshot)
        return self._headers

    @property
    def bounded(self) -> bool:
        """Whether a daily token quota or a budget applies, so that a stream may be cut."""
        return bool(self._limits.tokens_per_day or self._limits.budget)

    def reservation_holds(self) -> bool:
        """Whether usage within this request's reservation still fits the daily tokens and the
        budget: admission made room for all of it, and no request has used more than it
        reserved since (which alone can take that room back)."""
        return self._state.overdrawn == self._overdrawn

    def settle(self, tokens: int, cost: float) -> None:
        """Replace the reservation by the real usage (0, 0 for a failed request). Idempotent."""
        if self._settled:
            return
        self._settled = True
        st = self._state
        lim = self._limiter
        if lim._wall() >= lim._next_reset or st.day != lim._day_seq or st.month != lim._month:
            lim._current(st)
        if tokens < 0:
            tokens = 0
        if cost < 0.0:
            cost = 0.0
        if tokens > self._tokens or cost > self._cost:
            st.overdrawn += 1
        st.inflight -= 1
        if st.inflight <= 0:  # also drops the float residue of the held cost
            st.inflight = 0
            st.held_tokens = 0
            st.held_cost = 0.0
        else:
            st.held_tokens -= self._tokens
            st.held_cost -= self._cost
        st.day_tokens += tokens
        if cost:
            st.day_cost += cost
            st.month_cost += cost
            st.total_cost += cost
        tpm = self._limits.tokens_per_minute
        if tpm and tokens != self._est_tokens:
            shift = (tokens - self._est_tokens) * _WINDOW / tpm
            if shift > 0:
                now = lim._clock()
                st.tpm = (st.tpm if st.tpm > now else now) + shift
            else:
                st.tpm += shift

    def exceeded(self, tokens_so_far: int, cost_so_far: float) -> bool:
        """Whether real usage so far crosses the key's daily token quota or its budget.

        Counts settled usage, what other requests in flight hold, and this request's real usage
        so far. Usage beyond this request's estimate is added to its reservation, so that
        admissions and other streams see it at once.
        """
        st = self._state
        self._limiter._current(st)
        if self._settled:
            tokens, cost = st.held_tokens, st.held_cost
        else:
            if tokens_so_far > self._tokens:
                st.held_tokens += tokens_so_far - self._tokens
                self._tokens = tokens_so_far
                st.overdrawn += 1
            if cost_so_far > self._cost:
                st.held_cost += cost_so_far - self._cost
                self._cost = cost_so_far
                st.overdrawn += 1
            # what the others hold, plus this request's real usage rather than its estimate
            tokens = st.held_tokens - self._tokens + tokens_so_far
            cost = st.held_cost - self._cost + cost_so_far
        lim = self._limits
        tpd = lim.tokens_per_day
        if tpd and st.day_tokens + tokens > tpd:
            return True
        budget = lim.budget
        return bool(budget and st.cost(lim.budget_period) + cost > budget * _COST_SLACK)


class Admission(Protocol):
    """What an admitted request holds: here a `Ticket`, in a fleet a Redis ticket."""

    @property
    def headers(self) -> dict[str, str]: ...

    warning: str | None

    @property
    def bounded(self) -> bool: ...

    def settle(self, tokens: int, cost: float) -> None: ...

    def exceeded(self, tokens_so_far: int, cost_so_far: float) -> bool: ...

    def reservation_holds(self) -> bool: ...


# --- limiter --------------------------------------------------------------------------------


class Limiter:
    """Buckets, quotas and tier-upgrade streaks of every key, and buckets per client IP.

    ``clock`` (monotonic seconds) drives the buckets; ``wall`` (Unix seconds) the daily and
    monthly resets. A wall clock that steps back never undoes a reset.

    Tier upgrades: a day is clean for a key if at least one of its requests was admitted and
    none was refused by one of the key's own limits (per-IP refusals do not count: another
    client behind the same address may have caused them). The limiter counts clean days in a
    row per key; `rollover` turns runs that reached a tier's ``upgrade_after_days`` into
    upgrades. Call it at every daily reset (`seconds_until_day_reset` says when) with each
    key's current tier; persist `streaks` afterwards and feed them back with `restore_streak`
    at startup.
    """

    def __init__(
        self,
        config: LimitsConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._clock = clock
        self._wall = wall
        self._keys: dict[str, _KeyState] = {}
        self._ip: list[dict[str, float]] = [{}, {}, {}]
        self._day_seq = 0  # counts resets; day counters compare it, never a calendar date
        self._offset = config.day_reset_hour * 3600
        # days since 1970-01-01 of the current quota day, and when the next one begins
        self._day_index = math.floor((wall() - self._offset) / _DAY)
        self._next_reset = (self._day_index + 1) * _DAY + self._offset
        self._month = _month_of(self._day_index)  # year * 12 + month - 1; never decreases
        self._next_prune = clock() + _PRUNE_EVERY
        self.reconfigure(config)

    def reconfigure(self, config: LimitsConfig) -> None:
        """Take new per-IP limits and policies. Consumed quotas and buckets are kept.

        A new ``day_reset_hour`` resets the day at once if that hour has passed since the
        current day began, and otherwise when it comes.
        """
        self.config = config
        self.trusted = parse_trusted(config.trusted_proxies)
        self._ip_limits = (
            _limit(config.ip_chat_per_minute),
            _limit(config.ip_embeddings_per_minute),
            _limit(config.ip_standard_per_minute),
        )
        self._soft = config.soft_limit
        w = self._tick()  # a reset due under the old hour comes first
        offset = config.day_reset_hour * 3600
        if offset != self._offset:
            began = self._next_reset - _DAY
            index = math.floor((w - offset) / _DAY)
            if index > math.floor((began - offset) / _DAY):
                self._day_seq += 1
            self._offset = offset
            self._day_index = index
            self._next_reset = (index + 1) * _DAY + offset
            self._month = max(self._month, _month_of(index))

    def client_ip(self, peer: str | None, forwarded_for: str | None) -> str | None:
        """`client_ip` with the configured trusted proxies."""
        if not forwarded_for or not self.trusted:
            return peer  # nothing to walk: skip parsing the address on every request
        return client_ip(peer, forwarded_for, self.trusted)

    # --- the request path -----------------------------------------------------------------

    def admit(
        self,
        key_id: str,
        limits: EffectiveLimits,
        ip: str | None,
        endpoint: EndpointClass,
        est_tokens: int,
        est_cost: float,
    ) -> Ticket:
        """Reserve one request and its estimated tokens and cost against every limit, or raise.

        Raises `RateLimited` (a bucket) or `QuotaExceeded` (daily requests or tokens, or
        budget, used up or held by requests in flight); both carry the X-RateLimit-* headers
        and Retry-After. Nothing is taken when a limit refuses.
        """
        now = self._clock()
        w = self._wall()
        if w >= self._next_reset:
            self._advance(w)
        if now >= self._next_prune:
            self.prune()
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(self._day_seq, self._month)
        elif st.day != self._day_seq or st.month != self._month:
            self._roll(st)
        if est_tokens < 0:
            est_tokens = 0
        if est_cost < 0.0:
            est_cost = 0.0

        ei = _ENDPOINT_INDEX[endpoint]
        rpm = _per_minute(limits, ei)
        ok = True
        r_tat = r_step = 0.0
        if rpm:
            r_step = _WINDOW / rpm
            r_tat = st.rpm[ei]
            if r_tat < now:
                r_tat = now
            r_tat += r_step
            if r_tat - now > _TAU:
                ok = False
        ip_rpm = self._ip_limits[ei]
        ip_tat = 0.0
        if ip_rpm and ip is not None:
            ip_tat = self._ip[ei].get(ip, now)
            if ip_tat < now:
                ip_tat = now
            ip_tat += _WINDOW / ip_rpm
            if ip_tat - now > _TAU:
                ok = False
        tpm = limits.tokens_per_minute
        t_tat = 0.0
        if tpm:
            t_step = _WINDOW / tpm
            t_tat = st.tpm
            if t_tat < now:
                t_tat = now
            # a request bigger than the whole bucket passes when the bucket is full
            need = est_tokens if est_tokens < tpm else tpm
            if t_tat + need * t_step - now > _TAU:
                ok = False
            t_tat += est_tokens * t_step
        rpd = limits.requests_per_day
        if rpd and st.day_requests >= rpd:
            ok = False
        tpd = limits.tokens_per_day
        if tpd and st.day_tokens + st.held_tokens + est_tokens > tpd:
            ok = False
        budget = limits.budget
        spent = 0.0
        if budget:
            period = limits.budget_period
            if period == "month":
                spent = st.month_cost
            elif period == "day":
                spent = st.day_cost
            else:
                spent = st.total_cost
            if spent + st.held_cost + est_cost > budget * _COST_SLACK:
                ok = False
        if not ok:
            self._refuse(key_id, st, limits, ip, endpoint, est_tokens, est_cost, now, w)

        if rpm:
            st.rpm[ei] = r_tat
        if ip_rpm and ip is not None:
            self._ip[ei][ip] = ip_tat
        if tpm:
            st.tpm = t_tat
        st.day_requests += 1
        st.held_tokens += est_tokens
        st.held_cost += est_cost
        st.inflight += 1
        st.used = True

        # the header numbers as of now; the dict is built only if the caller asks for it
        snapshot = self._snapshot(st, limits, ip, ei, now, w)
        ticket = Ticket(self, st, limits, est_tokens, est_tokens, est_cost, snapshot, st.overdrawn)
        # the soft limit counts settled usage only: a large reservation is no sign of use
        if (tpd and st.day_tokens >= self._soft * tpd) or (budget and spent >= self._soft * budget):
            ticket.warning = self._soft_warning(key_id, st, limits, w)
        return ticket

    def peek(
        self, key_id: str, limits: EffectiveLimits, ip: str | None, endpoint: EndpointClass
    ) -> dict[str, str]:
        """The X-RateLimit-* headers as of now, taking nothing.

        For the responses to requests that ended before admission (a 400 or 404 found
        first), so that every response to a known key says where its limits stand.
        """
        now = self._clock()
        w = self._tick()
        st = self._state(key_id)
        return _rate_headers(*self._snapshot(st, limits, ip, _ENDPOINT_INDEX[endpoint], now, w))

    def _snapshot(
        self,
        st: _KeyState,
        limits: EffectiveLimits,
        ip: str | None,
        ei: int,
        now: float,
        w: float,
    ) -> _Snapshot:
        """The header numbers: per family, the limit that has the fewest left (on a tie, the
        one that takes longer to reset), so that the headers name what refuses first."""
        day_left = self._next_reset - w
        r_limit, r_left, r_reset = 0, 0, 0.0
        rpm = _per_minute(limits, ei)
        if rpm:
            debt = st.rpm[ei] - now
            if debt < 0.0:
                debt = 0.0
            r_limit, r_left, r_reset = rpm, int((_WINDOW - debt) * rpm / _WINDOW + _EPS), debt
        ip_rpm = self._ip_limits[ei]
        if ip_rpm and ip is not None:
            debt = self._ip[ei].get(ip, now) - now
            if debt < 0.0:
                debt = 0.0
            left = int((_WINDOW - debt) * ip_rpm / _WINDOW + _EPS)
            if not r_limit or left < r_left or (left == r_left and debt > r_reset):
                r_limit, r_left, r_reset = ip_rpm, left, debt
        rpd = limits.requests_per_day
        if rpd:
            left = rpd - st.day_requests
            if not r_limit or left < r_left or (left == r_left and day_left > r_reset):
                r_limit, r_left, r_reset = rpd, left, day_left
        t_limit, t_left, t_reset = 0, 0, 0.0
        tpm = limits.tokens_per_minute
        if tpm:
            debt = st.tpm - now
            if debt < 0.0:
                debt = 0.0
            t_limit, t_left, t_reset = tpm, int(tpm - debt * tpm / _WINDOW + _EPS), debt
        tpd = limits.tokens_per_day
        if tpd:
            left = tpd - st.day_tokens - st.held_tokens
            if not t_limit or left < t_left or (left == t_left and day_left > t_reset):
                t_limit, t_left, t_reset = tpd, left, day_left
        return (r_limit, r_left, r_reset, t_limit, t_left, t_reset)

    def _refuse(
        self,
        key_id: str,
        st: _KeyState,
        limits: EffectiveLimits,
        ip: str | None,
        endpoint: EndpointClass,
        est_tokens: int,
        est_cost: float,
        now: float,
        w: float,
    ) -> NoReturn:
        # The slow path: every test repeats admit's expression exactly, so that both agree.
        failed: list[_Failure] = []
        ei = _ENDPOINT_INDEX[endpoint]
        rpm = limits.per_minute(endpoint)
        if rpm:
            tat = max(st.rpm[ei], now) + _WINDOW / rpm
            if tat - now > _TAU:
                failed.append(_rate_failure(tat - now, f"{endpoint} requests per minute", rpm))
        ip_rpm = self._ip_limits[ei]
        ip_failed = False
        if ip_rpm and ip is not None:
            tat = max(self._ip[ei].get(ip, now), now) + _WINDOW / ip_rpm
            if tat - now > _TAU:
                ip_failed = True
                what = f"{endpoint} requests per minute from your IP address"
                failed.append(_rate_failure(tat - now, what, ip_rpm))
        tpm = limits.tokens_per_minute
        if tpm:
            t_step = _WINDOW / tpm
            t_tat = max(st.tpm, now)
            need = est_tokens if est_tokens < tpm else tpm
            if t_tat + need * t_step - now > _TAU:
                owed = t_tat + need * t_step - now
                failed.append(_rate_failure(owed, "tokens per minute", tpm, est_tokens))
        day_left = self._next_reset - w
        rpd = limits.requests_per_day
        if rpd and st.day_requests >= rpd:
            failed.append(
                _quota_failure("daily request quota", rpd, st.day_requests, 0, 1, day_left)
            )
        tpd = limits.tokens_per_day
        if tpd and st.day_tokens + st.held_tokens + est_tokens > tpd:
            used, held = st.day_tokens, st.held_tokens
            failed.append(
                _quota_failure("daily token quota", tpd, used, held, est_tokens, day_left)
            )
        budget = limits.budget
        if budget:
            period = limits.budget_period
            spent = st.cost(period)
            if spent + st.held_cost + est_cost > budget * _COST_SLACK:
                left = self._period_left(period, w)
                what = f"{_PERIOD_WORD[period]} budget"
                failed.append(_quota_failure(what, budget, spent, st.held_cost, est_cost, left))
        if not ip_failed or len(failed) > 1:
            st.refused = True
        worst = max(failed, key=_Failure.order, default=None)
        if worst is None:  # pragma: no cover - admit and this agree by construction
            worst = _Failure(_EPS, False, "Rate limit reached. Please try again in 1s.")
        headers = _rate_headers(*self._snapshot(st, limits, ip, ei, now, w))
        if worst.wait is None:
            # No wait helps; the openai SDKs obey this header and do not retry. Retry-After
            # still says when the key's day begins again, as every 429 carries one.
            headers["x-should-retry"] = "false"
            headers["Retry-After"] = str(max(1, _whole_seconds(day_left)))
        else:
            headers["Retry-After"] = str(max(1, _whole_seconds(worst.wait)))
        if worst.quota:
            raise QuotaExceeded(worst.message, headers=headers)
        raise RateLimited(worst.message, headers=headers)

    def _soft_warning(
        self, key_id: str, st: _KeyState, limits: EffectiveLimits, w: float
    ) -> str | None:
        parts: list[str] = []
        tpd = limits.tokens_per_day
        if tpd:
            used = st.day_tokens
            if used >= self._soft * tpd:
                what = f"{used * 100 // tpd}% of the daily token quota ({used} of {tpd} tokens)"
                parts.append(f"{what} used; it resets in {go_duration(self._next_reset - w)}")
                if st.warned_tokens != st.day:
                    st.warned_tokens = st.day
                    log.warning("key %s reached the soft limit: %s", key_id, what)
        budget = limits.budget
        if budget:
            period = limits.budget_period
            spent = st.cost(period)
            if spent >= self._soft * budget:
                what = (
                    f"{int(spent * 100 / budget)}% of the {_PERIOD_WORD[period]} budget "
                    f"({spent:.6g} of {budget:.6g})"
                )
                left = self._period_left(period, w)
                resets = (
                    "it does not reset" if left is None else f"it resets in {go_duration(left)}"
                )
                parts.append(f"{what} used; {resets}")
                # one marker per period: the residues keep days, months and "total" apart
                marker = (
                    st.day * 3 if period == "day" else st.month * 3 + 1 if period == "month" else 2
                )
                if st.warned_budget != marker:
                    st.warned_budget = marker
                    log.warning("key %s reached the soft limit: %s", key_id, what)
        return "; ".join(parts) or None

    # --- periods --------------------------------------------------------------------------

    def _advance(self, w: float) -> None:
        index = math.floor((w - self._offset) / _DAY)
        if index > self._day_index:
            self._day_seq += index - self._day_index
            self._day_index = index
            self._month = max(self._month, _month_of(index))
        self._next_reset = (self._day_index + 1) * _DAY + self._offset

    def _current(self, st: _KeyState) -> None:
        w = self._wall()
        if w >= self._next_reset:
            self._advance(w)
        if st.day != self._day_seq or st.month != self._month:
            self._roll(st)

    def _roll(self, st: _KeyState) -> None:
        if st.day != self._day_seq:
            closed = st.day
            if st.refused:
                st.run = 0
            elif st.used:
                st.run = st.run + 1 if st.run_through == closed - 1 else 1
                st.run_through = closed
            st.day = self._day_seq
            st.day_requests = 0
            st.day_tokens = 0
            st.day_cost = 0.0
            st.used = st.refused = False
        if st.month != self._month:
            st.month = self._month
            st.month_cost = 0.0

    def _today(self) -> date:
        return _EPOCH + timedelta(days=self._day_index)

    def _month_start(self, month: int) -> float:
        y, m = divmod(month, 12)
        return datetime(y, m + 1, 1, self._offset // 3600, tzinfo=UTC).timestamp()

    def _period_left(self, period: BudgetPeriod, w: float) -> float | None:
        if period == "day":
            return self._next_reset - w
        if period == "month":
            return self._month_start(self._month + 1) - w
        return None

    def _tick(self) -> float:
        w = self._wall()
        if w >= self._next_reset:
            self._advance(w)
        return w

    def seconds_until_day_reset(self) -> float:
        """Seconds until the next daily reset, when `rollover` should be called."""
        return self._next_reset - self._tick()

    def period_start(self, period: BudgetPeriod) -> float | None:
        """Unix time at which the current period began (None for "total"), for `restore`."""
        self._tick()
        if period == "day":
            return self._next_reset - _DAY
        if period == "month":
            return self._month_start(self._month)
        return None

    # --- persistence and upkeep -----------------------------------------------------------

    def restore(
        self,
        key_id: str,
        *,
        day_requests: int,
        day_tokens: int,
        period_cost: float,
        budget_period: BudgetPeriod,
        refused_today: bool = False,
    ) -> None:
        """Set a key's usage from the usage store at startup, before serving.

        ``day_requests`` and ``day_tokens`` count admitted requests since
        ``period_start("day")``; ``period_cost`` is what was spent in the current
        ``budget_period`` (the key's effective one). The spend of the other periods starts at
        zero, which matters only if a later reload changes the key's budget period.
        """
        self._tick()
        st = self._state(key_id)
        st.overdrawn += 1
        st.day_requests = day_requests
        st.day_tokens = day_tokens
        st.used = st.used or day_requests > 0
        st.refused = st.refused or refused_today
        if budget_period == "day":
            st.day_cost = period_cost
        elif budget_period == "month":
            st.month_cost = period_cost
        else:
            st.total_cost = period_cost

    def mark_used(self, key_id: str) -> None:
        """Count a request admitted elsewhere (by the fleet's limits in Redis) toward the key's
        clean days, as `admit` counts its own."""
        self._tick()
        self._state(key_id).used = True

    def mark_refused(self, key_id: str) -> None:
        """Count a refusal by one of the key's own limits decided elsewhere: the day is not
        clean."""
        self._tick()
        self._state(key_id).refused = True

    def restore_streak(self, key_id: str, streak: KeyStreak) -> None:
        """Set a key's run of clean days as persisted from `streaks`."""
        self._tick()
        st = self._state(key_id)
        st.run = streak.days
        st.run_through = self._day_seq - (self._today() - streak.through).days

    def streaks(self) -> dict[str, KeyStreak]:
        """Each key's run of clean days up to the last reset, for the caller to persist."""
        self._tick()
        today = self._today()
        out: dict[str, KeyStreak] = {}
        for key_id, st in self._keys.items():
            self._roll(st)
            if st.run > 0:
                through = today - timedelta(days=self._day_seq - st.run_through)
                out[key_id] = KeyStreak(st.run, through)
        return out

    def rollover(
        self, key_tiers: Mapping[str, str | None], tiers: Mapping[str, TierConfig]
    ) -> list[tuple[str, str, str]]:
        """Tier upgrades due: (key_id, from_tier, to_tier) for each key in ``key_tiers``.

        ``key_tiers`` maps key ids to their current tier names. A key is upgraded when its run
        of clean days reached its tier's ``upgrade_after_days``; its run then starts again
        from zero in the new tier. Idempotent within a day; an upgrade earned at a reset that
        was missed is still reported, unless a refused day has broken the run since.
        """
        self._tick()
        for st in self._keys.values():
            self._roll(st)
        upgrades: list[tuple[str, str, str]] = []
        for key_id, tier_name in key_tiers.items():
            state = self._keys.get(key_id)
            tier = tiers.get(tier_name) if tier_name is not None else None
            if state is None or tier_name is None or tier is None or tier.upgrade_to is None:
                continue
            if tier.upgrade_after_days is not None and state.run >= tier.upgrade_after_days:
                upgrades.append((key_id, tier_name, tier.upgrade_to))
                state.run = 0
        return upgrades

    def forget(self, key_id: str) -> None:
        """Drop a revoked key's state."""
        self._keys.pop(key_id, None)

    def prune(self) -> None:
        """Drop per-IP buckets that have refilled (a full bucket is the same as none).

        Runs by itself once a minute from `admit`, so entries exist only for addresses seen in
        about the last two minutes. The dicts are rebuilt because Python dicts never shrink.
        """
        now = self._clock()
        self._next_prune = now + _PRUNE_EVERY
        self._ip = [{ip: t for ip, t in d.items() if t > now} for d in self._ip]

    @property
    def tracked_ips(self) -> int:
        """Per-IP buckets held now, summed over endpoint classes."""
        return sum(len(d) for d in self._ip)

    def _state(self, key_id: str) -> _KeyState:
        st = self._keys.get(key_id)
        if st is None:
            st = self._keys[key_id] = _KeyState(self._day_seq, self._month)
        else:
            self._roll(st)
        return st


_PERIOD_WORD: Final[Mapping[BudgetPeriod, str]] = {
    "day": "daily",
    "month": "monthly",
    "total": "total",
}


def _month_of(day_index: int) -> int:
    d = _EPOCH + timedelta(days=day_index)
    return d.year * 12 + d.month - 1


@dataclass(frozen=True, slots=True)
class _Failure:
    """A limit that refuses: seconds until it would pass (None: never), and why."""

    wait: float | None
    quota: bool  # a used-up quota (insufficient_quota), not a rate limit
    message: str

    def order(self) -> float:
        return math.inf if self.wait is None else self.wait


def _rate_failure(owed: float, what: str, limit: int, requested: int = 1) -> _Failure:
    """A bucket that owes ``owed`` seconds of refill, of which one window may be owed."""
    wait = owed - _WINDOW
    asked = f", requested {requested}" if requested != 1 else ""
    return _Failure(
        wait,
        False,
        f"Rate limit reached for {what}: limit {limit}{asked}. "
        f"Please try again in {go_duration(wait)}.",
    )


def _quota_failure(
    what: str, limit: float, used: float, held: float, requested: float, left: float | None
) -> _Failure:
    if requested > limit * _COST_SLACK:
        message = f"This request needs up to {requested:.6g}, more than the {what} of {limit:.6g}."
        return _Failure(None, True, message)
    if used + requested <= limit * _COST_SLACK:
        # The quota is spoken for, though not yet used: there may be room once requests in
        # flight settle below their reservations. Still a quota, not a rate, that refuses.
        message = (
            f"You exceeded your {what}: requests in flight hold {held:.6g} of the "
            f"{limit - used:.6g} left. Please try again in 1s."
        )
        return _Failure(_IN_FLIGHT_WAIT, True, message)
    resets = "It does not reset." if left is None else f"It resets in {go_duration(left)}."
    message = (
        f"You exceeded your {what}: limit {limit:.6g}, used {used:.6g}, "
        f"requested {requested:.6g}. {resets}"
    )
    return _Failure(left, True, message)
