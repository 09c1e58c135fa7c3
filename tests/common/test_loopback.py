"""Endpoints beyond loopback are told apart, and `surveyor run` names every port a pipeline
exposes (the hit server's default, like every default, is loopback)."""

from __future__ import annotations

import pytest

from libs.common import exposure, security
from libs.common.exposure import beyond_loopback
from libs.common.pipeline import load
from services.hit_server.params import Params
from tests.conftest import REPO


@pytest.mark.parametrize(("endpoint", "beyond"), [
    ("tcp://127.0.0.1:12322", False), ("tcp://localhost:12322", False), ("tcp://[::1]:12322", False),
    ("ipc:///tmp/hits", False), ("tcp://*:12322", True), ("tcp://0.0.0.0:12322", True),
    ("tcp://eth0:12322", True), ("tcp://10.0.0.5:12322", True),
])
def test_endpoints_beyond_loopback_are_told_apart(endpoint, beyond):
    assert beyond_loopback(endpoint) is beyond


def test_the_default_endpoint_is_loopback():
    assert not beyond_loopback(Params().endpoint)


def test_the_pipelines_as_shipped_expose_nothing():
    for name in ("crystallography", "ptychography"):
        assert exposure.exposed(load(REPO / "pipelines" / f"{name}.toml"), web=("127.0.0.1", 8080)) == []


def test_every_exposed_port_is_named_in_the_warning():
    pipeline = load(REPO / "pipelines" / "crystallography.toml", (
        'handler.status="tcp://0.0.0.0:5551"', 'handler.data_host="0.0.0.0"',
        'stages.hit_server.params.endpoint="tcp://*:12322"'))
    found = exposure.exposed(pipeline, web=("0.0.0.0", 8080))
    assert found == ["the handler's status port tcp://0.0.0.0:5551",
                     "every service's command and data ports (data_host 0.0.0.0)",
                     "stage hit_server's endpoint tcp://*:12322",
                     "the web front-end at 0.0.0.0:8080 (its commands need the token)"]
    text = exposure.warning(pipeline, web=("0.0.0.0", 8080))
    assert all(port in text for port in found) and "no authentication" in text
    assert exposure.warning(load(REPO / "pipelines" / "crystallography.toml")) is None


def test_with_keys_only_the_ports_whose_peers_speak_no_curve_are_named(tmp_path):
    keys = security.create(tmp_path / "keys")
    exposed = ('handler.command="tcp://0.0.0.0:5550"', 'handler.data_host="0.0.0.0"',
               'stages.hit_server.params.endpoint="tcp://*:12322"', f'security.keys="{keys}"')
    pipeline = load(REPO / "pipelines" / "crystallography.toml", exposed)
    assert exposure.exposed(pipeline) == []
    plain_hits = load(REPO / "pipelines" / "crystallography.toml", (*exposed, "stages.hit_server.params.curve=false"))
    assert exposure.exposed(plain_hits) == ["stage hit_server's endpoint tcp://*:12322"]
