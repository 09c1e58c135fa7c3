"""Chaos: SIGKILLs and 10 s SIGSTOPs at seeded random moments over every kind of process, the
handler included, during a scan; every frame must be in the outputs exactly once and the summary
must say what the files hold. CI runs one short schedule per pipeline; `bench/chaos.py` runs long
ones (`--kills N --minutes M`)."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import chaos
from tests.conftest import synthetic_pipeline

SEED = int(os.environ.get("SURVEYOR_CHAOS_SEED", "11"))


def frames_on_disk(out: Path, stem: str) -> list[int]:
    """Every frame number in every file of the scan (continuations too), repeats kept."""
    numbers: list[int] = []
    for path in sorted(out.glob(f"{stem}*.cxi")):
        with h5py.File(path, "r", swmr=True) as f:
            found = f["entry_1/data_1/frame_number"][()]
        numbers += [int(n) for n in found if n >= 0]
    return numbers


def run_with_faults(run, targets: list[str], faults: int, window_s: tuple[float, float]) -> list[chaos.Inflicted]:
    run.wait_ready(len(targets) - 1)
    plan = chaos.schedule(SEED, targets, faults, window_s)
    stopping = threading.Event()
    done: list[chaos.Inflicted] = []
    worker = threading.Thread(target=lambda: done.extend(chaos.inflict(run.process.pid, plan, stopping=stopping)))
    worker.start()
    try:
        code, output = run.finish(timeout_s=240)
    finally:
        stopping.set()
        worker.join()
    assert code == 0, f"{plan}\n{output[-4000:]}"
    return done


@pytest.mark.slow
def test_synthetic_scan_survives_kills_and_stops_of_every_process(tmp_path, start_run):
    frames = 3000
    run = start_run(synthetic_pipeline(tmp_path, frames=frames, rate_hz=200, shape=(32, 32)), "--simulate")
    targets = ["handler", "receiver.1", "worker.1", "worker.2", "writer.1"]
    done = run_with_faults(run, targets, faults=6, window_s=(1.0, 11.0))
    assert sum(d.pid is not None for d in done) >= 5, done
    numbers = frames_on_disk(run.out, "t_0001_raw")
    assert sorted(numbers) == list(range(frames)), f"{len(numbers)} on disk, {len(set(numbers))} distinct"
    [scan] = run.summary()["scans"]
    assert scan["frames_written"] == frames and scan["frames_lost"] == 0 and scan["losses"] == []
