"""The scenarios: start the three servers, drive each target, measure the server process.

Targets: ``upstream`` (the fake, straight), ``bare`` (the baseline proxy) and ``gateway``. With
two cores or more the proxies run on the first core and the fake upstream and the load on the
second, so the two proxies are measured on the same core under the same load.
"""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from . import fake_upstream, gateway_config, loadgen, payloads, procs, profile, streams
from .loadgen import Load
from .report import Results, Row

SCENARIOS = (
    "nonstream-1",
    "nonstream-32",
    "nonstream-256",
    "stream",
    "stream-paced",
    "translated",
    "large-prompt",
    "slow-streams",
    "workers",
)
OPENAI_MODEL = "openai/gpt-bench"
STARTUP_TRIES = 3  # the best of three spawns: other processes on a shared machine add noise
NO_ANTHROPIC = "skipped: gateway has no anthropic provider kind"


@dataclass
class Options:
    scenarios: list[str]
    duration: float = 4.0
    warmup: float = 1.0
    stream_concurrency: int = 200
    hold_streams: int = 5000
    hold_seconds: float = 15.0
    hold_rate: float = 1000.0  # slow streams opened per second
    repeat: int = 3  # measure each target this many times, in turn; `pick` keeps one
    loadgen: str = "auto"  # auto | wrk | builtin
    profile: bool = False  # sample bare and gateway with py-spy while measured
    install: bool = True  # apt-get install wrk when it is missing
    results_dir: Path = field(default_factory=lambda: Path(__file__).parent / "results")


def pick(runs: dict[str, list[Row]]) -> list[Row]:
    """One run of each target. Where bare and gateway were measured in turn, the same repeat
    of every target: the one whose gateway / bare req/s is the median. Runs seconds apart
    share the machine's state (its speed drifts 20-30% over tens of seconds), so the ratio
    of such a pair is steadier than that of each target's fastest run, which may come from
    moments far apart. Elsewhere each target's fastest run."""
    count = min(len(rows) for rows in runs.values())
    listed = {t: ", ".join(f"{r.rps or 0:.0f}" for r in rows) for t, rows in runs.items()}
    if count > 1 and "bare" in runs and "gateway" in runs:

        def ratio(i: int) -> float:
            bare = runs["bare"][i].rps
            return (runs["gateway"][i].rps or 0.0) / bare if bare else 0.0

        median = sorted(range(count), key=ratio)[(count - 1) // 2]
        chosen = {t: rows[median] for t, rows in runs.items()}
        how = f"repeat {median + 1} of {count}, the median gateway/bare req/s"
    else:
        chosen = {t: max(rows, key=lambda r: r.rps or 0.0) for t, rows in runs.items()}
        how = f"best of {count}"
    if count > 1:
        for target, row in chosen.items():
            row.note += f"; {how} (req/s {listed[target]})"
    return list(chosen.values())


class Bench:
    def __init__(self, opts: Options, tmp: Path) -> None:
        self.opts = opts
        self.tmp = tmp
        self.results = Results()
        self.servers: dict[str, procs.Server] = {}
        self.wrk: str | None = None
        self.anthropic = False
        self.features: dict[str, str] = {}
        self.profiles: list[str] = []  # py-spy summaries, with --profile
        cores = procs.usable_cores()
        pinned = len(cores) >= 2
        self.server_core = cores[0] if pinned else None
        self.load_core = cores[1] if pinned else None

    @property
    def slow_delay_ms(self) -> int:
        """The fake's pause before each chunk of a slow stream, so that one lasts hold_seconds."""
        return max(1, round(self.opts.hold_seconds * 1000 / fake_upstream.STREAM_CHUNKS))

    # --- set-up -----------------------------------------------------------------------------

    def start(self) -> None:
        """Choose the load generator, write the gateway config, start the three servers."""
        meta = self.results.meta
        meta["cores"] = len(procs.usable_cores())
        meta["fd_limit"] = procs.raise_fd_limit()
        meta["loadgen"] = self._choose_loadgen()
        meta["bytecode"] = procs.compile_bytecode("gateway", "bench")
        meta["pinning"] = (
            "none (fewer than 2 cores)"
            if self.server_core is None
            else f"proxies on core {self.server_core}; upstream and load on core {self.load_core}"
        )
        ports = {name: procs.free_port() for name in ("upstream", "bare", "gateway")}
        up = ports["upstream"]
        setup = gateway_config.build(up, self.slow_delay_ms, self.tmp)
        self.anthropic = setup.anthropic
        self.features = meta["gateway_features"] = setup.features
        config = self.tmp / "gateway.toml"
        config.write_text(setup.toml)

        self._spawn("upstream", procs.python_argv("bench.fake_upstream", "--port", str(up)), up)
        bare = ["--port", str(ports["bare"]), "--upstream", f"http://127.0.0.1:{up}"]
        self._spawn("bare", procs.python_argv("bench.bare_proxy", *bare), ports["bare"])
        gateway = ["serve", "--config", str(config), "--port", str(ports["gateway"])]
        self._spawn("gateway", procs.python_argv("gateway", *gateway), ports["gateway"])
        procs.pin_self(self.load_core)

    def _choose_loadgen(self) -> str:
        if self.opts.loadgen == "builtin":
            return "built-in asyncio generator (--loadgen builtin)"
        self.wrk, how = loadgen.ensure_wrk(self.opts.install)
        if self.wrk is None and self.opts.loadgen == "wrk":
            raise RuntimeError("--loadgen wrk: " + how)
        return how

    def _spawn(self, name: str, argv: list[str], port: int) -> None:
        """Start a server; the proxies are started STARTUP_TRIES times to time their start."""
        core = self.load_core if name == "upstream" else self.server_core
        tries = 1 if name == "upstream" else STARTUP_TRIES
        times = []
        for _ in range(tries):  # the last one started stays up for the scenarios
            if name in self.servers:
                self.servers[name].stop()
            self.servers[name] = procs.start(name, argv, port, core, self.tmp / f"{name}.log")
            times.append(self.servers[name].ready_s * 1000)
        if name != "upstream":
            listed = ", ".join(f"{t:.0f}" for t in times)
            note = f"spawn to accepting: best of {tries} ({listed} ms)"
            extra = {"ready_ms": min(times), "ready_median_ms": sorted(times)[tries // 2]}
            self.results.add(Row(name, "startup", note=note, extra=extra))

    def stop(self) -> None:
        for server in self.servers.values():
            server.stop()

    def keep_logs(self, directory: Path) -> None:
        """Copy the servers' logs and the gateway config out of the temp dir."""
        directory.mkdir(parents=True, exist_ok=True)
        for path in [*self.tmp.glob("*.log"), self.tmp / "gateway.toml"]:
            if path.exists():
                shutil.copy(path, directory / path.name)

    async def check_paths(self) -> None:
        """One request per target before measuring: a broken setup fails here, clearly."""
        for target in ("upstream", "bare", "gateway"):
            status, text = await probe(self.load(target, "nonstream"))
            if status != 200:
                log = self.servers[target].log.read_text(errors="replace")[-1500:]
                raise RuntimeError(f"{target} answered {status}: {text[:500]}\n{log}")

    def load(self, target: str, kind: str, model: str = OPENAI_MODEL) -> Load:
        port = self.servers[target].port
        if kind in ("slow", "paced"):  # the gateway's provider of that name; the others go
            # straight to the fake's /slow/<ms>/ path
            if target == "gateway":
                return payloads.chat_load(port, f"{kind}/gpt-bench", stream=True)
            ms = self.slow_delay_ms if kind == "slow" else gateway_config.PACED_CHUNK_MS
            path = f"/slow/{ms}/v1/chat/completions"
            return payloads.chat_load(port, f"{kind}/gpt-bench", path=path, stream=True)
        if kind == "anthropic":
            return payloads.chat_load(port, "anthropic/claude-bench")
        if kind == "large":
            return Load(port, payloads.CHAT_PATH, payloads.large_body(model), payloads.HEADERS)
        return payloads.chat_load(port, model, stream=kind == "stream")

    # --- scenarios --------------------------------------------------------------------------

    async def run(self, scenario: str) -> None:
        """Measure each target in turn, `repeat` times, and keep one run of each (`pick`)."""
        if scenario == "translated":
            skipped = await self.translated_skipped()
            if skipped:
                self.results.add(Row("gateway", "translated", note=skipped))
                return
        if scenario == "workers":
            skipped = self.start_workers()
            if skipped:
                self.results.add(Row("workers", "workers", note=skipped))
                return
        targets, measure = self.plan(scenario)
        repeat = 1 if scenario == "slow-streams" else self.opts.repeat
        runs: dict[str, list[Row]] = {t: [] for t in targets}
        for _ in range(repeat):
            for target in targets:
                runs[target].append(await measure(target))
        for row in pick(runs):
            self.results.add(row)

    def plan(self, scenario: str) -> tuple[tuple[str, ...], Callable[[str], Awaitable[Row]]]:
        """The targets of a scenario and how to measure one of them."""
        every, proxies = ("upstream", "bare", "gateway"), ("bare", "gateway")
        if scenario.startswith("nonstream-"):
            conns = int(scenario.split("-")[1])
            return every, lambda t: self.closed_loop(t, scenario, self.load(t, "nonstream"), conns)
        if scenario == "stream":
            return every, lambda t: self.stream(t, scenario, "stream")
        if scenario == "stream-paced":
            return every, lambda t: self.stream(t, scenario, "paced")
        if scenario == "translated":
            return proxies, self.translated
        if scenario == "large-prompt":
            return proxies, lambda t: self.closed_loop(t, scenario, self.load(t, "large"), 32)
        if scenario == "slow-streams":
            return proxies, self.slow_streams
        if scenario == "workers":
            return ("gateway", "workers"), self.workers
        raise ValueError(f"unknown scenario {scenario!r}")

    async def closed_loop(self, target: str, scenario: str, load: Load, conns: int) -> Row:
        server = self.servers[target]
        gen = loadgen.generator(load, conns, self.wrk, self.load_core, self.tmp)
        try:
            if self.opts.warmup > 0:
                await gen.run(self.opts.warmup)
            spy = await self.start_profile(server, scenario)
            before = self.snapshot(server)
            result = await gen.run(self.opts.duration)
            delta = self.snapshot(server) - before
            await self.finish_profile(spy, server, scenario)
        finally:
            gen.close()
        row = Row(target, scenario, result.rps, result.p50_ms, result.p99_ms, errors=result.errors)
        row.note = f"{conns} conns" + (" (fake upstream's own CPU)" if target == "upstream" else "")
        return self.measured(row, server, delta, result.ok)

    async def start_profile(
        self, server: procs.Server, scenario: str
    ) -> asyncio.subprocess.Process | None:
        if not self.opts.profile or server.name == "upstream":
            return None
        out = self.opts.results_dir / f"profile-{server.name}-{scenario}.txt"
        out.parent.mkdir(parents=True, exist_ok=True)
        spy = await profile.record(server.proc.pid, self.opts.duration, out)
        if spy is None:
            self.results.meta["profile"] = "py-spy is not installed: pip install py-spy"
        return spy

    async def finish_profile(
        self, spy: asyncio.subprocess.Process | None, server: procs.Server, scenario: str
    ) -> None:
        if spy is None:
            return
        await spy.wait()
        out = self.opts.results_dir / f"profile-{server.name}-{scenario}.txt"
        if out.exists():
            self.profiles.append(profile.summarize(out))

    def snapshot(self, server: procs.Server) -> procs.Snapshot:
        core = self.load_core if server.name == "upstream" else self.server_core
        return procs.snapshot(server, core)

    def measured(self, row: Row, server: procs.Server, delta: procs.Snapshot, count: int) -> Row:
        """CPU per request, RSS now, and the notes that say how much to trust the numbers."""
        row.cpu_us = delta.cpu / count * 1e6 if count else None
        if row.rss_mb is None:
            row.rss_mb = server.rss_mb()
        row.extra["listen_overflows"] = delta.overflows
        row.extra["others_on_core_percent"] = round(delta.others_percent, 1)
        if delta.overflows:
            row.note += f"; {delta.overflows} listen-queue overflows"
        if delta.others_percent >= 5 and server.name != "upstream":  # its core runs the load too
            row.note += f"; other processes took {delta.others_percent:.0f}% of its core"
        return row

    async def stream(self, target: str, scenario: str, kind: str) -> Row:
        server = self.servers[target]
        load = self.load(target, kind)
        n = self.opts.stream_concurrency
        clients = loadgen.Clients(load, n)
        try:
            if self.opts.warmup > 0:
                await clients.run(self.opts.warmup)
            spy = await self.start_profile(server, scenario)
            before = self.snapshot(server)
            replies, errors, seconds = await clients.run(self.opts.duration)
            delta = self.snapshot(server) - before
            await self.finish_profile(spy, server, scenario)
        finally:
            clients.close()
        result = streams.stream_result(replies, errors, seconds)
        row = Row(target, scenario, result.rps, result.ttft_ms(50), result.ttft_ms(99))
        row.errors = result.errors
        row.extra = {"total_p50_ms": result.total_ms(50), "total_p99_ms": result.total_ms(99)}
        row.note = f"{n} concurrent streams; p50/p99 = TTFT; total p50 {result.total_ms(50):.2f} ms"
        if kind == "paced":
            row.note += f"; the fake pauses {gateway_config.PACED_CHUNK_MS} ms before each chunk"
        return self.measured(row, server, delta, result.ok)

    async def translated_skipped(self) -> str:
        """Why the translated path cannot be measured, or '' when it can."""
        if not self.anthropic:
            return NO_ANTHROPIC
        status, text = await probe(self.load("gateway", "anthropic"))
        if status != 200:
            return f"{NO_ANTHROPIC} (check-config accepts it; a request got {status} {_code(text)})"
        return ""

    async def translated(self, target: str) -> Row:
        """The gateway to the Anthropic-format fake; bare forwards OpenAI format to OpenAI."""
        kind = "anthropic" if target == "gateway" else "nonstream"
        row = await self.closed_loop(target, "translated", self.load(target, kind), 32)
        if target == "gateway":
            row.note = "32 conns, OpenAI client -> Anthropic upstream (bare: OpenAI -> OpenAI)"
        return row

    def start_workers(self) -> str:
        """Start Redis and `gateway serve --workers 2` on its config; '' or why it cannot."""
        redis = shutil.which("redis-server")
        if redis is None:
            return "skipped: redis-server is not installed (apt-get install redis-server)"
        if "workers" in self.servers:
            return ""
        redis_port, port = procs.free_port(), procs.free_port()
        argv = [redis, "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no"]  # fmt: skip
        self.servers["redis"] = procs.start("redis", argv, redis_port, self.load_core,
                                            self.tmp / "redis.log")  # fmt: skip
        config = self.tmp / "gateway-workers.toml"
        config.write_text(
            (self.tmp / "gateway.toml").read_text()
            + f'\n[cluster]\nredis_url = "redis://127.0.0.1:{redis_port}/0"\n'
        )
        gateway = ["serve", "--config", str(config), "--port", str(port), "--workers", "2"]
        server = procs.start("workers", procs.python_argv("gateway", *gateway), port, None,
                             self.tmp / "workers.log")  # fmt: skip
        self.servers["workers"] = procs.Tree(
            server.name, server.proc, server.port, server.ready_s, server.log
        )
        return ""

    async def workers(self, target: str) -> Row:
        """One gateway process (pinned to one core) against two workers sharing limits
        through Redis (unpinned: both cores, which the load and upstream also use)."""
        load = self.load(target, "nonstream")
        row = await self.closed_loop(target, "workers", load, 256)
        row.note = "256 conns, " + (
            "2 processes + Redis, unpinned" if target == "workers" else "1 process, one core"
        )
        return row

    async def slow_streams(self, target: str) -> Row:
        server = self.servers[target]
        n = self.opts.hold_streams
        before = self.snapshot(server)
        load = self.load(target, "slow")
        result = await streams.hold_streams(load, n, server.rss_mb, self.opts.hold_rate)
        delta = self.snapshot(server) - before
        busy = delta.cpu / delta.time * 100
        row = Row(target, "slow-streams", rss_mb=result.peak_rss_mb, errors=result.errors)
        row.extra = {"streams": n, "most_held": result.most_held, "cpu_percent": busy}
        row.extra["ramp_s"] = result.ramp_seconds
        kinds = ", ".join(f"{k}: {v}" for k, v in result.error_kinds.items())
        row.note = (
            f"{result.most_held}/{n} held at once, {self.opts.hold_seconds:g} s each, "
            f"all connected in {result.ramp_seconds:.1f} s; "
            f"RSS = peak; CPU/stream; {busy:.0f}% of a core"
            + (f"; errors {kinds}" if kinds else "")
        )
        return self.measured(row, server, delta, n)


def _code(body: str) -> str:
    """The error code of an OpenAI error envelope, else the start of the body."""
    try:
        error = json.loads(body).get("error") or {}
        return str(error.get("code") or error.get("message", ""))[:80]
    except (ValueError, AttributeError):
        return body[:80]


async def probe(load: Load) -> tuple[int, str]:
    """One request with aiohttp: the status and the body, for sanity checks and skip notes."""
    url = f"http://127.0.0.1:{load.port}{load.path}"
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url, data=load.body, headers=load.headers) as resp:
                return resp.status, await resp.text()
    except aiohttp.ClientError as e:
        return 0, str(e)
