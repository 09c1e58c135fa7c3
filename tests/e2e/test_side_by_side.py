"""Pipelines side by side on one host: a run that would share another's endpoints, or cannot bind
its own, stops at once with the reason, and nothing crosses between the pipelines."""

from __future__ import annotations

import socket
import time

import h5py
import numpy as np
import pytest

from tests.conftest import Run, synthetic_pipeline

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def whole_lines(monkeypatch):
    """The launcher's console (rich) then keeps each message on one line, whole."""
    monkeypatch.setenv("COLUMNS", "500")


def held_port() -> socket.socket:
    """A listening TCP socket on a free loopback port: what another program holding it looks like."""
    held = socket.socket()
    held.bind(("127.0.0.1", 0))
    held.listen()
    return held


def test_a_second_pipeline_on_the_first_ones_endpoints_is_refused_and_nothing_crosses(tmp_path):
    a_dir, b_dir = tmp_path / "a", tmp_path / "b"
    a_dir.mkdir()
    b_dir.mkdir()
    a = Run(synthetic_pipeline(a_dir, frames=600, rate_hz=200), cwd=a_dir)
    try:
        a.wait_ready(4)
        services = sorted((s["name"], s["pid"]) for s in a.ctl("status").result["services"])
        assert a.ctl("start_scan", {"scan_id": "a1", "n_frames": 600}).ok
        taken = (f'handler.command="{a.endpoint}"', f'handler.status="{a.pipeline.handler.status}"')
        b = Run(synthetic_pipeline(b_dir, frames=50), "--simulate", cwd=b_dir, overrides=taken)
        started = time.monotonic()
        code, output = b.finish(timeout_s=60)
        assert code == 1, output
        assert time.monotonic() - started < 30, "the refusal took long"
        flat = " ".join(output.split())
        assert a.endpoint in flat and ("another pipeline" in flat or "already answers" in flat), output
        assert "restarting" not in output
        finished = a.wait_scan("a1", timeout_s=60)["summary"]
        assert finished["frames_written"] == 600 and finished["frames_lost"] == 0, finished
        with h5py.File(a.out / "a1_raw.cxi", "r") as f:
            np.testing.assert_array_equal(np.sort(f["entry_1/data_1/frame_number"][...]), np.arange(600))
        assert not list(b.out.glob("*.cxi")), "B's run wrote frames"
        assert sorted((s["name"], s["pid"]) for s in a.ctl("status").result["services"]) == services
        assert a.ctl("ping").ok, "B's run shut A's handler down"
    finally:
        a.stop()


def test_a_handler_that_cannot_bind_stops_the_run_with_the_reason_from_its_log(tmp_path):
    held = held_port()
    try:
        port = held.getsockname()[1]
        run = Run(synthetic_pipeline(tmp_path, frames=50), "--simulate", cwd=tmp_path,
                  overrides=(f'handler.status="tcp://127.0.0.1:{port}"',))
        code, output = run.finish(timeout_s=60)
    finally:
        held.close()
    flat = " ".join(output.split())
    assert code == 1, output
    assert "handler could not bind" in flat and "Address already in use" in flat and str(port) in flat, output
    assert "restarting" not in output
    assert (run.logs / "handler.log").read_text().count("Address already in use") >= 1
    assert not list(run.out.glob("*.cxi"))


def test_a_service_that_cannot_bind_stops_the_run_with_the_reason_from_its_log(tmp_path):
    held = held_port()
    try:
        endpoint = f"tcp://127.0.0.1:{held.getsockname()[1]}"
        run = Run(synthetic_pipeline(tmp_path, frames=50), "--simulate", cwd=tmp_path,
                  overrides=(f'stages.receiver.params.republish="{endpoint}"',))
        code, output = run.finish(timeout_s=90)
    finally:
        held.close()
    flat = " ".join(output.split())
    assert code == 1, output
    assert "receiver.1 could not bind" in flat and endpoint in flat and "Address already in use" in flat, output
    assert "restarting" not in output
