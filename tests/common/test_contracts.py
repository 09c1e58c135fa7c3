"""The contracts between stages (libs/common/contracts.py): every model takes the example its
docstring shows and sends it back unchanged, the detector header of a real recording goes on the
wire with the keys it always had, and meta that does not parse is refused naming the frame, the
stage that sent it and the field."""

from __future__ import annotations

import gzip
import json
import textwrap

import msgpack
import numpy as np
import pytest

from libs.common import contracts
from libs.common.contracts import (CALIBRATION, DETECTOR_HEADER, END_RECORD, FRAMES_HEADER, PEAKS, RECORD, RESULT,
                                   Calibration, CleanFrame, DetectorHeader, FramesHeader, Peaks, PixelFormat,
                                   ProcessingRecord, Reconstruction, ScanHeader, parse_header, parse_record)
from libs.common.detector import stream1
from libs.common.errors import FrameError
from libs.common.frames import Frame, decode
from tests.conftest import SHARED

RECORDING = SHARED / "data" / "recorded" / "eiger1m_stream1.msgpack.gz"


def _frame(meta: dict, *, frame: int = 17, origin: str = "peak_worker.2", arrays: dict | None = None) -> Frame:
    """A frame with `meta` as a consumer receives it: through the bytes."""
    return decode(Frame.from_arrays(scan_id="s1", epoch=3, frame=frame, origin=origin, arrays=arrays or {},
                                    meta=meta).encode())


def _example(model: type) -> dict:
    """The JSON example in a model's docstring (its last block indented under the text)."""
    doc = textwrap.dedent(model.__doc__.split("\n", 1)[1])
    lines = doc.rstrip().splitlines()
    start = max(i for i, line in enumerate(lines) if line.startswith("    {"))
    return json.loads(" ".join(line.strip() for line in lines[start:]))


HEADERS = [DetectorHeader, Calibration, FramesHeader]
RECORDS = [Peaks, Reconstruction, ProcessingRecord]


@pytest.mark.parametrize("model", HEADERS + RECORDS + [CleanFrame], ids=lambda m: m.__name__)
def test_every_model_takes_its_docstring_example_and_sends_it_back_as_it_came(model):
    example = _example(model)
    frame = _frame(example, frame=0 if model in HEADERS else 17)
    if model in HEADERS:
        meta = parse_header(frame)
    elif model in RECORDS:
        meta = parse_record(frame)
    else:
        meta = model.of(frame)
    assert type(meta) is model
    assert model.of(frame) == meta
    assert meta.to_meta() == example
    assert msgpack.unpackb(_frame(meta.to_meta()).encode()[0])["meta"] == example  # the wire, unchanged


def test_the_names_are_the_models_tags():
    assert DetectorHeader.model_fields["header"].default == DETECTOR_HEADER
    assert Calibration.model_fields["header"].default == CALIBRATION
    assert FramesHeader.model_fields["header"].default == FRAMES_HEADER
    assert Peaks.model_fields["kind"].default == PEAKS
    assert Reconstruction.model_fields["kind"].default == RESULT
    assert set(ProcessingRecord.model_fields["kind"].annotation.__args__) == {RECORD, END_RECORD}


@pytest.mark.skipif(not RECORDING.is_file(), reason="../shared/data/recorded is absent")
def test_a_recorded_detector_header_goes_on_the_wire_with_the_keys_it_always_had():
    with gzip.open(RECORDING) as f:
        first = next(iter(msgpack.Unpacker(f, raw=False)))
    start = stream1.decode(list(first))
    meta = DetectorHeader(series=start.series, protocol="stream1", detector=start.info, config=start.config)
    # What the receiver sent before the contract had a model:
    assert meta.to_meta() == {"series": start.series, "protocol": "stream1",
                              "detector": start.info.model_dump(mode="json", exclude_none=True),
                              "config": start.config}
    header = ScanHeader.of(_frame(meta.to_meta(), frame=0, origin="receiver.1",
                                  arrays={"pixel_mask": np.zeros((4, 4), np.uint32)}))
    assert header.meta == meta and header.meta.detector.shape == (1065, 1030)
    assert header.meta.detector.serial_number == "E-02-0153" and header.names == {"pixel_mask"}
    assert "header" not in meta.to_meta()  # the detector's header is the one without a name
    synthetic = DetectorHeader(series="s1", protocol="synthetic")
    assert synthetic.to_meta() == {"series": "s1", "protocol": "synthetic"}
    assert parse_header(_frame(synthetic.to_meta(), frame=0)) == synthetic


def test_a_peak_record_without_sums_sends_no_sum_keys_and_one_with_them_both():
    peaks = Peaks(n_peaks=3, found=5, hit=True, max_num_peaks=3,
                  frame=PixelFormat(shape=(1065, 1030), dtype="<u4", compression="bslz4"))
    assert "sum_frames" not in peaks.to_meta() and "summed" not in peaks.to_meta()
    summed = peaks.model_copy(update={"sum_frames": (1, 1), "summed": [16, 17]})
    assert parse_record(_frame(summed.to_meta())) == summed
    with pytest.raises(FrameError, match="sum_frames and summed come together"):
        parse_record(_frame({**peaks.to_meta(), "sum_frames": [1, 1]}))


def test_numpy_values_leave_as_plain_numbers():
    result = Reconstruction(pixel_size_m=np.float64(1e-8), iterations=np.int64(10), iterations_after_last_frame=2,
                            error=np.float32(0.5), frames_used=4, beta=0.9, seconds_after_last_frame=1.0,
                            seconds_per_iteration_after_last_frame=0.5)
    assert parse_record(_frame(result.to_meta())) == result  # np.float32 would not even encode


@pytest.mark.parametrize("meta, said", [
    ({**_example(Peaks), "n_peaks": "many"}, "peaks record of frame 17 of scan s1 from peak_worker.2: n_peaks: "
                                             "Input should be a valid integer"),
    ({**_example(Peaks), "hit": None}, "hit: Input should be a valid boolean (got None)"),
    ({k: v for k, v in _example(Peaks).items() if k != "frame"}, "frame: Field required"),
    ({**_example(Peaks), "frame": {"shape": [4, 4], "dtype": "<u2", "compression": "zip"}},
     "frame.compression: Input should be 'none', 'bslz4' or 'lz4'"),
    ({**_example(Peaks), "peaks_found": 3}, "peaks_found: Extra inputs are not permitted"),
    ({**_example(Reconstruction), "kind": "reconstructed"}, "record of frame 17 of scan s1 from peak_worker.2: "
                                                            "kind 'reconstructed' is none of 'peaks'"),
    ({"rank": 2}, "no 'kind'"),
    ({"kind": "processed", "rank": -1}, "rank: Input should be greater than or equal to 0"),
])
def test_a_record_that_does_not_parse_is_refused_naming_the_frame_the_sender_and_the_field(meta, said):
    with pytest.raises(FrameError) as refused:
        parse_record(_frame(meta))
    assert said in str(refused.value)
    assert "frame 17 of scan s1 from peak_worker.2" in str(refused.value)


def test_a_header_or_a_clean_frame_that_does_not_parse_is_refused_naming_the_field():
    with pytest.raises(FrameError, match=r"calibration header of scan s1 from dark_worker.1: centre_px: Field "):
        parse_header(_frame({"header": "calibration", "darks": 3}, frame=0, origin="dark_worker.1"))
    with pytest.raises(FrameError, match=r"frames header of scan s1 from frame_worker.1: downsample: Input should "
                                         r"be 'fourier' or 'bin' \(got 'nearest'\)"):
        parse_header(_frame({**_example(FramesHeader), "downsample": "nearest"}, frame=0, origin="frame_worker.1"))
    with pytest.raises(FrameError, match=r"header 'flats' is none of 'detector', 'calibration', 'frames'"):
        parse_header(_frame({"header": "flats"}, frame=0))
    with pytest.raises(FrameError, match=r"detector header of scan s1 from receiver.1: detector.shape"):
        parse_header(_frame({"series": "1", "protocol": "stream1", "detector": {"shape": "big"}}, frame=0,
                            origin="receiver.1"))
    with pytest.raises(FrameError, match=r"clean frame of frame 17 of scan s1 from frame_worker.3: index: Field"):
        CleanFrame.of(_frame({}, origin="frame_worker.3"))
    with pytest.raises(FrameError, match=r"peak record of frame 17 .*: kind: Input should be 'peaks' \(got "
                                         r"'reconstruction'\)"):
        Peaks.of(_frame(_example(Reconstruction)))


def test_the_module_says_where_each_model_is():
    """Every model of the module is one of those tested here."""
    models = {obj for obj in vars(contracts).values()
              if isinstance(obj, type) and issubclass(obj, contracts.Meta) and obj is not contracts.Meta}
    assert models == set(HEADERS + RECORDS + [CleanFrame])
