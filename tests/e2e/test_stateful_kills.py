"""Stateful stages killed (SIGKILL) mid-scan, real processes: the successor has every frame's
contribution exactly once. The dark stage during the darks (and after the calibration, with a frame
worker that needs it again), the reconstruction mid-scan (against the same scan undisturbed), a peak
process mid-scan (the class sums count every frame once); and frames held for a calibration that
never comes are given up on with an event, never a silent hang."""

from __future__ import annotations

import os
import random
import signal
from typing import Any, Callable

import h5py
import numpy as np
import pytest

from libs.common import client
from libs.crystallography.hits import CLASSES
from libs.simulation.sx import SxScan
from tests.conftest import REPO, free_endpoints, free_port, wait_for
from tests.crystallography.test_science import finder_for

pytestmark = pytest.mark.slow

PTYCHO = REPO / "pipelines" / "ptychography.toml"
SX = REPO / "pipelines" / "crystallography.toml"
SMALL = ("stages.frame_worker.params.crop=256", "stages.frame_worker.params.size=64")
UNDISTURBED_NRMSE = {(100, 40): 0.033, (160, 10): 0.026, (144, 10): 0.028}
"""(frames, darks) -> NRMSE of the scan run undisturbed (`surveyor run pipelines/ptychography.toml
--simulate --frames F` with these overrides), measured: it varies by about 3 % between runs; a run
with a kill must come within 10 % of it."""


def small_ptycho(n_dark: int) -> tuple[str, ...]:
    return (*free_endpoints(), f"simulation.params={{n_dark={n_dark}, size=64, raw_shape=[320, 320]}}", *SMALL)


def live_stats(run, name: str) -> dict[str, Any] | None:
    """A process's own counters, asked at its command port (not the last heartbeat's)."""
    try:
        service = run.service(name)
        stats = client.call(service["command_endpoint"], "status", timeout_s=2).result["stats"]
    except (StopIteration, client.NoReply):
        return None
    return {"pid": service["pid"], **stats}


def kill_when(run, name: str, condition: Callable[[dict[str, Any]], bool], timeout_s: float = 60) -> dict[str, Any]:
    """SIGKILL process `name` as soon as its live counters satisfy `condition`; what they were."""
    stats = wait_for(lambda: (s := live_stats(run, name)) is not None and condition(s) and s, timeout_s,
                     f"{name} at the moment to kill it")
    os.kill(stats["pid"], signal.SIGKILL)
    return stats


def log_of(run, name: str) -> str:
    return (run.logs / f"{name}.log").read_text()


def check_ptycho_scan(run, frames: int, n_dark: int) -> dict[str, Any]:
    """Every frame in the CXI file once, every position in the reconstruction once, nothing lost."""
    [scan] = run.summary()["scans"]
    assert scan["frames_lost"] == 0 and scan["frames_rejected"] == 0, scan
    with h5py.File(next(p for p in scan["outputs"] if p.endswith(".cxi")), "r") as f:
        np.testing.assert_array_equal(f["entry_1/data_1/frame_number"][()], n_dark + np.arange(frames))
        process = f["entry_1/image_1/process_1"]
        assert process["frames_used"][()] == frames
        np.testing.assert_array_equal(process["weights"][()], np.ones(frames))
        dark = f["entry_1/instrument_1/detector_1/data_dark"][()]
        assert dark.mean() == pytest.approx(1000, abs=5)  # the simulated offset, from every dark
    return scan


def test_dark_worker_killed_during_the_darks_its_successor_gets_every_dark(start_run):
    frames, n_dark = 100, 40
    run = start_run(PTYCHO, "--simulate", "--frames", str(frames), "--rate", "20", overrides=small_ptycho(n_dark))
    run.wait_ready(services=7)
    at_kill = kill_when(run, "dark_worker.1", lambda s: 5 <= s["scan"]["frames_in"] < n_dark)
    code, output = run.finish(timeout_s=150)
    assert code == 0, output[-3000:]
    scan = check_ptycho_scan(run, frames, n_dark)
    print(f"dark worker killed at {at_kill['scan']['frames_in']} of {n_dark} darks: NRMSE {scan['nrmse']:.4f}")
    assert scan["nrmse"] <= 1.1 * UNDISTURBED_NRMSE[frames, n_dark]
    assert run.summary()["restarts"]["dark_worker.1"] >= 1
    log = log_of(run, "dark_worker.1")
    assert log.count("registered with the handler") >= 2
    # The successor's calibration holds all the darks, its predecessor's included.
    assert f"calibration from {n_dark} darks" in log.split("registered with the handler")[-1], at_kill


def test_dark_worker_killed_after_the_calibration_republishes_it_for_a_frame_worker_that_restarts(start_run):
    frames, n_dark = 160, 10
    run = start_run(PTYCHO, "--simulate", "--frames", str(frames), "--rate", "16", overrides=small_ptycho(n_dark))
    run.wait_ready(services=7)
    # Killed once the calibration is checkpointed (frames in counts darks not yet worked on).
    state = run.out.parent / run.pipeline.state_path
    wait_for(lambda: any(state.glob("scans/*/dark_worker/calibration.npz")), 60, "the calibration checkpointed")
    kill_when(run, "dark_worker.1", lambda s: True)
    wait_for(lambda: "restored from the checkpoint" in log_of(run, "dark_worker.1"), 60, "the calibration restored")
    kill_when(run, "frame_worker.1", lambda s: s["scan"]["frames_in"] >= 5)
    code, output = run.finish(timeout_s=150)
    assert code == 0, output[-3000:]
    scan = check_ptycho_scan(run, frames, n_dark)
    print(f"dark worker killed after the calibration, then a frame worker: NRMSE {scan['nrmse']:.4f}")
    assert scan["nrmse"] <= 1.1 * UNDISTURBED_NRMSE[frames, n_dark]
    log = log_of(run, "frame_worker.1")
    assert log.count("registered with the handler") >= 2 and "calibration_missing" not in log


def test_reconstruction_worker_killed_mid_scan_resumes_from_its_checkpoint(start_run):
    frames, n_dark = 144, 10
    params = ("stages.reconstruction_worker.params.state_interval_s=1",)
    reference = UNDISTURBED_NRMSE[frames, n_dark]
    run = start_run(PTYCHO, "--simulate", "--frames", str(frames), "--rate", "20",
                    overrides=(*small_ptycho(n_dark), *params))
    run.wait_ready(services=7)
    # Killed mid-scan once the solver's state is saved: before it, only frames are there to resume
    # from (on loaded cores the first state can come after half the frames).
    state = run.out.parent / run.pipeline.state_path
    at_kill = kill_when(run, "reconstruction_worker.1", lambda s: s["scan"]["frames_in"] >= frames // 2
                        and any(state.glob("scans/*/reconstruction_worker/solver.npz")))
    code, output = run.finish(timeout_s=150)
    assert code == 0, output[-3000:]
    scan = check_ptycho_scan(run, frames, n_dark)
    log = log_of(run, "reconstruction_worker.1")
    resumed = log.split("registered with the handler")[-1]
    assert "resumed from the checkpoint" in resumed and "iterations of object and probe" in resumed, at_kill
    print(f"reconstruction NRMSE: undisturbed {reference:.4f}, killed at {at_kill['scan']['frames_in']} frames "
          f"{scan['nrmse']:.4f}")
    assert scan["nrmse"] <= 1.1 * reference, (scan["nrmse"], reference)


def test_frames_held_for_a_calibration_that_never_comes_are_given_up_with_an_event(start_run):
    """The dark stage takes no darks here (its edge takes data frames), so no calibration comes."""
    frames, n_dark = 40, 10
    run = start_run(PTYCHO, "--simulate", "--frames", str(frames),
                    overrides=(*small_ptycho(n_dark), 'stages.dark_worker.frames="data"',
                               "stages.frame_worker.params.calibration_timeout_s=3"))
    run.wait_ready(services=7)
    event = run.feed.wait("calibration_missing", timeout_s=60)
    code, output = run.finish(timeout_s=60)
    assert code == 1, output[-3000:]  # something was lost, and the run says so
    assert event["waiting_for"] == "calibration" and event["stage"] == "dark_worker"
    assert event["n_dark"] == n_dark and event["scan_id"] in event["message"] and event["frames_lost"] > 0
    [scan] = run.summary()["scans"]
    assert scan["state"] == "finished" and scan["frames_lost"] == frames + n_dark
    assert any("gave up on" in reason for reason in scan["losses"])


def test_peak_worker_killed_mid_scan_the_class_sums_count_every_frame_once(start_run):
    """Deltas every 0.5 s, the kill at a moment drawn at random (printed): whatever the killed
    process held is summed again elsewhere, each frame once. Its frames re-sent come back in
    one-frame deltas (refused exactly when the writer merged them already, before the
    acknowledgement died with the process), and a delta riding on the record of a re-sent frame
    that the writer already has is merged all the same (the writer's `on_duplicate`)."""
    frames = 120
    kill_at = random.randint(5, 40)  # frames taken by the process (it gets about half the scan)
    run = start_run(SX, "--simulate", "--frames", str(frames), "--rate", "20", overrides=(
        *free_endpoints(), f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{free_port()}"',
        "simulation.params={layout='1m', hit_fraction=0.5}", "stages.peak_worker.params.sums_interval_s=0.5"))
    run.wait_ready(services=5)
    at_kill = kill_when(run, "peak_worker.1", lambda s: s["scan"]["frames_in"] >= kill_at)
    print(f"peak_worker.1 killed after {at_kill['scan']['frames_in']} frames (drawn: {kill_at})")
    code, output = run.finish(timeout_s=150)
    assert code == 0, output[-3000:]
    [scan] = run.summary()["scans"]
    assert scan["frames_lost"] == 0, scan
    assert run.summary()["restarts"]["peak_worker.1"] >= 1, at_kill
    sim = SxScan(count=frames, layout="1m", hit_fraction=0.5, scan_id=scan["scan_id"])
    _, corrections = finder_for(sim)
    with h5py.File(next(p for p in scan["outputs"] if p.endswith(".cxi") and not p.endswith("_raw.cxi")), "r") as f:
        numbers = f["entry_1/result_2/frame_number"][()]
        np.testing.assert_array_equal(np.sort(numbers), np.arange(frames))
        hit = dict(zip(numbers.tolist(), f["entry_1/result_2/hit"][()].astype(bool).tolist(), strict=True))
        sums = {cls: np.zeros(sim.geometry.shape) for cls in (0, 1)}
        for number in range(frames):
            sums[int(hit[number])] += corrections.apply(sim.frame(number))
        for cls, image in ((1, "image_1"), (0, "image_2")):
            assert f[f"entry_1/{image}/n_frames"][()] == sum(1 for h in hit.values() if int(h) == cls), CLASSES[cls]
            np.testing.assert_allclose(f[f"entry_1/{image}/data"][()], sums[cls], rtol=1e-9, atol=1e-6)
    log = log_of(run, "writer.1")
    assert "left out" not in log and "not in them" not in log, at_kill  # no delta refused in part
    print(f"writer: {log.count('merged from a record that came again')} deltas merged from records that came again")
