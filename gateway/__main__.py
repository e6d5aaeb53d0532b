"""The ``gateway`` command: serve (default), check-config, keys. Nothing runs at import."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence

from . import config as config_module
from . import keys_cli

COMMANDS = ("serve", "check-config", "keys", "usage")

log = logging.getLogger("gateway")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or (args[0] not in COMMANDS and args[0] not in ("-h", "--help", "--version")):
        args.insert(0, "serve")
    parser = _parser()
    ns = parser.parse_args(args)
    result: int = ns.func(ns)
    return result


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway",
        description="An OpenAI-compatible AI API gateway. "
        "Without a command, runs `serve`: `gateway --config config.toml`.",
    )
    parser.add_argument("--version", action="version", version="gateway 0.1.0")
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the gateway (the default command)")
    serve.add_argument(
        "--config",
        "-c",
        default="gateway.toml",
        metavar="FILE",
        help="TOML config file (default: gateway.toml)",
    )
    serve.add_argument("--host", help="listen address (overrides server.host)")
    serve.add_argument("--port", type=int, help="listen port (overrides server.port)")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="run N processes on the same port (needs [cluster] redis_url, so that limits "
        "are shared)",
    )
    serve.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    serve.add_argument(
        "--log-level",
        choices=("debug", "info", "warning", "error"),
        help="overrides [logging] level",
    )
    serve.set_defaults(func=_serve)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_check_config)

    keys_cli.add_commands(sub)
    return parser


def _load(path: str) -> config_module.Config | None:
    try:
        return config_module.load(path)
    except config_module.ConfigError as e:
        print(f"gateway: invalid config: {e}", file=sys.stderr)
        return None


def _check_config(ns: argparse.Namespace) -> int:
    config = _load(ns.file)
    if config is None:
        return 1
    active = config.active_providers()
    models = sum(len(p.models) for p in active)
    print(f"{ns.file}: OK")
    print(f"  providers: {len(active)} active of {len(config.providers)}")
    for p in config.providers:
        if p not in active:
            print(f"    {p.name}: disabled, environment variable {p.api_key_env} is not set")
    print(f"  models: {models}, aliases: {len(config.aliases)}, client keys: {len(config.keys)}")
    if not config.keys:
        print("  warning: no [[keys]]: every request will be refused (401)")
    return 0


def _serve(ns: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    config = _load(ns.config)
    if config is None:
        return 1

    from .app import build
    from .ops import SYSTEMD, configure_logging
    from .serve import serve

    configure_logging(config, ns.log_level)
    host = ns.host or config.server.host
    port = ns.port or config.server.port
    if ns.workers > 1:
        if not config.cluster.redis_url:
            print(
                "gateway: --workers needs [cluster] redis_url: each process would otherwise "
                f"keep its own limits, and {ns.workers} processes would allow {ns.workers} "
                "times what the config says",
                file=sys.stderr,
            )
            return 2
        from .workers import run_workers

        return run_workers(ns.workers, ns.config, host, port, ns.log_level)
    loop: asyncio.AbstractEventLoop | None = None
    try:
        import uvloop

        loop = uvloop.new_event_loop()
    except ImportError:  # pragma: no cover - uvloop is optional
        pass

    app = build(config)

    def listening() -> None:
        log.info(
            "gateway listening on http://%s:%d (config %s, %d models)",
            host,
            port,
            config.source,
            len(app_models(config)),
        )
        app[SYSTEMD].ready()

    serve(app, config, host, port, reuse_port=ns.worker is not None, on_ready=listening, loop=loop)
    log.info("gateway stopped")
    return 0


def app_models(config: config_module.Config) -> list[str]:
    return [f"{p.name}/{m.id}" for p in config.active_providers() for m in p.models]


if __name__ == "__main__":
    sys.exit(main())
