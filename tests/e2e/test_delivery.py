"""Frames through source -> 2 workers -> writer as real processes: exactly once, also when a
worker is killed, and load-balanced by speed."""

from __future__ import annotations

import os
import signal

import h5py
import numpy as np
import pytest

from libs.common import client
from libs.simulation.synthetic import frame_number_of
from tests.conftest import curve_keys, synthetic_pipeline, wait_for

pytestmark = pytest.mark.slow


def frames_in_file(path) -> np.ndarray:
    """Frame numbers as read back from the pixels, after checking slot i holds frame i."""
    with h5py.File(path, "r") as f:
        data = f["entry_1/data_1/data"][...]
        numbers = f["entry_1/data_1/frame_number"][...]
    from_pixels = np.array([frame_number_of(frame) for frame in data])
    np.testing.assert_array_equal(numbers, np.arange(len(numbers)))
    np.testing.assert_array_equal(from_pixels, numbers)
    np.testing.assert_array_equal(data[:, -1, -1], numbers % 251)
    return numbers


def test_2000_frames_arrive_exactly_once(tmp_path, start_run):
    run = start_run(synthetic_pipeline(tmp_path, frames=2000), "--simulate")
    code, output = run.finish()
    assert code == 0, output
    scan = run.summary()["scans"][0]
    assert scan["frames_received"] == scan["frames_written"] == 2000, scan
    assert scan["frames_lost"] == 0
    assert len(frames_in_file(scan["outputs"][0])) == 2000
    stages = run.summary()["stages"]
    assert stages["worker"]["frames_in"] == 2000 and stages["worker"]["processes"] == 2


def test_killed_worker_loses_nothing_and_is_restarted(tmp_path, start_run):
    # Paced so that the scan outlasts the handler's detection of the death (its liveness), even
    # when the killed process held no frame and the others finish the scan without waiting for it.
    run = start_run(synthetic_pipeline(tmp_path, frames=2000, rate_hz=200), "--simulate")
    run.wait_ready(4)
    victim = wait_for(lambda: (s := run.service("worker.1"))["frames_in"] >= 300 and s, 30,
                      "worker.1 to be busy")
    os.kill(victim["pid"], signal.SIGKILL)
    handler = run.pipeline.handler
    down = run.feed.wait("service_down", timeout_s=2 * handler.heartbeat_s * handler.liveness + 2,
                         instance=victim["instance"])
    assert "heartbeat" in down["message"]
    code, output = run.finish()
    assert code == 0, output
    summary = run.summary()
    scan = summary["scans"][0]
    assert scan["frames_written"] == 2000 and scan["frames_lost"] == 0, scan
    assert len(frames_in_file(scan["outputs"][0])) == 2000
    assert summary["restarts"]["worker.1"] >= 1


def test_slow_worker_gets_fewer_frames(tmp_path, start_run):
    """Over CURVE, with one worker slowed by an operator's key on its own port (the one change a
    service takes other than from its handler)."""
    host, operator = curve_keys(tmp_path / "keys")
    pipeline = synthetic_pipeline(tmp_path, frames=600, worker_params="{ delay_s = 0.002 }", keys=host.directory)
    run = start_run(pipeline, "--scans", "1")
    run.wait_ready(4)
    slow = run.service("worker.2")
    reply = client.call(slow["command_endpoint"], "configure", {"params": {"delay_s": 0.02}},
                        keys=operator, server_key=slow["server_key"])
    assert reply.ok and reply.result["params"]["delay_s"] == 0.02
    told = run.feed.wait("operator_command", service="worker.2")
    assert told["operator"] == "operator" and told["args"]["params"]["delay_s"] == 0.02
    assert run.ctl("start_scan", {"scan_id": "balance", "n_frames": 600}).ok
    finished = run.feed.wait("scan_finished", timeout_s=60)
    code, output = run.finish()
    assert code == 0, output
    assert finished["summary"]["stages"]["worker"]["frames_in"] == 600
    slow_frames = finished["services"]["worker.2"]["frames_in"]
    assert slow_frames + finished["services"]["worker.1"]["frames_in"] == 600
    assert slow_frames < 0.25 * 600, f"the 10x slower worker got {slow_frames} of 600 frames"
