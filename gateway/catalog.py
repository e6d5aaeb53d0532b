"""The model list of ``GET /v1/models``: OpenAI's list shape plus what a client needs to choose.

Each entry is OpenAI's ``Model`` (``id``, ``object``, ``created``, ``owned_by``) with
``context_window``, ``max_tokens``, ``pricing`` (USD per million tokens) and ``capabilities``.
Aliases are listed too, with ``alias_for`` naming the models they route to in order.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from .auth import Principal
from .errors import InvalidRequest
from .router import Deployment, Router
from .schema.openai import JSONObject

_CREATED = int(time.time())


def _entry(model_id: str, dep: Deployment) -> JSONObject:
    m = dep.model
    pricing: JSONObject = {"input": m.price_in, "output": m.price_out}
    if m.price_cache_read is not None:
        pricing["cache_read"] = m.price_cache_read
    if m.price_cache_write is not None:
        pricing["cache_write"] = m.price_cache_write
    pricing["unit"] = "USD per 1M tokens"
    return {
        "id": model_id,
        "object": "model",
        "created": _CREATED,
        "owned_by": dep.provider.name,
        "context_window": m.context_window,
        "max_tokens": m.max_tokens,
        "pricing": pricing,
        "capabilities": list(m.capabilities),
    }


def _visible(router: Router, principal: Principal) -> list[JSONObject]:
    entries = [_entry(d.id, d) for d in router.models.values() if principal.may_use(d.id)]
    for alias, deps in router.aliases.items():
        usable = [d for d in deps if principal.may_use(alias) or principal.may_use(d.id)]
        if usable:
            entry = _entry(alias, usable[0])
            entry["alias_for"] = [d.id for d in usable]
            entries.append(entry)
    return entries


def model_object(router: Router, principal: Principal, model_id: str) -> JSONObject | None:
    return next((e for e in _visible(router, principal) if e["id"] == model_id), None)


def model_list(router: Router, principal: Principal, query: Mapping[str, str]) -> JSONObject:
    entries = _visible(router, principal)
    provider = query.get("provider")
    if provider:
        entries = [e for e in entries if e["owned_by"] == provider]
    capability = query.get("capability")
    if capability:
        entries = [e for e in entries if capability in e["capabilities"]]
    min_context = _number(query, "min_context", int)
    if min_context is not None:
        entries = [e for e in entries if (e["context_window"] or 0) >= min_context]
    max_price_in = _number(query, "max_price_in", float)
    if max_price_in is not None:
        entries = [e for e in entries if e["pricing"]["input"] <= max_price_in]
    return {"object": "list", "data": entries}


def _number(query: Mapping[str, str], name: str, kind: type[int] | type[float]) -> float | None:
    raw = query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        raise InvalidRequest(
            f"Query parameter '{name}' must be {what}, got '{raw[:40]}'.", param=name
        ) from None
