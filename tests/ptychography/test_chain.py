"""The ptychography pipeline end to end: `surveyor run pipelines/ptychography.toml --simulate` on a
small scan (10 x 10 positions, 320 x 320 raw frames, its geometry chosen from the scan or pinned to
64 x 64 clean frames), real processes."""

from __future__ import annotations

import json
import os
import signal

import h5py
import numpy as np
import pytest
from scipy.constants import electron_volt

from services.reconstruction_worker import device
from tests.conftest import REPO, free_endpoints, wait_for
from tests.field_tools import hdf5_110_reads, ptypy_view, validate_cxi

PIPELINE = REPO / "pipelines" / "ptychography.toml"
SIMULATION = "simulation.params={n_dark=10, size=64, raw_shape=[320, 320]}"
PINNED = ("stages.frame_worker.params.crop=256", "stages.frame_worker.params.size=64")
FRAMES = 100


def run_small(start_run, *args: str, pinned: bool = True):
    return start_run(PIPELINE, "--simulate", "--frames", str(FRAMES), *args,
                     overrides=(*free_endpoints(), SIMULATION, *(PINNED if pinned else ())))


def check_every_frame_used_once(run) -> tuple[dict, h5py.File]:
    summary = run.summary()
    scan = summary["scans"][0]
    assert scan["frames_lost"] == 0 and scan["frames_rejected"] == 0
    assert scan["stages"]["reconstruction_worker"]["frames_in"] == FRAMES
    f = h5py.File(scan["outputs"][0], "r")
    numbers = f["entry_1/data_1/frame_number"][()]
    np.testing.assert_array_equal(numbers, 10 + np.arange(FRAMES))  # darks are 0-9
    process = f["entry_1/image_1/process_1"]
    assert process["frames_used"][()] == FRAMES
    np.testing.assert_array_equal(process["weights"][()], np.ones(FRAMES))
    return scan, f


def test_small_scan_reconstructs_the_object_and_writes_the_cxi_layout(start_run):
    run = run_small(start_run, pinned=False)  # the geometry chosen from the scan
    code, output = run.finish(timeout_s=240)
    assert code == 0, output
    assert "reconstruction NRMSE" in output
    scan, f = check_every_frame_used_once(run)
    assert scan["nrmse"] <= 0.15
    for path in (scan["outputs"][0], scan["truth"]):
        hdf5_110_reads(path)
    validate_cxi(scan["outputs"][0])
    # As PtyPy's Hdf5Loader reads it with the README's parameters.
    ptypy = ptypy_view(scan["outputs"][0])
    assert ptypy["intensities"].shape == (FRAMES, 128, 128) and np.isfinite(ptypy["intensities"]).all()
    assert ptypy["intensities"].min() >= 0 and 0.9 < ptypy["mask"].mean() < 1  # the bad pixels, and only them
    assert (ptypy["energy_kev"], ptypy["distance_m"], ptypy["psize_m"]) == pytest.approx((0.8, 0.08, 50e-6))
    with h5py.File(scan["truth"], "r") as truth:
        np.testing.assert_allclose(ptypy["positions"], truth["positions_m"][()])
    stages = scan["stages"]
    assert stages["dark_worker"]["frames_in"] == 10 and stages["frame_worker"]["frames_in"] == FRAMES  # routed
    with f, h5py.File(scan["truth"], "r") as truth:
        pixel = truth["pixel_size_m"][()]
        assert f["cxi_version"][()] == 160
        detector = f["entry_1/instrument_1/detector_1"]
        data = detector["data"]
        # 320 x 320 raw frames, a window of 256 around the centre: the probe (0.86 um) twice over in
        # 128 binned pixels of 19.4 nm, as the frame stage logged it.
        assert data.shape == (FRAMES, 128, 128) and data.dtype == np.float32
        assert (data.attrs["crop_px"], data.attrs["binning"], data.attrs["downsample"]) == (256, 2, "bin")
        assert data.attrs["probe_from"] == "probe model" and 20 < data.attrs["support_radius_px"] <= 0.4 * 128
        assert f"geometry {data.attrs['geometry']}" in (run.logs / "frame_worker.1.log").read_text()
        assert data[()].min() >= 0  # photons
        assert data.attrs["axes"] == "translation:y:x"
        assert f.get("entry_1/data_1/data", getlink=True).path == "/entry_1/instrument_1/detector_1/data"
        assert f.get("entry_1/data_1/translation", getlink=True).path == "/entry_1/sample_1/geometry_1/translation"
        assert np.all(data[()].sum(axis=(1, 2)) > 1e5)  # every slot holds a frame of ~2e6 photons
        assert detector["distance"][()] == pytest.approx(0.08)
        assert detector["x_pixel_size"][()] == pytest.approx(50e-6) == detector["y_pixel_size"][()]
        assert detector["data_dark"].shape == (320, 320)
        assert detector["data_dark"][()].mean() == pytest.approx(1000, abs=5)  # the simulated offset
        assert f["entry_1/instrument_1/source_1/energy"][()] == pytest.approx(800 * electron_volt)
        translation = f["entry_1/sample_1/geometry_1/translation"][()]
        np.testing.assert_allclose(translation[:, :2], truth["positions_m"][()][:, ::-1])
        assert np.all(translation[:, 2] == 0)
        image = f["entry_1/image_1"]
        assert image["data"].dtype == np.complex64
        np.testing.assert_allclose(image["image_size"][()], np.array(image["data"].shape) * pixel, rtol=1e-6)
        assert image["process_1/final_illumination"].shape == (128, 128)
        assert image["process_1/device"].asstr()[()] == device.select("auto").name  # a GPU wherever there is one
        assert f["entry_1/instrument_1/source_1/probe"].shape == (128, 128)
        assert image["x_pixel_size"][()] == pytest.approx(pixel, rel=1e-6)  # the crop is the simulated window


def test_a_frame_worker_killed_mid_scan_loses_no_frame_and_previews_are_published(start_run, subscriber):
    run = run_small(start_run, "--rate", "20")
    previews = subscriber(run.pipeline.handler.status, b"preview.")
    run.wait_ready(services=7)
    victim = wait_for(lambda: next((s for s in run.ctl("status").result["services"]
                                    if s["name"] == "frame_worker.1" and s["state"] == "up"
                                    and s["frames_in"] >= 15), None), 60, "frame_worker.1 busy")
    os.kill(victim["pid"], signal.SIGKILL)
    code, output = run.finish(timeout_s=240)
    assert code == 0, output
    scan, f = check_every_frame_used_once(run)
    f.close()
    assert run.summary()["restarts"]["frame_worker.1"] >= 1
    assert scan["nrmse"] <= 0.06  # 0.044 undisturbed
    received = {}
    while previews.poll(0):
        topic, body, *buffers = previews.recv_multipart()
        received[topic] = (json.loads(body), buffers)
    assert {b"preview.image_worker", b"preview.reconstruction_worker"} <= set(received)
    body, buffers = received[b"preview.reconstruction_worker"]
    assert body["scan_id"] == scan["scan_id"] and len(buffers) == len(body["arrays"])
    for spec, buffer in zip(body["arrays"], buffers, strict=True):
        assert np.isfinite(np.frombuffer(buffer, spec["dtype"]).reshape(spec["shape"])).all()
    assert {a["name"] for a in received[b"preview.image_worker"][0]["arrays"]} == {
        "transmission", "dpc_phase", "probe_amplitude"}
