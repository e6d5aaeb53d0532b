"""The processes under test: start (pinned to a core), wait until ready, read /proc, stop."""

from __future__ import annotations

import compileall
import contextlib
import ctypes
import importlib.util
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Server:
    """A running server process: its port and how long it took from spawn to accepting."""

    name: str
    proc: subprocess.Popen[bytes]
    port: int
    ready_s: float
    log: Path

    def cpu_seconds(self) -> float:
        """User + system CPU time of the whole process (all threads), from /proc/PID/stat."""
        stat = Path(f"/proc/{self.proc.pid}/stat").read_text()
        fields = stat[stat.rindex(")") + 2 :].split()
        return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS

    def rss_mb(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


class Tree(Server):
    """A server that runs as a parent and its child processes (`gateway serve --workers N`):
    CPU and memory are summed over all of them."""

    def pids(self) -> list[int]:
        pid = self.proc.pid
        try:
            children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        except OSError:
            children = []
        return [pid, *(int(c) for c in children)]

    def cpu_seconds(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError, ValueError, IndexError):
                stat = Path(f"/proc/{pid}/stat").read_text()
                fields = stat[stat.rindex(")") + 2 :].split()
                total += (int(fields[11]) + int(fields[12])) / CLOCK_TICKS
        return total

    def rss_mb(self) -> float:
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total


@dataclass(frozen=True)
class Snapshot:
    """What the bench reads around a measurement; subtract two to get the deltas."""

    cpu: float  # the server's CPU seconds
    core_busy: float  # CPU seconds the server's core spent on anything
    overflows: int  # connections dropped by full accept queues (system-wide)
    time: float

    def __sub__(self, before: Snapshot) -> Snapshot:
        return Snapshot(
            self.cpu - before.cpu,
            self.core_busy - before.core_busy,
            self.overflows - before.overflows,
            self.time - before.time,
        )

    @property
    def others_percent(self) -> float:
        """How busy the server's core was with other processes, in percent (a noise gauge)."""
        return max(0.0, self.core_busy - self.cpu) / self.time * 100 if self.time else 0.0


def snapshot(server: Server, core: int | None) -> Snapshot:
    return Snapshot(
        server.cpu_seconds(), core_busy_seconds(core), listen_overflows(), time.perf_counter()
    )


def core_busy_seconds(core: int | None) -> float:
    """Busy time (user, nice, system, irq, softirq, steal) of one core, or of all of them."""
    name = "cpu " if core is None else f"cpu{core} "
    for line in Path("/proc/stat").read_text().splitlines():
        if line.startswith(name):
            v = [int(x) for x in line.split()[1:9]]
            return (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / CLOCK_TICKS
    return 0.0


def usable_cores() -> list[int]:
    return sorted(os.sched_getaffinity(0))


def pin_argv(core: int | None) -> list[str]:
    """``taskset -c CORE`` when pinning is on and taskset exists."""
    if core is None or shutil.which("taskset") is None:
        return []
    return ["taskset", "-c", str(core)]


def pin_self(core: int | None) -> None:
    if core is not None:
        os.sched_setaffinity(0, {core})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def start(name: str, argv: list[str], port: int, core: int | None, log: Path) -> Server:
    """Spawn `argv` pinned to `core` and wait until its port accepts connections."""
    with log.open("wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen(
            [*pin_argv(core), *argv],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
    deadline = started + 20
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with {proc.returncode}: {_tail(log)}")
        if _accepting(port):
            return Server(name, proc, port, time.perf_counter() - started, log)
        if time.perf_counter() > deadline:
            proc.kill()
            raise RuntimeError(f"{name} did not accept connections within 20 s: {_tail(log)}")
        time.sleep(0.002)


def python_argv(module: str, *args: str) -> list[str]:
    return [sys.executable, "-m", module, *args]


def compile_bytecode(*modules: str) -> str:
    """Write the modules' bytecode, as `pip install` does for an installed package, so that
    start-up is timed as an operator's service starts, not compiling every source file (an
    editable checkout under PYTHONDONTWRITEBYTECODE=1 would compile ~50 files per start)."""
    done = []
    for name in modules:
        spec = importlib.util.find_spec(name)
        dirs = spec.submodule_search_locations if spec is not None else None
        if dirs and all(compileall.compile_dir(d, quiet=2) for d in dirs):
            done.append(name)
    return f"compiled for {', '.join(done)}" if done else "not compiled: compiled at each start"


def raise_fd_limit(wanted: int = 65536) -> int:
    """Raise the open-file limit (inherited by the servers) as far as allowed; the new limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for limit in (max(wanted, hard), hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))
            return limit
        except (ValueError, OSError):
            continue
    return soft


def listen_overflows() -> int:
    """The kernel's count of connections dropped because an accept queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return 0
    for names, values in zip(lines[::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], values.split()[1:], strict=False))
            return int(table.get("ListenOverflows", 0))
    return 0


def _accepting(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.1):
            return True
    except OSError:
        return False


def _die_with_parent() -> None:
    """Linux PR_SET_PDEATHSIG: a killed bench leaves no server behind."""
    with contextlib.suppress(OSError, AttributeError):  # not Linux: no such guard
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-2000:]
    except OSError:
        return ""
