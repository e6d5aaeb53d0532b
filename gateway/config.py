"""The TOML configuration, read into frozen dataclasses.

Every table is a dataclass below; the loader walks the type hints, so a key that is not a field
is an error, as is a value of the wrong type. Each error names the table, the key and the
problem: ``providers[1] (openai).models[0].price_in: expected a number, got "abc"``.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import tomllib
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from .usage_types import check_key_id


class ConfigError(ValueError):
    """The configuration is invalid; the message says where and why."""


ProviderKind = Literal["openai", "anthropic", "gemini", "demo"]
Capability = Literal["chat", "embeddings", "images", "speech", "tools", "vision", "json"]


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    # Largest accepted request body; bigger ones get 413 before they are read.
    max_body_bytes: int = 10 * 1024 * 1024
    # Upstream timeouts, in seconds. connect: to open a connection. request: one deadline
    # per request across its retries and fallbacks, for a whole non-stream answer or for
    # the first token of a stream. first_token: how long one stream attempt may wait for
    # its first token before it counts as failed and is retried or falls back (default:
    # the request timeout). idle: the longest silence inside a stream after its first
    # token. stream: for a whole stream. Providers may override request_timeout,
    # first_token_timeout and idle_timeout.
    connect_timeout: float = 10.0
    request_timeout: float = 60.0
    first_token_timeout: float | None = None
    idle_timeout: float = 60.0
    stream_timeout: float = 900.0
    # While a stream waits on its upstream, an SSE comment is sent this often so that load
    # balancers and proxies do not drop the idle connection.
    keepalive_interval: float = 15.0
    # Retries of the same deployment on connection errors, 429 and 5xx, with exponential
    # backoff (base seconds, full jitter) within the request timeout; never once a response
    # has started reaching the client.
    retries: int = 2
    retry_backoff: float = 0.25
    # A deployment failing this many times in a row is skipped for breaker_cooldown seconds,
    # then tried again with one probe request.
    breaker_failures: int = 5
    breaker_cooldown: float = 30.0
    # How long SIGTERM waits for requests in flight (streams included) before closing them.
    shutdown_timeout: float = 30.0
    # Connections that send no complete request head within header_timeout seconds, or sit
    # idle between requests for keepalive_timeout seconds, are closed (slow-loris clients).
    header_timeout: float = 10.0
    keepalive_timeout: float = 60.0
    # A request whose body has not all arrived body_timeout seconds after its head gets 408.
    body_timeout: float = 30.0


@dataclass(frozen=True, slots=True)
class ModelConfig:
    id: str
    # The name the provider knows the model by; defaults to ``id``.
    upstream: str = ""
    context_window: int | None = None
    # The most output tokens the model can produce per request.
    max_tokens: int | None = None
    # Prices in USD per million tokens.
    price_in: float = 0.0
    price_out: float = 0.0
    price_cache_read: float | None = None
    price_cache_write: float | None = None
    # A flat price per request (e.g. credits per message), added to the token prices.
    price_request: float = 0.0
    capabilities: tuple[Capability, ...] = ("chat",)

    @property
    def upstream_name(self) -> str:
        return self.upstream or self.id


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    name: str
    kind: ProviderKind
    base_url: str = ""
    # The provider's API key, inline (discouraged) or read from an environment variable.
    api_key: str | None = None
    api_key_env: str | None = None
    # When api_key_env names an unset variable the provider is skipped with a warning, so
    # that one config file can list every provider an installation might use.
    headers: Mapping[str, str] = field(default_factory=dict)
    request_timeout: float | None = None
    first_token_timeout: float | None = None
    idle_timeout: float | None = None
    models: tuple[ModelConfig, ...] = ()


@dataclass(frozen=True, slots=True)
class AliasConfig:
    # Model ids in order of preference: the next one serves when one fails.
    models: tuple[str, ...]
    # With weights, each request picks its first model at random in proportion to them
    # (load balancing); the others stay its fallbacks.
    weights: tuple[float, ...] = ()


BudgetPeriod = Literal["day", "month", "total"]


@dataclass(frozen=True, slots=True)
class LimitSet:
    """Limits of one key. Unset fields inherit (key -> tier -> [limits]); 0 means no limit."""

    chat_per_minute: int | None = None  # requests per minute to chat completions
    embeddings_per_minute: int | None = None
    standard_per_minute: int | None = None  # every other endpoint
    requests_per_day: int | None = None
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    # Spending limit in the unit of the model prices (USD, or credits), per budget_period.
    budget: float | None = None
    budget_period: BudgetPeriod | None = None


@dataclass(frozen=True, slots=True)
class TierConfig(LimitSet):
    # Automatic upgrade: after this many days in a row on which the key was used and never
    # refused by a limit, it moves to `upgrade_to` at the daily reset.
    upgrade_to: str | None = None
    upgrade_after_days: int | None = None


@dataclass(frozen=True, slots=True)
class LimitsConfig(LimitSet):
    """[limits]: defaults for every key, plus the per-client-IP limits and policies."""

    ip_chat_per_minute: int | None = None
    ip_embeddings_per_minute: int | None = None
    ip_standard_per_minute: int | None = None
    # X-Forwarded-For is honoured only from these addresses or networks.
    trusted_proxies: tuple[str, ...] = ()
    # Fraction of a daily token quota or budget after which responses carry a warning.
    soft_limit: float = 0.8
    # UTC hour at which daily quotas reset.
    day_reset_hour: int = 0
    # Cut a stream whose real usage crosses a hard budget or token quota.
    cut_off_streams: bool = True


@dataclass(frozen=True, slots=True)
class KeyConfig:
    id: str
    # "sha256:<hex>" of the key; the key itself is never stored.
    hash: str
    description: str = ""
    # Model ids, aliases or glob patterns ("openai/*", "*") this key may use.
    models: tuple[str, ...] = ("*",)
    tier: str | None = None
    limits: LimitSet = LimitSet()


@dataclass(frozen=True, slots=True)
class StorageConfig:
    # SQLite database of usage records and managed keys, relative to the working directory.
    path: str = "gateway.db"
    # A shared PostgreSQL database instead of `path`, "postgresql://user@host:5432/db", for a
    # fleet of gateways that report usage as one (needs `pip install 'gateway[postgres]'`).
    # Leave the password out: PGPASSWORD or ~/.pgpass supply it.
    url: str | None = None
    # Connections each gateway process keeps to PostgreSQL (the writer uses one at a time).
    pool_size: int = 4
    # Usage records are written in batches at most this many seconds apart; a crash loses
    # at most this much (plus one batch write).
    flush_interval: float = 1.0
    # Raw usage records older than this are deleted (daily roll-ups are kept).
    retention_days: int = 90
    # Records waiting to be written are capped in memory; past it they are dropped and
    # counted.
    queue_max: int = 100_000


@dataclass(frozen=True, slots=True)
class AdminConfig:
    # "sha256:<hex>" of the admin key that guards /admin, /dashboard and /metrics; no key,
    # no admin API and no dashboard.
    key_hash: str | None = None
    # "host:port" of a separate listener that serves /metrics (and /healthz, /readyz)
    # without a key, for a Prometheus on a trusted network; /metrics then leaves the main
    # listener.
    metrics_listen: str | None = None


LogLevel = Literal["debug", "info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class LoggingConfig:
    level: LogLevel = "info"
    # "json": one JSON object per line (for journald and log shippers); "text": for humans.
    format: Literal["json", "text"] = "json"
    # One line per request (request id, key id, model, provider, status, tokens, latency).
    access_log: bool = True


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    # Shared limits for a fleet of gateway processes: "redis://host:6379/0". Unset: every
    # process limits on its own (and `serve --workers` stays at 1).
    redis_url: str | None = None
    # When Redis cannot be reached: "open" serves with each process's own limits (and counts
    # the fault), "closed" answers 503.
    on_redis_failure: Literal["open", "closed"] = "open"
    # Seconds a Redis call may take before the policy above applies.
    redis_timeout: float = 0.1
    # Prefix of every key the gateway writes in Redis.
    key_prefix: str = "gw:"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig = ServerConfig()
    storage: StorageConfig = StorageConfig()
    admin: AdminConfig = AdminConfig()
    logging: LoggingConfig = LoggingConfig()
    cluster: ClusterConfig = ClusterConfig()
    providers: tuple[ProviderConfig, ...] = ()
    # alias -> a model id, a list of model ids (fallbacks in order), or {models, weights}
    aliases: Mapping[str, AliasConfig] = field(default_factory=dict)
    limits: LimitsConfig = LimitsConfig()
    tiers: Mapping[str, TierConfig] = field(default_factory=dict)
    keys: tuple[KeyConfig, ...] = ()
    # Where the file was read from; not a TOML key.
    source: str = field(default="", metadata={"internal": True})

    def provider_api_key(self, provider: ProviderConfig) -> str | None:
        """The provider's key, from the file or the environment (read at call time)."""
        if provider.api_key:
            return provider.api_key
        if provider.api_key_env:
            return os.environ.get(provider.api_key_env) or None
        return None

    def active_providers(self) -> tuple[ProviderConfig, ...]:
        """Providers that can be used: those whose key variable, if any, is set."""
        return tuple(p for p in self.providers if not p.api_key_env or self.provider_api_key(p))


def load(path: str | os.PathLike[str]) -> Config:
    """Read and validate a TOML config file."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return loads(raw.decode("utf-8", errors="replace"), source=str(p))


def loads(text: str, *, source: str = "<string>") -> Config:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    # an alias may be one model id or a list of them; normalise before the typed walk
    aliases = data.get("aliases")
    if isinstance(aliases, dict):
        data["aliases"] = {
            k: {"models": [v] if isinstance(v, str) else v} if isinstance(v, str | list) else v
            for k, v in aliases.items()
        }
    config: Config = _build(Config, data, "")
    config = dataclasses.replace(config, source=source)
    _check(config)
    return config


# --- typed walk ---------------------------------------------------------------------------


def _where(path: str) -> str:
    return path or "top level"


def _describe(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return f'"{value}"' if len(value) < 40 else "a string"
    if isinstance(value, dict):
        return "a table"
    if isinstance(value, list):
        return "an array"
    return repr(value)


def _build(cls: type[Any], table: object, path: str) -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"{_where(path)}: expected a table, got {_describe(table)}")
    hints = get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if not f.metadata.get("internal")}
    unknown = [k for k in table if k not in fields]
    if unknown:
        allowed = ", ".join(fields)
        raise ConfigError(f"{_where(path)}: unknown key '{unknown[0]}' (allowed: {allowed})")
    kwargs: dict[str, Any] = {}
    for name, f in fields.items():
        key_path = f"{path}.{name}" if path else name
        if name in table:
            kwargs[name] = _convert(table[name], hints[name], key_path, table)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise ConfigError(f"{_where(path)}: missing required key '{name}'")
    return cls(**kwargs)


def _convert(value: object, tp: Any, path: str, parent: Mapping[str, Any]) -> Any:
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        return _convert(value, args[0], path, parent)
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            options = ", ".join(f'"{c}"' for c in choices)
            raise ConfigError(f"{path}: {_describe(value)} is not one of {options}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise ConfigError(f"{path}: expected an array, got {_describe(value)}")
        item_tp = get_args(tp)[0]
        return tuple(
            _convert(v, item_tp, f"{path}[{i}]{_label(v)}", parent) for i, v in enumerate(value)
        )
    if origin in (Mapping, dict):
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a table, got {_describe(value)}")
        val_tp = get_args(tp)[1]
        return {str(k): _convert(v, val_tp, f'{path}."{k}"', parent) for k, v in value.items()}
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, path)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true or false, got {_describe(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {_describe(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{path}: expected a number, got {_describe(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {_describe(value)}")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {path}")  # pragma: no cover


def _label(item: object) -> str:
    """' (openai)' for a table with a name or id, so that errors say which entry."""
    if isinstance(item, dict):
        name = item.get("name", item.get("id"))
        if isinstance(name, str):
            return f" ({name})"
    return ""


# --- cross-field checks ---------------------------------------------------------------------

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_MODEL_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:@+-]*(/[A-Za-z0-9._:@+-]+)*$")
_KEY_HASH = re.compile(r"^sha256:[0-9a-f]{64}$")


def _check(config: Config) -> None:
    s = config.server
    if not 0 < s.port < 65536:
        raise ConfigError(f"server.port: {s.port} is not a TCP port (1-65535)")
    for name in ("max_body_bytes",):
        if getattr(s, name) <= 0:
            raise ConfigError(f"server.{name}: must be greater than 0")
    for name in (
        "connect_timeout",
        "request_timeout",
        "idle_timeout",
        "stream_timeout",
        "keepalive_interval",
        "breaker_cooldown",
        "shutdown_timeout",
        "header_timeout",
        "keepalive_timeout",
        "body_timeout",
    ):
        if getattr(s, name) <= 0:
            raise ConfigError(f"server.{name}: must be greater than 0 seconds")
    if s.first_token_timeout is not None and s.first_token_timeout <= 0:
        raise ConfigError("server.first_token_timeout: must be greater than 0 seconds")
    if s.retries < 0 or s.retry_backoff < 0:
        raise ConfigError("server.retries and server.retry_backoff must not be negative")
    if s.breaker_failures < 1:
        raise ConfigError("server.breaker_failures: must be at least 1")

    seen_providers: set[str] = set()
    model_ids: set[str] = set()
    for i, p in enumerate(config.providers):
        where = f"providers[{i}] ({p.name})"
        if not _NAME.match(p.name):
            raise ConfigError(
                f"{where}.name: '{p.name}' may use only letters, digits, '.', '_' and '-'"
            )
        if p.name in seen_providers:
            raise ConfigError(f"{where}.name: provider '{p.name}' is declared twice")
        seen_providers.add(p.name)
        if p.kind != "demo" and not re.match(r"^https?://[^/\s]+", p.base_url):
            raise ConfigError(
                f"{where}.base_url: {p.kind} providers need an http:// or https:// URL"
            )
        if p.api_key and p.api_key_env:
            raise ConfigError(f"{where}: set api_key or api_key_env, not both")
        for name in ("request_timeout", "first_token_timeout", "idle_timeout"):
            value = getattr(p, name)
            if value is not None and value <= 0:
                raise ConfigError(f"{where}.{name}: must be greater than 0 seconds")
        if not p.models:
            raise ConfigError(f"{where}.models: a provider needs at least one model")
        seen_models: set[str] = set()
        for j, m in enumerate(p.models):
            mwhere = f"{where}.models[{j}] ({m.id})"
            if not _MODEL_ID.match(m.id):
                raise ConfigError(f"{mwhere}.id: '{m.id}' is not a valid model id")
            if m.id in seen_models:
                raise ConfigError(f"{mwhere}.id: model '{m.id}' is declared twice")
            seen_models.add(m.id)
            model_ids.add(f"{p.name}/{m.id}")
            prices = (
                "price_in",
                "price_out",
                "price_cache_read",
                "price_cache_write",
                "price_request",
            )
            for name in prices:
                v = getattr(m, name)
                if v is not None and v < 0:
                    raise ConfigError(f"{mwhere}.{name}: a price cannot be negative")
            for name in ("context_window", "max_tokens"):
                v = getattr(m, name)
                if v is not None and v <= 0:
                    raise ConfigError(f"{mwhere}.{name}: must be greater than 0")

    for alias, spec in config.aliases.items():
        where = f'aliases."{alias}"'
        if alias in model_ids:
            raise ConfigError(f"{where}: hides the model of the same id")
        if not spec.models:
            raise ConfigError(f"{where}: needs at least one model id")
        for t in spec.models:
            if t not in model_ids:
                raise ConfigError(
                    f'{where}: "{t}" is not a configured model (use provider/model, e.g. '
                    '"openai/gpt-4o")'
                )
        if spec.weights and (
            len(spec.weights) != len(spec.models) or any(w <= 0 for w in spec.weights)
        ):
            raise ConfigError(f"{where}.weights: one positive weight per model")

    _check_limits(config)

    seen_keys: set[str] = set()
    seen_hashes: set[str] = set()
    for i, k in enumerate(config.keys):
        where = f"keys[{i}] ({k.id})"
        try:
            check_key_id(k.id)
        except ValueError as e:
            raise ConfigError(f"keys[{i}].id: {e}") from None
        if k.id in seen_keys:
            raise ConfigError(f"{where}.id: key id '{k.id}' is declared twice")
        seen_keys.add(k.id)
        if not _KEY_HASH.match(k.hash):
            raise ConfigError(
                f'{where}.hash: expected "sha256:<64 hex digits>" '
                "(run `gateway keys new` to make one)"
            )
        if k.hash in seen_hashes:
            raise ConfigError(f"{where}.hash: the same key hash is used by two keys")
        seen_hashes.add(k.hash)
        if k.tier is not None and k.tier not in config.tiers:
            raise ConfigError(f"{where}.tier: no tier '{k.tier}' in [tiers]")
        _check_limit_set(k.limits, f"{where}.limits")

    if config.admin.key_hash is not None and not _KEY_HASH.match(config.admin.key_hash):
        raise ConfigError('admin.key_hash: expected "sha256:<64 hex digits>"')
    listen = config.admin.metrics_listen
    if listen is not None and not re.match(
        r"^(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+):\d{1,5}$", listen
    ):
        raise ConfigError(f'admin.metrics_listen: expected "host:port", got "{listen}"')
    cluster = config.cluster
    if cluster.redis_url is not None and not re.match(r"^rediss?://", cluster.redis_url):
        raise ConfigError('cluster.redis_url: expected "redis://host:port/db" or "rediss://..."')
    if cluster.redis_url is not None and re.search(
        r"[?&]ssl_cert_reqs=(?!(none|required)(&|$))", cluster.redis_url
    ):
        raise ConfigError("cluster.redis_url: ssl_cert_reqs must be none or required")
    if cluster.redis_timeout <= 0:
        raise ConfigError("cluster.redis_timeout: must be greater than 0 seconds")
    st = config.storage
    if st.flush_interval <= 0:
        raise ConfigError("storage.flush_interval: must be greater than 0 seconds")
    if st.retention_days < 1:
        raise ConfigError("storage.retention_days: must be at least 1")
    if st.queue_max < 1:
        raise ConfigError("storage.queue_max: must be at least 1")
    if st.url is not None and not re.match(r"^postgres(ql)?://", st.url):
        raise ConfigError('storage.url: expected "postgresql://user@host:port/database"')
    if st.pool_size < 1:
        raise ConfigError("storage.pool_size: must be at least 1")


def _check_limit_set(limits: LimitSet, where: str) -> None:
    for f in dataclasses.fields(limits):
        v = getattr(limits, f.name)
        if isinstance(v, int | float) and not isinstance(v, bool) and v < 0:
            raise ConfigError(f"{where}.{f.name}: must not be negative (0 means no limit)")


def _check_limits(config: Config) -> None:
    lim = config.limits
    _check_limit_set(lim, "limits")
    if not 0 < lim.soft_limit <= 1:
        raise ConfigError("limits.soft_limit: must be a fraction between 0 and 1")
    if not 0 <= lim.day_reset_hour <= 23:
        raise ConfigError("limits.day_reset_hour: must be an hour from 0 to 23")
    for i, proxy in enumerate(lim.trusted_proxies):
        try:
            ipaddress.ip_network(proxy, strict=False)
        except ValueError:
            raise ConfigError(
                f"limits.trusted_proxies[{i}]: '{proxy}' is not an IP address or network"
            ) from None
    for name, tier in config.tiers.items():
        where = f'tiers."{name}"'
        _check_limit_set(tier, where)
        if tier.upgrade_to is not None and tier.upgrade_to not in config.tiers:
            raise ConfigError(f"{where}.upgrade_to: no tier '{tier.upgrade_to}' in [tiers]")
        if (tier.upgrade_to is None) != (tier.upgrade_after_days is None):
            raise ConfigError(f"{where}: set both upgrade_to and upgrade_after_days, or neither")
        if tier.upgrade_after_days is not None and tier.upgrade_after_days < 1:
            raise ConfigError(f"{where}.upgrade_after_days: must be at least 1")
