"""The admin API under ``/admin``: usage across keys, the key list and the key lifecycle,
breaker states. Guarded by the admin key whose hash is ``[admin] key_hash``; without one the
admin API does not exist (404).

Changes made here reach the running key store at once (and other processes through the
database, which they poll). The key lifecycle itself (``client_keys``, ``add_client_key``,
``revoke_client_key``, ``rotate_client_key``) is shared with the dashboard.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from aiohttp import web

from .auth import hash_key, new_key
from .errors import InvalidAPIKey, InvalidRequest, NotFound
from .exchange import EXCHANGE
from .handlers import parse_period
from .key_listing import KeyInfo, key_infos
from .ops import breaker_states
from .runtime import STATE, GatewayState
from .usage_store import KeyConflict, UnknownKey
from .usage_types import MAX_GRACE as MAX_GRACE  # (the dashboard imports it from here)
from .usage_types import MAX_KEY_ID, KeyFieldError, check_key_fields


def _json(obj: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def admin_state(request: web.Request) -> GatewayState:
    """The gateway state, once the caller has shown the admin key; else 401 (or 404)."""
    state = request.app[STATE]
    expected = state.config.admin.key_hash
    if expected is None:
        raise NotFound(
            "The admin API is disabled: set [admin] key_hash in the config.",
            code="unknown_endpoint",
        )
    auth = request.headers.get("Authorization", "")
    scheme, _, token = auth.partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else request.headers.get("X-API-Key", "")
    if not key:
        raise InvalidAPIKey("The admin API needs the admin key as 'Authorization: Bearer <key>'.")
    if hash_key(key) != expected:
        raise InvalidAPIKey("Incorrect admin key provided.")
    exchange = request.get(EXCHANGE)
    if exchange is not None:
        exchange.key_id = "admin"
    return state


async def usage(request: web.Request) -> web.Response:
    state = admin_state(request)
    start, end = parse_period(request.query)
    result = await state.usage.backend.admin_usage(
        start,
        end,
        key_id=request.query.get("key") or None,
        model=request.query.get("model") or None,
    )
    return _json(result)


async def list_keys(request: web.Request) -> web.Response:
    state = admin_state(request)
    return _json({"object": "list", "data": await client_keys(state)})


async def create_key(request: web.Request) -> web.Response:
    state = admin_state(request)
    body = await _body(request)
    key_id = body.get("id")
    if not isinstance(key_id, str) or not key_id:
        raise InvalidRequest("'id' is required: a name for the key.", param="id")
    models = body.get("models", ["*"])
    tier = body.get("tier")
    description = body.get("description") or ""
    if not isinstance(models, list) or not all(isinstance(m, str) for m in models):
        raise InvalidRequest("'models' must be an array of model ids or patterns.", param="models")
    if tier is not None and not isinstance(tier, str):
        raise InvalidRequest("'tier' must be the name of a tier in the config.", param="tier")
    if not isinstance(description, str):
        raise InvalidRequest("'description' must be a string.", param="description")
    issued = await add_client_key(state, key_id, models, tier, description)
    # the only time the key is ever shown
    return _json({"id": issued.id, "key": issued.key, "models": models, "tier": tier}, status=201)


async def revoke_key(request: web.Request) -> web.Response:
    state = admin_state(request)
    key_id = request.match_info["key_id"]
    revoked_at = await revoke_client_key(state, key_id, "admin API")
    return _json({"id": key_id, "revoked": True, "revoked_at": revoked_at})


async def rotate_key(request: web.Request) -> web.Response:
    state = admin_state(request)
    key_id = request.match_info["key_id"]
    body = await _body(request) if request.can_read_body else {}
    grace = body.get("grace_seconds", 3600)
    if not isinstance(grace, int | float) or isinstance(grace, bool):
        raise InvalidRequest(
            f"'grace_seconds' must be a number from 0 to {MAX_GRACE}.", param="grace_seconds"
        )
    issued = await rotate_client_key(state, key_id, float(grace))
    return _json(
        {"id": issued.id, "key": issued.key, "old_key_valid_until": issued.old_key_valid_until}
    )


# --- the key lifecycle, shared with the dashboard --------------------------------------------


@dataclass(frozen=True, slots=True)
class IssuedKey:
    """A key just created or rotated: the secret is in memory only until it is shown once."""

    id: str
    key: str
    tier: str | None = None
    old_key_valid_until: float | None = None  # rotations only


async def client_keys(state: GatewayState) -> list[KeyInfo]:
    """Every key, from the config and the database, with its tier in force, status and usage."""
    tiers = {p.key_id: p.tier for p in state.runtime.keys.principals()}
    return await key_infos(state.config, state.usage.backend, tiers)


async def add_client_key(
    state: GatewayState,
    key_id: str,
    models: Sequence[str] = ("*",),
    tier: str | None = None,
    description: str = "",
) -> IssuedKey:
    """Create a managed key and make the running gateway accept it at once."""
    if any(k.id == key_id for k in state.config.keys):
        raise InvalidRequest(f"Key id '{key_id}' is defined in the config file.", param="id")
    if tier is not None and tier not in state.config.tiers:
        shown = f" '{tier}'" if len(tier) <= MAX_KEY_ID else ""  # never echo a huge one
        raise InvalidRequest(f"No tier{shown} in the config.", param="tier")
    try:
        check_key_fields(description, models)
    except KeyFieldError as e:
        raise InvalidRequest(str(e), param=e.param) from None
    key = new_key()
    try:
        record = await state.usage.backend.add_key(
            key_id, hash_key(key), description=description, models=models, tier=tier
        )
    except KeyConflict as e:
        raise InvalidRequest(str(e), param="id", code="key_exists") from None
    except ValueError as e:
        raise InvalidRequest(str(e), param="id") from None
    await state.load_keys()
    return IssuedKey(record.id, key, tier)


async def revoke_client_key(state: GatewayState, key_id: str, reason: str) -> float:
    """Revoke a key (managed or from the config) for good, at once. Returns when."""
    backend = state.usage.backend
    known = {k.id for k in state.config.keys} | {k.id for k in await backend.list_keys()}
    if key_id not in known:
        raise NotFound(f"No key '{key_id}'.", param="key_id", code="key_not_found")
    revoked_at = await backend.revoke_key(key_id, reason)
    await state.load_keys()
    return revoked_at


async def rotate_client_key(state: GatewayState, key_id: str, grace: float) -> IssuedKey:
    """Give a managed key a new secret; the old one keeps working for `grace` seconds."""
    if not 0 <= grace <= MAX_GRACE:
        raise InvalidRequest(
            f"'grace_seconds' must be a number from 0 to {MAX_GRACE}.", param="grace_seconds"
        )
    if any(k.id == key_id for k in state.config.keys):
        raise InvalidRequest(
            f"Key '{key_id}' is defined in the config file: put a new hash there instead.",
            param="key_id",
        )
    key = new_key()
    try:
        record = await state.usage.backend.rotate_key(key_id, hash_key(key), grace)
    except UnknownKey:
        raise NotFound(
            f"No managed key '{key_id}'.", param="key_id", code="key_not_found"
        ) from None
    await state.load_keys()
    return IssuedKey(record.id, key, record.tier, time.time() + grace)


async def breakers(request: web.Request) -> web.Response:
    state = admin_state(request)
    return _json({"object": "breakers", "deployments": breaker_states(state)})


async def _body(request: web.Request) -> dict[str, Any]:
    try:
        body = orjson.loads(await request.read() or b"{}")
    except orjson.JSONDecodeError:
        raise InvalidRequest("The request body is not valid JSON.", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.", code="invalid_json")
    return body


def add_routes(app: web.Application) -> None:
    app.router.add_get("/admin/usage", usage, allow_head=False)
    app.router.add_get("/admin/keys", list_keys, allow_head=False)
    app.router.add_post("/admin/keys", create_key)
    app.router.add_post("/admin/keys/{key_id}/revoke", revoke_key)
    app.router.add_post("/admin/keys/{key_id}/rotate", rotate_key)
    app.router.add_get("/admin/breakers", breakers, allow_head=False)
