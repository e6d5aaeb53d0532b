"""The gateway's config for the bench, set up the way an operator runs it.

Auth is always on (one hashed client key). Limits, usage storage and an access log are turned
on when ``python -m gateway check-config`` accepts them, so the bench runs against whatever the
gateway supports today; the features it found are reported with the results.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from gateway.auth import hash_key

from .procs import python_argv

CLIENT_KEY = "gw-bench-0123456789abcdefghijklmnopqrstuvwxyzABCDEFG"
UPSTREAM_KEY = "sk-bench-upstream"

# Generous limits: every request passes through the limiter, none is ever refused.
LIMITS_FULL = """
[limits]
chat_per_minute = 100000000
embeddings_per_minute = 100000000
standard_per_minute = 100000000
requests_per_day = 1000000000
tokens_per_minute = 1000000000000
tokens_per_day = 1000000000000
ip_chat_per_minute = 100000000
ip_embeddings_per_minute = 100000000
ip_standard_per_minute = 100000000
"""
LIMITS_MINIMAL = """
[limits]
chat_per_minute = 100000000
"""
# Names an access-log switch might have; the first the gateway accepts is used.
ACCESS_LOG_SERVER_KEYS = ("access_log = true",)
ACCESS_LOG_TABLES = ("[logging]\naccess_log = true\n", "[log]\naccess = true\n")


@dataclass
class GatewaySetup:
    toml: str
    features: dict[str, str] = field(default_factory=dict)
    anthropic: bool = False  # the config has an anthropic provider (check-config took it)


def provider(name: str, kind: str, base_url: str, model: str) -> str:
    return f"""
[[providers]]
name = "{name}"
kind = "{kind}"
base_url = "{base_url}"
api_key = "{UPSTREAM_KEY}"
models = [
  {{ id = "{model}", context_window = 1000000, price_in = 2.5, price_out = 10.0 }},
]
"""


# The fake's pause before each chunk of a paced stream (``stream-paced``): 20 chunks in ~0.4 s,
# a token every 20 ms, as a fast model streams.
PACED_CHUNK_MS = 20


def build(upstream_port: int, slow_delay_ms: int, workdir: Path) -> GatewaySetup:
    """Probe the optional parts one by one and return the fullest config the gateway accepts."""
    up = f"http://127.0.0.1:{upstream_port}"
    server = ["[server]", "shutdown_timeout = 2", "request_timeout = 120"]
    tables = [
        provider("openai", "openai", f"{up}/v1", "gpt-bench"),
        provider("slow", "openai", f"{up}/slow/{slow_delay_ms}/v1", "gpt-bench"),
        provider("paced", "openai", f"{up}/slow/{PACED_CHUNK_MS}/v1", "gpt-bench"),
        f'\n[[keys]]\nid = "bench"\nhash = "{hash_key(CLIENT_KEY)}"\n',
    ]
    setup = GatewaySetup("", {"auth": "on (1 key, sha256)"})

    def accepted(extra_server: list[str], extra_tables: list[str]) -> bool:
        text = _render(server + extra_server, tables + extra_tables)
        return check_config(text, workdir) is None

    error = check_config(_render(server, tables), workdir)
    if error is not None:
        raise RuntimeError("the gateway rejects the bench's base config: " + error)

    if accepted([], [LIMITS_FULL]):
        tables.append(LIMITS_FULL)
        setup.features["limits"] = "on ([limits], generous)"
    elif accepted([], [LIMITS_MINIMAL]):
        tables.append(LIMITS_MINIMAL)
        setup.features["limits"] = "on ([limits] chat_per_minute only)"
    else:
        setup.features["limits"] = "not supported by the config"

    db = workdir / "usage.db"
    storage = f'\n[storage]\npath = "{db}"\n'
    if accepted([], [storage]):
        tables.append(storage)
        setup.features["storage"] = f"on ({db.name} in a temp dir)"
    else:
        setup.features["storage"] = "not supported by the config"

    tried = ", ".join(["server.access_log", "logging.access_log", "log.access"])
    setup.features["access_log"] = f"no config switch found (tried {tried})"
    for line in ACCESS_LOG_SERVER_KEYS:
        if accepted([line], []):
            server.append(line)
            setup.features["access_log"] = f"on (server.{line})"
            break
    else:
        for table in ACCESS_LOG_TABLES:
            if accepted([], [table]):
                tables.append(table)
                setup.features["access_log"] = "on (" + table.replace("\n", " ").strip() + ")"
                break

    anthropic = provider("anthropic", "anthropic", f"{up}/v1", "claude-bench")
    if accepted([], [anthropic]):
        tables.append(anthropic)
        setup.anthropic = True
    setup.features["anthropic kind"] = "accepted" if setup.anthropic else "rejected"
    setup.toml = _render(server, tables)
    return setup


def check_config(text: str, workdir: Path) -> str | None:
    """None when ``python -m gateway check-config`` accepts `text`, else its complaint."""
    path = workdir / "probe.toml"
    path.write_text(text)
    done = subprocess.run(
        python_argv("gateway", "check-config", str(path)),
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode == 0:
        return None
    return done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}"


def _render(server: list[str], tables: list[str]) -> str:
    return "\n".join(server) + "\n" + "".join(tables)
