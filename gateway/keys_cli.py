"""``gateway keys new|list|revoke|rotate`` and ``gateway usage``: the key lifecycle and usage
from a terminal, on the usage database named by the config's ``[storage]`` (the SQLite file at
``path``, or the PostgreSQL database at ``url``).

A running gateway notices changes made here within a few seconds (it polls the database).
Each command opens the store, runs one coroutine against it (``asyncio.run``) and closes it.
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, date, datetime
from pathlib import Path

from . import config as config_module
from .auth import hash_key, new_key
from .key_listing import key_infos
from .usage_backend import UsageBackend, open_backend
from .usage_types import MAX_GRACE, KeyConflict, UnknownKey, UsageStoreError, default_period


def add_commands(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    keys = sub.add_parser("keys", help="create, list, revoke and rotate client API keys")
    keys_sub = keys.add_subparsers(title="key commands", metavar="KEYCOMMAND", required=True)

    new = keys_sub.add_parser("new", help="make a new key and show it once")
    _config_option(new, required=False)
    new.add_argument("--id", default="my-app", help="a name for the key (default: my-app)")
    new.add_argument(
        "--models",
        nargs="*",
        default=None,
        metavar="PATTERN",
        help='models the key may use, e.g. "openai/*" (default: all)',
    )
    new.add_argument("--tier", help="the key's tier (from [tiers])")
    new.add_argument("--description", default="", help="a note for operators")
    new.add_argument(
        "--admin",
        action="store_true",
        help="make the admin key instead and print its [admin] block",
    )
    new.set_defaults(func=keys_new)

    listing = keys_sub.add_parser("list", help="the keys, their status and their usage")
    _config_option(listing)
    listing.set_defaults(func=keys_list)

    revoke = keys_sub.add_parser("revoke", help="revoke a key for good (config keys too)")
    _config_option(revoke)
    revoke.add_argument("key_id", metavar="ID")
    revoke.set_defaults(func=keys_revoke)

    rotate = keys_sub.add_parser(
        "rotate", help="give a key a new secret; the old one works for a grace period"
    )
    _config_option(rotate)
    rotate.add_argument("key_id", metavar="ID")
    rotate.add_argument(
        "--grace",
        type=_grace,
        default=3600.0,
        metavar="SECONDS",
        help=f"how long the old secret keeps working, 0 to {MAX_GRACE} (30 days; default: 3600)",
    )
    rotate.set_defaults(func=keys_rotate)

    usage = sub.add_parser("usage", help="print a usage table (tokens, requests, cost)")
    _config_option(usage)
    usage.add_argument("--start", help="first day, YYYY-MM-DD (default: the 1st of this month)")
    usage.add_argument("--end", help="last day, YYYY-MM-DD (default: today)")
    usage.add_argument("--key", help="one key id only")
    usage.set_defaults(func=usage_table)


def _grace(text: str) -> float:
    """``--grace``: seconds from 0 to MAX_GRACE (argparse prints the message and exits 2)."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds <= MAX_GRACE:
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds from 0 to {MAX_GRACE} (30 days), got '{text[:40]}'"
        )
    return seconds


def _config_option(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument(
        "--config",
        "-c",
        required=required,
        metavar="FILE",
        help="the gateway's config file (its [storage] path is the database)",
    )


def _load(config_path: str) -> config_module.Config | None:
    try:
        return config_module.load(config_path)
    except config_module.ConfigError as e:
        print(f"gateway: invalid config: {e}", file=sys.stderr)
        return None


def _run(config: config_module.Config, command: Callable[[UsageBackend], Awaitable[int]]) -> int:
    """Open the configured store, run `command` on it, close it; 1 if it cannot be opened."""
    storage = config.storage
    if storage.url is None and not Path(storage.path).is_absolute():
        print(f"note: [storage] path is relative; using {Path(storage.path).resolve()}",
              file=sys.stderr)  # fmt: skip

    async def main() -> int:
        try:
            store = await open_backend(storage)
        except (UsageStoreError, sqlite3.Error, OSError) as e:
            print(f"gateway: cannot open the usage database: {e}", file=sys.stderr)
            return 1
        try:
            return await command(store)
        finally:
            await store.close()

    return asyncio.run(main())


def keys_new(ns: argparse.Namespace) -> int:
    key = new_key()
    if ns.admin:
        print("New admin key. It is shown only this once; store it now:\n")
        print(f"    {key}\n")
        print("Put this in the config file and restart (or reload) the gateway:\n")
        print("[admin]")
        print(f'key_hash = "{hash_key(key)}"')
        return 0
    if ns.config is None:
        print(f"New API key for '{ns.id}'. It is shown only this once; store it now:\n")
        print(f"    {key}\n")
        print("Add this block to the config file and reload (or restart) the gateway")
        print("(or run with --config FILE to store the key in the gateway's database):\n")
        print("[[keys]]")
        print(f'id = "{ns.id}"')
        print(f'hash = "{hash_key(key)}"')
        if ns.models:
            print("models = [" + ", ".join(f'"{m}"' for m in ns.models) + "]")
        if ns.tier:
            print(f'tier = "{ns.tier}"')
        return 0
    config = _load(ns.config)
    if config is None:
        return 1
    if any(k.id == ns.id for k in config.keys):
        print(f"gateway: key id '{ns.id}' is already defined in {ns.config}", file=sys.stderr)
        return 1
    if ns.tier and ns.tier not in config.tiers:
        print(f"gateway: no tier '{ns.tier}' in {ns.config}", file=sys.stderr)
        return 1

    async def add(store: UsageBackend) -> int:
        try:
            await store.add_key(
                ns.id,
                hash_key(key),
                description=ns.description,
                models=ns.models or ["*"],
                tier=ns.tier,
            )
        except (KeyConflict, ValueError) as e:
            print(f"gateway: {e}", file=sys.stderr)
            return 1
        print(f"New API key for '{ns.id}' (stored as a hash in {store.where}).")
        print("It is shown only this once; store it now:\n")
        print(f"    {key}\n")
        print("A running gateway accepts it within a few seconds.")
        return 0

    return _run(config, add)


def keys_list(ns: argparse.Namespace) -> int:
    config = _load(ns.config)
    if config is None:
        return 1
    return _run(config, lambda store: _list(config, store))


async def _list(config: config_module.Config, store: UsageBackend) -> int:
    rows = [
        (
            "ID",
            "SOURCE",
            "TIER",
            "STATUS",
            "CREATED",
            "LAST USED",
            "REQUESTS",
            "TOKENS",
            "COST",
            "TODAY",
        )
    ]
    for k in await key_infos(config, store):
        status = "revoked" if k["revoked"] else "active"
        if k["expires"] is not None:
            status += f" (expires {_when(k['expires'])})"
        today = k["today"]
        rows.append((
            k["id"],
            "database" if k["source"] == "managed" else "config",
            k["tier"] or "-",
            status,
            _when(k["created"]) if k["created"] is not None else "-",
            _when(k["last_used"]) if k["last_used"] else "never",
            str(k["requests"]),
            str(k["total_tokens"]),
            f"{k['cost']:.4f}",
            f"{today['requests']} req / {today['total_tokens']} tok",
        ))  # fmt: skip
    _print_table(rows)
    return 0


def keys_revoke(ns: argparse.Namespace) -> int:
    config = _load(ns.config)
    if config is None:
        return 1

    async def revoke(store: UsageBackend) -> int:
        known = {k.id for k in config.keys} | {k.id for k in await store.list_keys()}
        if ns.key_id not in known:
            print(f"gateway: no key '{ns.key_id}'", file=sys.stderr)
            return 1
        await store.revoke_key(ns.key_id, "gateway keys revoke")
        print(f"Revoked '{ns.key_id}'. A running gateway refuses it within a few seconds.")
        return 0

    return _run(config, revoke)


def keys_rotate(ns: argparse.Namespace) -> int:
    config = _load(ns.config)
    if config is None:
        return 1
    if any(k.id == ns.key_id for k in config.keys):
        print(
            f"gateway: '{ns.key_id}' is defined in {ns.config}: put a new hash there "
            "(gateway keys new prints one)",
            file=sys.stderr,
        )
        return 1
    key = new_key()

    async def rotate(store: UsageBackend) -> int:
        try:
            await store.rotate_key(ns.key_id, hash_key(key), ns.grace)
        except UnknownKey:
            print(f"gateway: no key '{ns.key_id}' in {store.where}", file=sys.stderr)
            return 1
        print(f"New secret for '{ns.key_id}'. It is shown only this once; store it now:\n")
        print(f"    {key}\n")
        print(f"The old secret keeps working until {_when(time.time() + ns.grace)}.")
        return 0

    return _run(config, rotate)


def usage_table(ns: argparse.Namespace) -> int:
    config = _load(ns.config)
    if config is None:
        return 1
    default_start, default_end = default_period(time.time())
    start = _day(ns.start, "--start", default_start)
    end = _day(ns.end, "--end", default_end)
    if start is None or end is None:
        return 1
    if start > end:
        print(f"gateway: the period starts ({start}) after it ends ({end})", file=sys.stderr)
        return 1
    return _run(config, lambda store: _usage(store, start, end, ns.key))


def _day(text: str | None, option: str, default: date) -> date | None:
    if not text:
        return default
    try:
        return date.fromisoformat(text)
    except ValueError:
        print(f"gateway: {option} must be a date as YYYY-MM-DD, got '{text[:40]}'", file=sys.stderr)
        return None


async def _usage(store: UsageBackend, start: date, end: date, key_id: str | None) -> int:
    report = await store.admin_usage(start, end, key_id=key_id)
    print(f"Usage from {report['period_start']} to {report['period_end']} (UTC, days included)\n")
    header = ("KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "COST")
    rows: list[tuple[str, ...]] = []
    totals = [0, 0, 0, 0]  # requests, errors, prompt, completion
    for key in report["keys"]:
        for model, u in sorted(key["breakdown"].items()):
            counts = (u["requests"], u["errors"], u["prompt_tokens"], u["completion_tokens"])
            totals = [t + c for t, c in zip(totals, counts, strict=True)]
            rows.append((key["key_id"], model, *map(str, counts), f"{u['cost']:.6f}"))
    rows.append(("TOTAL", "", *map(str, totals), f"{report['total_cost']:.6f}"))
    _print_table([header, *rows])
    return 0


def _when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


def _print_table(rows: Sequence[Sequence[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
