"""A processing node in-process over its real command port, steered with an operator's key (no
handler runs): a live `configure` of `parameters` reaches the running instance's `configure`; a
value the class refuses is refused to the operator and the parameters in force stay; a class that
cannot be built refuses the scan, saying why."""

from __future__ import annotations

import textwrap
import threading

import pytest

from libs.common import client
from libs.common.pipeline import from_dict
from services.processing_node.service import Service
from tests.conftest import curve_keys, free_port, wait_for

CLASS = '''
class Scaled:
    def __init__(self, *, parameters):
        self.scale = parameters["scale"]

    def configure(self, *, parameters):
        if parameters["scale"] < 0:
            raise ValueError(f"scale {parameters['scale']} is negative")
        self.scale = parameters["scale"]

    def initialize_processing_node(self, *, node_rank, node_pool_size):
        pass

    def initialize_collecting_node(self, *, node_rank, node_pool_size):
        pass

    def process_data(self, *, node_rank, node_pool_size, data):
        return {"scaled": self.scale}, node_rank

    def collect_data(self, *, node_rank, node_pool_size, processed_data):
        pass
'''


@pytest.fixture
def code(tmp_path):
    path = tmp_path / "scaled.py"
    path.write_text(textwrap.dedent(CLASS))
    return path


@pytest.fixture
def node(tmp_path, code):
    host, operator = curve_keys(tmp_path / "keys")
    pipeline = from_dict({
        "security": {"keys": str(host.directory)},
        "handler": {"command": f"tcp://127.0.0.1:{free_port()}", "state_dir": str(tmp_path / "state")},
        "stages": {"receiver": {"service": "receiver"},
                   "processing": {"service": "processing_node", "inputs": ["receiver"],
                                  "params": {"processing": f"{code}:Scaled", "parameters": {"scale": 2}}}}})
    service = Service(pipeline=pipeline, stage="processing", name="processing.1", handler=pipeline.handler.command)
    service.call = lambda cmd, args=None: client.call(service.command_endpoint, cmd, args, keys=operator,
                                                      server_key=host.public.decode())
    loop = threading.Thread(target=service.run)
    loop.start()
    yield service
    service.stop()
    loop.join(10)


def test_live_configure_reaches_the_instance_and_a_refusal_keeps_the_old_parameters(node):
    assert node.call("scan_start", {"epoch": 1, "scan": {"scan_id": "s1"}}).ok
    instance = wait_for(lambda: node._node and node._node.instance, 5, "the scan's instance")
    assert instance.scale == 2

    reply = node.call("configure", {"params": {"parameters": {"scale": 5}}})
    assert reply.ok and reply.result["params"]["parameters"] == {"scale": 5}
    assert instance.scale == 5

    reply = node.call("configure", {"params": {"parameters": {"scale": -1}}})
    assert not reply.ok
    assert "Scaled.configure refused the parameters: ValueError: scale -1 is negative" in reply.error["message"]
    assert "the parameters in force did not change" in reply.error["message"]
    assert instance.scale == 5 and node.params.parameters == {"scale": 5}
    status = node.call("status").result
    assert status["params"]["parameters"] == {"scale": 5}
    assert node.call("ping").ok


def test_a_class_that_cannot_be_built_refuses_the_scan_saying_why(node, code):
    code.write_text(CLASS.replace("self.scale = parameters[\"scale\"]\n\n    def configure",
                                  "self.scale = parameters[\"gain\"]\n\n    def configure"))
    reply = node.call("scan_start", {"epoch": 1, "scan": {"scan_id": "s1"}})
    assert not reply.ok and reply.error["type"] == "ProcessingError"
    assert reply.error["message"] == "Scaled: __init__ or initialize_processing_node failed: KeyError: 'gain'"
    assert node._refused == 1 and node._input_paused  # no credit: its frames go to the other nodes
    code.write_text(CLASS)  # fixed: the next scan (a new epoch) builds it again, read anew
    assert node.call("scan_start", {"epoch": 2, "scan": {"scan_id": "s2"}}).ok
    assert not node._input_paused and node._node.instance.scale == 2
