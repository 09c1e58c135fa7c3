"""A detector message over the receiver's `max_message_bytes` is dropped by ZeroMQ, which then
closes the link for good: the receiver counts and reports it, connects again, and the series goes on."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import zmq
from zmq.utils.monitor import recv_monitor_message

from libs.common import codecs
from libs.common.detector import PROTOCOLS, DetectorInfo, Image, SeriesEnd, SeriesStart
from libs.common.frames import ArraySpec
from libs.simulation.synthetic import synthetic_frame
from tests.conftest import free_port, ingest_pipeline

pytestmark = pytest.mark.slow


def test_an_oversized_message_is_rejected_and_the_receiver_connects_again(tmp_path, start_run):
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol="stream1", source=source, receiver="max_message_bytes = 65536"),
                    "--scans", "1")
    push = zmq.Context.instance().socket(zmq.PUSH)
    accepted = push.get_monitor_socket(zmq.EVENT_ACCEPTED)
    push.bind(source)
    try:
        run.wait_ready(2)
        assert accepted.poll(30_000), "the receiver never connected"
        recv_monitor_message(accepted)
        encode = PROTOCOLS["stream1"].encode
        spec = ArraySpec(name="data", dtype="<u2", shape=(32, 32), compression="bslz4")

        def images(numbers: range) -> None:
            for number in numbers:
                blob = codecs.compress(synthetic_frame(number, (32, 32), "<u2"))
                push.send_multipart(encode(Image(series="3", frame=number, blobs=[(spec, blob)])))

        push.send_multipart(encode(SeriesStart(series="3", info=DetectorInfo(shape=(32, 32), dtype="<u2",
                                                                             n_images=20))))
        images(range(10))
        push.send_multipart([b'{"htype": "dimage-1.0"}', b"x" * 200_000])
        assert accepted.poll(30_000), "the receiver did not connect again after the oversized message"
        images(range(10, 20))
        push.send_multipart(encode(SeriesEnd(series="3")))
        rejected = run.feed.wait("frame_rejected", timeout_s=30)
        code, output = run.finish(timeout_s=60)
    finally:
        push.disable_monitor()
        accepted.close(linger=0)
        push.close(linger=0)
    assert code == 0, output
    assert "max_message_bytes (65536 bytes)" in rejected["reason"] and rejected["service"] == "receiver.1"
    [scan] = run.summary()["scans"]
    assert scan["frames_written"] == 20 and scan["frames_rejected"] == 1 and scan["frames_lost"] == 0


def test_a_burst_beyond_the_detector_queue_all_arrives(tmp_path, start_run):
    """The detector sends a whole series at once, many times the receiver's queue, in frames far
    smaller compressed than the header announces: every frame is written. (A receiver that sized
    its queue by the header's frame size, then by the first image, wedged the link: 243 of 500.)"""
    source = f"tcp://127.0.0.1:{free_port()}"
    run = start_run(ingest_pipeline(tmp_path, protocol="stream1", source=source,
                                    receiver="buffer_mb = 2, series_timeout_s = 10"), "--scans", "1")
    push = zmq.Context.instance().socket(zmq.PUSH)
    push.bind(source)
    try:
        run.wait_ready(2)
        encode = PROTOCOLS["stream1"].encode
        shape, frames = (512, 512), 600
        spec = ArraySpec(name="data", dtype="<u2", shape=shape, compression="bslz4")
        blobs = [codecs.compress(np.where(synthetic_frame(number, shape, "<u2") > 60000, 1, 0).astype("<u2"))
                 for number in range(8)]
        push.send_multipart(encode(SeriesStart(series="5", info=DetectorInfo(shape=shape, dtype="<u2",
                                                                             n_images=frames))))
        for number in range(frames):
            push.send_multipart(encode(Image(series="5", frame=number, blobs=[(spec, blobs[number % 8])])))
        push.send_multipart(encode(SeriesEnd(series="5")))
        code, output = run.finish(timeout_s=120)
    finally:
        push.close(linger=0)
    assert code == 0, output
    [scan] = run.summary()["scans"]
    assert scan["frames_written"] == frames and scan["frames_lost"] == 0
    with h5py.File(tmp_path / "out" / "series_5_raw.cxi", "r") as f:
        np.testing.assert_array_equal(f["entry_1/data_1/frame_number"][()], np.arange(frames))
