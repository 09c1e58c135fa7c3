"""What the benchmarks share: `surveyor run` of a pipeline file as a quiet child process."""

from __future__ import annotations

import os
import subprocess
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
