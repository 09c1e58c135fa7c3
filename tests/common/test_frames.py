"""The frame envelope: zero-copy round trip over a real socket, and refusal of bad messages."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import zmq

from libs.common import codecs
from libs.common.errors import FrameError
from libs.common.frames import ArraySpec, Frame, decode


def test_round_trip_over_zeromq_is_zero_copy_and_exact():
    context = zmq.Context.instance()
    pull = context.socket(zmq.PULL)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push = context.socket(zmq.PUSH)
    push.connect(f"tcp://127.0.0.1:{port}")
    data = np.arange(512 * 512, dtype=np.uint16).reshape(512, 512)
    mask = np.ones((4, 4), bool).view(np.uint8)
    frame = Frame.from_arrays(scan_id="s", epoch=3, frame=17, origin="receiver",
                              arrays={"data": data, "mask": mask}, meta={"hit": True})
    push.send_multipart(frame.encode(), copy=False)
    received = decode(pull.recv_multipart(copy=False))
    push.close(linger=0)
    pull.close(linger=0)
    assert received.key == (3, 17) and received.header.meta == {"hit": True}
    np.testing.assert_array_equal(received.array(), data)
    np.testing.assert_array_equal(received.array("mask"), mask)
    assert not received.array().flags.owndata  # a view of the message memory


def _header(**change):
    header = {"scan_id": "s", "epoch": 1, "frame": 0, "origin": "r",
              "arrays": [{"name": "data", "dtype": "<u2", "shape": [4, 4]}], "meta": {}}
    header.update(change)
    return msgpack.packb(header)


@pytest.mark.parametrize("parts, fragment", [
    ([], "empty"),
    ([b"\xc1"], "not msgpack"),
    ([msgpack.packb([1, 2])], "bad frame header"),
    ([_header(frame=-1)], "frame"),
    ([_header(arrays=[{"name": "data", "dtype": "object", "shape": [1]}]), b"x"], "numeric"),
    ([_header()], "carries 0 buffers"),
    ([_header(), b"\x00" * 31], "needs 32 bytes, got 31"),
])
def test_malformed_frames_are_refused_with_the_reason(parts, fragment):
    with pytest.raises(FrameError, match=fragment):
        decode(parts)


def test_compressed_arrays_travel_as_blobs_and_decode_once_checked():
    pixels = np.arange(64 * 48, dtype="<u2").reshape(64, 48)
    blob = codecs.compress(pixels, "bslz4")
    spec = ArraySpec(name="data", dtype="<u2", shape=(64, 48), compression="bslz4")
    frame = decode(Frame.from_blobs(scan_id="s", epoch=1, frame=0, origin="r", blobs=[(spec, blob)]).encode())
    assert bytes(frame.raw()) == blob
    assert np.array_equal(frame.array(), pixels)
    assert frame.array() is frame.array()
    lying = decode(Frame.from_blobs(scan_id="s", epoch=1, frame=0, origin="r", blobs=[(spec, blob[:-3])]).encode())
    with pytest.raises(FrameError, match="truncated"):
        lying.array()
