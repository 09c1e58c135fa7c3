"""The crystallography pipeline end to end, real processes: the simulated run's CXI file checked
field by field and against an in-process recomputation of every frame; live reconfiguration; the
hit server played from the indexer's side; the recorded Eiger streams."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import msgpack
import numpy as np
import pytest
import zmq
from scipy.constants import electron_volt

from libs.crystallography.hits import is_hit
from libs.simulation.sx import SxScan
from services.peak_worker.params import Params
from tests.conftest import FALSE_DOWN, REPO, SHARED, free_endpoints, free_port, wait_for
from tests.crystallography.test_science import finder_for
from tests.field_tools import hdf5_110_pixels, hdf5_110_reads, validate_cxi
from tests.ingest.test_nxmx import fabio_frames

PIPELINE = REPO / "pipelines" / "crystallography.toml"
FRAMES = 60
RECORDED = SHARED / "data" / "recorded"


def overrides(hit_port: int, *extra: str) -> tuple[str, ...]:
    return (*free_endpoints(), f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{hit_port}"',
            "simulation.params={layout='1m', hit_fraction=0.5}", *extra)


def recompute(scan: SxScan, params: Params, numbers) -> dict[int, tuple]:
    """What the peak stage should have made of each frame: (peaks, hit, corrected frame)."""
    finder, corrections = finder_for(scan, params)
    results = {}
    for number in numbers:
        corrected = corrections.apply(scan.frame(number))
        peaks = finder.find(corrected)
        results[number] = (peaks, is_hit(len(peaks), params.min_peaks, params.max_peaks), corrected)
    return results


def worker_tallies(logs) -> np.ndarray:
    """Frames, hits and peaks the peak processes logged at the end of the scan, added up."""
    total = np.zeros(3, int)
    for log in logs.glob("peak_worker*.log"):
        for line in log.read_text().splitlines():
            found = re.search(r"(\d+) frames, (\d+) hits, (\d+) peaks in this process", line)
            if found:
                total += [int(v) for v in found.groups()]
    return total


def test_simulated_run_writes_cheetah_layout_that_agrees_with_the_workers(start_run, subscriber):
    run = start_run(PIPELINE, "--simulate", "--frames", str(FRAMES), overrides=overrides(free_port()))
    previews = subscriber(run.pipeline.handler.status, b"preview.writer")
    code, output = run.finish(timeout_s=240)
    assert code == 0, output[-3000:]
    assert "peaks against the truth" in output
    scan = run.summary()["scans"][0]
    assert scan["frames_lost"] == 0 and scan["frames_rejected"] == 0
    assert scan["recall"] >= 0.95 and scan["precision"] >= 0.95
    cxi, geom = (next(p for p in scan["outputs"] if Path(p).name == f"{scan['scan_id']}{suffix}")
                 for suffix in (".cxi", ".geom"))
    validate_cxi(cxi)
    hdf5_110_reads(cxi)
    hdf5_110_pixels(cxi, "/entry_1/data_1/data")  # a bitshuffle/LZ4 chunk written as the detector sent it
    params = Params.model_validate(run.pipeline.stages["peak_worker"].params)
    sim = SxScan(count=FRAMES, layout="1m", hit_fraction=0.5, scan_id=scan["scan_id"])
    expected = recompute(sim, params, range(FRAMES))
    hit_numbers = sorted(n for n, (_, hit, _) in expected.items() if hit)
    assert 10 < len(hit_numbers) < FRAMES - 10

    with h5py.File(cxi, "r") as f:
        assert f["cxi_version"][()] == 160
        entry = f["entry_1"]
        every = entry["result_2"]
        order = np.argsort(every["frame_number"][()])
        np.testing.assert_array_equal(every["frame_number"][()][order], np.arange(FRAMES))
        np.testing.assert_array_equal(every["n_peaks"][()][order], [len(expected[n][0]) for n in range(FRAMES)])
        np.testing.assert_array_equal(every["hit"][()][order], [expected[n][1] for n in range(FRAMES)])
        # Hits: one row each, the frame as the detector sent it, the peak list as the stage found it.
        result = entry["result_1"]
        rows = result["frame_number"][()]
        assert sorted(rows) == hit_numbers
        assert entry["data_1/experiment_identifier"].asstr()[()].tolist() == [f"{scan['scan_id']}//{n}" for n in rows]
        data = entry["data_1/data"]
        assert data.shape == (len(rows), 1024, 1024) and data.dtype == np.uint16
        assert f.get("entry_1/instrument_1/detector_1/data", getlink=True).path == "/entry_1/data_1/data"
        assert f.get("entry_1/result_1/data", getlink=True).path == "/entry_1/result_1/peakTotalIntensity"
        names = {"peakXPosRaw": "fs", "peakYPosRaw": "ss", "peakTotalIntensity": "intensity",
                 "peakMaximumValue": "max_pixel_intensity", "peakNPixels": "num_pixels", "peakSNR": "snr",
                 "peakBackgroundSigma": "sigma"}
        for row, number in enumerate(rows):
            peaks = expected[number][0]
            assert result["nPeaks"][row] == len(peaks)
            for name, field in names.items():
                assert result[name].shape[1] == params.max_num_peaks and result[name].dtype == np.float32
                np.testing.assert_array_equal(result[name][row, :len(peaks)], getattr(peaks, field))
                assert not result[name][row, len(peaks):].any()
            np.testing.assert_array_equal(data[row], sim.frame(number))
        # Sums per class, their frame counts, the virtual powder.
        hits_sum = sum(expected[n][2].astype(np.float64) for n in hit_numbers)
        misses_sum = sum(expected[n][2].astype(np.float64) for n in range(FRAMES) if n not in hit_numbers)
        assert entry["image_1/n_frames"][()] == len(hit_numbers)
        assert entry["image_2/n_frames"][()] == FRAMES - len(hit_numbers)
        np.testing.assert_allclose(entry["image_1/data"][()], hits_sum, rtol=1e-12)
        np.testing.assert_allclose(entry["image_2/data"][()], misses_sum, rtol=1e-12)
        powder = np.zeros((1024, 1024))
        for n in hit_numbers:
            p = expected[n][0]
            np.add.at(powder, (np.rint(p.ss).astype(int), np.rint(p.fs).astype(int)), p.intensity)
        np.testing.assert_allclose(entry["image_3/data"][()], powder, rtol=1e-6)
        # Geometry and units.
        detector = entry["instrument_1/detector_1"]
        assert detector["distance"][()] == pytest.approx(0.1) and detector["distance"].attrs["units"] == "m"
        assert detector["x_pixel_size"][()] == pytest.approx(75e-6) == detector["y_pixel_size"][()]
        assert entry["instrument_1/source_1/energy"][()] == pytest.approx(12000 * electron_volt)
        assert (detector["mask"][()] != 0).sum() == (sim.pixel_mask != 0).sum()

    # What the workers reported adds up to what is in the file.
    frames, hits, peaks = worker_tallies(run.logs)
    assert (frames, hits) == (FRAMES, len(hit_numbers))
    assert peaks == sum(len(expected[n][0]) for n in range(FRAMES))

    # The raw frames beside the hits (raw_writer), as DIALS and fabio read them through the master:
    # the hits CrystFEL reads are the very frames DIALS reads.
    raw, master = (Path(cxi).with_name(f"{scan['scan_id']}{suffix}") for suffix in ("_raw.cxi", "_master.h5"))
    outputs = scan["outputs"]
    assert outputs.index(str(master)) == outputs.index(str(raw)) + 1, outputs
    validate_cxi(raw)
    hdf5_110_reads(raw)
    read = fabio_frames(master)
    assert len(read) == FRAMES and all(np.array_equal(read[n], sim.frame(n)) for n in range(FRAMES))
    with h5py.File(cxi, "r") as f:
        rows = f["entry_1/result_1/frame_number"][()]
        assert all(np.array_equal(f["entry_1/data_1/data"][row], read[n]) for row, n in enumerate(rows))

    geometry = Path(geom).read_text()
    for line in ("peak_list = /entry_1/result_1", "peak_list_type = cxi", "data = /entry_1/data_1/data",
                 "dim0 = %", "photon_energy = 12000", "clen = 0.1", "p0/max_fs = 1023",
                 "mask = /entry_1/instrument_1/detector_1/mask"):
        assert line in geometry

    last: dict[str, tuple[dict, dict[str, np.ndarray]]] = {}  # the writer's newest preview of each name
    while previews.poll(0):
        message = previews.recv_multipart()
        body, buffers = json.loads(message[1]), message[2:]
        last[body["name"]] = (body, {spec["name"]: np.frombuffer(b, spec["dtype"]).reshape(spec["shape"])
                                     for spec, b in zip(body["arrays"], buffers, strict=True)})
    assert {"crystallography", "latency", "latest_hit"} <= last.keys(), f"previews of the writer: {sorted(last)}"
    body, arrays = last["crystallography"]
    assert body["meta"]["frames"] == FRAMES and body["meta"]["hits"] == len(hit_numbers)
    assert arrays["virtual_powder"].shape == (256, 256)
    assert arrays["virtual_powder"].sum() == pytest.approx(powder.sum(), rel=1e-5)
    assert 0 < arrays["hit_rate"][-1] < 1
    # Peaks per frame: every frame's count (fewer than PEAKS_KEPT), in the order written.
    assert sorted(zip(arrays["n_peaks_frames"].tolist(), arrays["n_peaks"].tolist())) == \
        [(n, len(expected[n][0])) for n in range(FRAMES)]
    assert body["meta"]["peaks_per_frame"] == pytest.approx(np.mean([len(expected[n][0]) for n in range(FRAMES)]),
                                                            abs=0.01)
    # The geometry the rings are drawn with: the scan's, and the powder's binning.
    geometry = body["meta"]["geometry"]
    assert geometry["beam_center_px"] == pytest.approx(list(sim.beam_center_px)) and geometry["binning"] == 4
    assert geometry["pixel_size_m"] == pytest.approx([75e-6, 75e-6]) and geometry["distance_m"] == pytest.approx(0.1)
    assert geometry["wavelength_a"] == pytest.approx(1.0332, abs=1e-4) and geometry["shape"] == [1024, 1024]
    # The latest hit: one of the hits, binned, with the peaks the stage found in it (raw [ss, fs]).
    hit, hit_arrays = last["latest_hit"]
    number = hit["meta"]["frame"]
    assert number in hit_numbers and hit["meta"]["binning"] == 4 and hit["meta"]["n_peaks"] == len(expected[number][0])
    np.testing.assert_array_equal(hit_arrays["peaks"], np.stack([expected[number][0].ss, expected[number][0].fs], 1))
    frame = sim.frame(number).astype(np.float32)
    frame[sim.pixel_mask != 0] = np.nan
    # block means, NaN where a block holds a masked pixel
    np.testing.assert_allclose(hit_arrays["image"], frame.reshape(256, 4, 256, 4).mean(axis=(1, 3)), rtol=1e-5)
    # Latency: each frame's record once, from the receiver's stamp to the flush that made it safe.
    latency, histogram = last["latency"]
    assert histogram["counts"].sum() == FRAMES == latency["meta"]["frames"]
    assert len(histogram["edges_s"]) == len(histogram["counts"]) + 1 and latency["meta"]["negative"] == 0
    assert 0 < latency["meta"]["p50_s"] <= latency["meta"]["p95_s"] < 60 and latency["meta"]["max_s"] < 60


def request(socket: zmq.Socket, body: bytes) -> bytes:
    socket.send(body)
    assert socket.poll(5000), f"no answer to {body!r}"
    return socket.recv()


def live_geometry(path: Path, answer: dict) -> dict[str, object]:
    """What the live geometry names, looked up in a served map as CrystFEL's msgpack reader does:
    the image a 2-D `<f4`/`<i4` array, the peak list a map of equal-length fs, ss, intensity."""
    lines = [line.split(";")[0].strip() for line in path.read_text().splitlines()]
    named = dict(line.split(" = ", 1) for line in lines if " = " in line)
    assert not any(key.split("/")[-1].startswith("dim") for key in named), "the msgpack reader refuses dimN"
    image, peaks = answer[named["data"]], answer[named["peak_list"]]
    assert image[b"type"] in ("<f4", "<i4") and len(image[b"shape"]) == 2
    assert len(image[b"data"]) == 4 * int(np.prod(image[b"shape"]))
    assert [int(named[f"p0/max_{axis}"]) + 1 for axis in ("ss", "fs")] == list(image[b"shape"])
    assert len(peaks["fs"]) == len(peaks["ss"]) == len(peaks["intensity"])
    return {key: answer[value] for key, value in named.items() if key in ("data", "peak_list")}


def test_live_configure_and_the_indexer_gets_the_newest_hits(start_run, tmp_path):
    hit_port = free_port()
    run = start_run(PIPELINE, overrides=overrides(hit_port))
    run.wait_ready(services=5)
    refused = run.ctl("configure", {"stage": "peak_worker", "params": {"min_peaks": 50, "max_peaks": 10}})
    assert not refused.ok and "min_peaks" in refused.error["message"]
    assert not run.ctl("configure", {"stage": "peak_worker", "params": {"minimum_snr": -1}}).ok
    reply = run.ctl("configure", {"stage": "peak_worker", "params": {"max_peaks": 150}})
    assert reply.ok, reply.error
    source = run.pipeline.stages["receiver"].params["source"]
    subprocess.run([sys.executable, "-m", "libs.cli.main", "simulate", "sx", "--bind", source, "--frames", "40",
                    "--rate", "20", "--scan-id", "live", "--handler", run.endpoint, "--param", "hit_fraction=0.6"],
                   check=True, capture_output=True, timeout=120)
    run.wait_scan("live", timeout_s=60)

    with h5py.File(tmp_path / "out" / "live.cxi", "r") as f:
        every = f["entry_1/result_2"]
        n_peaks, hit = every["n_peaks"][()], every["hit"][()].astype(bool)
        counts = dict(zip(every["frame_number"][()].tolist(), n_peaks.tolist(), strict=True))
        hits = f["entry_1/result_1/frame_number"][()]
        rows = {int(n): row for row, n in enumerate(hits)}
        fs = f["entry_1/result_1/peakXPosRaw"][()]
    np.testing.assert_array_equal(hit, (n_peaks >= 10) & (n_peaks <= 150))
    assert (n_peaks > 150).any(), "the scan should have frames the new limit turns away"

    indexer = zmq.Context.instance().socket(zmq.REQ)
    indexer.setsockopt(zmq.LINGER, 0)
    indexer.connect(f"tcp://127.0.0.1:{hit_port}")
    assert request(indexer, b"hello") == b"What?"
    sim = SxScan(count=40, hit_fraction=0.6, scan_id="live")
    _, corrections = finder_for(sim)
    served = []
    for _ in range(3):
        answer = msgpack.unpackb(request(indexer, b"next"))
        number = int(answer["event_id"].rsplit("//", 1)[1])
        served.append(number)
        image = answer["detector_data"]
        data = np.frombuffer(image[b"data"], image[b"type"]).reshape(image[b"shape"])
        expected = corrections.apply(sim.frame(number))
        bad = ~corrections.good | (sim.frame(number) == np.iinfo(sim.frame(number).dtype).max)
        np.testing.assert_array_equal(np.isnan(data), bad)  # what the file's mask flags, as CrystFEL reads it
        np.testing.assert_array_equal(data[~bad], expected[~bad])
        peaks = answer["peak_list"]
        assert peaks["num_peaks"] == len(peaks["fs"]) == counts[number]
        np.testing.assert_array_equal(np.float32(peaks["fs"]), fs[rows[number], :peaks["num_peaks"]])
        assert answer["beam_energy"] == 12000
        assert set(live_geometry(tmp_path / "out" / "live_live.geom", answer)) == {"data", "peak_list"}
    assert served == sorted(hits)[::-1][:3], "newest hits first, each once"
    indexer.close()


@pytest.mark.stalls
def test_a_peak_process_that_stalls_past_its_heartbeats_rejoins_and_no_frame_is_lost(start_run):
    """SIGSTOP for longer than the handler's liveness: the process is declared dead, its frames go
    to the other one; after SIGCONT it registers again, takes frames again, and the file holds
    every frame once, with sums that never count one twice."""
    frames = 200
    run = start_run(PIPELINE, "--simulate", "--frames", str(frames), "--rate", "20", overrides=overrides(free_port()))
    run.wait_ready(services=5)
    victim = wait_for(lambda: next((s for s in run.ctl("status").result["services"]
                                    if s["name"] == "peak_worker.1" and s["frames_in"] >= 10), None), 60,
                      "peak_worker.1 busy")
    os.kill(victim["pid"], signal.SIGSTOP)
    time.sleep(run.pipeline.handler.heartbeat_s * run.pipeline.handler.liveness + 3)
    os.kill(victim["pid"], signal.SIGCONT)
    code, output = run.finish(timeout_s=240)
    assert code == 0, output[-3000:]
    scan = run.summary()["scans"][0]
    assert scan["frames_lost"] == 0
    log = (run.logs / "peak_worker.1.log").read_text()
    assert log.count("registered with the handler") >= 2
    back = [line for line in (run.logs / "handler.log").read_text().splitlines() if FALSE_DOWN in line]
    assert len(back) == 1 and "peak_worker.1 was declared dead" in back[0], "the handler tells a stall from a death"
    tally = int(re.findall(r"(\d+) frames, \d+ hits", log)[-1])
    assert tally >= victim["frames_in"] + 10, "the process took frames again after it came back"
    with h5py.File(next(p for p in scan["outputs"] if p.endswith(".cxi") and not p.endswith("_raw.cxi")), "r") as f:
        numbers = np.sort(f["entry_1/result_2/frame_number"][()])
        np.testing.assert_array_equal(numbers, np.arange(frames))
        summed = f["entry_1/image_1/n_frames"][()] + f["entry_1/image_2/n_frames"][()]
        hits = f["entry_1/result_2/hit"][()].sum()
        assert summed <= frames and f["entry_1/image_1/n_frames"][()] <= hits


@pytest.mark.skipif(not RECORDED.is_dir(), reason="../shared/data/recorded is absent")
@pytest.mark.parametrize(("name", "series"), [("stream1", "14"), ("stream2", "16")])
def test_recorded_eiger_stream_runs_through_the_chain(start_run, tmp_path, name, series):
    run = start_run(PIPELINE, "--scans", "1", overrides=(*overrides(free_port()),
                                                          f'stages.receiver.params.protocol="{name}"'))
    run.wait_ready(services=5)
    source = run.pipeline.stages["receiver"].params["source"]
    subprocess.run([sys.executable, str(SHARED / "tools" / "replay_stream.py"),
                    str(RECORDED / f"eiger1m_{name}.msgpack.gz"), "--bind", source, "--wait-peer", "30"],
                   check=True, capture_output=True, timeout=60)
    code, output = run.finish(timeout_s=120)
    assert code == 0, output[-3000:]
    [scan] = run.summary()["scans"]
    assert scan["frames_rejected"] == 0 and scan["frames_lost"] == 0
    with h5py.File(tmp_path / "out" / f"series_{series}.cxi", "r") as f:
        every = f["entry_1/result_2"]
        assert len(every["frame_number"]) == scan["frames_received"] > 0
        mask = f["entry_1/instrument_1/detector_1/mask"][()]
        assert mask.shape == (1065, 1030) and (mask != 0).sum() > 30_000  # the module gaps
        # The gap pixels (0xFFFFFFFF) are masked: no peaks and nothing in the sums from them.
        misses = f["entry_1/image_2/data"][()]
        assert np.isfinite(misses).all() and not misses[mask != 0].any()
        assert misses.max() < 1e6
    logs = "".join(p.read_text() for p in run.logs.glob("peak_worker*.log"))
    assert "Traceback" not in logs and "failed" not in logs
