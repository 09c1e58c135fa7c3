"""A liveness of 3 heartbeats on 2 loaded cores: the shipped demos run beside processes that keep
every core busy, and no process is declared dead (the hooks run off the event loop, so a process
at work still beats). `bench/liveness.py` runs the demos at full size; these are short."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from libs.common import client
from tests.conftest import FALSE_DOWN, REPO, free_endpoints, free_port, synthetic_pipeline, wait_for

DEMOS = {
    "crystallography": ("--frames", "80", f'stages.hit_server.params.endpoint="tcp://127.0.0.1:{free_port()}"'),
    "ptychography": ("--frames", "100", "simulation.params={n_dark=10, size=64, raw_shape=[320, 320]}",
                     "stages.frame_worker.params.crop=256", "stages.frame_worker.params.size=64"),
}


def declared_dead(handler_log: Path) -> list[str]:
    """The processes the handler gave up on for missed heartbeats, and those back from the dead."""
    return [line for line in handler_log.read_text().splitlines()
            if "is down: missed heartbeats" in line or FALSE_DOWN in line]


def busy_cores() -> list[subprocess.Popen]:
    """One process spinning on every core, at the pipeline's own priority."""
    return [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(os.cpu_count() or 2)]


@pytest.fixture
def loaded_cores():
    burners = busy_cores()
    yield
    for burner in burners:
        burner.kill()
        burner.wait()


@pytest.mark.slow
@pytest.mark.parametrize("demo", sorted(DEMOS))
def test_the_demos_on_loaded_cores_declare_no_process_dead(start_run, loaded_cores, demo):
    frames, count, *sets = DEMOS[demo]
    run = start_run(REPO / "pipelines" / f"{demo}.toml", "--simulate", frames, count,
                    overrides=(*free_endpoints(), *sets))
    code, output = run.finish(timeout_s=170)
    assert code == 0, output[-3000:]
    assert run.pipeline.handler.liveness == 3
    assert run.summary()["scans"][0]["frames_lost"] == 0
    assert declared_dead(run.logs / "handler.log") == []


def test_a_frame_that_takes_longer_than_the_liveness_costs_no_heartbeat(tmp_path, start_run):
    """A frame takes 3.6 s in the worker, past 3 heartbeats of 1 s: the worker still beats and
    answers `status` while it works, and the scan ends with no process declared dead."""
    run = start_run(synthetic_pipeline(tmp_path, frames=1, workers=1, worker_params="{ delay_s = 3.6 }"),
                    "--simulate")
    run.wait_ready(services=3)
    worker = wait_for(lambda: next((s for s in run.ctl("status").result["services"]
                                    if s["name"] == "worker.1" and s["frames_in"] >= 1), None), 30,
                      "the worker at work")
    started = time.monotonic()
    reply = client.call(worker["command_endpoint"], "status", timeout_s=2)
    assert reply.ok and time.monotonic() - started < 1.0, "status is answered while a frame is worked on"
    code, output = run.finish(timeout_s=60)
    assert code == 0, output[-3000:]
    assert run.summary()["scans"][0]["frames_lost"] == 0
    assert declared_dead(run.logs / "handler.log") == []
