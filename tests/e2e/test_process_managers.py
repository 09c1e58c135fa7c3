"""The same pipeline under supervisord (generated configuration) and the CLI around it: a crash is
restarted, `surveyor ctl shutdown` leaves every pipeline program EXITED, and the web front-end, a
program of the configuration by default but no pipeline process, serves the page until stopped."""

from __future__ import annotations

import os
import signal
import re
import subprocess
import sys
import time
import urllib.request

import pytest

from libs.common import client
from libs.common.pipeline import load
from tests.conftest import free_port, synthetic_pipeline, wait_for

pytestmark = pytest.mark.slow


def surveyor(*args: str, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "libs.cli.main", *args], capture_output=True, text=True,
                          timeout=60, env=env)


def program_states(conf) -> dict[str, str]:
    """supervisorctl's view: program (group:process) -> state."""
    listing = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "status"],
                             capture_output=True, text=True, timeout=30).stdout
    return {line.split()[0]: line.split()[1] for line in listing.splitlines() if line.strip()}


def test_supervisord_runs_restarts_logs_and_shuts_down_the_pipeline(tmp_path):
    pipeline_path = synthetic_pipeline(tmp_path, frames=300)
    endpoint = load(pipeline_path).handler.command
    conf = tmp_path / "surveyor.conf"
    without = surveyor("supervisor-conf", str(pipeline_path), "--no-web")
    assert without.returncode == 0 and "[program:web]" not in without.stdout, without.stderr
    generated = surveyor("supervisor-conf", str(pipeline_path), "--log-dir", str(tmp_path / "logs"),
                         "--web", f"127.0.0.1:{free_port()}")
    assert generated.returncode == 0, generated.stderr
    assert "[program:web]" in surveyor("supervisor-conf", str(pipeline_path)).stdout, "the web program by default"
    conf.write_text(generated.stdout)
    page = re.search(r"The live page .*: (http://127\.0\.0\.1:\d+/)#token=", generated.stdout).group(1)
    (tmp_path / "logs").mkdir()
    daemon = subprocess.Popen([sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        def services():
            try:
                found = client.call(endpoint, "status", timeout_s=1).result["services"]
            except client.NoReply:
                return []
            return [s for s in found if s["state"] == "up"]
        up = wait_for(lambda: len(services()) == 4 and services(), 60, "4 services under supervisord")
        assert sorted(s["name"] for s in up) == ["receiver.1", "worker.1", "worker.2", "writer.1"]
        victim = next(s for s in up if s["name"] == "worker.2")
        os.kill(victim["pid"], signal.SIGKILL)
        wait_for(lambda: any(s["name"] == "worker.2" and s["pid"] != victim["pid"] for s in services()), 30,
                 "supervisord to restart worker.2")
        assert client.call(endpoint, "start_scan", {"scan_id": "supervised", "n_frames": 300}).ok
        wait_for(lambda: any(scan["scan_id"] == "supervised" and scan["frames_written"] == 300
                             for scan in client.call(endpoint, "status").result["scans"]), 30, "the scan to finish")
        env = {**os.environ, "SURVEYOR_LOG_DIR": str(tmp_path / "logs")}
        logs = surveyor("logs", "worker.2", env=env)
        assert logs.returncode == 0 and "registered with the handler" in logs.stdout
        ping = surveyor("ctl", "--handler", endpoint, "ping")
        assert ping.returncode == 0 and '"pong": true' in ping.stdout
        wrong = surveyor("ctl", "--handler", endpoint, "explode")
        assert wrong.returncode == 1 and "UnknownCommand" in wrong.stdout
        status = surveyor("status", "--handler", endpoint)
        assert status.returncode == 0 and "worker.2" in status.stdout
        with urllib.request.urlopen(f"{page}api/status", timeout=5) as response:  # the web program's API
            assert "worker.2" in response.read().decode()
        shutdown = surveyor("ctl", "--handler", endpoint, "shutdown")
        assert shutdown.returncode == 0, shutdown.stdout + shutdown.stderr
        programs = ["handler", "receiver:receiver_01", "worker:worker_01", "worker:worker_02", "writer:writer_01"]
        everything_exited = {**dict.fromkeys(programs, "EXITED"), "web": "RUNNING"}
        wait_for(lambda: program_states(conf) == everything_exited, 30,
                 "every pipeline program EXITED after the shutdown, the web front-end still up")
        time.sleep(1.5)  # past startsecs: a program restarted after its exit would be STARTING or RUNNING now
        assert program_states(conf) == everything_exited
        # The web front-end is no pipeline process: the shutdown does not reach it, supervisorctl stops it.
        stopped = subprocess.run([sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), "stop", "web"],
                                 capture_output=True, text=True, timeout=30)
        assert stopped.returncode == 0 and program_states(conf)["web"] == "STOPPED", stopped.stdout + stopped.stderr
        log = (tmp_path / "logs" / "supervisord.log").read_text()
        assert "exited: worker_02 (terminated by SIGKILL; not expected)" in log, log
        for program in programs:
            assert f"exited: {program.split(':')[-1]} (exit status 0; expected)" in log, log
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)


def test_a_host_of_a_pipeline_spread_over_several_gets_its_share(tmp_path):
    """`--handler` (it runs elsewhere): no handler or web program, the chosen stages only, named
    after the host, bound on `--bind`, with the host's keys (tests/e2e/test_hosts.py runs them)."""
    pipeline_path = synthetic_pipeline(tmp_path)
    share = surveyor("supervisor-conf", str(pipeline_path), "--stages", "worker", "--handler", "tcp://10.0.0.1:5550",
                     "--bind", "10.0.0.2", "--keys", str(tmp_path / "keys"))
    assert share.returncode == 0, share.stderr
    programs = re.findall(r"^\[program:(\w+)\]", share.stdout, re.M)
    assert programs == ["worker"]
    command = re.search(r"^command=(.*)$", share.stdout, re.M).group(1)
    assert command.endswith("service worker --pipeline " + str(pipeline_path.resolve()) +
                            " --name worker.%(host_node_name)s.%(process_num)d --handler tcp://10.0.0.1:5550"
                            " --bind 10.0.0.2")
    assert f'SURVEYOR_KEYS="{tmp_path / "keys"}"' in share.stdout
    unknown = surveyor("supervisor-conf", str(pipeline_path), "--stages", "wroker")
    assert unknown.returncode != 0 and "no stage ['wroker']" in unknown.stderr
