"""The crystallography writer killed mid-scan (SIGKILL), real processes: its successor continues in
`<scan_id>.part2.cxi` from the aggregates the first part holds, so the last part's class sums,
frame counts and virtual powder have every frame's contribution exactly once, and the parts
together hold every frame's record once."""

from __future__ import annotations

import os
import signal

import h5py
import numpy as np
import pytest

from libs.common import client
from libs.simulation.sx import SxScan
from services.peak_worker.params import Params
from tests.conftest import free_port, wait_for
from tests.crystallography.test_chain import PIPELINE, overrides, recompute
from tests.field_tools import hdf5_110_reads, validate_cxi

pytestmark = pytest.mark.slow


def test_a_killed_writer_s_successor_has_every_frame_in_the_sums_exactly_once(start_run):
    frames = 160
    run = start_run(PIPELINE, "--simulate", "--frames", str(frames), "--rate", "25", overrides=overrides(free_port()))
    run.wait_ready(services=5)

    def writer_status():
        writer = next((s for s in run.ctl("status").result["services"]
                       if s["name"] == "writer.1" and s["state"] == "up"), None)
        return writer and (writer, client.call(writer["command_endpoint"], "status", timeout_s=5).result)
    victim, status = wait_for(lambda: (w := writer_status()) and w[1]["stats"]["scan"]["written"] >= 50 and w,
                              90, "the writer to have records on disk")
    os.kill(victim["pid"], signal.SIGKILL)
    code, output = run.finish(timeout_s=240)
    assert code == 0, output[-3000:]
    summary = run.summary()
    scan = summary["scans"][0]
    assert summary["restarts"]["writer.1"] >= 1
    assert scan["frames_lost"] == 0 and scan["frames_written"] == frames, scan
    parts = sorted((p for p in scan["outputs"] if p.endswith(".cxi") and not p.endswith("_raw.cxi")),
                   key=lambda p: (len(p), p))
    assert [os.path.basename(p) for p in parts] == [f"{scan['scan_id']}.cxi", f"{scan['scan_id']}.part2.cxi"]

    params = Params.model_validate(run.pipeline.stages["peak_worker"].params)
    sim = SxScan(count=frames, layout="1m", hit_fraction=0.5, scan_id=scan["scan_id"])
    expected = recompute(sim, params, range(frames))
    hit_numbers = sorted(n for n, (_, hit, _) in expected.items() if hit)

    records, hit_rows = [], []
    for path in parts:
        with h5py.File(path, "r", swmr=True) as f:
            records += f["entry_1/result_2/frame_number"][()].tolist()
            hit_rows += f["entry_1/result_1/frame_number"][()].tolist()
    assert sorted(records) == list(range(frames)), "every record once over the parts"
    assert sorted(hit_rows) == hit_numbers

    validate_cxi(parts[-1])  # a continuation is a CXI file of its own
    hdf5_110_reads(parts[-1])
    with h5py.File(parts[-1], "r") as f:
        entry = f["entry_1"]
        assert list(entry["previous_parts"].asstr()) == [os.path.basename(parts[0])]
        assert entry["image_1/n_frames"][()] == len(hit_numbers)
        assert entry["image_2/n_frames"][()] == frames - len(hit_numbers)
        hits_sum = sum(expected[n][2].astype(np.float64) for n in hit_numbers)
        misses_sum = sum(expected[n][2].astype(np.float64) for n in range(frames) if n not in hit_numbers)
        np.testing.assert_allclose(entry["image_1/data"][()], hits_sum, rtol=1e-12)
        np.testing.assert_allclose(entry["image_2/data"][()], misses_sum, rtol=1e-12)
        assert sorted(entry["aggregates/summed_frames"][()].tolist()) == list(range(frames))
        powder = np.zeros((1024, 1024))
        for n in hit_numbers:
            p = expected[n][0]
            np.add.at(powder, (np.rint(p.ss).astype(int), np.rint(p.fs).astype(int)), p.intensity)
        np.testing.assert_allclose(entry["image_3/data"][()], powder, rtol=1e-6)
        # Both copies of the aggregates hold the final values once the scan has ended.
        np.testing.assert_array_equal(entry["aggregates/slot_1/hits"][()], entry["image_1/data"][()])
        np.testing.assert_array_equal(entry["aggregates/slot_1/powder"][()], entry["image_3/data"][()])
