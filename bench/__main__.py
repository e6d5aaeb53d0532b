"""``python -m bench``: the gateway against a bare pass-through proxy, on one table.

python -m bench                       # every scenario, a few minutes
python -m bench --quick               # smoke run: nonstream-32, one second
python -m bench --scenario stream --scenario nonstream-1 --duration 5
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import uvloop

from .report import table, write_json
from .runner import SCENARIOS, Bench, Options


def parse(argv: Sequence[str] | None) -> Options:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="repeatable; default all")
    p.add_argument("--quick", action="store_true", help="short smoke run (default: nonstream-32)")
    p.add_argument("--duration", type=float, help="seconds per measurement (default 4, quick 1)")
    p.add_argument("--warmup", type=float, help="seconds of warm-up before each (default 1)")
    p.add_argument(
        "--streams", type=int, help="concurrent streams in the stream scenarios (default 200)"
    )
    p.add_argument("--hold", type=int, help="slow streams held at once (default 5000)")
    p.add_argument("--hold-seconds", type=float, help="life of one slow stream (default 15)")
    p.add_argument("--hold-rate", type=float, help="slow streams opened per second (default 1000)")
    p.add_argument(
        "--repeat", type=int, help="runs per target, in turn; report the median pair (default 3)"
    )
    p.add_argument("--loadgen", choices=("auto", "wrk", "builtin"), default="auto")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument(
        "--profile", action="store_true", help="py-spy the proxies while measured (slows them)"
    )
    p.add_argument("--results-dir", type=Path, help="default bench/results")
    ns = p.parse_args(argv)
    quick = ns.quick
    opts = Options(
        scenarios=ns.scenario or (["nonstream-32"] if quick else list(SCENARIOS)),
        duration=ns.duration or (1.0 if quick else 4.0),
        warmup=ns.warmup if ns.warmup is not None else (0.3 if quick else 1.0),
        stream_concurrency=ns.streams or 200,
        hold_streams=ns.hold or (500 if quick else 5000),
        hold_seconds=ns.hold_seconds or (3.0 if quick else 15.0),
        hold_rate=ns.hold_rate or 1000.0,
        repeat=max(1, ns.repeat if ns.repeat is not None else (1 if quick else 3)),
        loadgen=ns.loadgen,
        install=not ns.no_install,
        profile=ns.profile,
    )
    if ns.results_dir is not None:
        opts.results_dir = ns.results_dir
    return opts


def main(argv: Sequence[str] | None = None) -> int:
    opts = parse(argv)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as tmp:
        bench = Bench(opts, Path(tmp))
        try:
            bench.start()
            say(f"load generator: {bench.results.meta['loadgen']}")
            say(f"pinning: {bench.results.meta['pinning']}")
            say(f"bytecode: {bench.results.meta['bytecode']}")
            for name, state in bench.features.items():
                say(f"gateway {name}: {state}")
            uvloop.run(run_all(bench))
        finally:
            bench.stop()
            bench.keep_logs(opts.results_dir / "logs")
    results = bench.results
    results.meta.update(
        started=time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        seconds=round(time.perf_counter() - started, 1),
        gateway_commit=_git_commit(),
        python=platform.python_version(),
        options={k: str(v) for k, v in vars(opts).items()},
    )
    results.compare()
    checks = results.checks()
    print(table(results, checks))
    for summary in bench.profiles:
        print("\n" + summary)
    paths = write_json(results, checks, opts.results_dir)
    print(f"\nwritten: {', '.join(str(p) for p in paths)}  ({results.meta['seconds']} s)")
    return 0


async def run_all(bench: Bench) -> None:
    await bench.check_paths()
    for scenario in bench.opts.scenarios:
        say(f"running {scenario} ...")
        await bench.run(scenario)


def say(text: str) -> None:
    print(f"[bench] {text}", file=sys.stderr, flush=True)


def _git_commit() -> str:
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            cwd=Path(__file__).parent.parent,
            capture_output=True,
            text=True,
            timeout=5,
        )
        return done.stdout.strip()
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
