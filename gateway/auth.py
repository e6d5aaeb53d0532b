"""Client API keys: generation, hashing and lookup.

Keys are 256 random bits, so a plain SHA-256 is a sufficient one-way hash: nothing shorter
than the key can be guessed. Only the hash is stored; lookups hash the presented key and find
the hash in a dict, so no comparison ever touches the key itself.
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from .config import KeyConfig
from .errors import InvalidAPIKey

KEY_PREFIX = "gw-"


def new_key() -> str:
    """A fresh client key: 'gw-' and 43 URL-safe characters (256 bits)."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()


@dataclass(slots=True, eq=False)
class Principal:
    """Who is calling: one client key's id and what it may use."""

    key_id: str
    model_patterns: tuple[str, ...] = ("*",)
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


class KeyStore:
    """Hash -> Principal for every client key the gateway accepts."""

    def __init__(self, keys: Iterable[KeyConfig]) -> None:
        self._by_hash: dict[str, Principal] = {k.hash: Principal(k.id, k.models) for k in keys}

    def __len__(self) -> int:
        return len(self._by_hash)

    def authenticate(self, headers: Mapping[str, str]) -> Principal:
        """The caller's principal from `Authorization: Bearer` or `X-API-Key`; else 401."""
        key = _presented_key(headers)
        if key is None:
            raise InvalidAPIKey(
                "Missing API key. Send it as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            )
        principal = self._by_hash.get(hash_key(key))
        if principal is None:
            # never echo the key, not even a part of it
            raise InvalidAPIKey("Incorrect API key provided.")
        return principal


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
