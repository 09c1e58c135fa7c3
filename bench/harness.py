"""What the benchmarks share: `surveyor run` of a pipeline file as a quiet child process."""

from __future__ import annotations

import os
import subprocess
from collections import Counter
import sys
from pathlib import Path

from libs.common import client
from libs.common.pipeline import HandlerConfig, load
from tests.conftest import wait_for


def start(path: Path, directory: Path) -> tuple[subprocess.Popen, HandlerConfig, client.StatusFeed]:
    """`surveyor run PATH --scans 1`, its handler endpoints, and a subscriber to its events."""
    handler = load(path).handler
    env = {**os.environ, "SURVEYOR_LOG_DIR": str(directory / "logs")}
    run = subprocess.Popen([sys.executable, "-m", "libs.cli.main", "run", str(path), "--scans", "1",
                            "--out", str(directory / "out")], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.DEVNULL)
    return run, handler, client.StatusFeed(handler.status, topics=(b"event",))


def wait_up(handler: HandlerConfig, processes: int) -> list[dict]:
    """The status of every service once `processes` of them are up."""
    def up() -> list[dict]:
        try:
            services = client.call(handler.command, "status", timeout_s=1).result["services"]
        except client.NoReply:
            return []
        return services if sum(s["state"] == "up" for s in services) == processes else []
    return wait_for(up, 60, "the pipeline to start")


def cpu_by_thread(pid: int) -> Counter[str]:
    """User and system CPU seconds of a process so far by kind of thread: `main` (the event loop),
    `zmq_io` (ZeroMQ's I/O threads) and `other` (the hooks thread, ZeroMQ's reaper, numba's)."""
    seconds: Counter[str] = Counter()
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        except OSError:  # the thread ended
            continue
        name, fields = stat[stat.index("(") + 1:stat.rindex(")")], stat[stat.rindex(")") + 2:].split()
        kind = "main" if int(tid) == pid else "zmq_io" if name.startswith("ZMQbg/IO") else "other"
        seconds[kind] += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return seconds
