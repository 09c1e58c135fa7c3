"""`surveyor status`: the handler's status as console tables, once or live."""

from __future__ import annotations

import json
from typing import Any

import zmq
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table

from libs.common import security

console = Console()


def render(status: dict[str, Any]) -> Group:
    services = Table(title=f"pipeline {status['pipeline']} (epoch {status['epoch']})")
    for column in ("service", "stage", "host", "pid", "state", "heartbeat s", "in", "out", "queue", "busy s"):
        services.add_column(column, justify="right" if column in ("pid", "in", "out", "queue") else "left")
    for s in status["services"]:
        colour = "green" if s["state"] == "up" else "red"
        services.add_row(s["name"], s["stage"], s["host"], str(s["pid"]), f"[{colour}]{s['state']}",
                         f"{s['heartbeat_age_s']:.1f}", str(s["frames_in"]), str(s["frames_out"]),
                         str(s["queue_depth"]), f"{s['busy_s']:.1f}")
    parts: list[Any] = [services]
    scan = status.get("scan")
    if scan:
        table = Table(title=f"scan {scan['scan_id']} ({scan['state']}, {scan['n_frames'] or '?'} frames expected)")
        for column in ("stage", "in", "out", "written", "rejected"):
            table.add_column(column)
        for stage, counts in scan["stages"].items():
            table.add_row(stage, *(str(counts[k]) for k in ("frames_in", "frames_out", "written", "rejected")))
        parts.append(table)
    else:
        parts.append("no scan running")
    return Group(*parts)


def show(status: dict[str, Any]) -> None:
    # Piped into a file or another program, keep every column whole.
    (console if console.is_terminal else Console(width=200)).print(render(status))


def watch(endpoint: str) -> int:
    socket = zmq.Context.instance().socket(zmq.SUB)
    security.connect_as_client(socket, security.configured())
    socket.setsockopt(zmq.SUBSCRIBE, b"status")
    socket.connect(endpoint)
    console.print(f"following {endpoint} (Ctrl-C to stop)")
    try:
        with Live(console=console, auto_refresh=False) as live:
            while True:
                if socket.poll(5000):
                    live.update(render(json.loads(socket.recv_multipart()[1])), refresh=True)
                else:
                    live.update(f"no status from {endpoint} for 5 s: is the handler running?", refresh=True)
    except KeyboardInterrupt:
        return 0
    finally:
        socket.close(linger=0)
