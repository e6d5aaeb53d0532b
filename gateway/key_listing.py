"""Every client key, from the config file and the database, joined with its usage: what the
admin API and the dashboard list, and ``gateway keys list`` prints.

Kept apart from ``admin.py`` so that the CLI can list keys without importing the server.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypedDict

from .config import Config
from .usage_backend import UsageBackend
from .usage_types import PeriodUsage


class KeyInfo(TypedDict):
    """One client key as the admin API lists it and the dashboard shows it."""

    id: str
    source: str  # "managed" (database) or "config" (TOML)
    description: str
    models: list[str]
    tier: str | None
    revoked: bool
    created: float | None
    expires: float | None
    last_used: float | None
    requests: int
    total_tokens: int
    cost: float
    today: PeriodUsage


async def key_infos(
    config: Config, backend: UsageBackend, tiers: Mapping[str, str | None] | None = None
) -> list[KeyInfo]:
    """Every key, by id, with its status and usage.

    `tiers` are the tiers in force by key id (a running gateway's, earned upgrades included);
    a key not in it shows the tier it was given in the config or the database.
    """
    tiers = tiers or {}
    managed = {k.id: k for k in await backend.list_keys()}
    revoked = await backend.revoked_ids()
    stats = {s["key_id"]: s for s in await backend.key_stats([k.id for k in config.keys])}
    configured = {k.id: k for k in config.keys}
    keys: list[KeyInfo] = []
    for key_id in sorted(configured.keys() | managed.keys()):
        m = managed.get(key_id)
        source = m or configured[key_id]
        s = stats.get(key_id)
        keys.append(
            {
                "id": key_id,
                "source": "managed" if m is not None else "config",
                "description": source.description,
                "models": list(source.models),
                "tier": tiers.get(key_id, source.tier),
                "revoked": key_id in revoked,
                "created": m.created_at if m else None,
                "expires": m.expires_at if m else None,
                "last_used": s["last_used"] if s else None,
                "requests": s["requests"] if s else 0,
                "total_tokens": s["total_tokens"] if s else 0,
                "cost": s["cost"] if s else 0.0,
                "today": s["today"] if s else {"requests": 0, "total_tokens": 0, "cost": 0.0},
            }
        )
    return keys
