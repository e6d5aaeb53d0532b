"""Rows of results, the targets checked against them, the printed table and the JSON files."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Row:
    """One target (upstream, bare, gateway) in one scenario. Latencies in ms, CPU in µs."""

    target: str
    scenario: str
    rps: float | None = None  # requests (or streams) per second
    p50_ms: float | None = None  # for streams: time to first token
    p99_ms: float | None = None
    added_p50_ms: float | None = None  # p50 minus the same scenario straight to the upstream
    cpu_us: float | None = None  # server CPU per request (or per stream)
    rss_mb: float | None = None  # server RSS after the run (slow streams: the peak)
    errors: int = 0
    rps_x_bare: float | None = None
    cpu_x_bare: float | None = None
    note: str = ""
    extra: dict[str, float] = field(default_factory=dict)


@dataclass
class Check:
    target: str
    measured: str
    limit: str
    passed: bool | None  # None: not measured in this run (or skipped), or information only
    info: bool = False  # a number to read beside the targets, not one of them


class Results:
    def __init__(self) -> None:
        self.rows: list[Row] = []
        self.meta: dict[str, object] = {}

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def find(self, target: str, scenario: str) -> Row | None:
        for row in self.rows:
            if row.target == target and row.scenario == scenario:
                return row
        return None

    def compare(self) -> None:
        """Fill in the ratios to bare and the latency added over the direct upstream."""
        for row in self.rows:
            direct = self.find("upstream", row.scenario)
            if direct is not None and row is not direct:
                row.added_p50_ms = _sub(row.p50_ms, direct.p50_ms)
                if "total_p50_ms" in row.extra and "total_p50_ms" in direct.extra:
                    added = row.extra["total_p50_ms"] - direct.extra["total_p50_ms"]
                    row.extra["added_total_p50_ms"] = added
            bare = self.find("bare", row.scenario)
            if row.target == "gateway" and bare is not None:
                row.rps_x_bare = _div(row.rps, bare.rps)
                row.cpu_x_bare = _div(row.cpu_us, bare.cpu_us)
            single = self.find("gateway", "workers")
            if row.target == "workers" and single is not None:
                # against the single-process gateway, in the same run
                ratio = _div(row.rps, single.rps)
                if ratio is not None:
                    row.extra["rps_x_single"] = ratio
                    row.note += f"; {ratio:.2f}x the single process's req/s"

    def checks(self) -> list[Check]:
        gw, bare = "gateway", "bare"
        checks: list[Check] = []
        for conns in (32, 256):
            row = self.find(gw, f"nonstream-{conns}")
            checks.append(_ratio(f"req/s at {conns} conns >= 0.85x bare", row, "rps_x_bare", 0.85))
            checks.append(
                _ratio(f"CPU/req at {conns} conns <= 1.2x bare", row, "cpu_x_bare", 1.2, le=True)
            )
        g, b = self.find(gw, "nonstream-1"), self.find(bare, "nonstream-1")
        checks.append(_added("added p50 at 1 conn <= bare + 0.10 ms", g, b, 0.10))
        # Added TTFT is the latency a proxy adds, read where neither proxy is saturated: with
        # streams back to back, TTFT is the concurrency over the streams per second (Little's
        # law), a throughput figure that CPU/stream covers; it is shown beside, as information.
        g, b = self.find(gw, "stream-paced"), self.find(bare, "stream-paced")
        checks.append(_added("stream added TTFT <= bare + 1 ms", g, b, 1.0))
        g, b = self.find(gw, "stream"), self.find(bare, "stream")
        saturated = _added("  back to back (saturated): added TTFT", g, b, 0.0)
        checks.append(dataclasses.replace(saturated, limit="none: = streams / throughput",
                                          passed=None, info=True))  # fmt: skip
        checks.append(_ratio("CPU/stream <= 1.3x bare", g, "cpu_x_bare", 1.3, le=True))
        row = self.find(gw, "translated")
        checks.append(_ratio("translated req/s >= 0.6x bare", row, "rps_x_bare", 0.6))
        row = self.find(gw, "nonstream-256")
        rss = row.rss_mb if row else None
        checks.append(_limit("RSS after 256 conns <= 100 MB", rss, 100, "MB"))
        row = self.find(gw, "slow-streams")
        if row is None or row.rss_mb is None:
            checks.append(Check("5,000 held streams < 300 MB, no error", "-", "-", None))
        else:
            held = int(row.extra.get("most_held", 0))
            wanted = int(row.extra.get("streams", 0))
            ok = row.rss_mb < 300 and row.errors == 0 and held >= wanted
            measured = f"{row.rss_mb:.0f} MB, {row.errors} errors, {held}/{wanted} held at once"
            checks.append(
                Check(f"{wanted} held streams < 300 MB, no error", measured, "300 MB", ok)
            )
        row = self.find(gw, "startup")
        ready = row.extra.get("ready_ms") if row else None
        checks.append(_limit("start to ready < 0.5 s", ready, 500, "ms", strict=True))
        return checks


def _sub(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a - b


def _div(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def _ratio(name: str, row: Row | None, attr: str, limit: float, le: bool = False) -> Check:
    value = getattr(row, attr) if row is not None else None
    sign = "<=" if le else ">="
    if value is None or math.isnan(value):
        return Check(name, _skipped(row), f"{sign} {limit}x", None)
    passed = value <= limit if le else value >= limit
    return Check(name, f"{value:.2f}x", f"{sign} {limit}x", passed)


def _added(name: str, gw: Row | None, bare: Row | None, slack_ms: float) -> Check:
    if gw is None or bare is None or gw.added_p50_ms is None or bare.added_p50_ms is None:
        return Check(name, _skipped(gw), f"bare + {slack_ms} ms", None)
    limit = bare.added_p50_ms + slack_ms
    measured = f"{gw.added_p50_ms:.3f} ms (bare {bare.added_p50_ms:.3f})"
    return Check(name, measured, f"<= {limit:.3f} ms", gw.added_p50_ms <= limit)


def _limit(name: str, value: float | None, limit: float, unit: str, strict: bool = False) -> Check:
    sign = "<" if strict else "<="
    if value is None:
        return Check(name, "-", f"{sign} {limit:g} {unit}", None)
    passed = value < limit if strict else value <= limit
    return Check(name, f"{value:.0f} {unit}", f"{sign} {limit:g} {unit}", passed)


def _skipped(row: Row | None) -> str:
    return "skipped (see its row)" if row is not None and row.note.startswith("skipped") else "-"


COLUMNS = (
    ("target", 8, "target"),
    ("scenario", 13, "scenario"),
    ("req/s", 8, "rps"),
    ("p50 ms", 7, "p50_ms"),
    ("p99 ms", 7, "p99_ms"),
    ("+p50 ms", 7, "added_p50_ms"),
    ("CPU µs", 7, "cpu_us"),
    ("RSS MB", 6, "rss_mb"),
    ("err", 4, "errors"),
    ("rps/bare", 8, "rps_x_bare"),
    ("cpu/bare", 8, "cpu_x_bare"),
)


def table(results: Results, checks: list[Check]) -> str:
    head = " ".join(
        f"{title:>{w}}" if i > 1 else f"{title:<{w}}" for i, (title, w, _) in enumerate(COLUMNS)
    )
    lines = [head + "  note", "-" * (len(head) + 6)]
    for row in results.rows:
        cells = [_cell(getattr(row, attr), w, i > 1) for i, (_, w, attr) in enumerate(COLUMNS)]
        lines.append(" ".join(cells) + "  " + row.note)
    lines += ["", "targets (gateway vs bare, same run, same core):"]
    width = max(len(c.target) for c in checks)
    for c in checks:
        verdict = "info" if c.info else {True: "PASS", False: "FAIL", None: "n/a "}[c.passed]
        lines.append(f"  {verdict}  {c.target:<{width}}  {c.measured}  (limit {c.limit})")
    return "\n".join(lines)


def _cell(value: object, width: int, right: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        text = "-"
    elif isinstance(value, float):
        text = f"{value:.0f}" if abs(value) >= 100 else f"{value:.2f}"
    else:
        text = str(value)
    return f"{text:>{width}}" if right else f"{text:<{width}}"


def write_json(results: Results, checks: list[Check], directory: Path) -> list[Path]:
    """``latest.json`` and a timestamped copy, so that runs can be compared."""
    directory.mkdir(parents=True, exist_ok=True)
    doc = {
        "meta": results.meta,
        "rows": [dataclasses.asdict(r) for r in results.rows],
        "checks": [dataclasses.asdict(c) for c in checks],
    }
    text = json.dumps(_finite(doc), indent=2, ensure_ascii=False) + "\n"
    stamp = time.strftime("%Y%m%d-%H%M%S")
    paths = [directory / "latest.json", directory / f"{stamp}.json"]
    for path in paths:
        path.write_text(text)
    return paths


def _finite(value: object) -> object:
    """NaN and infinity are not JSON: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
