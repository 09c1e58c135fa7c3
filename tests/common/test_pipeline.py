"""Pipeline files: shipped ones load, mistakes are reported with file, key and expectation."""

from __future__ import annotations

import pytest

from libs.common.errors import PipelineError
from libs.common.pipeline import PIPELINES_DIR, load, parse_override

GOOD = """
[stages.receiver]
service = "receiver"
[stages.worker]
service = "passthrough"
inputs = ["receiver"]
processes = 3
[stages.writer]
service = "writer"
inputs = ["worker"]
"""


def write(tmp_path, text):
    path = tmp_path / "p.toml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", sorted(PIPELINES_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_shipped_pipelines_load(path):
    pipeline = load(path)
    assert "receiver" in pipeline.stages and "writer" in pipeline.stages


def test_graph_order_and_overrides(tmp_path):
    pipeline = load(write(tmp_path, GOOD), ["stages.worker.params.offset=7", "handler.command=tcp://127.0.0.1:9"])
    assert pipeline.topological_order == ["receiver", "worker", "writer"]
    assert pipeline.stages["worker"].params == {"offset": 7}
    assert pipeline.handler.command == "tcp://127.0.0.1:9"
    assert list(pipeline.downstream("receiver")) == ["worker"] and pipeline.sources() == ["receiver"]


@pytest.mark.parametrize("change, fragment", [
    (GOOD + "[stages.worker2]\nservice = 'passthrough'\ninputs = ['nothing']\n",
     "stages.worker2.inputs names 'nothing'"),
    (GOOD.replace('inputs = ["receiver"]', 'inputs = ["writer"]'), "cycle"),
    (GOOD + "[stages.extra]\nservice = 'nonesuch'\n", "stages.extra.service = 'nonesuch' is not a Surveyor service"),
    (GOOD.replace("processes = 3", "processes = 0"), "stages.worker.processes"),
    (GOOD.replace("processes = 3", "procs = 3"), "stages.worker.procs: Extra inputs"),
    (GOOD.replace("processes = 3", "params = { offset = -1 }"), "stages.worker.params: offset"),
    (GOOD.replace("processes = 3", 'delivery = "sometimes"'), "stages.worker.delivery"),
    (GOOD.replace("processes = 3", 'frames = "odd"'), "stages.worker.frames"),
    ("[stages\n", "not valid TOML"),
])
def test_mistakes_name_the_file_and_the_key(tmp_path, change, fragment):
    path = write(tmp_path, change)
    with pytest.raises(PipelineError) as error:
        load(path)
    assert str(path) in str(error.value) and fragment in str(error.value)


def test_override_values_are_toml_with_bare_strings_allowed():
    assert parse_override('a.b="tcp://x:1"') == ("a.b", "tcp://x:1")
    assert parse_override("a=[1, 2]") == ("a", [1, 2])
    assert parse_override("a=tcp://host:9999") == ("a", "tcp://host:9999")
    with pytest.raises(PipelineError, match="KEY=VALUE"):
        parse_override("novalue")
