"""Detector stream formats: real recorded messages decode right; every format round-trips; bad
messages are refused with a reason (and never reach a C decoder)."""

from __future__ import annotations

import gzip
import json
import struct

import bitshuffle
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


@pytest.mark.parametrize(("message", "reason"), [
    ([b"\xff"], "not CBOR"),
    ([b"\xa1\x64type\x65image"], "image_id"),
    ([b"\xa1\x64type\x64what"], "not start, image or end"),
    ([b"\x83\x01\x02\x03"], "not a map"),
])
def test_stream2_refuses_bad_messages_with_a_reason(message, reason):
    with pytest.raises(StreamError, match=reason):
        PROTOCOLS["stream2"].decode(message)
