"""The limiter on a fake clock: buckets, quotas, reservations, headers, tiers, restarts."""

from __future__ import annotations

import logging
from dataclasses import replace
from datetime import UTC, date, datetime
from typing import TypedDict, Unpack

import pytest

from gateway.config import LimitsConfig, LimitSet, TierConfig
from gateway.errors import GatewayError, QuotaExceeded, RateLimited
from gateway.limits import (
    EffectiveLimits,
    EndpointClass,
    KeyStreak,
    Limiter,
    Ticket,
    client_ip,
    go_duration,
    parse_trusted,
)

START = datetime(2026, 3, 10, 12, 0, tzinfo=UTC)


class FakeClock:
    """A monotonic and a wall clock that move together, and only when told to."""

    def __init__(self, wall: datetime = START) -> None:
        self.mono = 5000.0
        self.wall = wall.timestamp()

    def monotonic(self) -> float:
        return self.mono

    def time(self) -> float:
        return self.wall

    def advance(self, seconds: float) -> None:
        self.mono += seconds
        self.wall += seconds

    def to(self, when: datetime) -> None:
        self.advance(when.timestamp() - self.wall)


def make(wall: datetime = START, **config: object) -> tuple[Limiter, FakeClock]:
    clock = FakeClock(wall)
    limiter = Limiter(LimitsConfig(**config), clock=clock.monotonic, wall=clock.time)  # type: ignore[arg-type]
    return limiter, clock


class Request(TypedDict, total=False):
    key: str
    ip: str | None
    endpoint: EndpointClass
    tokens: int
    cost: float


def admit(limiter: Limiter, limits: EffectiveLimits, **req: Unpack[Request]) -> Ticket:
    return limiter.admit(
        req.get("key", "k"),
        limits,
        req.get("ip"),
        req.get("endpoint", "chat"),
        req.get("tokens", 0),
        req.get("cost", 0.0),
    )


def refused(limiter: Limiter, limits: EffectiveLimits, **req: Unpack[Request]) -> GatewayError:
    with pytest.raises((RateLimited, QuotaExceeded)) as info:
        admit(limiter, limits, **req)
    return info.value


def passes(limiter: Limiter, limits: EffectiveLimits, **req: Unpack[Request]) -> bool:
    """Admit and settle at the estimate."""
    try:
        admit(limiter, limits, **req).settle(req.get("tokens", 0), req.get("cost", 0.0))
    except (RateLimited, QuotaExceeded):
        return False
    return True


def passes_held(limiter: Limiter, limits: EffectiveLimits, **req: Unpack[Request]) -> bool:
    """Admit and keep the reservation (the request stays in flight)."""
    try:
        admit(limiter, limits, **req)
    except (RateLimited, QuotaExceeded):
        return False
    return True


# --- resolving limits -----------------------------------------------------------------------


def test_limits_inherit_key_then_tier_then_defaults_and_zero_is_unlimited() -> None:
    defaults = LimitsConfig(
        chat_per_minute=60,
        embeddings_per_minute=100,
        requests_per_day=1000,
        tokens_per_day=100_000,
        budget=10.0,
    )
    tier = TierConfig(
        chat_per_minute=120, tokens_per_day=0, tokens_per_minute=5000, budget_period="day"
    )
    key = LimitSet(chat_per_minute=30, requests_per_day=0, budget=2.5)

    assert EffectiveLimits.resolve(defaults, tier, key) == EffectiveLimits(
        chat_per_minute=30,  # key
        embeddings_per_minute=100,  # defaults
        standard_per_minute=None,  # set nowhere
        requests_per_day=None,  # key's 0 beats the defaults' 1000
        tokens_per_minute=5000,  # tier
        tokens_per_day=None,  # tier's 0 beats the defaults' 100000
        budget=2.5,
        budget_period="day",
    )
    plain = EffectiveLimits.resolve(defaults, None, LimitSet())
    assert plain.chat_per_minute == 60
    assert plain.tokens_per_day == 100_000
    assert plain.budget_period == "month"
    assert EffectiveLimits.resolve(LimitsConfig(), None, LimitSet()) == EffectiveLimits()


# --- request buckets ------------------------------------------------------------------------


def test_bucket_exact_boundary_nth_passes_next_fails_then_passes_after_refill_time() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=3)
    for _ in range(3):
        assert passes(limiter, limits)
    err = refused(limiter, limits)
    assert isinstance(err, RateLimited)
    assert err.headers["Retry-After"] == "20"  # one request refills in 60 / 3 seconds
    clock.advance(19.999)
    assert not passes(limiter, limits)
    clock.advance(0.001)
    assert passes(limiter, limits)
    assert not passes(limiter, limits)


def test_bucket_refills_continuously_and_bursts_only_up_to_capacity() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=60)
    assert sum(passes(limiter, limits) for _ in range(100)) == 60
    clock.advance(0.5)
    assert not passes(limiter, limits)
    clock.advance(0.5)
    assert passes(limiter, limits)
    clock.advance(10.0)
    assert sum(passes(limiter, limits) for _ in range(100)) == 10
    clock.advance(600.0)  # long idle: the bucket holds at most its capacity
    assert sum(passes(limiter, limits) for _ in range(100)) == 60


def test_endpoint_classes_and_keys_have_separate_buckets() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(chat_per_minute=1, embeddings_per_minute=1)
    assert passes(limiter, limits, endpoint="chat")
    assert not passes(limiter, limits, endpoint="chat")
    assert passes(limiter, limits, endpoint="embeddings")
    assert not passes(limiter, limits, endpoint="embeddings")
    assert all(passes(limiter, limits, endpoint="standard") for _ in range(50))
    assert passes(limiter, limits, endpoint="chat", key="other")


def test_tokens_per_minute_is_reconciled_to_real_usage() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_minute=1000)
    admit(limiter, limits, tokens=600).settle(100, 0.0)  # over-estimate: 500 come back
    assert passes(limiter, limits, tokens=900)
    assert not passes(limiter, limits, tokens=1)

    limiter, _ = make()
    admit(limiter, limits, tokens=100).settle(1000, 0.0)  # under-estimate: the bucket is empty
    err = refused(limiter, limits, tokens=60)
    assert isinstance(err, RateLimited)
    assert err.headers["Retry-After"] == "4"  # 60 tokens at 1000 per minute


def test_a_long_request_settled_late_still_charges_its_extra_tokens() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(tokens_per_minute=1000)
    ticket = admit(limiter, limits, tokens=100)
    clock.advance(60)  # the bucket has refilled while the stream ran
    ticket.settle(1000, 0.0)  # the 900 beyond the estimate are taken now
    assert not passes(limiter, limits, tokens=101)
    assert passes(limiter, limits, tokens=100)


def test_request_larger_than_the_token_bucket_passes_when_full_and_the_debt_is_waited_off() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(tokens_per_minute=1000)
    admit(limiter, limits, tokens=3000).settle(3000, 0.0)
    err = refused(limiter, limits, tokens=1000)
    assert err.headers["Retry-After"] == "180"  # 3000 tokens of debt, then a full bucket
    clock.advance(179.9)
    assert not passes(limiter, limits, tokens=1000)
    clock.advance(0.1)
    assert passes(limiter, limits, tokens=1000)


def test_a_refusal_takes_nothing() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(chat_per_minute=10, requests_per_day=100, tokens_per_day=1000)
    admit(limiter, limits, tokens=900).settle(900, 0.0)
    for _ in range(20):
        refused(limiter, limits, tokens=200)  # the daily quota refuses; buckets stay untouched
    ticket = admit(limiter, limits, tokens=100)
    assert ticket.headers["X-RateLimit-Remaining-Requests"] == "8"
    limiter.restore("k", day_requests=99, day_tokens=0, period_cost=0.0, budget_period="day")
    assert passes(limiter, limits)  # the 20 refusals were not counted as requests
    assert not passes(limiter, limits)


# --- daily and monthly periods --------------------------------------------------------------


def test_daily_quota_resets_at_utc_midnight() -> None:
    limiter, clock = make(datetime(2026, 3, 10, 23, 59, 0, tzinfo=UTC))
    limits = EffectiveLimits(tokens_per_day=1000, requests_per_day=5)
    admit(limiter, limits, tokens=1000).settle(1000, 0.0)
    err = refused(limiter, limits, tokens=1)
    assert isinstance(err, QuotaExceeded)
    assert err.headers["Retry-After"] == "60"
    clock.advance(59.5)
    assert not passes(limiter, limits, tokens=1)
    clock.advance(0.5)
    assert passes(limiter, limits, tokens=1000)
    for _ in range(4):
        assert passes(limiter, limits)
    err = refused(limiter, limits)  # 5 requests today; the one before midnight was yesterday's
    assert isinstance(err, QuotaExceeded)
    assert "daily request quota" in err.message


def test_daily_quota_resets_at_the_configured_hour() -> None:
    limiter, clock = make(datetime(2026, 3, 10, 5, 0, tzinfo=UTC), day_reset_hour=6)
    limits = EffectiveLimits(tokens_per_day=100)
    admit(limiter, limits, tokens=100).settle(100, 0.0)
    clock.to(datetime(2026, 3, 10, 5, 59, 59, tzinfo=UTC))
    assert refused(limiter, limits, tokens=1).headers["Retry-After"] == "1"
    clock.to(datetime(2026, 3, 10, 6, 0, tzinfo=UTC))
    admit(limiter, limits, tokens=100).settle(100, 0.0)
    clock.to(datetime(2026, 3, 11, 0, 30, tzinfo=UTC))  # midnight is no reset
    assert refused(limiter, limits, tokens=1).headers["Retry-After"] == str(5 * 3600 + 30 * 60)
    clock.to(datetime(2026, 3, 11, 6, 0, tzinfo=UTC))
    assert passes(limiter, limits, tokens=100)
    assert limiter.period_start("day") == datetime(2026, 3, 11, 6, 0, tzinfo=UTC).timestamp()


def test_monthly_budget_resets_on_the_first_at_the_reset_hour() -> None:
    limiter, clock = make(datetime(2026, 3, 31, 12, 0, tzinfo=UTC), day_reset_hour=6)
    limits = EffectiveLimits(budget=1.0, budget_period="month")
    for _ in range(10):
        admit(limiter, limits, cost=0.1).settle(0, 0.1)
    err = refused(limiter, limits, cost=0.01)
    assert isinstance(err, QuotaExceeded)
    assert err.code == "insufficient_quota"
    assert err.headers["Retry-After"] == str(18 * 3600)  # to 1 April, 06:00
    clock.to(datetime(2026, 4, 1, 5, 59, 59, tzinfo=UTC))
    assert not passes(limiter, limits, cost=0.01)
    clock.to(datetime(2026, 4, 1, 6, 0, tzinfo=UTC))
    assert passes(limiter, limits, cost=1.0)
    assert limiter.period_start("month") == datetime(2026, 4, 1, 6, 0, tzinfo=UTC).timestamp()


def test_daily_budget_resets_daily_and_total_budget_never() -> None:
    limiter, clock = make()
    daily = EffectiveLimits(budget=0.5, budget_period="day")
    admit(limiter, daily, cost=0.5).settle(0, 0.5)
    assert not passes(limiter, daily, cost=0.1)
    clock.advance(12 * 3600)
    assert passes(limiter, daily, cost=0.5)

    limiter, clock = make()
    total = EffectiveLimits(budget=0.5, budget_period="total")
    admit(limiter, total, cost=0.5).settle(0, 0.5)
    clock.advance(40 * 86400)
    err = refused(limiter, total, cost=0.1)
    assert isinstance(err, QuotaExceeded)
    assert err.headers["x-should-retry"] == "false"  # no wait helps
    # every 429 carries Retry-After; without a period, it is the key's next day
    assert err.headers["Retry-After"] == str(12 * 3600)
    assert limiter.period_start("total") is None


def test_wall_clock_stepping_back_does_not_reset_the_day_again() -> None:
    limiter, clock = make(datetime(2026, 3, 10, 23, 59, 59, tzinfo=UTC))
    limits = EffectiveLimits(tokens_per_day=100)
    clock.advance(2)  # past midnight
    admit(limiter, limits, tokens=100).settle(100, 0.0)
    clock.wall -= 5  # NTP steps back over midnight
    assert not passes(limiter, limits, tokens=1)
    clock.wall += 5
    assert not passes(limiter, limits, tokens=1)


# --- reservations and settlement ------------------------------------------------------------


def test_settle_after_an_under_estimate_counts_the_real_usage() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000)
    admit(limiter, limits, tokens=100).settle(700, 0.0)
    assert admit(limiter, limits, tokens=1).headers["X-RateLimit-Remaining-Tokens"] == "299"
    assert not passes(limiter, limits, tokens=300)
    assert passes(limiter, limits, tokens=299)


def test_settle_after_an_over_estimate_releases_the_rest() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000)
    ticket = admit(limiter, limits, tokens=900)
    err = refused(limiter, limits, tokens=200)
    # held by a request in flight, not yet used up: still the quota that refuses
    assert isinstance(err, QuotaExceeded)
    assert (err.type, err.code) == ("insufficient_quota", "insufficient_quota")
    assert err.headers["Retry-After"] == "1"
    assert "in flight" in err.message
    ticket.settle(100, 0.0)
    assert passes(limiter, limits, tokens=900)
    assert not passes(limiter, limits, tokens=901)


def test_settle_is_idempotent() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000, budget=1.0)
    ticket = admit(limiter, limits, tokens=500, cost=0.5)
    ticket.settle(500, 0.5)
    ticket.settle(500, 0.5)
    assert passes(limiter, limits, tokens=500, cost=0.5)


def test_concurrent_admissions_cannot_overshoot_a_quota() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000)
    tickets: list[Ticket] = []
    errors: list[GatewayError] = []
    for _ in range(50):  # all in flight at once: none settles in between
        try:
            tickets.append(admit(limiter, limits, tokens=100))
        except QuotaExceeded as e:
            errors.append(e)
    assert len(tickets) == 10
    assert len(errors) == 40
    # held by requests in flight: insufficient_quota, to be tried again once they settle
    assert all(e.code == "insufficient_quota" and e.headers["Retry-After"] == "1" for e in errors)
    for t in tickets:
        t.settle(100, 0.0)
    err = refused(limiter, limits, tokens=100)
    assert isinstance(err, QuotaExceeded)  # now it is used up: until the daily reset
    assert err.headers["Retry-After"] == str(12 * 3600)

    limiter, _ = make()
    budget = EffectiveLimits(budget=1.0, budget_period="day")
    admitted = sum(passes_held(limiter, budget, cost=0.1) for _ in range(50))
    assert admitted == 10


def test_exceeded_answers_mid_stream_against_settled_and_held_usage() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000, budget=1.0, budget_period="day")
    admit(limiter, limits, tokens=500).settle(500, 0.0)
    a = admit(limiter, limits, tokens=200, cost=0.1)
    b = admit(limiter, limits, tokens=200, cost=0.1)
    assert not a.exceeded(100, 0.05)
    assert not a.exceeded(300, 0.05)  # 500 settled + 200 held by b + 300: exactly the quota
    assert a.exceeded(301, 0.05)
    # a's usage beyond its estimate is held at once: b and new admissions see it
    assert not b.exceeded(0, 0.0)
    assert not passes(limiter, limits, tokens=1)
    a.settle(301, 0.05)
    assert b.exceeded(200, 0.0)  # 500 + 301 + 200 > 1000
    assert not b.exceeded(0, 0.95)  # 0.05 spent + 0.95: exactly the budget
    assert b.exceeded(0, 0.96)
    assert not b.exceeded(0, 0.9)


def test_a_reservation_holds_until_a_request_uses_more_than_it_reserved() -> None:
    # a stream within its reservation needs no check while this holds (handlers.budget_cutoff)
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000, budget=1.0, budget_period="day")
    stream = admit(limiter, limits, tokens=500, cost=0.5)
    admit(limiter, limits, tokens=100).settle(100, 0.0)  # as reserved, or less
    admit(limiter, limits, tokens=100).settle(0, 0.0)
    assert stream.reservation_holds()
    # a request that used more than it reserved takes back room the stream was counted in
    admit(limiter, limits, tokens=100).settle(401, 0.0)
    assert not stream.reservation_holds()
    assert not stream.exceeded(400, 0.5)  # 100 + 401 settled + 400: within 1000
    assert stream.exceeded(500, 0.5)  # + 500: the whole reservation no longer fits
    # a cost beyond the reserved one overdraws too, and so does a stream outgrowing its own
    limiter, _ = make()
    held = admit(limiter, limits, tokens=10, cost=0.1)
    admit(limiter, limits, tokens=10, cost=0.1).settle(10, 0.2)
    assert not held.reservation_holds()
    growing = admit(limiter, limits, tokens=10, cost=0.1)
    assert growing.reservation_holds()
    assert not growing.exceeded(20, 0.1)  # past its own reservation: now held, and said
    assert not growing.reservation_holds()


def test_usage_beyond_the_estimate_is_released_with_the_reservation() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(tokens_per_day=1000)
    a = admit(limiter, limits, tokens=100)
    admit(limiter, limits, tokens=100)  # stays in flight
    assert not a.exceeded(300, 0.0)  # a now holds 300
    a.settle(300, 0.0)
    assert not passes(limiter, limits, tokens=601)  # 300 used, 100 held
    assert passes(limiter, limits, tokens=600)


# --- client address and per-IP buckets ------------------------------------------------------


def test_client_ip_walks_x_forwarded_for_only_through_trusted_proxies() -> None:
    trusted = parse_trusted(["10.0.0.0/8", "::1"])
    assert client_ip("203.0.113.5", "1.2.3.4", trusted) == "203.0.113.5"  # untrusted peer
    assert client_ip("10.0.0.2", "198.51.100.7", trusted) == "198.51.100.7"
    assert client_ip("10.0.0.2", "6.6.6.6, 198.51.100.7", trusted) == "198.51.100.7"
    assert client_ip("10.0.0.2", "6.6.6.6, 198.51.100.7, 10.0.0.3", trusted) == "198.51.100.7"
    assert client_ip("::1", "10.0.0.9, 10.0.0.3", trusted) == "10.0.0.9"  # all trusted
    assert client_ip("10.0.0.2", "198.51.100.7, junk", trusted) == "10.0.0.2"
    assert client_ip("10.0.0.2", "[2001:db8::1]:443", trusted) == "2001:db8::1"
    assert client_ip("10.0.0.2", "198.51.100.7:5678", trusted) == "198.51.100.7"
    assert client_ip("::ffff:203.0.113.5", None, trusted) == "203.0.113.5"
    assert client_ip("10.0.0.2", None, trusted) == "10.0.0.2"
    assert client_ip(None, "1.2.3.4", trusted) is None
    assert client_ip("10.0.0.2", "1.2.3.4", ()) == "10.0.0.2"  # nothing trusted


def test_per_ip_buckets_are_shared_by_keys_and_spoofed_forwarded_for_is_ignored() -> None:
    limiter, _ = make(ip_chat_per_minute=2, trusted_proxies=("10.0.0.0/8",))
    limits = EffectiveLimits()
    # a client connecting directly cannot pick a fresh address per request
    for i in range(2):
        ip = limiter.client_ip("203.0.113.5", f"198.51.100.{i}")
        assert passes(limiter, limits, key=f"key{i}", ip=ip)
    ip = limiter.client_ip("203.0.113.5", "198.51.100.99")
    err = refused(limiter, limits, key="key9", ip=ip)
    assert isinstance(err, RateLimited)
    assert "IP address" in err.message
    assert err.headers["Retry-After"] == "30"
    # behind the trusted proxy, each client has its own bucket
    for i in range(3):
        ip = limiter.client_ip("10.0.0.2", f"198.51.100.{i}")
        assert passes(limiter, limits, ip=ip) == (i < 3)
    assert passes(limiter, limits, endpoint="embeddings", ip="203.0.113.5")  # no IP limit there


def test_pruning_keeps_per_ip_buckets_bounded() -> None:
    limiter, clock = make(ip_chat_per_minute=60)
    limits = EffectiveLimits()
    for i in range(5000):
        assert passes(limiter, limits, ip=f"10.{i // 256}.{i % 256}.1")
    assert limiter.tracked_ips == 5000
    clock.advance(59.5)
    for _ in range(60):
        assert passes(limiter, limits, ip="192.0.2.1")  # empties its bucket: 60 s to refill
    clock.advance(1.0)
    assert passes(limiter, limits, ip="192.0.2.2")  # a minute has passed: this prunes
    assert limiter.tracked_ips == 2  # only buckets that are not full again remain
    # the kept bucket kept its state: one request has refilled in the last second
    assert sum(passes(limiter, limits, ip="192.0.2.1") for _ in range(100)) == 1
    assert sum(passes(limiter, limits, ip="10.0.0.1") for _ in range(100)) == 60


# --- headers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.0004, "1ms"),
        (0.12, "120ms"),
        (0.12000000001, "120ms"),
        (1, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (60, "1m0s"),
        (61.25, "1m1.25s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723, "1h2m3s"),
    ],
)
def test_go_duration_matches_go_formatting(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_success_headers_use_openai_names_and_formats() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=60, tokens_per_minute=150_000, tokens_per_day=10**6)
    ticket = admit(limiter, limits, tokens=1000)
    assert ticket.headers == {
        "X-RateLimit-Limit-Requests": "60",
        "X-RateLimit-Remaining-Requests": "59",
        "X-RateLimit-Reset-Requests": "1s",
        "X-RateLimit-Limit-Tokens": "150000",
        "X-RateLimit-Remaining-Tokens": "149000",
        "X-RateLimit-Reset-Tokens": "400ms",
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "59",
        "X-RateLimit-Reset": "1",
    }
    for _ in range(9):
        admit(limiter, limits, tokens=1000)
    clock.advance(0.5)
    headers = admit(limiter, limits, tokens=1000).headers
    assert headers["X-RateLimit-Remaining-Requests"] == "49"
    assert headers["X-RateLimit-Reset-Requests"] == "10.5s"
    assert headers["X-RateLimit-Reset"] == "11"
    assert headers["X-RateLimit-Reset-Tokens"] == "3.9s"


def test_tokens_headers_fall_back_to_the_daily_quota_and_unlimited_families_are_omitted() -> None:
    limiter, _ = make()
    headers = admit(limiter, EffectiveLimits(tokens_per_day=10_000), tokens=500).headers
    assert headers == {
        "X-RateLimit-Limit-Tokens": "10000",
        "X-RateLimit-Remaining-Tokens": "9500",
        "X-RateLimit-Reset-Tokens": "12h0m0s",  # to midnight UTC
    }
    assert admit(limiter, EffectiveLimits(), tokens=500).headers == {}
    headers = admit(limiter, EffectiveLimits(embeddings_per_minute=5), endpoint="chat").headers
    assert headers == {}  # the chat bucket of this key is unlimited


def test_headers_describe_the_limit_with_the_fewest_left_in_each_family() -> None:
    limiter, _ = make(ip_chat_per_minute=10)
    limits = EffectiveLimits(
        chat_per_minute=60, requests_per_day=12, tokens_per_minute=10_000, tokens_per_day=2_500
    )
    headers = admit(limiter, limits, ip="198.51.100.1", tokens=1000).headers
    # requests: key 59 left, IP 9, day 11: the IP's bucket; tokens: minute 9000, day 1500
    assert headers == {
        "X-RateLimit-Limit-Requests": "10",
        "X-RateLimit-Remaining-Requests": "9",
        "X-RateLimit-Reset-Requests": "6s",
        "X-RateLimit-Limit-Tokens": "2500",
        "X-RateLimit-Remaining-Tokens": "1500",
        "X-RateLimit-Reset-Tokens": "12h0m0s",
        "X-RateLimit-Limit": "10",
        "X-RateLimit-Remaining": "9",
        "X-RateLimit-Reset": "6",
    }
    for n in range(2, 5):
        headers = admit(limiter, limits, ip=f"198.51.100.{n}", tokens=0).headers
    # key 56 left, each IP 9, day 8: the daily request quota
    assert headers["X-RateLimit-Limit-Requests"] == "12"
    assert headers["X-RateLimit-Remaining-Requests"] == "8"
    assert headers["X-RateLimit-Reset-Requests"] == "12h0m0s"
    assert headers["X-RateLimit-Reset"] == str(12 * 3600)

    # a tie goes to the limit that takes longer to come back
    limiter, _ = make()
    tied = EffectiveLimits(chat_per_minute=1, requests_per_day=1)
    headers = admit(limiter, tied).headers
    assert headers["X-RateLimit-Remaining-Requests"] == "0"
    assert headers["X-RateLimit-Limit-Requests"] == "1"
    assert headers["X-RateLimit-Reset-Requests"] == "12h0m0s"

    # a refusal reports the same way: here the per-IP bucket is what is used up
    limiter, _ = make(ip_chat_per_minute=1)
    admit(limiter, EffectiveLimits(chat_per_minute=60), key="a", ip="203.0.113.9")
    err = refused(limiter, EffectiveLimits(chat_per_minute=60), key="b", ip="203.0.113.9")
    assert err.headers["X-RateLimit-Limit-Requests"] == "1"
    assert err.headers["X-RateLimit-Remaining-Requests"] == "0"


def test_peek_reports_the_headers_and_takes_nothing() -> None:
    limiter, clock = make(ip_chat_per_minute=100)
    limits = EffectiveLimits(chat_per_minute=2, tokens_per_day=1000)
    assert limiter.peek("k", limits, "198.51.100.1", "chat") == {
        "X-RateLimit-Limit-Requests": "2",
        "X-RateLimit-Remaining-Requests": "2",
        "X-RateLimit-Reset-Requests": "0s",
        "X-RateLimit-Limit-Tokens": "1000",
        "X-RateLimit-Remaining-Tokens": "1000",
        "X-RateLimit-Reset-Tokens": "12h0m0s",
        "X-RateLimit-Limit": "2",
        "X-RateLimit-Remaining": "2",
        "X-RateLimit-Reset": "0",
    }
    admit(limiter, limits, ip="198.51.100.1", tokens=300)
    clock.advance(10)
    for _ in range(5):
        headers = limiter.peek("k", limits, "198.51.100.1", "chat")
    assert headers["X-RateLimit-Remaining-Requests"] == "1"
    assert headers["X-RateLimit-Reset-Requests"] == "20s"
    assert headers["X-RateLimit-Remaining-Tokens"] == "700"
    assert passes_held(limiter, limits, ip="198.51.100.1", tokens=700)  # nothing was taken
    assert limiter.peek("k", limits, None, "embeddings") == {
        "X-RateLimit-Limit-Tokens": "1000",
        "X-RateLimit-Remaining-Tokens": "0",
        "X-RateLimit-Reset-Tokens": "11h59m50s",
    }


def test_refusals_carry_the_headers_and_the_real_retry_after() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=60, tokens_per_day=10_000)
    for _ in range(60):
        admit(limiter, limits, tokens=100)
    clock.advance(0.3)
    err = refused(limiter, limits, tokens=100)
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "rate_limit_exceeded")
    assert err.headers == {
        "X-RateLimit-Limit-Requests": "60",
        "X-RateLimit-Remaining-Requests": "0",
        "X-RateLimit-Reset-Requests": "59.7s",
        "X-RateLimit-Limit-Tokens": "10000",
        "X-RateLimit-Remaining-Tokens": "4000",
        "X-RateLimit-Reset-Tokens": "11h59m59.7s",
        "X-RateLimit-Limit": "60",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-Reset": "60",
        "Retry-After": "1",  # 0.7 s, rounded up
    }
    assert "try again in 700ms" in err.message

    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=60, tokens_per_day=1000)
    admit(limiter, limits, tokens=1000).settle(1000, 0.0)
    err = refused(limiter, limits, tokens=10)
    assert isinstance(err, QuotaExceeded)
    assert (err.status, err.type, err.code) == (429, "insufficient_quota", "insufficient_quota")
    assert err.headers["Retry-After"] == str(12 * 3600)  # the daily reset
    assert err.headers["X-RateLimit-Remaining-Requests"] == "59"

    err = refused(limiter, EffectiveLimits(tokens_per_day=1000), key="fresh", tokens=1001)
    assert isinstance(err, QuotaExceeded)
    assert err.headers["x-should-retry"] == "false"  # larger than the whole quota: never passes
    assert err.headers["Retry-After"] == str(12 * 3600)  # yet every 429 says when to ask


def test_the_longest_wait_decides_the_error_and_retry_after() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(chat_per_minute=1, requests_per_day=1)
    assert passes(limiter, limits)
    err = refused(limiter, limits)
    assert isinstance(err, QuotaExceeded)  # the daily quota outlasts the minute bucket
    assert err.headers["Retry-After"] == str(12 * 3600)


# --- soft limit -----------------------------------------------------------------------------


def test_soft_limit_warns_on_every_admission_and_logs_once_per_key_and_day(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.limits")
    limiter, clock = make(soft_limit=0.8)
    limits = EffectiveLimits(tokens_per_day=1000)
    first = admit(limiter, limits, tokens=700)
    first.settle(700, 0.0)
    assert first.warning is None
    ticket = admit(limiter, limits, tokens=250)  # 700 used + 250 reserved: 95%, not used
    assert ticket.warning is None
    assert caplog.records == []
    ticket.settle(100, 0.0)  # 800 used: 80%
    again = admit(limiter, limits, tokens=50)
    assert again.warning is not None
    assert "80% of the daily token quota (800 of 1000 tokens)" in again.warning
    again.settle(50, 0.0)
    third = admit(limiter, limits, tokens=10)
    assert third.warning is not None and "85%" in third.warning
    assert admit(limiter, limits, key="other", tokens=10).warning is None
    assert len(caplog.records) == 1
    assert caplog.records[0].name == "gateway.limits"
    assert "key k " in caplog.records[0].getMessage()

    clock.advance(86400)
    big = admit(limiter, limits, tokens=900)
    assert big.warning is None  # a new day: nothing used yet
    big.settle(900, 0.0)
    assert admit(limiter, limits, tokens=1).warning is not None
    assert len(caplog.records) == 2  # a new day, a new line


def test_soft_limit_on_the_budget_logs_once_per_budget_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="gateway.limits")
    limiter, clock = make(datetime(2026, 3, 30, 12, 0, tzinfo=UTC), soft_limit=0.5)
    limits = EffectiveLimits(budget=10.0, budget_period="month")
    admit(limiter, limits, cost=6.0).settle(0, 6.0)
    warning = admit(limiter, limits, cost=0.1).warning
    assert warning is not None and "monthly budget" in warning and "resets in" in warning
    clock.advance(86400)  # a new day, the same month
    assert admit(limiter, limits, cost=0.1).warning is not None
    assert len(caplog.records) == 1
    clock.to(datetime(2026, 4, 1, 0, 0, tzinfo=UTC))
    assert admit(limiter, limits, cost=0.1).warning is None
    reserved = admit(limiter, limits, cost=5.0)
    assert reserved.warning is None  # held, not spent
    reserved.settle(0, 5.0)
    assert admit(limiter, limits, cost=0.1).warning is not None
    assert len(caplog.records) == 2


# --- tier upgrades --------------------------------------------------------------------------

TIERS = {
    "free": TierConfig(upgrade_to="basic", upgrade_after_days=3),
    "basic": TierConfig(upgrade_to="pro", upgrade_after_days=2),
    "pro": TierConfig(),
}


def next_day(
    limiter: Limiter, clock: FakeClock, tiers: dict[str, str | None]
) -> list[tuple[str, str, str]]:
    clock.advance(limiter.seconds_until_day_reset())
    return limiter.rollover(tiers, TIERS)


def test_tier_upgrade_after_n_clean_days_in_a_row() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=1)
    tiers: dict[str, str | None] = {"k": "free", "idle": "free", "none": None}
    ups = []
    for _ in range(3):
        assert passes(limiter, limits)
        ups = next_day(limiter, clock, tiers)
        if ups:
            break
    assert ups == [("k", "free", "basic")]
    assert limiter.rollover(tiers, TIERS) == []  # reported once
    tiers["k"] = "basic"
    for _ in range(2):  # the next tier counts its own days
        assert passes(limiter, limits)
        ups = next_day(limiter, clock, tiers)
    assert ups == [("k", "basic", "pro")]


def test_a_day_with_a_refusal_or_without_use_breaks_the_run() -> None:
    limiter, clock = make()
    limits = EffectiveLimits(chat_per_minute=1)
    tiers: dict[str, str | None] = {"k": "free"}
    assert passes(limiter, limits)
    assert next_day(limiter, clock, tiers) == []
    assert passes(limiter, limits)
    assert not passes(limiter, limits)  # refused by the key's own limit
    assert next_day(limiter, clock, tiers) == []
    for _ in range(2):
        assert passes(limiter, limits)
        assert next_day(limiter, clock, tiers) == []
    assert next_day(limiter, clock, tiers) == []  # a day without use
    assert passes(limiter, limits)
    assert next_day(limiter, clock, tiers) == []
    assert limiter.streaks()["k"].days == 1


def test_per_ip_refusals_do_not_count_against_the_key() -> None:
    limiter, clock = make(ip_chat_per_minute=1)
    limits = EffectiveLimits()
    tiers: dict[str, str | None] = {"k": "free"}
    ups = []
    for _ in range(3):
        assert passes(limiter, limits, ip="203.0.113.5")
        assert not passes(limiter, limits, ip="203.0.113.5")
        ups = next_day(limiter, clock, tiers)
    assert ups == [("k", "free", "basic")]


def test_streaks_survive_a_restart() -> None:
    limiter, clock = make()
    limits = EffectiveLimits()
    tiers: dict[str, str | None] = {"k": "free"}
    for _ in range(2):
        assert passes(limiter, limits)
        assert next_day(limiter, clock, tiers) == []
    saved = limiter.streaks()
    assert saved == {"k": KeyStreak(2, date(2026, 3, 11))}

    restarted, clock2 = make(datetime(2026, 3, 12, 9, 0, tzinfo=UTC))
    restarted.restore_streak("k", saved["k"])
    assert passes(restarted, limits)
    assert next_day(restarted, clock2, tiers) == [("k", "free", "basic")]

    stale, clock3 = make(datetime(2026, 3, 14, 9, 0, tzinfo=UTC))  # two idle days since
    stale.restore_streak("k", saved["k"])
    assert passes(stale, limits)
    assert next_day(stale, clock3, tiers) == []


# --- restart and reload ---------------------------------------------------------------------


def test_restore_after_restart_continues_the_days_counts_and_the_budget() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(requests_per_day=10, tokens_per_day=1000, budget=1.0)
    limiter.restore("k", day_requests=8, day_tokens=900, period_cost=0.9, budget_period="month")
    assert not passes(limiter, limits, tokens=101)
    assert not passes(limiter, limits, cost=0.11)
    assert passes(limiter, limits, tokens=100, cost=0.1)
    assert passes(limiter, limits)
    err = refused(limiter, limits)
    assert "daily request quota" in err.message


def test_restore_refused_today_breaks_the_run() -> None:
    limiter, clock = make()
    limiter.restore_streak("k", KeyStreak(2, date(2026, 3, 9)))
    limiter.restore(
        "k", day_requests=3, day_tokens=0, period_cost=0.0, budget_period="day", refused_today=True
    )
    assert next_day(limiter, clock, {"k": "free"}) == []
    assert "k" not in limiter.streaks()


def test_new_limits_apply_at_once_and_keep_what_was_used() -> None:
    limiter, clock = make(ip_chat_per_minute=100)
    free = EffectiveLimits(tokens_per_day=1000, chat_per_minute=10)
    for _ in range(5):
        admit(limiter, free, tokens=160).settle(160, 0.0)
    pro = EffectiveLimits(tokens_per_day=2000, chat_per_minute=20)
    assert not passes(limiter, pro, tokens=1201)
    limiter.reconfigure(LimitsConfig(ip_chat_per_minute=1000, day_reset_hour=13))
    assert passes(limiter, pro, tokens=1200)  # 800 used + 1200: the reload reset nothing
    assert not passes(limiter, pro, tokens=1)
    # a bucket keeps the time it needs to refill: 5 requests at 10 per minute emptied it by
    # half, 2 at 20 per minute by another tenth, leaving 8 of 20
    assert admit(limiter, pro).headers["X-RateLimit-Remaining-Requests"] == "8"
    clock.to(datetime(2026, 3, 10, 13, 0, tzinfo=UTC))  # the new reset hour
    assert passes(limiter, pro, tokens=2000)


def test_a_later_reset_hour_does_not_move_spending_back_a_month() -> None:
    limiter, clock = make(datetime(2026, 4, 1, 3, 0, tzinfo=UTC))
    limits = EffectiveLimits(budget=1.0, budget_period="month")
    admit(limiter, limits, cost=1.0).settle(0, 1.0)
    limiter.reconfigure(LimitsConfig(day_reset_hour=6))  # today began yesterday at 06:00
    assert not passes(limiter, limits, cost=0.1)
    clock.to(datetime(2026, 4, 1, 7, 0, tzinfo=UTC))
    assert not passes(limiter, limits, cost=0.1)  # April's spending stays April's


def test_a_reload_neither_loses_a_due_reset_nor_skips_a_passed_reset_hour() -> None:
    limiter, clock = make(datetime(2026, 3, 10, 23, 59, tzinfo=UTC))
    limits = EffectiveLimits(tokens_per_day=100)
    admit(limiter, limits, tokens=100).settle(100, 0.0)
    clock.advance(120)  # past midnight, no request yet
    limiter.reconfigure(LimitsConfig(ip_chat_per_minute=5))
    assert passes(limiter, limits, tokens=100)

    limiter, clock = make(datetime(2026, 3, 10, 5, 0, tzinfo=UTC), day_reset_hour=6)
    admit(limiter, limits, tokens=100).settle(100, 0.0)  # the day began yesterday at 06:00
    limiter.reconfigure(LimitsConfig(day_reset_hour=0))  # midnight has passed since
    assert passes(limiter, limits, tokens=100)
    assert limiter.seconds_until_day_reset() == 19 * 3600


def test_forget_drops_a_key() -> None:
    limiter, _ = make()
    limits = EffectiveLimits(requests_per_day=1)
    assert passes(limiter, limits)
    assert not passes(limiter, limits)
    limiter.forget("k")
    assert passes(limiter, limits)


def test_reconfigure_replaces_trusted_proxies_and_ip_limits() -> None:
    limiter, _ = make(ip_chat_per_minute=1)
    assert limiter.client_ip("10.0.0.2", "198.51.100.7") == "10.0.0.2"
    assert passes(limiter, EffectiveLimits(), ip="10.0.0.2")
    assert not passes(limiter, EffectiveLimits(), ip="10.0.0.2")
    limiter.reconfigure(replace(LimitsConfig(), trusted_proxies=("10.0.0.0/8",)))
    assert limiter.client_ip("10.0.0.2", "198.51.100.7") == "198.51.100.7"
    assert passes(limiter, EffectiveLimits(), ip="10.0.0.2")  # the IP limit is gone
