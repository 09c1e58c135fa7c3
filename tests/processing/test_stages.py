"""A Processing class as real processes: receiver -> 2 processing nodes -> collecting node, with the
same frames in a raw file beside. The collected result is what `surveyor process` gives on the
raw file; a processing process killed mid-scan costs no frame, none is collected twice; feedback
from collect_data reaches the processing nodes, by rank and to all; the class's previews reach
front-ends."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from tests.conftest import REPO, free_port, wait_for

pytestmark = pytest.mark.slow

CLASS = '''
import numpy as np

class Tally:
    """Each frame's number as its pixels say it and its sum; the collector counts every frame it
    collects and sends feedback: the frames collected so far to all, a note to the sender."""

    def __init__(self, *, parameters):
        self.scale = parameters["scale"]

    def initialize_processing_node(self, *, node_rank, node_pool_size):
        self.frames, self.fed_all, self.fed_me = 0, 0, 0

    def initialize_collecting_node(self, *, node_rank, node_pool_size):
        self.times, self.sums, self.ends = {}, {}, {}

    def process_data(self, *, node_rank, node_pool_size, data):
        pixels = data["detector_data"]
        self.frames += 1
        self.fed_all += "collected" in data
        self.fed_me += data.get("to") == node_rank
        return {"frame": data["frame_number"], "from_pixels": int(pixels.flat[0]) + (int(pixels.flat[1]) << 16),
                "sum": int(pixels.sum()) * self.scale}, node_rank

    def collect_data(self, *, node_rank, node_pool_size, processed_data):
        values, rank = processed_data
        if "fed_all" in values:
            self.ends[rank] = values
            return None
        frame = values["frame"]
        assert values["from_pixels"] == frame, values
        self.times[frame] = self.times.get(frame, 0) + 1
        self.sums[frame] = values["sum"]
        return {0: {"collected": len(self.times)}, rank: {"to": rank}}

    def preview(self, *, node_rank, node_pool_size):
        return {"collected": np.array([len(self.times)])}

    def end_processing_on_processing_node(self, *, node_rank, node_pool_size):
        return {"frames": self.frames, "fed_all": self.fed_all, "fed_me": self.fed_me}

    def end_processing_on_collecting_node(self, *, node_rank, node_pool_size):
        frames = sorted(self.times)
        return {"frame_number": np.array(frames), "times_collected": np.array([self.times[f] for f in frames]),
                "sum": np.array([self.sums[f] for f in frames]),
                "ends": {str(rank): end for rank, end in sorted(self.ends.items())}}
'''


def processing_pipeline(directory: Path, *, frames: int, rate_hz: float, heartbeat_s: float = 1.0) -> Path:
    """receiver (synthetic) -> processing x2 -> collector, and a raw writer on the receiver; the
    class is in a folder of its own, outside the repository."""
    code = directory / "science" / "tally.py"
    code.parent.mkdir()
    code.write_text(textwrap.dedent(CLASS))
    spec, out = f"{code}:Tally", directory / "out"
    path = directory / "pipeline.toml"
    path.write_text(f"""
[handler]
command = "tcp://127.0.0.1:{free_port()}"
status = "tcp://127.0.0.1:{free_port()}"
heartbeat_s = {heartbeat_s}

[simulation]
frames = {frames}
rate_hz = {rate_hz}
scan_id = "t"
shape = [32, 32]

[stages.receiver]
service = "receiver"

[stages.processing]
service = "processing_node"
processes = 2
inputs = ["receiver"]
params = {{ processing = "{spec}", parameters = {{ scale = 3 }} }}

[stages.collector]
service = "collecting_node"
inputs = ["processing"]
params = {{ processing = "{spec}", parameters = {{ scale = 3 }}, output_dir = "{out}" }}

[stages.raw_writer]
service = "writer"
inputs = ["receiver"]
params = {{ output_dir = "{out}" }}
""")
    return path


def read(path: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda name, item: found.update({name: item[()]}) if isinstance(item, h5py.Dataset) else None)
    return found


def finished(run) -> tuple[dict, Path, Path]:
    code, output = run.finish()
    assert code == 0, output
    scan = run.summary()["scans"][0]
    assert scan["frames_lost"] == 0 and not scan["losses"], scan
    raw, result = (Path(next(p for p in scan["outputs"] if p.endswith(end))) for end in ("_raw.cxi", ".collector.h5"))
    return scan, raw, result


def test_collected_result_is_the_offline_result_and_feedback_reaches_the_nodes(tmp_path, start_run, subscriber):
    run = start_run(processing_pipeline(tmp_path, frames=300, rate_hz=300), "--simulate")
    previews = subscriber(run.pipeline.handler.status, b"preview.collector")
    scan, raw, result = finished(run)
    last = None
    while previews.poll(0):
        last = previews.recv_multipart()
    assert last is not None, "no preview.collector published"
    body = json.loads(last[1])
    assert body["name"] == "tally" and body["meta"] == {"frames": 300}
    assert np.frombuffer(last[2], body["arrays"][0]["dtype"]).tolist() == [300]  # the last, at the scan end (int64 as float64)
    live = read(result)
    assert live["frame_number"].tolist() == list(range(300)) and set(live["times_collected"]) == {1}
    np.testing.assert_array_equal(live["sum"], [3 * (32 * 32 - 2) * (n % 251) + 3 * n for n in range(300)])
    # Each node's end record came before the collector ended; the collector's feedback reached
    # both nodes (to all, and to the sender by its rank) in the frames after it.
    ends = {rank: {k: live[f"ends/{rank}/{k}"] for k in ("frames", "fed_all", "fed_me")} for rank in ("1", "2")}
    assert ends["1"]["frames"] + ends["2"]["frames"] == 300, ends
    assert all(end["fed_all"] > 0 and end["fed_me"] > 0 for end in ends.values()), ends

    offline = subprocess.run([sys.executable, "-m", "libs.cli.main", "process", str(tmp_path / "science/tally.py:Tally"),
                              str(raw), "--param", "scale=3", "--out", str(tmp_path / "offline")],
                             cwd=REPO, capture_output=True, text=True, timeout=60)
    assert offline.returncode == 0, offline.stderr
    alone = read(tmp_path / "offline" / f"{scan['scan_id']}.offline.h5")
    for name in ("frame_number", "times_collected", "sum"):
        np.testing.assert_array_equal(alone[name], live[name])
    assert alone["ends/1/frames"] == 300 and alone["ends/1/fed_all"] == 299  # one node offline: fed after frame 0


def test_killed_processing_node_costs_no_frame_and_none_is_collected_twice(tmp_path, start_run):
    # Paced so that the scan outlasts the handler's detection of the death (4 heartbeats of 0.25 s).
    run = start_run(processing_pipeline(tmp_path, frames=1200, rate_hz=300, heartbeat_s=0.25), "--simulate")
    run.wait_ready(5)
    victim = wait_for(lambda: (s := run.service("processing.1"))["frames_in"] >= 150 and s, 30,
                      "processing.1 to be busy")
    os.kill(victim["pid"], signal.SIGKILL)
    run.feed.wait("service_down", timeout_s=10, instance=victim["instance"])
    scan, raw, result = finished(run)
    live = read(result)
    assert live["frame_number"].tolist() == list(range(1200)), "a frame was not collected"
    assert set(live["times_collected"]) == {1}, "a frame was collected twice"
    assert run.summary()["restarts"]["processing.1"] >= 1
    with h5py.File(raw, "r") as f:
        assert f["entry_1/data_1/frame_number"][()].tolist() == list(range(1200))
