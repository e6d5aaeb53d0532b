"""What both usage stores (SQLite in ``usage_store.py``, PostgreSQL in ``usage_pg.py``) store
and answer: records, keys, tiers, the shapes of the usage reports, and the pure functions that
turn rows of sums into those reports, so that both stores answer alike to the cent.

Money is kept as integer nano-units (1e-9 of the price unit, USD or credits): sums over millions
of rows are then exact, and a record's cost loses at most half a nano-unit when it is stored.
Times are UNIX seconds (UTC); days are UTC dates ``YYYY-MM-DD``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import NamedTuple, TypedDict

NANO = 1_000_000_000
DAY = 86_400.0
# The longest a rotated key's old secret may keep working (admin API, dashboard, CLI): 30 days.
MAX_GRACE = 30 * 86_400


class UsageStoreError(Exception):
    """The usage database cannot be used as asked; the message says why."""


class SchemaTooNew(UsageStoreError):
    pass


class KeyConflict(UsageStoreError, ValueError):
    pass


class UnknownKey(UsageStoreError, LookupError):
    pass


class UsageRecord(NamedTuple):
    """One request, as the usage table stores it.

    ``key_id`` is "" when the request had no valid key; ``model`` is the model (or alias) the
    client asked for, "" if it never said; ``provider`` and ``upstream_model`` are "" when no
    deployment was tried. ``outcome`` is "ok", an error code, or "client_closed".
    """

    ts: float  # UNIX seconds when the request arrived
    request_id: str
    key_id: str
    client_ip: str
    endpoint: str
    model: str
    provider: str = ""
    upstream_model: str = ""
    status: int = 200
    outcome: str = "ok"
    prompt_tokens: int = 0  # includes cached and cache-write tokens
    completion_tokens: int = 0  # includes reasoning tokens
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0
    cost: float = 0.0
    latency_ms: float = 0.0
    ttft_ms: float | None = None  # streams only: time to the first byte sent to the client
    stream: bool = False


@dataclass(frozen=True, slots=True)
class ManagedKey:
    id: str
    hash: str  # the current "sha256:<hex>"
    description: str = ""
    models: tuple[str, ...] = ("*",)
    tier: str | None = None
    created_at: float = 0.0
    revoked_at: float | None = None
    expires_at: float | None = None


class TierChange(NamedTuple):
    key_id: str
    ts: float
    from_tier: str | None
    to_tier: str | None
    reason: str


@dataclass(frozen=True, slots=True)
class TierState:
    """A key's automatic-upgrade state: its effective tier and its streak of clean days."""

    key_id: str
    tier: str | None
    clean_days: int = 0
    last_day: str | None = None  # the last UTC day counted, "YYYY-MM-DD"
    updated_at: float = 0.0


class KeyTotals(NamedTuple):
    requests: int = 0
    tokens: int = 0
    cost: float = 0.0


class RestoredCounters(NamedTuple):
    """What the rate limiter needs back after a restart, for one key."""

    requests_today: int
    tokens_today: int
    cost: float  # spent since the given timestamp


class ModelUsage(TypedDict):
    requests: int
    errors: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_tokens: int
    cache_write_tokens: int
    reasoning_tokens: int
    cost: float


class DailyUsage(TypedDict):
    date: str
    requests: int
    total_tokens: int
    cost: float


class UsageSummary(TypedDict):
    object: str  # "usage"
    total_tokens: int
    total_requests: int
    total_cost: float
    period_start: str  # inclusive
    period_end: str  # inclusive
    breakdown: dict[str, ModelUsage]
    daily: list[DailyUsage]  # days with at least one request, oldest first


class KeyUsage(TypedDict):
    key_id: str
    requests: int
    total_tokens: int
    cost: float
    breakdown: dict[str, ModelUsage]


class AdminUsage(TypedDict):
    object: str  # "usage.keys"
    total_tokens: int
    total_requests: int
    total_cost: float
    period_start: str
    period_end: str
    keys: list[KeyUsage]


class PeriodUsage(TypedDict):
    requests: int
    total_tokens: int
    cost: float


class DailyKeyModelUsage(TypedDict):
    date: str  # UTC day, "YYYY-MM-DD"
    key_id: str
    model: str
    requests: int
    errors: int
    total_tokens: int
    cost: float


class KeyStats(TypedDict):
    key_id: str
    created: float | None  # managed keys only
    first_used: float | None
    last_used: float | None
    requests: int
    total_tokens: int
    cost: float
    today: PeriodUsage  # the current UTC day


# The sums of a usage_daily query, in this order: requests, errors, prompt, completion,
# cached, cache-write and reasoning tokens, cost in nano-units.
Sums = Sequence[int]

MAX_KEY_ID = 64
MAX_DESCRIPTION = 200
MAX_MODELS = 100  # ids or patterns in one key's list
MAX_MODEL_PATTERN = 200
KEY_ID = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_KEY_ID - 1}}}")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")
_INT64 = range(-(2**63), 2**63)
_RECORD_TYPES: tuple[tuple[type | tuple[type, ...], ...], ...] = (
    (int, float),
    (str,),
    (str, type(None)),
    (str, type(None)),
    (str,),
    (str, type(None)),
    (str, type(None)),
    (str, type(None)),
    (int,),
    (str,),
    *(((int,),) * 5),
    (int, float),
    (int, float),
    (int, float, type(None)),
    (bool, int),
)


def money(nano: int | None) -> float:
    return (nano or 0) / NANO


def utc_day(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).date().isoformat()


def day_boundary(ts: float) -> float:
    """The first midnight (UTC) at or after `ts`."""
    return -(-ts // DAY) * DAY


def default_period(now: float) -> tuple[date, date]:
    """The current UTC month up to today: the period of a summary when none is given."""
    today = datetime.fromtimestamp(now, UTC).date()
    return today.replace(day=1), today


def day_start(day: date) -> float:
    """UNIX time of a UTC day's midnight."""
    return datetime(day.year, day.month, day.day, tzinfo=UTC).timestamp()


def is_valid_record(rec: object) -> bool:
    """Whether a record has the shape and types the usage table accepts."""
    if not isinstance(rec, tuple) or len(rec) != len(_RECORD_TYPES):
        return False
    return all(
        isinstance(v, t) and (not isinstance(v, int) or v in _INT64)
        for v, t in zip(rec, _RECORD_TYPES, strict=True)
    )


def check_key_id(key_id: str) -> None:
    if not KEY_ID.fullmatch(key_id):
        shown = f" '{key_id}'" if len(key_id) <= MAX_KEY_ID else ""  # never echo a huge one
        raise ValueError(
            f"a key id{shown} is 1 to {MAX_KEY_ID} letters, digits, '.', '_' or '-', "
            "starting with a letter or digit"
        )


class KeyFieldError(ValueError):
    """A field of a new key out of bounds; `param` names it."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param


def check_key_fields(description: str, models: Sequence[str]) -> None:
    """Bounds on what a new key carries, so that an admin request cannot store megabytes."""
    if len(description) > MAX_DESCRIPTION:
        raise KeyFieldError(
            "description", f"a key's description is at most {MAX_DESCRIPTION} characters"
        )
    if len(models) > MAX_MODELS or any(len(m) > MAX_MODEL_PATTERN for m in models):
        raise KeyFieldError(
            "models",
            f"a key's models are at most {MAX_MODELS} ids or patterns of at most "
            f"{MAX_MODEL_PATTERN} characters each",
        )


def check_hash(key_hash: str) -> None:
    if not _KEY_HASH.match(key_hash):
        raise ValueError('a key hash is "sha256:<64 hex digits>"')


# --- rows of sums -> reports ----------------------------------------------------------------


def model_usage(sums: Sums) -> ModelUsage:
    requests, errors, prompt, completion, cached, cache_write, reasoning, cost = sums
    return {
        "requests": requests,
        "errors": errors,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "cached_tokens": cached,
        "cache_write_tokens": cache_write,
        "reasoning_tokens": reasoning,
        "cost": money(cost),
    }


def build_summary(
    start: date,
    end: date,
    by_model: Iterable[tuple[str, Sums]],
    by_day: Iterable[tuple[str, int, int, int]],
) -> UsageSummary:
    """`by_model`: (model, sums) sorted by model; `by_day`: (day, requests, tokens, cost nano)
    sorted by day."""
    breakdown: dict[str, ModelUsage] = {}
    total_nano = 0
    for m, sums in by_model:
        breakdown[m] = model_usage(sums)
        total_nano += sums[-1]
    daily: list[DailyUsage] = [
        {"date": day, "requests": requests, "total_tokens": tokens, "cost": money(cost)}
        for day, requests, tokens, cost in by_day
    ]
    return {
        "object": "usage",
        "total_tokens": sum(m["total_tokens"] for m in breakdown.values()),
        "total_requests": sum(m["requests"] for m in breakdown.values()),
        "total_cost": money(total_nano),
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "breakdown": breakdown,
        "daily": daily,
    }


def daily_row(
    day: str, key_id: str, model: str, requests: int, errors: int, tokens: int, cost_nano: int
) -> DailyKeyModelUsage:
    """One (day, key, model) row of the dashboard's series, from its usage_daily columns."""
    return {
        "date": day,
        "key_id": key_id,
        "model": model,
        "requests": requests,
        "errors": errors,
        "total_tokens": tokens,
        "cost": money(cost_nano),
    }


def build_admin_usage(start: date, end: date, rows: Iterable[tuple[str, str, Sums]]) -> AdminUsage:
    """`rows`: (key id, model, sums) sorted by key id and model."""
    keys: dict[str, KeyUsage] = {}
    nano: dict[str, int] = {}
    for kid, m, sums in rows:
        usage = model_usage(sums)
        entry = keys.setdefault(
            kid, {"key_id": kid, "requests": 0, "total_tokens": 0, "cost": 0.0, "breakdown": {}}
        )
        entry["breakdown"][m] = usage
        entry["requests"] += usage["requests"]
        entry["total_tokens"] += usage["total_tokens"]
        nano[kid] = nano.get(kid, 0) + sums[-1]
        entry["cost"] = money(nano[kid])
    return {
        "object": "usage.keys",
        "total_tokens": sum(k["total_tokens"] for k in keys.values()),
        "total_requests": sum(k["requests"] for k in keys.values()),
        "total_cost": money(sum(nano.values())),
        "period_start": start.isoformat(),
        "period_end": end.isoformat(),
        "keys": list(keys.values()),
    }


def build_key_stats(
    key_ids: Iterable[str],
    created: Iterable[tuple[str, float]],
    activity: Iterable[tuple[str, float, float]],
    totals: Iterable[tuple[str, int, int, int, int, int, int]],
) -> list[KeyStats]:
    """`totals`: (key id, requests, tokens, cost nano, and the same three for today)."""
    stats: dict[str, KeyStats] = {}

    def entry(kid: str) -> KeyStats:
        return stats.setdefault(
            kid,
            {
                "key_id": kid,
                "created": None,
                "first_used": None,
                "last_used": None,
                "requests": 0,
                "total_tokens": 0,
                "cost": 0.0,
                "today": {"requests": 0, "total_tokens": 0, "cost": 0.0},
            },
        )

    for kid in key_ids:
        entry(kid)
    for kid, created_at in created:
        entry(kid)["created"] = created_at
    for kid, first, last in activity:
        e = entry(kid)
        e["first_used"], e["last_used"] = first, last
    for kid, requests, tokens, cost, t_requests, t_tokens, t_cost in totals:
        e = entry(kid)
        e["requests"], e["total_tokens"], e["cost"] = requests, tokens, money(cost)
        e["today"] = {"requests": t_requests, "total_tokens": t_tokens, "cost": money(t_cost)}
    return [stats[k] for k in sorted(stats)]


def add_totals(*parts: Iterable[tuple[str, int, int | None, int | None]]) -> dict[str, KeyTotals]:
    """Adds rows of (key id, requests, tokens, cost nano) from several queries per key."""
    sums: dict[str, list[int]] = {}
    for rows in parts:
        for kid, requests, tokens, cost in rows:
            acc = sums.setdefault(kid, [0, 0, 0])
            acc[0] += requests
            acc[1] += tokens or 0
            acc[2] += cost or 0
    return {k: KeyTotals(r, t, money(c)) for k, (r, t, c) in sums.items()}


def restored_counters(
    today: Mapping[str, KeyTotals], spent: Mapping[str, KeyTotals]
) -> dict[str, RestoredCounters]:
    return {
        k: RestoredCounters(
            today.get(k, KeyTotals()).requests,
            today.get(k, KeyTotals()).tokens,
            spent.get(k, KeyTotals()).cost,
        )
        for k in sorted(today.keys() | spent.keys())
    }
