"""Client API keys: generation, hashing and lookup.

Keys are 256 random bits, so a plain SHA-256 is a sufficient one-way hash: nothing shorter
than the key can be guessed. Only the hash is stored. Keys come from the config's ``[[keys]]``
and from the usage database (created with ``gateway keys new`` or the admin API); a revocation
stored in the database applies to both.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .config import Config, LimitSet
from .errors import InvalidAPIKey
from .limits import EffectiveLimits
from .usage_store import ManagedKey, TierState

KEY_PREFIX = "gw-"
_CACHE_MAX = 10_000


def new_key() -> str:
    """A fresh client key: 'gw-' and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(slots=True, eq=False)
class Principal:
    """Who is calling: one client key's id, what it may use, and its limits."""

    key_id: str
    model_patterns: tuple[str, ...] = ("*",)
    tier: str | None = None
    limits: EffectiveLimits = field(default_factory=EffectiveLimits)
    managed: bool = False  # created through the CLI or admin API (else from the config)
    _allowed: dict[str, bool] = field(default_factory=dict, repr=False)
    _pattern: re.Pattern[str] | None = field(default=None, repr=False)

    def may_use(self, model_id: str) -> bool:
        """Whether this key may use a model id or alias (glob patterns, cached per name)."""
        ok = self._allowed.get(model_id)
        if ok is None:
            if self._pattern is None:
                joined = "|".join(fnmatch.translate(p) for p in self.model_patterns)
                self._pattern = re.compile(joined or "(?!)")
            ok = self._pattern.match(model_id) is not None
            if len(self._allowed) < 4096:
                self._allowed[model_id] = ok
        return ok


@dataclass(frozen=True, slots=True)
class KeyRecords:
    """What the usage database says about keys: managed keys, revocations, earned tiers."""

    managed: Mapping[str, ManagedKey] = field(default_factory=dict)  # hash -> key
    revoked: frozenset[str] = frozenset()
    tiers: Mapping[str, TierState] = field(default_factory=dict)


class KeyStore:
    """Every client key the gateway accepts, by hash; built again when keys change."""

    def __init__(self, config: Config, records: KeyRecords | None = None) -> None:
        records = records or KeyRecords()
        self._by_hash: dict[str, Principal] = {}
        self._by_key: dict[str, Principal] = {}  # presented key -> principal, saves the hash
        for k in config.keys:
            if k.id not in records.revoked:
                tier = _effective_tier(config, k.tier, records.tiers.get(k.id))
                self._by_hash[k.hash] = _principal(config, k.id, k.models, tier, k.limits, False)
        principals: dict[str, Principal] = {}
        for key_hash, m in records.managed.items():
            if m.id in records.revoked:
                continue
            if m.id not in principals:  # a rotated key's old and new hash: one principal
                tier = _effective_tier(config, m.tier, records.tiers.get(m.id))
                principals[m.id] = _principal(config, m.id, m.models, tier, LimitSet(), True)
            self._by_hash[key_hash] = principals[m.id]

    def __len__(self) -> int:
        return len(self._by_hash)

    def principals(self) -> list[Principal]:
        unique = {id(p): p for p in self._by_hash.values()}
        return sorted(unique.values(), key=lambda p: p.key_id)

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's principal from `Authorization: Bearer` or `X-API-Key`; else 401."""
        key = _presented_key(headers)
        if key is None:
            raise InvalidAPIKey(
                "Missing API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            )
        principal = self._by_key.get(key)
        if principal is None:
            principal = self._by_hash.get(hash_key(key))
            if principal is None:
                # never echo the key, not even a part of it
                raise InvalidAPIKey("Incorrect API key provided.")
            if len(self._by_key) < _CACHE_MAX:
                self._by_key[key] = principal
        return principal


def _principal(
    config: Config,
    key_id: str,
    models: Iterable[str],
    tier: str | None,
    limits: LimitSet,
    managed: bool,
) -> Principal:
    effective = EffectiveLimits.resolve(config.limits, config.tiers.get(tier or ""), limits)
    return Principal(key_id, tuple(models), tier, effective, managed)


def _effective_tier(config: Config, configured: str | None, earned: TierState | None) -> str | None:
    """The tier a key earned by automatic upgrades, if it is still on the configured tier's
    upgrade path; else the configured one (an operator's change of tier wins)."""
    if earned is None or earned.tier is None or configured is None:
        return configured
    tier: str | None = configured
    seen: set[str] = set()
    while tier is not None and tier not in seen:
        if tier == earned.tier:
            return tier
        seen.add(tier)
        spec = config.tiers.get(tier)
        tier = spec.upgrade_to if spec is not None else None
    return configured


def _presented_key(headers: Mapping[str, str]) -> str | None:
    auth = headers.get("Authorization")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() == "bearer" and token.strip():
            return token.strip()
    key = headers.get("X-API-Key")
    if key and key.strip():
        return key.strip()
    return None
