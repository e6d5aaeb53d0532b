"""The `gateway` command as an operator runs it: a real process, real signals."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from decimal import Decimal
from pathlib import Path

from gateway.auth import hash_key
from gateway.usage_store import UsageRecord, UsageStore

ROOT = Path(__file__).parent.parent


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=ROOT,
        env=env,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_help_lists_commands() -> None:
    result = run("--help")
    assert result.returncode == 0
    for word in ("serve", "check-config", "keys"):
        assert word in result.stdout
    serve = run("serve", "--help")
    assert "--config" in serve.stdout and "--port" in serve.stdout


def test_check_config_ok_and_broken(tmp_path: Path) -> None:
    ok = run("check-config", "config.example.toml")
    assert ok.returncode == 0, ok.stderr
    assert "OK" in ok.stdout
    broken = tmp_path / "broken.toml"
    broken.write_text('[server]\nport = 8080\nhots = "x"\n')
    bad = run("check-config", str(broken))
    assert bad.returncode == 1
    assert "server: unknown key 'hots'" in bad.stderr
    missing = run("check-config", str(tmp_path / "nope.toml"))
    assert missing.returncode == 1
    assert "cannot read" in missing.stderr


def test_keys_new_prints_a_key_and_a_block_with_its_hash() -> None:
    result = run("keys", "new", "--id", "billing-app", "--models", "openai/*")
    assert result.returncode == 0
    key = next(w for w in result.stdout.split() if w.startswith("gw-"))
    assert len(key) > 40
    block = result.stdout[result.stdout.index("[[keys]]") :]
    parsed = tomllib.loads(block)["keys"][0]
    assert parsed == {"id": "billing-app", "hash": hash_key(key), "models": ["openai/*"]}
    again = run("keys", "new")
    assert key not in again.stdout


def wait_ready(port: int, proc: subprocess.Popen[str], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError("gateway did not start")


def test_serve_example_then_sighup_survives_and_sigterm_exits_cleanly() -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "gateway", "--config", "config.example.toml", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_ready(port, proc)
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/v1/models",
            headers={"Authorization": "Bearer gw-demo-not-a-secret"},
        )
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGHUP)
        time.sleep(0.3)
        assert proc.poll() is None  # SIGHUP must not kill the process
        with urllib.request.urlopen(request, timeout=5) as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        _, stderr = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stderr
    assert "gateway listening on" in stderr
    assert "gateway-demo-not-a-secret" not in stderr and "gw-demo-not-a-secret" not in stderr


def test_serve_refuses_a_broken_config(tmp_path: Path) -> None:
    broken = tmp_path / "g.toml"
    broken.write_text("[[providers]]\nname = 'x'\n")
    result = run("--config", str(broken))
    assert result.returncode == 1
    assert "providers[0] (x): missing required key 'kind'" in result.stderr


def test_serve_says_in_one_line_why_it_cannot_start(tmp_path: Path) -> None:
    example = (ROOT / "config.example.toml").read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        busy = run("--config", "config.example.toml", "--port", port)
    assert busy.returncode == 1
    assert "address already in use" in busy.stderr.strip().splitlines()[-1]
    assert "Traceback" not in busy.stderr

    unreachable = tmp_path / "pg.toml"
    unreachable.write_text(
        example.replace(
            "[storage]\n", '[storage]\nurl = "postgresql://gw:secret-pw@127.0.0.1:1/usage"\n', 1
        )
    )
    nodb = run("--config", str(unreachable), "--port", str(free_port()))
    assert nodb.returncode == 1
    last = nodb.stderr.strip().splitlines()[-1]
    assert "cannot start: cannot open postgresql://gw:***@127.0.0.1:1/usage" in last
    assert "Traceback" not in nodb.stderr and "secret-pw" not in nodb.stderr


def usage_config(tmp_path: Path) -> Path:
    """A config whose usage database holds two keys' requests on two models, today."""
    db = tmp_path / "usage.db"
    now = time.time()
    with UsageStore(str(db)) as store:
        store.write_batch([
            UsageRecord(now, "r1", "alpha", "", "chat", "openai/gpt-4o", prompt_tokens=1200,
                        completion_tokens=345, cost=0.25),
            UsageRecord(now, "r2", "alpha", "", "chat", "openai/gpt-4o", status=502,
                        outcome="upstream_error", prompt_tokens=7),
            UsageRecord(now, "r3", "alpha", "", "chat", "demo/echo", prompt_tokens=10,
                        completion_tokens=20000, cost=0.125),
            UsageRecord(now, "r4", "a-much-longer-key-id", "", "embeddings", "demo/embed",
                        prompt_tokens=5, cost=0.000001),
        ])  # fmt: skip
    config = tmp_path / "gateway.toml"
    config.write_text(f'[storage]\npath = "{db}"\n')
    return config


def test_usage_table_columns_and_total_add_up(tmp_path: Path) -> None:
    result = run("usage", "--config", str(usage_config(tmp_path)))
    assert result.returncode == 0, result.stderr
    lines = [ln for ln in result.stdout.splitlines()[1:] if ln.strip()]
    header, *rows, total = lines
    names = header.split()
    assert names == ["KEY", "MODEL", "REQUESTS", "ERRORS", "PROMPT", "COMPLETION", "COST"]
    starts = [header.index(n) for n in names]

    def cells(line: str) -> list[str]:
        # every cell starts at its header's column and ends before the next one
        bounds = [*starts, None]
        for s in starts[1:]:
            assert line[s - 1 : s] in ("", " "), (line, s)
        return [line[a:b].strip() for a, b in itertools.pairwise(bounds)]

    table = [cells(r) for r in rows]
    assert [r[:2] for r in table] == [
        ["a-much-longer-key-id", "demo/embed"],
        ["alpha", "demo/echo"],
        ["alpha", "openai/gpt-4o"],
    ]
    last = cells(total)
    assert last[:2] == ["TOTAL", ""]
    for column in range(2, 6):  # requests, errors, prompt, completion
        assert int(last[column]) == sum(int(r[column]) for r in table), names[column]
    assert [int(c) for c in last[2:6]] == [4, 1, 1222, 20345]
    assert Decimal(last[6]) == sum(Decimal(r[6]) for r in table) == Decimal("0.375001")


def test_usage_refuses_a_period_that_ends_before_it_starts(tmp_path: Path) -> None:
    config = str(usage_config(tmp_path))
    backwards = run("usage", "--config", config, "--start", "2026-05-02", "--end", "2026-05-01")
    assert backwards.returncode == 1 and backwards.stdout == ""
    assert backwards.stderr.strip().splitlines() == [
        "gateway: the period starts (2026-05-02) after it ends (2026-05-01)"
    ]
    not_a_day = run("usage", "--config", config, "--start", "last week")
    assert not_a_day.returncode == 1 and not_a_day.stdout == ""
    assert not_a_day.stderr.strip().splitlines() == [
        "gateway: --start must be a date as YYYY-MM-DD, got 'last week'"
    ]
    one_day = run("usage", "--config", config, "--start", "2026-05-01", "--end", "2026-05-01")
    assert one_day.returncode == 0 and "TOTAL" in one_day.stdout


def test_rotate_refuses_a_negative_or_absurd_grace(tmp_path: Path) -> None:
    config = str(usage_config(tmp_path))
    with UsageStore(str(tmp_path / "usage.db")) as store:
        store.add_key("app", hash_key("gw-old-secret"))
    for grace in ("-5", "2592001", "1e12", "nan", "soon"):
        result = run("keys", "rotate", "app", "--config", config, "--grace", grace)
        assert result.returncode == 2, (grace, result.stdout)
        assert "Traceback" not in result.stderr and "gw-" not in result.stdout
        assert "from 0 to 2592000 (30 days)" in result.stderr.strip().splitlines()[-1]
    with UsageStore(str(tmp_path / "usage.db")) as store:
        assert store.get_key("app").hash == hash_key("gw-old-secret")  # type: ignore[union-attr]
    helped = run("keys", "rotate", "--help")
    assert "30 days" in helped.stdout
    ok = run("keys", "rotate", "app", "--config", config, "--grace", "2592000")
    assert ok.returncode == 0, ok.stderr
    assert "gw-" in ok.stdout


def test_keys_new_applies_the_admin_apis_field_bounds(tmp_path: Path) -> None:
    config = str(usage_config(tmp_path))
    long = run("keys", "new", "--config", config, "--id", "app", "--description", "x" * 201)
    assert long.returncode == 1 and "gw-" not in long.stdout
    assert long.stderr.strip().splitlines() == [
        "gateway: a key's description is at most 200 characters"
    ]
    many = run("keys", "new", "--config", config, "--id", "app", "--models", *["m"] * 101)
    assert many.returncode == 1 and "gw-" not in many.stdout
    with UsageStore(str(tmp_path / "usage.db")) as store:
        assert store.get_key("app") is None
    ok = run("keys", "new", "--config", config, "--id", "app", "--description", "x" * 200)
    assert ok.returncode == 0, ok.stderr
    with UsageStore(str(tmp_path / "usage.db")) as store:
        assert store.get_key("app") is not None
