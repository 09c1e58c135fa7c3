"""`surveyor run` as an operator meets it: each run's logs in a directory of their own, a summary
that cannot be written is reported and not fatal, `--scans` counts finished scans only,
`surveyor status --watch --handler X` follows X's status feed, and `surveyor ctl shutdown` ends the
run (a crash before it is still restarted)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import Run, synthetic_pipeline, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def whole_lines(monkeypatch):
    """The launcher's console (rich) then keeps each message on one line, whole."""
    monkeypatch.setenv("COLUMNS", "500")


def surveyor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libs.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env={**os.environ, **env})


def test_a_summary_that_cannot_be_written_is_reported_and_the_run_keeps_its_logs_apart(tmp_path):
    blocker = tmp_path / "not_a_directory"
    blocker.write_text("")
    summary = blocker / "summary.json"
    run = Run(synthetic_pipeline(tmp_path, frames=50), "--simulate", "--summary", str(summary), cwd=tmp_path)
    code, output = run.finish(timeout_s=120)
    flat = " ".join(output.split())
    assert code == 0, output
    assert f"summary not written to {summary}" in flat and "errno" in flat, output
    assert list(run.out.glob("*_raw.cxi")), "the scan's file is missing"
    assert run.logs.parent == run.log_root and run.logs.name.startswith("pipeline-")
    assert f"logs in {run.logs}" in flat
    assert {"handler.log", "receiver.1.log", "writer.1.log"} <= {p.name for p in run.logs.iterdir()}
    logs = surveyor("logs", "writer.1", env={"SURVEYOR_LOG_DIR": str(run.log_root)})
    assert logs.returncode == 0 and "registered with the handler" in logs.stdout, logs.stderr


def test_scans_counts_finished_scans_not_aborted_ones_and_watch_follows_the_handler_asked_for(tmp_path):
    run = Run(synthetic_pipeline(tmp_path, frames=100, rate_hz=500), "--scans", "1", cwd=tmp_path)
    try:
        run.wait_ready(4)
        watcher = subprocess.Popen([sys.executable, "-m", "libs.cli.main", "status", "--watch", "--handler",
                                    run.endpoint], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        assert run.ctl("start_scan", {"scan_id": "doomed", "n_frames": 5000}).ok
        wait_for(lambda: run.ctl("status").result["scan"]["stages"]["writer"]["written"] > 20, 30,
                 "frames at the writer")
        assert run.ctl("abort", {"scan_id": "doomed"}).ok
        run.feed.wait("scan_aborted", scan_id="doomed")
        assert run.process.poll() is None, "the run ended on an aborted scan"
        watcher.send_signal(signal.SIGINT)
        watched, _ = watcher.communicate(timeout=30)
        assert f"following {run.pipeline.handler.status}" in watched, watched
        assert run.ctl("start_scan", {"scan_id": "kept", "n_frames": 100}).ok
        code, output = run.finish(timeout_s=60)
    finally:
        run.stop()
    assert code == 0, output
    flat = " ".join(output.split())
    assert "scan doomed aborted" in flat and "scan kept: 100 frames received" in flat, output
    scans = {scan["scan_id"]: scan for scan in json.loads((run.out / "summary.json").read_text())["scans"]}
    assert scans["doomed"]["state"] == "aborted" and scans["kept"]["state"] == "finished"


def test_ctl_shutdown_ends_the_run_with_its_summary_and_only_a_crash_is_restarted(tmp_path):
    run = Run(synthetic_pipeline(tmp_path), cwd=tmp_path)
    try:
        run.wait_ready(4)
        crashed = run.service("worker.1")["pid"]
        os.kill(crashed, signal.SIGKILL)
        wait_for(lambda: any(s["name"] == "worker.1" and s["state"] == "up" and s["pid"] != crashed
                             for s in run.ctl("status").result["services"]), 30, "worker.1 restarted")
        pids = [s["pid"] for s in run.ctl("status").result["services"] if s["pid"] != crashed]
        asked = time.monotonic()
        shutdown = surveyor("ctl", "--handler", run.endpoint, "shutdown", env={})
        assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
        code, output = run.finish(timeout_s=20)
        took = time.monotonic() - asked
    finally:
        run.stop()
    flat = " ".join(output.split())
    assert code == 0, output
    assert took < 15, f"the run took {took:.1f} s to end after the shutdown"
    assert "the handler was asked to stop" in flat and f"summary written to {run.out / 'summary.json'}" in flat, output
    assert output.count("restarting") == 1 and "worker.1 exited with code -9" in flat, output
    assert run.summary()["restarts"] == {"handler": 0, "receiver.1": 0, "worker.1": 1, "worker.2": 0, "writer.1": 0}

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False
    wait_for(lambda: all(gone(pid) for pid in pids), 5, "every process of the run gone")
