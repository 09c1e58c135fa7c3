"""Faults at moments the code under test did not choose: a seeded schedule of SIGKILLs and
SIGSTOPs over the processes of a running `surveyor run`, the handler included.

The schedule is a function of the seed alone, so a failing run is replayed by its seed. Each
target is hit once before any is hit twice. A stopped process is continued after `stop_s`
(long enough, at 10 s, for the handler to declare it dead and for it to come back as a stalled
process does); a killed one is restarted by the launcher. `inflict` runs the schedule against
whatever process holds each name at that moment (the current incarnation).
"""

from __future__ import annotations

import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

STOP_S = 10.0


@dataclass(frozen=True)
class Fault:
    at_s: float
    target: str
    kind: Literal["kill", "stop"]


@dataclass
class Inflicted:
    fault: Fault
    pid: int | None
    wall: float = field(default_factory=time.time)


def schedule(seed: int, targets: list[str], faults: int, window_s: tuple[float, float],
             stop_fraction: float = 0.3, stop_s: float = STOP_S) -> list[Fault]:
    """`faults` faults spread over `window_s` (seconds after the start); no target is hit again
    while it is stopped."""
    rng = random.Random(seed)
    names: list[str] = []
    while len(names) < faults:
        names += rng.sample(targets, len(targets))
    start, end = window_s
    times = sorted(rng.uniform(start, end) for _ in range(faults))
    planned: list[Fault] = []
    busy_until: dict[str, float] = {}
    for at, name in zip(times, names[:faults]):
        if busy_until.get(name, -1.0) > at:
            name = next((t for t in rng.sample(targets, len(targets)) if busy_until.get(t, -1.0) <= at), name)
        kind = "stop" if rng.random() < stop_fraction and name != "handler" else "kill"
        busy_until[name] = at + (stop_s if kind == "stop" else 2.0)
        planned.append(Fault(round(at, 2), name, kind))
    return planned


def children(parent: int) -> dict[str, int]:
    """The launcher's children by Surveyor name (`handler`, or a service's `--name`)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) != parent:
            continue
        words = [w.decode(errors="replace") for w in argv]
        if "handler" in words:
            found["handler"] = int(entry.name)
        elif "--name" in words:
            found[words[words.index("--name") + 1]] = int(entry.name)
    return found


def inflict(launcher_pid: int, faults: list[Fault], stop_s: float = STOP_S,
            stopping: threading.Event | None = None) -> list[Inflicted]:
    """Run the schedule (times from now); returns what was done to which pid."""
    started = time.monotonic()
    done: list[Inflicted] = []
    for fault in faults:
        while time.monotonic() - started < fault.at_s:
            if stopping is not None and stopping.is_set():
                return done
            time.sleep(0.05)
        pid = children(launcher_pid).get(fault.target)
        if pid is not None:
            try:
                os.kill(pid, signal.SIGKILL if fault.kind == "kill" else signal.SIGSTOP)
            except ProcessLookupError:
                pid = None
            else:
                if fault.kind == "stop":
                    threading.Timer(stop_s, _continue, (pid,)).start()
        done.append(Inflicted(fault, pid))
    return done


def _continue(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass
