"""Detector stream formats: real recorded messages decode right; every format round-trips; bad
messages are refused with a reason (and never reach a C decoder)."""

from __future__ import annotations

import gzip
import json
import struct

import bitshuffle
import cbor2
import msgpack
import numpy as np
import pytest

from libs.common import codecs
from libs.common.detector import PROTOCOLS, DetectorInfo, Image, SeriesEnd, SeriesStart, StreamError
from libs.common.frames import ArraySpec, Frame
from tests.conftest import SHARED

RECORDED = SHARED / "data" / "recorded"
needs_recordings = pytest.mark.skipif(not RECORDED.is_dir(), reason="../shared/data/recorded is absent")


def recording(name: str) -> list[list[bytes]]:
    with gzip.open(RECORDED / f"eiger1m_{name}.msgpack.gz") as f:
        return [list(m) for m in msgpack.Unpacker(f, raw=False)]


def independent_decode(blob: bytes, shape, dtype) -> np.ndarray:
    """bitshuffle's own decoder on the stripped stream: not our code path."""
    total, block = struct.unpack(">QI", blob[:12])
    assert total == np.prod(shape) * np.dtype(dtype).itemsize
    return bitshuffle.decompress_lz4(np.frombuffer(blob, np.uint8)[12:], shape, np.dtype(dtype),
                                     block // np.dtype(dtype).itemsize)


@needs_recordings
def test_recorded_stream1_decodes_with_geometry_mask_and_blobs_untouched():
    messages = recording("stream1")
    header = PROTOCOLS["stream1"].decode(messages[0])
    assert isinstance(header, SeriesStart) and header.series == "14"
    assert header.info.shape == (1065, 1030) and header.info.energy_ev == 8000.0
    assert header.info.pixel_size_m == (75e-6, 75e-6) and header.info.sensor_material == "Si"
    assert header.pixel_mask["data"].shape == (1065, 1030) and header.flatfield["data"].dtype == np.float32
    assert header.config["appendix"] == {"filename": "", "rotate": 0}
    for number, message in enumerate(messages[1:]):
        image = PROTOCOLS["stream1"].decode(message)
        spec, blob = image.blobs[0]
        assert image.frame == number and spec.compression == "bslz4" and spec.shape == (1065, 1030)
        assert bytes(blob) == message[2]
        pixels = Frame.from_blobs(scan_id="s", epoch=1, frame=number, origin="r", blobs=image.blobs).array()
        assert np.array_equal(pixels, independent_decode(message[2], (1065, 1030), "<u4"))


@needs_recordings
def test_recorded_stream2_decodes_with_cbor_tags_and_blobs_untouched():
    messages = recording("stream2")
    decode = PROTOCOLS["stream2"].decode
    header = decode(messages[0])
    assert header.series == "16" and header.info.n_images == 10 and header.info.shape == (1065, 1030)
    assert header.pixel_mask["data"].shape == (1065, 1030)
    assert isinstance(decode(messages[-1]), SeriesEnd)
    for number, message in enumerate(messages[1:-1]):
        image = decode(message)
        spec, blob = image.blobs[0]
        assert image.frame == number and spec.dtype == "<u4"
        assert bytes(blob) in message[0]
        pixels = Frame.from_blobs(scan_id="s", epoch=1, frame=number, origin="r", blobs=image.blobs).array()
        assert np.array_equal(pixels, independent_decode(bytes(blob), (1065, 1030), "<u4"))
        assert 10_000 < int(pixels[pixels != 0xFFFFFFFF].sum()) < 200_000


@pytest.mark.parametrize("protocol", sorted(PROTOCOLS))
@pytest.mark.parametrize("compression", ["none", "bslz4", "lz4"])
def test_every_format_round_trips_pixels_and_header(protocol, compression):
    pixels = np.random.default_rng(3).poisson(5, (70, 90)).astype("<u2")
    blob = pixels.tobytes() if compression == "none" else codecs.compress(pixels, compression)
    spec = ArraySpec(name="data", dtype="<u2", shape=(70, 90), compression=compression)
    fmt = PROTOCOLS[protocol]
    back = fmt.decode(fmt.encode(Image(series="3", frame=11, blobs=[(spec, blob)])))
    assert back.frame == 11 and back.blobs[0][0] == spec
    assert np.array_equal(Frame.from_blobs(scan_id="s", epoch=1, frame=11, origin="r", blobs=back.blobs).array(),
                          pixels)
    info = DetectorInfo(shape=(70, 90), dtype="<u2", energy_ev=9000.0, distance_m=0.5,
                        pixel_size_m=(75e-6, 75e-6), beam_center_px=(35.5, 44.0))
    header = fmt.decode(fmt.encode(SeriesStart(series="3", info=info)))
    assert header.info.model_dump(exclude_none=True) == info.model_dump(exclude_none=True)


def stream1_image(**changes) -> list[bytes]:
    pixels = np.ones((20, 30), "<u4")
    blob = codecs.compress(pixels)
    described = {"htype": "dimage_d-1.0", "shape": [30, 20], "type": "uint32", "encoding": "bs32-lz4<",
                 "size": len(blob)}
    described.update(changes)
    return [json.dumps({"htype": "dimage-1.0", "series": 1, "frame": 0}).encode(),
            json.dumps(described).encode(), blob]


@pytest.mark.parametrize(("message", "reason"), [
    ([b"\xff\xfe"], "not JSON"),
    ([b"[1, 2]"], "not an object"),
    ([b'{"htype": "dimage-1.0", "series": 1, "frame": 0}'], "parts"),
    (stream1_image(shape=[30, 21]), "header says"),
    (stream1_image(type="uint16"), "does not fit"),
    (stream1_image(size=5), "says 5 bytes"),
    (stream1_image(encoding="zstd"), "encoding"),
    (stream1_image(shape=[30, -1]), "shape"),
    (stream1_image()[:2] + [codecs.compress(np.ones((20, 30), "<u4"))[:-9]], "bytes"),
])
def test_stream1_refuses_bad_messages_with_a_reason(message, reason):
    with pytest.raises(StreamError, match=reason):
        PROTOCOLS["stream1"].decode(message)


def test_stream1_json_that_only_the_standard_library_reads_still_decodes():
    """The fast JSON parser refuses NaN and integers over 64 bits; a detector's message with them
    is read all the same."""
    message = stream1_image()
    first = json.loads(message[0])
    message[0] = json.dumps({**first, "hash": float("nan"), "counter": 2 ** 70}).encode()
    image = PROTOCOLS["stream1"].decode(message)
    assert image.frame == 0 and image.blobs[0][0].shape == (20, 30)


@pytest.mark.parametrize(("message", "reason"), [
    ([b"\xff"], "not CBOR"),
    ([b"\xa1\x64type\x65image"], "image_id"),
    ([b"\xa1\x64type\x64what"], "not start, image or end"),
    ([b"\x83\x01\x02\x03"], "not a map"),
])
def test_stream2_refuses_bad_messages_with_a_reason(message, reason):
    with pytest.raises(StreamError, match=reason):
        PROTOCOLS["stream2"].decode(message)


# --- header parts that cannot be used are left out, never the header ------------------------------


@needs_recordings
def test_recorded_stream1_header_with_empty_flatfield_and_mask_keeps_everything_else():
    """The Eiger 4M case: header_detail "all" with empty flatfield and pixel-mask blobs."""
    header = recording("stream1")[0]
    header[3] = header[5] = b""
    start = PROTOCOLS["stream1"].decode(header)
    assert [name for name, _ in start.left_out] == ["dflatfield-1.0", "dpixelmask-1.0"]
    assert all("blob has 0 bytes" in why for _, why in start.left_out)
    assert start.flatfield == {} and start.pixel_mask == {}
    assert start.series == "14" and start.info.shape == (1065, 1030) and start.info.energy_ev == 8000.0
    assert start.config["appendix"] == {"filename": "", "rotate": 0}


def stream1_header() -> list[bytes]:
    """A good dheader-1.0 (header_detail "all") of a 20 x 30 detector: config, flatfield, mask."""
    start = SeriesStart(series="2", info=DetectorInfo(shape=(20, 30), dtype="<u2", energy_ev=9000.0),
                        flatfield={"data": np.full((20, 30), 1.5, np.float32)},
                        pixel_mask={"data": np.arange(600, dtype=np.uint32).reshape(20, 30)})
    return PROTOCOLS["stream1"].encode(start)


def part(value: dict) -> bytes:
    return json.dumps(value).encode()


@pytest.mark.parametrize(("change", "left_out", "kept"), [
    (lambda p: p[:3] + [b""] + p[4:], ["dflatfield-1.0"], {"pixel_mask"}),
    (lambda p: p[:4] + [part({"htype": "dpixelmask-1.0", "shape": [31, 20], "type": "uint32"}),
                        bytes(31 * 20 * 4)], ["dpixelmask-1.0"], {"flatfield"}),
    (lambda p: p[:4] + [part({"htype": "dpixelmask-1.0", "shape": [30, 20], "type": "complex"}), p[5]],
     ["dpixelmask-1.0"], {"flatfield"}),
    (lambda p: p[:5], ["dpixelmask-1.0"], {"flatfield"}),
    (lambda p: p + [part({"htype": "dcountrate_table-1.0", "shape": [2, 4], "type": "float32"}), b""],
     ["dcountrate_table-1.0"], {"flatfield", "pixel_mask"}),
    (lambda p: p[:2] + [part({"htype": "dwhatever-1.0"}), b"\x00\xff\x01"] + p[2:], ["dwhatever-1.0"],
     {"flatfield", "pixel_mask"}),
])
def test_stream1_header_parts_that_cannot_be_used_are_left_out_and_named(change, left_out, kept):
    start = PROTOCOLS["stream1"].decode(change(stream1_header()))
    assert [name for name, _ in start.left_out] == left_out
    assert start.info.shape == (20, 30) and start.info.energy_ev == 9000.0
    assert {kind for kind in ("flatfield", "pixel_mask") if getattr(start, kind)} == kept
    if "pixel_mask" in kept:
        assert np.array_equal(start.pixel_mask["data"], np.arange(600).reshape(20, 30))
    assert "appendix" not in start.config  # an unknown part's blob is not taken for an appendix


def test_stream1_header_whose_configuration_is_not_json_keeps_its_arrays():
    parts = stream1_header()
    parts[1] = b"\xff\xfe"
    start = PROTOCOLS["stream1"].decode(parts)
    [(name, why)] = start.left_out
    assert name == "detector configuration (header part 1)" and "not JSON" in why
    assert start.info.shape is None and start.pixel_mask["data"].shape == (20, 30)


def stream2_start(**changes) -> list[bytes]:
    [message] = PROTOCOLS["stream2"].encode(SeriesStart(
        series="4", info=DetectorInfo(shape=(20, 30), dtype="<u4", n_images=7),
        flatfield={"data": np.full((20, 30), 1.5, np.float32)}, pixel_mask={"data": np.ones((20, 30), np.uint32)}))
    return [cbor2.dumps({**cbor2.loads(message), **changes})]


def cbor_array(shape: list[int], tag: int, payload: bytes) -> cbor2.CBORTag:
    return cbor2.CBORTag(40, [shape, cbor2.CBORTag(tag, payload)])


@pytest.mark.parametrize(("changes", "left_out", "kept"), [
    ({"flatfield": {"threshold_1": cbor_array([20, 30], 85, b"")}}, ["flatfield[threshold_1]"],
     {"flatfield": [], "pixel_mask": ["data"]}),
    ({"pixel_mask": {"threshold_1": cbor_array([21, 30], 70, bytes(21 * 30 * 4))}}, ["pixel_mask[threshold_1]"],
     {"flatfield": ["data"], "pixel_mask": []}),
    ({"pixel_mask": b""}, ["pixel_mask"], {"flatfield": ["data"], "pixel_mask": []}),
    # A later channel is never promoted to the first ("data") in place of one left out.
    ({"flatfield": {"threshold_1": b"", "threshold_2": cbor_array([20, 30], 85, bytes(2400))}},
     ["flatfield[threshold_1]"], {"flatfield": ["threshold_2"], "pixel_mask": ["data"]}),
])
def test_stream2_start_arrays_that_cannot_be_used_are_left_out_and_named(changes, left_out, kept):
    start = PROTOCOLS["stream2"].decode(stream2_start(**changes))
    assert [name for name, _ in start.left_out] == left_out
    assert start.series == "4" and start.info.n_images == 7 and start.info.shape == (20, 30)
    assert {"flatfield": sorted(start.flatfield), "pixel_mask": sorted(start.pixel_mask)} == kept


def test_stins_header_meta_that_cannot_be_used_is_left_out_value_by_value():
    stins = PROTOCOLS["stins"]
    head = part({"htype": "header", "msg_number": 3, "filename": "/data/x.h5"})
    start = stins.decode([head, part({"shape": [64, "x"], "dtype": "<u2", "energy_ev": 9000})])
    assert [name for name, _ in start.left_out] == ["header meta shape"]
    assert start.info.shape is None and start.info.dtype == "<u2" and start.info.energy_ev == 9000.0
    start = stins.decode([head, b"\x00garbage"])
    assert [name for name, _ in start.left_out] == ["header part 1 (meta)"]
    assert start.series == "3" and start.config == {"filename": "/data/x.h5"}
