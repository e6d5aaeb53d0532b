"""The dashboard's logins: server-side sessions with an expiry, and a per-IP login backoff.

A session is a random id (the cookie's only content) mapping to what the server keeps: its
CSRF token, when it ends, the admin key hash it was opened with (a reload that changes the
admin key ends every session opened with the old one) and one-shot messages for the next page,
among them a key just created or rotated, which is shown once and then forgotten.

Everything lives in memory: a restart logs everyone out, which for one operator's dashboard is
a fair price for never writing a session or a key to disk.
"""

from __future__ import annotations

import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .admin import IssuedKey

SESSION_TTL = 12 * 3600.0
MAX_SESSIONS = 64  # past this the oldest session is dropped: one operator needs a few

# Login backoff per client IP: this many failures are free, then each further one locks the
# address out for twice as long as the one before, up to MAX_LOCKOUT seconds.
FREE_FAILURES = 3
MAX_LOCKOUT = 60.0
FORGET_FAILURES_AFTER = 900.0
MAX_TRACKED_IPS = 10_000


@dataclass(slots=True)
class Session:
    id: str
    csrf: str
    admin_hash: str
    expires: float
    notices: list[tuple[str, str]] = field(default_factory=list)  # (kind, text), shown once
    issued: IssuedKey | None = None  # a new secret, shown once

    def check_csrf(self, token: str) -> bool:
        return hmac.compare_digest(self.csrf.encode(), token.encode("utf-8", "replace"))

    def take_notices(self) -> list[tuple[str, str]]:
        notices, self.notices = self.notices, []
        return notices

    def take_issued(self) -> IssuedKey | None:
        issued, self.issued = self.issued, None
        return issued


class Sessions:
    def __init__(
        self, ttl: float = SESSION_TTL, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self.clock = clock
        self._by_id: dict[str, Session] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def open(self, admin_hash: str) -> Session:
        self._prune()
        while len(self._by_id) >= MAX_SESSIONS:
            del self._by_id[next(iter(self._by_id))]  # dicts keep insertion order: the oldest
        session = Session(
            secrets.token_urlsafe(32),
            secrets.token_urlsafe(32),
            admin_hash,
            self.clock() + self.ttl,
        )
        self._by_id[session.id] = session
        return session

    def get(self, session_id: str | None, admin_hash: str) -> Session | None:
        """The live session with this id, opened with the current admin key, else None."""
        if not session_id:
            return None
        session = self._by_id.get(session_id)
        if session is None:
            return None
        if session.expires <= self.clock() or session.admin_hash != admin_hash:
            del self._by_id[session_id]
            return None
        return session

    def close(self, session_id: str) -> None:
        self._by_id.pop(session_id, None)

    def _prune(self) -> None:
        now = self.clock()
        for sid in [s.id for s in self._by_id.values() if s.expires <= now]:
            del self._by_id[sid]


@dataclass(slots=True)
class _Failures:
    count: int
    last: float
    locked_until: float = 0.0


class LoginThrottle:
    """Slows down guessing: after a few wrong keys from one address, it must wait."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._by_ip: dict[str, _Failures] = {}

    def wait(self, ip: str) -> float:
        """Seconds `ip` must still wait before its next attempt is even checked (0: none)."""
        f = self._by_ip.get(ip)
        return max(0.0, f.locked_until - self.clock()) if f else 0.0

    def failed(self, ip: str) -> None:
        now = self.clock()
        f = self._by_ip.get(ip)
        if f is None or now - f.last > FORGET_FAILURES_AFTER:
            if len(self._by_ip) >= MAX_TRACKED_IPS:
                self._forget_old(now)
            f = self._by_ip[ip] = _Failures(0, now)
        f.count += 1
        f.last = now
        if f.count > FREE_FAILURES:
            f.locked_until = now + min(2.0 ** (f.count - FREE_FAILURES - 1), MAX_LOCKOUT)

    def succeeded(self, ip: str) -> None:
        self._by_ip.pop(ip, None)

    def _forget_old(self, now: float) -> None:
        for ip in [ip for ip, f in self._by_ip.items() if now - f.last > FORGET_FAILURES_AFTER]:
            del self._by_ip[ip]
        if len(self._by_ip) >= MAX_TRACKED_IPS:  # a flood of addresses: start over
            self._by_ip.clear()
