"""A detector message over the receiver's `max_message_bytes` is dropped by ZeroMQ, which then
closes the link for good: the receiver counts and reports it, connects again, and the series goes on."""

from __future__ import annotations

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
