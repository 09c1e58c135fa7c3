"""OM's Processing Protocol without sockets: loading a class (and what the operator is told when it
cannot be), the per-frame data, what travels between nodes, the offline driver, the result file,
`surveyor process` over a real detector's recorded stream."""

from __future__ import annotations

import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest

from libs.cli import process
from libs.common import codecs, processing, processing_result
from libs.common.contracts import END_RECORD, RECORD
from libs.common.errors import ProcessingError
from libs.common.frames import ArraySpec, Frame
from libs.common.processing_wire import END_FRAME, from_feedback, from_record, to_feedback, to_record, travel
from tests.conftest import REPO, SHARED

CLASS = '''
import numpy as np

class Tally:
    """Sums each frame; the collector sends back the running total (to all) and a note (to the sender)."""

    def __init__(self, *, parameters):
        self.scale = parameters["scale"]

    def initialize_processing_node(self, *, node_rank, node_pool_size):
        self.fed = []

    def initialize_collecting_node(self, *, node_rank, node_pool_size):
        self.sums, self.ends = {}, []

    def process_data(self, *, node_rank, node_pool_size, data):
        self.fed.append([data.get("total"), data.get("note")])
        return {"frame": data["frame_number"], "sum": int(data["detector_data"].sum()) * self.scale,
                "corner": data["detector_data"][:2, :2], "nested": {"t": (1, np.float32(2.5)), "nan": float("nan")}}, node_rank

    def collect_data(self, *, node_rank, node_pool_size, processed_data):
        values, rank = processed_data
        if "fed" in values:
            self.ends.append(values)
            return None
        self.sums[values["frame"]] = values["sum"]
        return {0: {"total": sum(self.sums.values())}, rank: {"note": np.arange(3) + values["frame"]}, 7: {"x": 1}}

    def end_processing_on_processing_node(self, *, node_rank, node_pool_size):
        return {"fed": self.fed, "rank": node_rank}

    def end_processing_on_collecting_node(self, *, node_rank, node_pool_size):
        frames = sorted(self.sums)
        return {"frame_number": np.array(frames), "sum": np.array([self.sums[f] for f in frames]), "ends": self.ends}
'''


def frames(count: int, shape=(4, 4)) -> list[processing.FrameData]:
    return [processing.FrameData(Frame.from_arrays(scan_id="s1", epoch=3, frame=n, origin="receiver.1",
                                                   arrays={"data": np.full(shape, n, np.uint16)}),
                                 scan={"scan_id": "s1"}) for n in range(count)]


def write_class(tmp_path, text=CLASS, name="tally.py"):
    path = tmp_path / "elsewhere" / name
    path.parent.mkdir(exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def test_a_class_outside_the_repository_loads_by_path_and_by_module(tmp_path, monkeypatch):
    path = write_class(tmp_path)
    assert processing.load(f"{path}:Tally").__name__ == "Tally"
    monkeypatch.syspath_prepend(str(path.parent))
    assert processing.load("tally:Tally").__name__ == "Tally"


@pytest.mark.parametrize("spec, says", [
    ("tally.py", "names no class: write 'package.module:Class' or 'path/to/file.py:Class'"),
    ("{dir}/missing.py:Tally", "no file {dir}/missing.py"),
    ("{dir}/tally.py:Talley", "defines no class Talley; it defines ['Tally']"),
    ("{dir}/broken.py:Broken", "(line 2) failed: SyntaxError"),
    ("{dir}/half.py:Half", "class Half lacks initialize_collecting_node, collect_data"),
    ("{dir}/needs.py:Needs", "ModuleNotFoundError: No module named 'not_installed_anywhere'"),
    ("not_a_module_anywhere:Tally", "no module 'not_a_module_anywhere' on the Python path"),
])
def test_load_errors_say_what_where_and_what_to_do(tmp_path, spec, says):
    directory = write_class(tmp_path).parent
    (directory / "broken.py").write_text("class Broken:\n    def (self):\n")
    (directory / "half.py").write_text("class Half:\n    def initialize_processing_node(self, **_): pass\n"
                                       "    def process_data(self, **_): pass\n")
    (directory / "needs.py").write_text("import not_installed_anywhere\n")
    with pytest.raises(ProcessingError) as error:
        processing.load(spec.format(dir=directory))
    assert says.format(dir=directory) in str(error.value)


def test_rank_is_the_number_of_the_process_name():
    assert processing.rank_of("processing.2", "processing") == 2
    for name in ("processing.0", "processing.x", "worker.1", "processing"):
        with pytest.raises(ProcessingError, match="start it with --name processing.N"):
            processing.rank_of(name, "processing")


def test_data_decodes_pixels_only_when_read_and_names_what_it_has():
    pixels = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    blob = codecs.compress(pixels, "bslz4")
    spec = ArraySpec(name="data", dtype="<u2", shape=(64, 64), compression="bslz4")
    frame = Frame.from_blobs(scan_id="s1", epoch=2, frame=9, origin="receiver.1", blobs=[(spec, blob)],
                             meta={"start_time": 5})
    header = Frame.from_arrays(scan_id="s1", epoch=2, frame=0, origin="receiver.1",
                               arrays={"pixel_mask": np.zeros((64, 64), np.uint32)},
                               meta={"detector": {"energy_ev": 12000.0}})
    data = processing.FrameData(frame, scan={"scan_id": "s1"}, detector=header, received=1.5)
    assert {k: data[k] for k in ("scan_id", "frame_number", "epoch", "event_id", "timestamp", "frame_meta")} == {
        "scan_id": "s1", "frame_number": 9, "epoch": 2, "event_id": "s1//9", "timestamp": 1.5,
        "frame_meta": {"start_time": 5}}
    assert data["detector"] == {"detector": {"energy_ev": 12000.0}} and "pixel_mask" in data
    assert sorted(data) == sorted(["scan_id", "frame_number", "epoch", "event_id", "timestamp", "frame_meta",
                                   "scan", "detector", "detector_data", "pixel_mask"])
    with pytest.raises(KeyError, match="this frame's data has"):
        data["beam_energy"]
    assert not frame._decoded  # nothing decompressed until the class reads the pixels
    np.testing.assert_array_equal(data["detector_data"], pixels)
    assert list(frame._decoded) == ["data"]
    fed = data.with_feedback({"detector_data": "fed", "gain": 2})
    assert fed["detector_data"] == "fed" and fed["gain"] == 2 and "gain" not in data


def test_records_and_feedback_carry_nested_arrays_and_json_values_never_pickle():
    values = {"profile": np.linspace(0, 1, 5), "peaks": {"x": np.array([1.5, 2.5], np.float32), "n": np.int64(2)},
              "list": [np.zeros((2, 2), bool), "text", None], "nan": float("nan"), "pair": (1, 2)}
    record = travel(to_record(values, kind=RECORD, rank=2, frame=7, scan_id="s1", epoch=3, origin="processing.2",
                              where="C.process_data"))
    assert record.key == (3, 7) and record.header.meta == {"kind": RECORD, "rank": 2}
    for back, rank in (from_record(record), (from_feedback(to_feedback(values, "C.collect_data")), 2)):
        assert rank == 2 and back["pair"] == [1, 2] and back["peaks"]["n"] == 2 and np.isnan(back["nan"])
        np.testing.assert_array_equal(back["profile"], values["profile"])
        assert back["peaks"]["x"].dtype == np.float32 and back["list"][0].dtype == bool and back["list"][1:] == ["text", None]
    for bad, says in (({"names": np.array(["a"])}, "the array at ['names'] is <U1; only numeric arrays travel"),
                      ({"by_rank": {1: 2}}, "the dict at ['by_rank'] has keys [1] that are not strings"),
                      ({"s": {1, 2}}, "set at ['s'] cannot travel"), ([1], "returned list for the collector")):
        with pytest.raises(ProcessingError) as error:
            to_record(bad, kind=RECORD, rank=1, frame=0, scan_id="s1", epoch=0, origin="p", where="C.process_data")
        assert str(error.value).startswith("C.process_data") and says in str(error.value)


def test_a_record_keeps_what_was_sent_though_the_class_reuses_its_buffer():
    buffer = np.zeros(3)
    record = to_record({"b": buffer}, kind=RECORD, rank=1, frame=0, scan_id="s", epoch=0, origin="p", where="w")
    buffer[:] = 9
    assert from_record(travel(record))[0]["b"].tolist() == [0, 0, 0]


def test_offline_driver_honours_feedback_and_collects_the_end_record(tmp_path):
    cls = processing.load(f"{write_class(tmp_path)}:Tally")
    done = processing.run_offline(cls, parameters={"scale": 2}, frames=frames(4))
    assert (done.frames, done.collected, done.failed) == (4, 4, 0)
    result = done.result
    assert result["frame_number"].tolist() == [0, 1, 2, 3] and result["sum"].tolist() == [0, 32, 64, 96]
    (end,) = result["ends"]
    assert end["rank"] == 1
    # Each frame's data has the feedback collect_data sent after the frame before (to all and to rank 1).
    assert [total for total, _ in end["fed"]] == [None, 0, 32, 96]
    assert [note if note is None else note.tolist() for _, note in end["fed"]] == [None, [0, 1, 2], [1, 2, 3], [2, 3, 4]]


def test_offline_driver_counts_a_failing_frame_and_goes_on(tmp_path, caplog):
    text = CLASS.replace('return {"frame"', 'assert data["frame_number"] != 2, "frame 2 is bad"\n        return {"frame"')
    cls = processing.load(f"{write_class(tmp_path, text, 'failing.py')}:Tally")
    done = processing.run_offline(cls, parameters={"scale": 1}, frames=frames(4))
    assert (done.frames, done.collected, done.failed) == (4, 3, 1)
    assert done.result["frame_number"].tolist() == [0, 1, 3]
    assert "frame 2 failed" in caplog.text and "frame 2 is bad" in caplog.text


def test_a_class_that_breaks_the_contract_is_told_how(tmp_path):
    cls = processing.load(f"{write_class(tmp_path)}:Tally")
    with pytest.raises(ProcessingError, match=r"__init__ or initialize_processing_node failed: KeyError"):
        processing.ProcessingNode(cls, parameters={}, rank=1, pool_size=2)
    node = processing.ProcessingNode(cls, parameters={"scale": 1}, rank=1, pool_size=2)
    node.instance.process_data = lambda **_: {"no": "rank"}
    with pytest.raises(ProcessingError, match=r"returned dict .*; it returns \(dict, node_rank\)"):
        node.process(frames(1)[0])


def test_result_file_is_plain_hdf5_of_the_dict(tmp_path):
    path = processing_result.write(processing_result.result_path(tmp_path, "s1", "collector"),
                                   {"profile": {"hits": np.ones(3), "bin_px": 4.0}, "hit_rate": 0.25, "name": "radial",
                                    "labels": ["a", "b"], "mixed": [{"a": 1}, 2], "none": None, "a/b": 1},
                                   scan_id="s1", stage="collector", processing="m:C", parameters={"x": 1}, frames=4)
    assert path.name == "s1.collector.h5" and not list(tmp_path.glob(".*partial"))
    with h5py.File(path, "r", libver=("earliest", "v110")) as f:
        assert f["profile/hits"][()].tolist() == [1, 1, 1] and f["profile/bin_px"][()] == 4.0
        assert f["hit_rate"][()] == 0.25 and f["name"].asstr()[()] == "radial"
        assert f["labels"].asstr()[()].tolist() == ["a", "b"] and f["mixed"].attrs["json"] == 1
        assert f["none"].shape is None and f["a_b"][()] == 1
        assert dict(f.attrs) | {"frames_collected": 4} == {"scan_id": "s1", "stage": "collector", "processing": "m:C",
                                                           "parameters": '{"x": 1}', "frames_collected": 4,
                                                           "program": "surveyor 0.1.0"}


def test_end_records_are_numbered_apart_from_frames():
    record = to_record({}, kind=END_RECORD, rank=2, frame=END_FRAME + 2, scan_id="s", epoch=1, origin="p", where="w")
    assert travel(record).header.frame == END_FRAME + 2 and from_record(travel(record)) == ({}, 2)


RECORDED = SHARED / "data" / "recorded"
SEEN = '''
class Seen:
    """What the class sees of a real detector's stream: frames, shape, geometry, the pixel mask."""

    def __init__(self, *, parameters):
        pass

    def initialize_processing_node(self, *, node_rank, node_pool_size):
        pass

    def initialize_collecting_node(self, *, node_rank, node_pool_size):
        self.seen = []

    def process_data(self, *, node_rank, node_pool_size, data):
        image, good = data["detector_data"], data["pixel_mask"] == 0
        return {"frame": data["frame_number"], "shape": list(image.shape), "masked": int((~good).sum()),
                "energy_ev": data["detector"]["detector"]["energy_ev"], "scan_id": data["scan_id"]}, node_rank

    def collect_data(self, *, node_rank, node_pool_size, processed_data):
        self.seen.append(processed_data[0])

    def end_processing_on_collecting_node(self, *, node_rank, node_pool_size):
        return {key: [seen[key] for seen in self.seen] for key in self.seen[0]}
'''


@pytest.mark.skipif(not RECORDED.is_dir(), reason="../shared/data/recorded is absent")
@pytest.mark.parametrize("recording, frames", [("eiger1m_stream1", 9), ("eiger1m_stream2", 10)])
def test_surveyor_process_runs_a_class_over_a_recorded_detector_stream(tmp_path, recording, frames):
    code = write_class(tmp_path, SEEN, "seen.py")
    assert process.run(spec=f"{code}:Seen", source=str(RECORDED / f"{recording}.msgpack.gz"), params=[],
                       pipeline=None, out=str(tmp_path), stage="offline", protocol=None, dataset="") == 0
    with h5py.File(tmp_path / f"{recording}.offline.h5", "r") as f:
        assert len(f["frame"]) == frames and f["shape"][0].tolist() == [1065, 1030]
        assert set(f["energy_ev"][()]) == {8000.0} and set(f["scan_id"].asstr()[()]) == {recording}
        assert f["masked"][()].min() > 30000  # the detector's module gaps, from its header
        assert f.attrs["frames_collected"] == frames and f.attrs["processing"] == f"{code}:Seen"


def test_feedback_too_large_for_the_handler_is_refused_with_what_to_do():
    with pytest.raises(ProcessingError, match="the handler relays at most .*send less"):
        to_feedback({"background": np.zeros((512, 512))}, "C.collect_data")


def test_the_example_pipeline_finds_its_class_from_any_working_directory(tmp_path, monkeypatch):
    """A relative file in a pipeline is taken from the pipeline file's folder, not from where
    `surveyor run` was started."""
    from libs.common.pipeline import load

    monkeypatch.chdir(tmp_path)
    pipeline = load(REPO / "examples" / "radial_monitor.toml")
    spec = pipeline.stages["processing"].params["processing"]
    assert not Path(spec.split(":")[0]).is_absolute()
    assert processing.load(spec, Path(pipeline.directory)).__name__ == "RadialMonitor"
    with pytest.raises(ProcessingError, match="pipeline file's folder"):
        processing.load("nowhere.py:RadialMonitor", Path(pipeline.directory))
