"""CURVE on a running pipeline: only the allow-list's keys get anything, a refusal is logged once
with the address and the key, a key let in or taken out later counts without a restart, the handler's key
must be the handler's, a service takes changes only from an operator's key, the web front-end
follows the handler over CURVE, and a scan runs with every frame exactly once."""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.request

import pytest
import zmq

from libs.common import client, security
from tests.conftest import curve_keys, synthetic_pipeline, wait_for
from tests.e2e.test_delivery import frames_in_file

pytestmark = pytest.mark.slow


def surveyor(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "libs.cli.main", *args], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_surveyor_keys_makes_a_host_directory_and_lets_clients_in(tmp_path):
    host, station = tmp_path / "host", tmp_path / "station"
    surveyor("keys", "init", str(host), "--name", "beamline-1")
    surveyor("keys", "init", str(station), "--handler-key", str(host / "server.key"))
    rows = [line.split() for line in surveyor("keys", "allow", str(host), str(station / "client.key"),
                                              "--name", "anna", "--operator").splitlines()]
    keys = {(role, name): key for role, name, key in rows}
    station_client, _ = zmq.auth.load_certificate(station / "client.key")
    assert keys[("allowed", "anna")] == keys[("operator", "anna")] == station_client.decode()
    assert keys[("handler", "handler")] == keys[("server", "server")]
    assert ("allowed", "beamline-1") in keys
    assert security.Keys.load(station).handler == security.Keys.load(host).public
    assert (host / "server.key_secret").stat().st_mode & 0o077 == 0


def test_only_the_allow_list_gets_anything_and_changes_need_an_operator(tmp_path, start_run):
    host, operator = curve_keys(tmp_path / "keys")
    stranger = security.Keys.load(security.create(tmp_path / "stranger", handler_key=host.directory / "server.key"))
    impostor = security.Keys.load(security.create(tmp_path / "impostor"))  # trusts another "handler"
    security.allow(host.directory, impostor.directory / "client.key", name="impostor")
    run = start_run(synthetic_pipeline(tmp_path, frames=400, keys=host.directory), "--scans", "1", web=True)
    run.wait_ready(4)
    worker = run.service("worker.1")
    assert worker["server_key"] == host.public.decode()
    page = wait_for(lambda: _web_status(run.web_url), 20, "the web front-end's status over CURVE")
    assert {s["name"] for s in page["services"]} >= {"receiver.1", "worker.1", "worker.2", "writer.1"}

    for keys in (None, stranger):  # None: no CURVE at all ($SURVEYOR_KEYS is not set here)
        with pytest.raises(client.NoReply):
            client.call(run.endpoint, "ping", timeout_s=0.5, keys=keys)
        with pytest.raises(client.NoReply):
            client.call(worker["command_endpoint"], "status", timeout_s=0.5, keys=keys, server_key=worker["server_key"])
    with pytest.raises(client.NoReply, match="handler.key its server key"):  # let in, but trusting another handler
        client.call(run.endpoint, "ping", timeout_s=0.5, keys=impostor)
    eavesdropper = client.StatusFeed(run.pipeline.handler.status, keys=stranger)
    try:
        assert eavesdropper.pump(1.5) == [] and eavesdropper.status is None  # a snapshot goes out every second
    finally:
        eavesdropper.close()
    handler_log = (run.logs / "handler.log").read_text()
    assert handler_log.count(f"refused a CURVE client at 127.0.0.1 with key {stranger.client_public.decode()}") == 1

    reply = client.call(worker["command_endpoint"], "configure", {"params": {"offset": 3}},
                        server_key=worker["server_key"], keys=host)
    assert not reply.ok and reply.error["type"] == "AccessRefused", reply
    assert "only from its handler or an operator's key" in reply.error["message"]
    assert client.call(worker["command_endpoint"], "ping", keys=operator, server_key=worker["server_key"]).ok

    security.allow(host.directory, stranger.directory / "client.key", name="stranger")
    assert wait_for(lambda: _answers(run.endpoint, stranger), 10, "the stranger let in without a restart")
    (host.directory / "allowed" / "stranger.key").unlink()
    assert wait_for(lambda: not _answers(run.endpoint, stranger), 10, "the stranger shut out again")

    assert run.ctl("start_scan", {"scan_id": "curve", "n_frames": 400}).ok
    finished = run.wait_scan("curve")
    assert finished["summary"]["frames_written"] == 400 and finished["summary"]["frames_lost"] == 0
    assert len(frames_in_file(run.out / "curve_raw.cxi")) == 400
    code, output = run.finish()
    assert code == 0, output


def _web_status(url: str) -> dict | None:
    try:
        with urllib.request.urlopen(f"{url}/api/status", timeout=2) as response:
            status = json.loads(response.read())
    except OSError:
        return None
    return status if status.get("services") else None


def _answers(endpoint: str, keys: security.Keys) -> bool:
    try:
        return client.call(endpoint, "ping", timeout_s=1, keys=keys).ok
    except client.NoReply:
        return False
