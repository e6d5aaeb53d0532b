"""``--profile``: sample the gateway with py-spy while it is measured, and say where time goes.

py-spy writes collapsed stacks (``frame;frame;... count``, one stack a line), which any
flamegraph tool reads; the summary lists the functions with the most samples, by their own
time and with what they call. Sampling costs the gateway a little: profiled numbers run slow.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import Counter
from pathlib import Path


async def record(pid: int, seconds: float, out: Path) -> asyncio.subprocess.Process | None:
    """Start py-spy on `pid` for `seconds`; None when py-spy is not installed."""
    py_spy = shutil.which("py-spy")
    if py_spy is None:
        return None
    argv = [py_spy, "record", "--pid", str(pid), "--duration", str(max(1, round(seconds)))]
    argv += ["--rate", "250", "--nonblocking", "--format", "raw", "--output", str(out)]
    return await asyncio.create_subprocess_exec(
        *argv, stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL
    )


def summarize(path: Path, top: int = 12) -> str:
    """The functions with the most samples, by own time and including callees."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [_short(f) for f in stack.split(";")]
        own[frames[-1]] += n
        for frame in set(frames):
            inclusive[frame] += n
    if not total:
        return f"{path.name}: no samples (py-spy needs ptrace: root or CAP_SYS_PTRACE)"
    lines = [f"{path.name}: {total} samples", "  top by own time:"]
    lines += [f"    {n / total * 100:5.1f}%  {f}" for f, n in own.most_common(top)]
    # asyncio resumes coroutines from C, so stacks are cut at task steps: a lower bound.
    lines.append("  project code including callees (at least):")
    ours = [(f, n) for f, n in inclusive.most_common() if _ours(f)][:top]
    lines += [f"    {n / total * 100:5.1f}%  {f}" for f, n in ours]
    return "\n".join(lines)


def _ours(frame: str) -> bool:
    return ("(gateway/" in frame or "(bench/" in frame) and "__main__" not in frame


def _short(frame: str) -> str:
    """'handle (aiohttp/web_protocol.py:512)' -> 'handle (aiohttp/web_protocol.py)'."""
    name, _, where = frame.partition(" (")
    where = where.rstrip(")").rsplit(":", 1)[0]
    for marker in ("site-packages/", "/lib/python3", "/work/"):
        if marker in where:
            where = where.split(marker, 1)[1]
    return f"{name} ({where})" if where else name
