"""``gateway serve --workers N``: N gateway processes on one port (SO_REUSEPORT).

The parent starts the workers, passes SIGTERM, SIGINT and SIGHUP on to them, and exits when
they have: with 0 if all stopped cleanly, else 1 (after stopping the others when one fails,
so that systemd restarts the whole set). Limits are shared through Redis, which is why
``[cluster] redis_url`` is required; usage goes to the one configured database.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from types import FrameType

log = logging.getLogger("gateway")


def run_workers(count: int, config: str, host: str, port: int, log_level: str | None) -> int:
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    for index in range(count):
        command = [sys.executable, "-m", "gateway", "serve", "--config", config,
                   "--host", host, "--port", str(port), "--worker", str(index)]  # fmt: skip
        if log_level:
            command += ["--log-level", log_level]
        env = {**os.environ, "GATEWAY_WORKER": str(index)}
        children.append(subprocess.Popen(command, env=env))
    log.info("started %d workers on %s:%d", count, host, port)
    failed = False
    while any(child.poll() is None for child in children):
        for child in children:
            code = child.poll()
            if code is not None and code != 0 and not stopping and not failed:
                failed = True
                log.error("worker %d exited with %d: stopping the others", child.pid, code)
                forward(signal.SIGTERM, None)
        time.sleep(0.2)
    # a worker stopped by our SIGTERM before it had set up its own handler died of it
    clean = (0, -signal.SIGTERM, -signal.SIGINT) if stopping else (0,)
    return 1 if failed or any(child.returncode not in clean for child in children) else 0
