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

from libs.simulation.sx import SxScan
from services.peak_worker.params import Params
from tests import chaos
from tests.crystallography.test_chain import recompute
from tests.conftest import free_endpoints, free_port, ingest_pipeline, synthetic_pipeline, wait_for
from tests.e2e.test_stateful_kills import PTYCHO, SX, UNDISTURBED_NRMSE, small_ptycho

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
    run.wait_ready(sum(1 for name in run.pipeline.stages for _ in range(run.pipeline.stages[name].processes)))
    plan = chaos.schedule(SEED, targets, faults, window_s)
    stopping = threading.Event()
    done: list[chaos.Inflicted] = []
    worker = threading.Thread(target=lambda: done.extend(chaos.inflict(run.process.pid, plan, stopping=stopping)))
    worker.start()
    try:
        code, output = run.finish(timeout_s=180)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"the scan did not end under {plan}; services: {run.diagnose()}") from None
    finally:
        stopping.set()
        worker.join()
    assert code == 0, f"{plan}\n{output[-4000:]}"
    return done


@pytest.mark.slow
@pytest.mark.stalls
def test_synthetic_scan_survives_kills_and_stops_of_every_process(tmp_path, start_run):
    frames = 2200
    run = start_run(synthetic_pipeline(tmp_path, frames=frames, rate_hz=200, shape=(32, 32)), "--simulate")
    targets = ["handler", "receiver.1", "worker.1", "worker.2", "writer.1"]
    done = run_with_faults(run, targets, faults=6, window_s=(1.0, 8.0))
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


def check_schedule_hit(done: list[chaos.Inflicted], targets: list[str]) -> None:
    hit = {d.fault.target for d in done if d.pid is not None}
    assert hit == set(targets), f"not every kind of process was hit: {done}"


@pytest.mark.slow
@pytest.mark.stalls
def test_ptychography_scan_survives_kills_and_stops_of_every_stage(start_run):
    frames, n_dark = 160, 10
    run = start_run(PTYCHO, "--simulate", "--frames", str(frames), "--rate", "10", overrides=small_ptycho(n_dark))
    targets = ["handler", "dark_worker.1", "frame_worker.1", "frame_worker.2", "image_worker.1",
               "reconstruction_worker.1", "writer.1"]
    done = run_with_faults(run, targets, faults=len(targets), window_s=(0.5, 14.0))
    check_schedule_hit(done, targets)
    [scan] = run.summary()["scans"]
    assert scan["frames_lost"] == 0 and scan["losses"] == [] and scan["frames_written"] == frames, scan
    numbers = frames_on_disk(run.out, scan["scan_id"])
    assert sorted(numbers) == list(n_dark + np.arange(frames)), "every clean frame once, over every part"
    assert scan["nrmse"] <= 1.1 * UNDISTURBED_NRMSE[frames, n_dark], scan["nrmse"]


@pytest.mark.slow
@pytest.mark.stalls
def test_crystallography_scan_survives_kills_and_stops_of_every_stage(start_run):
    frames = 220
    run = start_run(SX, "--simulate", "--frames", str(frames), "--rate", "20", overrides=(
        *free_endpoints(), f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{free_port()}"',
        "simulation.params={layout='1m', hit_fraction=0.5}", "stages.peak_worker.params.sums_interval_s=1"))
    targets = ["handler", "peak_worker.1", "peak_worker.2", "writer.1", "hit_server.1"]
    done = run_with_faults(run, targets, faults=len(targets), window_s=(0.5, 9.0))
    check_schedule_hit(done, targets)
    [scan] = run.summary()["scans"]
    assert scan["frames_lost"] == 0 and scan["losses"] == [] and scan["frames_written"] == frames, scan
    params = Params.model_validate(run.pipeline.stages["peak_worker"].params)
    expected = recompute(SxScan(count=frames, layout="1m", hit_fraction=0.5, scan_id=scan["scan_id"]), params,
                         range(frames))
    found: dict[int, int] = {}
    for path in sorted(run.out.glob(f"{scan['scan_id']}.*cxi")):
        with h5py.File(path, "r", swmr=True) as f:
            every = f["entry_1/result_2"]
            for number, n_peaks in zip(every["frame_number"][()], every["n_peaks"][()], strict=True):
                assert number not in found, f"frame {number} twice"
                found[int(number)] = int(n_peaks)
    assert found == {n: len(peaks) for n, (peaks, _, _) in expected.items()}, "the same peaks as undisturbed"
    last = sorted(run.out.glob(f"{scan['scan_id']}.*cxi"))[-1]
    with h5py.File(last, "r", swmr=True) as f:
        counted = int(f["entry_1/image_1/n_frames"][()] + f["entry_1/image_2/n_frames"][()])
    assert counted == frames, "the class sums count every frame once"
