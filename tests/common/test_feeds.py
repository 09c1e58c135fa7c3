"""What front-ends read: every message of a real run's status port parses into its model."""

from __future__ import annotations

import time

import pytest

from libs.common import feeds
from tests.conftest import synthetic_pipeline


def test_every_message_of_a_run_parses_into_its_model(tmp_path, start_run, subscriber):
    run = start_run(synthetic_pipeline(tmp_path, frames=50, rate_hz=25), "--simulate")  # a snapshot a second
    socket = subscriber(run.pipeline.handler.status)
    parsed: list = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(
            isinstance(m, feeds.Event) and m.kind == "scan_finished" for m in parsed):
        if socket.poll(500):
            topic, body, *_ = socket.recv_multipart()
            parsed.append(feeds.parse(topic, body))
    finished = next(m for m in parsed if isinstance(m, feeds.Event) and m.kind == "scan_finished")
    summary = feeds.ScanSummary.model_validate(finished.summary)
    assert summary.frames_lost == 0 and summary.frames_written == 50
    assert any(isinstance(m, feeds.StatusSnapshot) for m in parsed)
    snapshot = feeds.StatusSnapshot.model_validate(run.ctl("status").result)  # the status command: the same model
    assert snapshot.scans[-1] == summary
    assert {row.stage for row in snapshot.services} == {"receiver", "worker", "writer"}
    assert all(row.state == "up" for row in snapshot.services)
    with pytest.raises(ValueError, match="unknown topic"):
        feeds.parse(b"nonsense", b"{}")
    with pytest.raises(ValueError):
        feeds.parse(b"event", b'{"kind": "Not A Kind", "time": 0, "service": "x", "message": ""}')
