"""The NXmx master beside every raw scan, read the way crystallographers read raw data, with real
processes: PyPI `nxmx` (what DIALS's FormatNXmx uses) finds the header's geometry, fabio's Eiger
reader gives the raw file's frames pixel for pixel, HDF5 1.10's tools read it; on the virtual
detector, on both recorded Eiger streams, for an aborted scan and a scan whose writer was killed."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys

import cbor2
import fabio
import h5py
import hdf5plugin  # noqa: F401 - registers the filters to read pixels back
import msgpack
import numpy as np
import nxmx
import pytest
from scipy.constants import angstrom, electron_volt, h, speed_of_light

from libs.simulation.sx import SxScan
from libs.simulation.synthetic import frame_number_of
from tests.conftest import SHARED, free_port, ingest_pipeline, synthetic_pipeline, wait_for
from tests.field_tools import hdf5_110_reads

RECORDED = SHARED / "data" / "recorded"
pytestmark = pytest.mark.slow


def wavelength_a(energy_ev: float) -> float:
    return h * speed_of_light / (energy_ev * electron_volt) / angstrom


def read_nxmx(master) -> dict:
    """What DIALS's reader sees: the facts `nxmx` hands over, in SI units and pixels."""
    with h5py.File(master, "r") as f:
        [entry] = nxmx.NXmx(f).entries
        [instrument] = entry.instruments
        [detector] = instrument.detectors
        [module] = detector.modules
        [beam] = instrument.beams
        [data] = entry.data
        images = data[data.signal.decode()]
        chain = nxmx.get_dependency_chain(detector.depends_on)
        fast, slow = module.fast_pixel_direction, module.slow_pixel_direction
        # Where the beam centre pixel sits in the lab, as dxtbx places the module: the fast axis'
        # offset plus the detector's translation, then so many pixels along each axis.
        origin = fast.offset.to("m").magnitude + nxmx.get_cumulative_transformation(chain)[0, :3, 3] / 1000
        centre = (origin + detector.beam_center_x.magnitude * fast[()].to("m").magnitude * fast.vector
                  + detector.beam_center_y.magnitude * slow[()].to("m").magnitude * slow.vector)
        return {
            "definition": entry.definition,
            "images": images.shape[0], "shape": images.shape[1:],
            "data_size": tuple(module.data_size),
            "pixel_m": (module.slow_pixel_direction[()].to("m").magnitude[0],
                        module.fast_pixel_direction[()].to("m").magnitude[0]),
            "wavelength_a": beam.incident_wavelength.to("angstrom").magnitude,
            "distance_m": chain[0][()].to("m").magnitude[0],
            "distance": detector.distance,
            "beam_centre_in_lab_m": centre,
            "beam_center_px": (detector.beam_center_y.magnitude, detector.beam_center_x.magnitude),
            "sample_axis": (entry.samples[0].depends_on.transformation_type, len(entry.samples[0].depends_on)),
            "pixel_mask": detector.pixel_mask[()],
            "nimages": int(f["entry/instrument/detector/detectorSpecific/nimages"][()]),
            "frame_number": f["entry/data/frame_number"][()],
        }


def fabio_frames(master) -> list[np.ndarray]:
    image = fabio.open(str(master))
    try:
        assert type(image).__name__ == "EigerImage"
        return [image.getframe(n).data for n in range(image.nframes)]
    finally:
        image.close()


def raw_frames(raw) -> np.ndarray:
    with h5py.File(raw, "r") as f:
        return f["entry_1/data_1/data"][()]


def test_the_virtual_detector_s_series_reads_in_nxmx_and_fabio_as_its_header_says(tmp_path, start_run):
    source, frames = f"tcp://127.0.0.1:{free_port()}", 12
    run = start_run(ingest_pipeline(tmp_path, protocol="stream1", source=source), "--scans", "1")
    run.wait_ready(2)
    subprocess.run([sys.executable, "-m", "libs.cli.main", "simulate", "sx", "--protocol", "stream1", "--bind", source,
                    "--frames", str(frames), "--series-id", "3"], check=True, capture_output=True, timeout=120)
    code, output = run.finish()
    assert code == 0, output[-3000:]
    master, raw = tmp_path / "out" / "series_3_master.h5", tmp_path / "out" / "series_3_raw.cxi"
    sim = SxScan(count=frames, series="3")
    seen = read_nxmx(master)
    assert seen["definition"] == "NXmx" and seen["images"] == seen["nimages"] == frames
    assert seen["shape"] == seen["data_size"] == sim.geometry.shape
    assert seen["pixel_m"] == pytest.approx((sim.pixel_m, sim.pixel_m))
    assert seen["wavelength_a"] == pytest.approx(wavelength_a(sim.energy_ev))
    assert seen["distance_m"] == pytest.approx(sim.distance_m)
    assert seen["beam_center_px"] == pytest.approx(sim.beam_center_px)
    assert seen["beam_centre_in_lab_m"] == pytest.approx([0, 0, sim.distance_m], abs=1e-12)  # on the beam
    assert seen["sample_axis"] == ("rotation", frames)  # still shots: omega 0 for each image
    np.testing.assert_array_equal(seen["pixel_mask"], sim.pixel_mask)
    np.testing.assert_array_equal(seen["frame_number"], np.arange(frames))
    pixels = raw_frames(raw)
    read = fabio_frames(master)
    assert len(read) == frames and all(np.array_equal(a, b) for a, b in zip(read, pixels, strict=True))
    assert all(np.array_equal(read[n], sim.frame(n)) for n in (0, frames - 1))
    with h5py.File(master, "r") as f:
        # One copy of the pixels: the master links into the raw file.
        assert f["entry/data"].get("data_000001", getlink=True).filename == raw.name
        specific = f["entry/instrument/detector/detectorSpecific"]
        assert specific["pixel_mask"].dtype == np.uint32 and specific["ntrigger"][()] == 1
        assert (specific["x_pixels_in_detector"][()], specific["y_pixels_in_detector"][()]) == sim.geometry.shape[::-1]
        assert all(f[name].attrs.get("NX_class") for name in ("entry", "entry/data", "entry/instrument",
                                                                "entry/instrument/detector/module", "entry/sample"))
    hdf5_110_reads(master)


def recorded_header(name: str) -> dict:
    """The recorded series' own header, read without our decoders."""
    with gzip.open(RECORDED / f"eiger1m_{name}.msgpack.gz") as f:
        messages = [list(m) for m in msgpack.Unpacker(f, raw=False)]
    if name == "stream1":
        config = json.loads(next(m for m in messages if b"dheader" in m[0])[1])
        return {"energy_ev": config["photon_energy"], "pixel_m": (config["y_pixel_size"], config["x_pixel_size"]),
                "distance_m": config["detector_distance"], "wavelength_a": config["wavelength"],
                "beam_center_px": (config["beam_center_y"], config["beam_center_x"])}
    start = cbor2.loads(messages[0][0])
    return {"energy_ev": start["incident_energy"], "pixel_m": (start["pixel_size_y"], start["pixel_size_x"]),
            "distance_m": start.get("detector_distance"), "wavelength_a": start["incident_wavelength"],
            "beam_center_px": (start["beam_center_y"], start["beam_center_x"])}


@pytest.mark.skipif(not RECORDED.is_dir(), reason="../shared/data/recorded is absent")
@pytest.mark.parametrize(("name", "series"), [("stream1", "14"), ("stream2", "16")])
def test_a_recorded_eiger_series_reads_in_nxmx_and_fabio(tmp_path, start_run, name, series):
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol=name, source=source), "--scans", "1")
    run.wait_ready(2)
    subprocess.run([sys.executable, str(SHARED / "tools" / "replay_stream.py"),
                    str(RECORDED / f"eiger1m_{name}.msgpack.gz"), "--bind", source, "--wait-peer", "30"],
                   check=True, capture_output=True, timeout=60)
    code, output = run.finish()
    assert code == 0, output[-3000:]
    master, raw = tmp_path / "out" / f"series_{series}_master.h5", tmp_path / "out" / f"series_{series}_raw.cxi"
    header, seen, pixels = recorded_header(name), read_nxmx(master), raw_frames(raw)
    assert seen["images"] == seen["nimages"] == len(pixels) > 0
    assert seen["shape"] == (1065, 1030) and seen["pixel_m"] == pytest.approx(header["pixel_m"])
    assert seen["wavelength_a"] == pytest.approx(header["wavelength_a"], rel=1e-4)
    assert seen["wavelength_a"] == pytest.approx(wavelength_a(header["energy_ev"]))
    assert seen["beam_center_px"] == header["beam_center_px"]
    # These series did not know their detector distance (0 or absent): the master claims none.
    assert not header["distance_m"] and seen["distance"] is None and seen["distance_m"] == 0
    with h5py.File(raw, "r") as f:
        cxi_mask = f["entry_1/instrument_1/detector_1/mask"][()]
    assert (seen["pixel_mask"] != 0).sum() == (cxi_mask != 0).sum() > 30_000  # the module gaps
    read = fabio_frames(master)
    assert len(read) == len(pixels) and all(np.array_equal(a, b) for a, b in zip(read, pixels, strict=True))
    with h5py.File(master, "r") as f:
        detector = f["entry/instrument/detector"]
        assert detector["sensor_material"][()] == b"Si" and detector["sensor_thickness"][()] == 450e-6
        assert detector["bit_depth_image"][()] == 32
    hdf5_110_reads(master)


def test_the_master_of_an_aborted_scan_opens_and_holds_what_was_written(tmp_path, start_run):
    run = start_run(synthetic_pipeline(tmp_path, frames=5000, rate_hz=400, workers=1))
    run.wait_ready(3)
    assert run.ctl("start_scan", {"scan_id": "cut", "n_frames": 5000, "energy_ev": 9000, "distance_m": 0.25,
                                  "pixel_size_m": 172e-6, "beam_center_px": [30.5, 31.5]}).ok
    wait_for(lambda: run.ctl("status").result["scan"]["stages"]["writer"]["written"] > 50, 20, "frames at the writer")
    assert run.ctl("abort", {"scan_id": "cut"}).ok
    master = tmp_path / "out" / "cut_master.h5"
    wait_for(lambda: master.exists() and read_nxmx(master)["nimages"] > 0, 10, "the master rewritten at the abort")
    with h5py.File(tmp_path / "out" / "cut_raw.cxi", "r") as f:
        slots = f["entry_1/data_1/frame_number"][()]
    seen = read_nxmx(master)
    assert 50 < seen["images"] == seen["nimages"] == len(slots) < 5000
    np.testing.assert_array_equal(seen["frame_number"], slots)
    assert seen["wavelength_a"] == pytest.approx(wavelength_a(9000)) and seen["distance_m"] == pytest.approx(0.25)
    assert seen["pixel_m"] == pytest.approx((172e-6, 172e-6)) and seen["beam_center_px"] == pytest.approx((30.5, 31.5))
    read = fabio_frames(master)
    assert [frame_number_of(read[n]) for n in np.flatnonzero(slots >= 0)] == slots[slots >= 0].tolist()
    hdf5_110_reads(master)


# --- crystallography keeps its raw data -------------------------------------------------------------


def test_a_raw_writer_short_of_frames_is_a_loss_though_the_hits_writer_has_them_all():
    """Two writers of the same frames are copies: the summary counts the one with fewer."""
    from libs.common.messages import ScanCounters, ScanDescription
    from libs.common.pipeline import load
    from services.handler.scans import ScanRecord
    from tests.crystallography.test_chain import PIPELINE

    pipeline = load(PIPELINE)
    assert pipeline.share("raw_writer") == "all" and pipeline.share("writer") == "data"
    record = ScanRecord(ScanDescription(scan_id="sx", technique="crystallography", n_frames=100), epoch=1,
                        state="finished")
    record.counters = {"r": ("receiver", ScanCounters(frames_out=100)),
                       "w": ("writer", ScanCounters(written=100, delivered=100)),
                       "p": ("peak_worker", ScanCounters(frames_in=100, frames_out=100))}
    assert (record.summary(pipeline).frames_written, record.losses(pipeline)[0]) == (100, 0)
    record.counters["x"] = ("raw_writer", ScanCounters(written=93, delivered=93))
    summary = record.summary(pipeline)
    assert summary.frames_written == 93 and summary.frames_lost == 7
    assert summary.losses == ["7 of 100 frames reached no output"]


@pytest.mark.skipif(not RECORDED.is_dir(), reason="../shared/data/recorded is absent")
def test_a_series_whose_header_never_came_has_a_master_of_its_frames_and_no_made_up_geometry(tmp_path, start_run):
    from tests.ingest.test_raw_path import recording, replay

    messages = [*recording("stream1")[1:], [json.dumps({"htype": "dseries_end-1.0", "series": 14}).encode()]]
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol="stream1", source=source), "--scans", "1")
    run.wait_ready(2)
    replay(tmp_path, messages, source)
    code, output = run.finish()
    assert code == 0, output[-3000:]
    master, raw = tmp_path / "out" / "series_14_master.h5", tmp_path / "out" / "series_14_raw.cxi"
    pixels = raw_frames(raw)
    read = fabio_frames(master)
    assert len(read) == len(pixels) == 9 and all(np.array_equal(a, b) for a, b in zip(read, pixels, strict=True))
    with h5py.File(master, "r") as f:
        [entry] = nxmx.NXmx(f).entries
        [detector] = entry.instruments[0].detectors
        assert detector.distance is None and detector.beam_center_x is None
        assert "incident_wavelength" not in entry.instruments[0].beams[0]
        assert not detector.pixel_mask[()].any()
        assert detector.pixel_mask.attrs["description"] == b"the detector sent no pixel mask"
    hdf5_110_reads(master)


def test_the_cxi_mask_carries_every_eiger_bit_as_its_cxi_bit_and_flags_the_pixel_invalid():
    """DECTRIS bits 0-4 (gap, dead, cold, hot, noisy) become CXI's missing, dead, bad, hot and noisy,
    any other bit `bad`; every flagged pixel is `invalid` too, an unflagged one 0."""
    from services.writer import cxi

    eiger = np.array([0, 1, 2, 4, 8, 16, 1 | 8, 1 << 5, 1 << 31, 31 | 1 << 7], np.uint32)
    expected = [0, cxi.CXI_MISSING, cxi.CXI_DEAD, cxi.CXI_BAD, cxi.CXI_HOT, cxi.CXI_NOISY,
                cxi.CXI_MISSING | cxi.CXI_HOT, cxi.CXI_BAD, cxi.CXI_BAD,
                cxi.CXI_MISSING | cxi.CXI_DEAD | cxi.CXI_BAD | cxi.CXI_HOT | cxi.CXI_NOISY]
    mask = cxi.cxi_mask(eiger.reshape(2, 5))
    assert mask.dtype == np.uint32
    np.testing.assert_array_equal(mask.ravel(), [bits | (cxi.CXI_INVALID if bits else 0) for bits in expected])
