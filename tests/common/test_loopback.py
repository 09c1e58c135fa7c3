"""The hit server warns when its endpoint reaches beyond this host (its default is loopback)."""

from __future__ import annotations

import pytest

from services.hit_server.params import Params
from services.hit_server.service import beyond_loopback


@pytest.mark.parametrize(("endpoint", "beyond"), [
    ("tcp://127.0.0.1:12322", False), ("tcp://localhost:12322", False), ("tcp://[::1]:12322", False),
    ("ipc:///tmp/hits", False), ("tcp://*:12322", True), ("tcp://0.0.0.0:12322", True),
    ("tcp://eth0:12322", True), ("tcp://10.0.0.5:12322", True),
])
def test_endpoints_beyond_loopback_are_told_apart(endpoint, beyond):
    assert beyond_loopback(endpoint) is beyond


def test_the_default_endpoint_is_loopback():
    assert not beyond_loopback(Params().endpoint)
