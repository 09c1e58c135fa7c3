"""Chaos: SIGKILLs and 10 s SIGSTOPs at seeded random moments over every kind of process, the
handler included, during a scan; every frame must be in the outputs exactly once and the summary
must say what the files hold. CI runs one short schedule per pipeline; `bench/chaos.py` runs long
ones (`--kills N --minutes M`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests import chaos
from tests.conftest import free_port, ingest_pipeline, synthetic_pipeline, wait_for

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


@pytest.mark.slow
def test_a_receiver_killed_during_a_detector_stream_reports_exactly_what_is_missing(tmp_path, start_run):
    """A detector does not send again what a dead receiver had in its buffers: that loss is
    real, so it must be counted, exactly, with the reason, and the run must exit 1."""
    source = f"tcp://127.0.0.1:{free_port()}"
    frames = 1500
    run = start_run(ingest_pipeline(tmp_path, protocol="stream1", source=source), "--scans", "1")
    run.wait_ready(2)
    detector = subprocess.Popen([sys.executable, "-m", "libs.cli.main", "simulate", "synthetic", "--protocol",
                                 "stream1", "--bind", source, "--frames", str(frames), "--rate", "300",
                                 "--series-id", "7"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        victim = wait_for(lambda: (s := run.service("receiver.1"))["frames_out"] >= 300 and s, 30, "frames")
        os.kill(victim["pid"], signal.SIGKILL)
        code, output = run.finish(timeout_s=120)
    finally:
        detector.kill()
    [scan] = run.summary()["scans"]
    on_disk = frames_on_disk(run.out, "series_7_raw")
    assert len(on_disk) == len(set(on_disk)), "a frame written twice"
    missing = frames - len(set(on_disk))
    assert scan["frames_expected"] == frames and scan["frames_written"] == len(set(on_disk))
    assert scan["frames_lost"] == missing, (scan, missing)
    assert (code == 1) == (missing > 0), output[-2000:]
    if missing:
        assert any("receiver.1" in reason for reason in scan["losses"]), scan["losses"]
