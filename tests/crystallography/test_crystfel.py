"""Surveyor's crystallography outputs read by the real CrystFEL (run as a client, where installed):
the CXI file and its geometry through `list_events` and `indexamajig --peaks=cxi`, and the hit
server's msgpack maps with `<scan_id>_live.geom` through `indexamajig --zmq-input --peaks=msgpack`.
Every hit is one image to CrystFEL, and every image carries the peak list Surveyor wrote or served."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import zmq

from tests.conftest import REPO, free_port
from tests.crystallography.test_chain import overrides

PIPELINE = REPO / "pipelines" / "crystallography.toml"
FRAMES = 40

pytestmark = pytest.mark.skipif(not (shutil.which("indexamajig") and shutil.which("list_events")),
                                reason="CrystFEL (indexamajig, list_events) is not on PATH")


def crystfel_env() -> dict[str, str]:
    """HDF5 finds the bitshuffle/LZ4 filter the raw frames are stored with."""
    import hdf5plugin

    return {**os.environ, "HDF5_PLUGIN_PATH": hdf5plugin.PLUGIN_PATH}


def chunks(stream: Path) -> list[dict[str, object]]:
    """Each chunk of a stream: its header lines as a dict and its peak table (fs, ss, 1/d, I)."""
    found = []
    for text in stream.read_text().split("----- Begin chunk -----")[1:]:
        head, _, rest = text.partition("Peaks from peak search")
        fields = dict(line.split(" = ", 1) for line in head.splitlines() if " = " in line)
        fields.update(line.split(": ", 1) for line in head.splitlines() if ": " in line and " = " not in line)
        table = rest.partition("End of peak list")[0].strip().splitlines()[1:]
        fields["peaks"] = np.array([[float(v) for v in line.split()[:4]] for line in table]).reshape(-1, 4)
        found.append(fields)
    return found


def settled(count: Callable[[], int], quiet_s: float, timeout_s: float = 120) -> int:
    """The count once it is above 0 and has not changed for `quiet_s`."""
    deadline, last, since = time.monotonic() + timeout_s, -1, time.monotonic()
    while time.monotonic() < deadline:
        now = count()
        if now != last:
            last, since = now, time.monotonic()
        elif now > 0 and time.monotonic() - since >= quiet_s:
            return now
        time.sleep(0.25)
    raise AssertionError(f"still {last} after {timeout_s} s")


def indexamajig(*args: str, cwd: Path, timeout_s: float = 120) -> str:
    done = subprocess.run(["indexamajig", "--indexing=none", "-j", "1", *args], check=False, cwd=cwd,
                          env=crystfel_env(), capture_output=True, text=True, timeout=timeout_s)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def test_indexamajig_reads_every_hit_and_its_peak_list_from_the_cxi_file(start_run, tmp_path):
    run = start_run(PIPELINE, "--simulate", "--frames", str(FRAMES), overrides=overrides(free_port()))
    code, output = run.finish(timeout_s=240)
    assert code == 0, output[-3000:]
    scan = run.summary()["scans"][0]
    cxi, geom = (Path(next(p for p in scan["outputs"] if Path(p).name == f"{scan['scan_id']}{suffix}"))
                 for suffix in (".cxi", ".geom"))
    with h5py.File(cxi, "r") as f:
        result = f["entry_1/result_1"]
        n_peaks, fs, ss = result["nPeaks"][()], result["peakXPosRaw"][()], result["peakYPosRaw"][()]
        mask = f["entry_1/instrument_1/detector_1/mask"][()]
    assert 5 < len(n_peaks) < FRAMES
    (tmp_path / "files.lst").write_text(f"{cxi}\n")

    listed = subprocess.run(["list_events", "-i", "files.lst", "-g", str(geom), "-o", "events.lst"],
                            check=False, cwd=tmp_path, env=crystfel_env(), capture_output=True, text=True,
                            timeout=60)
    assert listed.returncode == 0, listed.stderr
    assert (tmp_path / "events.lst").read_text().splitlines() == [f"{cxi} //{row}" for row in range(len(n_peaks))]

    # As written: CrystFEL takes each peak list whole and puts it at CrystFEL's pixel corners.
    log = indexamajig("-i", "files.lst", "-g", str(geom), "--peaks=cxi", "--no-revalidate", "-o", "as_is.stream",
                      cwd=tmp_path)
    assert f"Final: {len(n_peaks)} images processed, {len(n_peaks)} hits" in log
    images = chunks(tmp_path / "as_is.stream")
    assert [image["Event"] for image in images] == [f"//{row}" for row in range(len(n_peaks))]
    for row, image in enumerate(images):
        count = n_peaks[row]
        assert int(image["num_peaks"]) == count == len(image["peaks"])
        np.testing.assert_allclose(image["peaks"][:, 0], fs[row, :count] + 0.5, atol=0.006)
        np.testing.assert_allclose(image["peaks"][:, 1], ss[row, :count] + 0.5, atol=0.006)
        assert float(image["photon_energy_eV"]) == pytest.approx(12000)
        assert image["average_camera_length"] == "0.100000 m"

    # CrystFEL's own check of each peak (its default) drops only peaks whose integration ring
    # reaches a pixel the file's mask marks bad: the mask is read where the geometry says.
    indexamajig("-i", "files.lst", "-g", str(geom), "--peaks=cxi", "-o", "checked.stream", cwd=tmp_path)
    bad_ss, bad_fs = np.nonzero(mask & 1)
    for row, image in enumerate(chunks(tmp_path / "checked.stream")):
        kept = image["peaks"][:, :2] - 0.5
        ours = np.c_[fs[row, :n_peaks[row]], ss[row, :n_peaks[row]]]
        near_kept = np.abs(ours[:, None, :] - kept[None, :, :]).max(axis=2).min(axis=1, initial=np.inf) < 0.006
        assert near_kept.sum() == len(kept)
        for x, y in ours[~near_kept]:
            assert np.hypot(bad_fs - x, bad_ss - y).min() < 8, f"peak ({x}, {y}) dropped far from a bad pixel"


def test_indexamajig_reads_the_hit_servers_maps_with_the_live_geometry(start_run, tmp_path):
    hit_port = free_port()
    run = start_run(PIPELINE, overrides=overrides(hit_port, "stages.hit_server.params.buffer=100"))
    run.wait_ready(services=5)
    source = run.pipeline.stages["receiver"].params["source"]
    subprocess.run([sys.executable, "-m", "libs.cli.main", "simulate", "sx", "--bind", source, "--frames", str(FRAMES),
                    "--scan-id", "live", "--handler", run.endpoint, "--param", "hit_fraction=0.5"],
                   check=True, capture_output=True, timeout=120)
    run.wait_scan("live", timeout_s=60)
    out = tmp_path / "out"
    with h5py.File(out / "live.cxi", "r") as f:
        result = f["entry_1/result_1"]
        rows = {int(n): row for row, n in enumerate(result["frame_number"][()])}
        n_peaks, fs, ss = result["nPeaks"][()], result["peakXPosRaw"][()], result["peakYPosRaw"][()]
        energy_ev = f["entry_1/instrument_1/source_1/energy"][()] / 1.602176634e-19
        distance_m = f["entry_1/instrument_1/detector_1/distance"][()]
    assert 5 < len(rows) < FRAMES

    # The hits outlive the scan: an indexer that comes afterwards takes every one the hit server
    # holds, newest first (its "latest" edge may have passed over some while the scan ran).
    log = tmp_path / "indexamajig.log"
    with log.open("w") as sink:
        indexer = subprocess.Popen(
            ["indexamajig", f"--zmq-input=tcp://127.0.0.1:{hit_port}", "--zmq-request=next", "--data-format=msgpack",
             "--peaks=msgpack", "-g", str(out / "live_live.geom"), "--indexing=none", "-o", "live.stream", "-j", "1",
             "--copy-header=event_id", "--copy-header=beam_energy", "--copy-header=detector_distance"],
            cwd=tmp_path, env=crystfel_env(), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    stream = tmp_path / "live.stream"
    try:
        settled(lambda: stream.read_text().count("----- End chunk -----") if stream.exists() else 0, quiet_s=5)
    finally:
        os.killpg(indexer.pid, signal.SIGTERM)
        indexer.wait(timeout=30)
    probe = zmq.Context.instance().socket(zmq.REQ)
    probe.setsockopt(zmq.LINGER, 0)
    probe.connect(f"tcp://127.0.0.1:{hit_port}")
    probe.send(b"next")
    left = probe.poll(2000)
    probe.close()
    assert not left, "the hit server still held a hit that indexamajig did not take"
    text = log.read_text()
    assert not re.search(r"error|couldn't|not found|wrong|unrecognised", text, re.IGNORECASE), text[-3000:]

    images = chunks(stream)
    served = [int(image["header/str/event_id"].rsplit("//", 1)[1]) for image in images]
    assert served == sorted(set(served), reverse=True), "each hit once, newest first"
    assert set(served) <= set(rows) and len(served) >= len(rows) // 2, (served, sorted(rows))
    # CrystFEL's check of each peak (its default) sees the same bad pixels live (NaN in the map) as
    # in the file (its mask): it keeps the same peaks of every hit both ways.
    (tmp_path / "files.lst").write_text(f"{out / 'live.cxi'}\n")
    indexamajig("-i", "files.lst", "-g", str(out / "live.geom"), "--peaks=cxi", "-o", "file.stream", cwd=tmp_path)
    from_file = {int(image["Event"].lstrip("/")): image for image in chunks(tmp_path / "file.stream")}
    number_of_row = {row: number for number, row in rows.items()}
    checked = {number_of_row[row]: image["peaks"] for row, image in from_file.items()}
    for number, image in zip(served, images, strict=True):
        row, count = rows[number], n_peaks[rows[number]]
        assert image["header/str/event_id"] == f"live//{number}"
        assert int(image["num_peaks"]) == len(image["peaks"]) <= count
        np.testing.assert_allclose(image["peaks"][:, :2], checked[number][:, :2], atol=0.006)
        kept = image["peaks"][:, :2] - 0.5
        ours = np.c_[fs[row, :count], ss[row, :count]]
        assert (np.abs(ours[:, None, :] - kept[None, :, :]).max(axis=2).min(axis=0) < 0.006).all()
        assert float(image["header/float/beam_energy"]) == pytest.approx(energy_ev)
        assert float(image["header/float/detector_distance"]) == pytest.approx(distance_m)
        assert float(image["photon_energy_eV"]) == pytest.approx(energy_ev)
        assert image["average_camera_length"] == f"{distance_m:.6f} m"
