"""Commands against a running pipeline: garbage, abort mid-stream, live configuration."""

from __future__ import annotations

import json
import random

import h5py
import numpy as np
import pytest
import zmq

from libs.common import client
from tests.conftest import Run, synthetic_pipeline, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("control")
    pipeline = synthetic_pipeline(directory, frames=300, rate_hz=500)
    run = Run(pipeline, cwd=directory)
    run.wait_ready(4)
    yield run
    run.stop()


def garbage(rng: random.Random) -> list[bytes]:
    """One malformed command message, of many kinds."""
    kinds = [
        lambda: [b"not json at all"],
        lambda: [bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 200)))],
        lambda: [b"[1, 2, 3]"],
        lambda: [b'"just a string"'],
        lambda: [b"{}"],
        lambda: [json.dumps({"cmd": "explode", "id": 3}).encode()],
        lambda: [json.dumps({"cmd": 42}).encode()],
        lambda: [json.dumps({"cmd": "start_scan", "args": {"scan_id": 5}}).encode()],
        lambda: [json.dumps({"cmd": "start_scan", "args": {"scan_id": "../../etc/passwd"}}).encode()],
        lambda: [json.dumps({"cmd": "start_scan", "args": {"scan_id": "x", "n_frames": -3}}).encode()],
        lambda: [json.dumps({"cmd": "configure", "args": {"stage": "worker", "params": "fast"}}).encode()],
        lambda: [json.dumps({"cmd": "configure", "args": {"stage": "nope", "params": {}}}).encode()],
        lambda: [json.dumps({"cmd": "ping", "args": {"extra": 1}}).encode()],
        lambda: [json.dumps({"cmd": "abort", "args": {"scan_id": "not-running"}}).encode()],
        lambda: [json.dumps({"cmd": "heartbeat", "args": {"instance": "ghost"}}).encode()],
        lambda: [json.dumps({"cmd": "ping", "args": [1]}).encode()],
        lambda: [b'{"cmd": "ping", "id": ' + b"[" * 5000 + b"]" * 5000 + b"}"],
        lambda: [b"{" * 100_000],
        lambda: [json.dumps({"cmd": "status", "pad": "x" * (2 << 20)}).encode()],
        lambda: [b"\xff\xfe\x00garbage", b"second part", b"third"],
        lambda: [b""],
    ]
    return rng.choice(kinds)()


@pytest.mark.parametrize("target", ["handler", "worker.1"])
def test_malformed_commands_get_errors_and_nothing_dies(run, target):
    endpoint = run.endpoint if target == "handler" else run.service(target)["command_endpoint"]
    rng = random.Random(7)
    socket = zmq.Context.instance().socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    socket.connect(endpoint)
    sent = 500
    for _ in range(sent):
        socket.send_multipart(garbage(rng))
    replies = []
    while len(replies) < sent and socket.poll(5000):
        replies.append(json.loads(socket.recv_multipart()[-1]))
    socket.close()
    assert len(replies) == sent, f"{sent - len(replies)} malformed commands got no reply"
    assert all(r["ok"] is False and r["error"]["message"] for r in replies)
    assert {r["error"]["type"] for r in replies} >= {"MessageError", "UnknownCommand"}
    for service in run.ctl("status").result["services"]:
        if service["state"] == "up":
            assert client.call(service["command_endpoint"], "ping", timeout_s=2).result["pong"]
    assert run.ctl("ping").result["pong"]


def test_abort_drops_the_scan_everywhere_and_the_next_scan_runs(run):
    assert run.ctl("start_scan", {"scan_id": "doomed", "n_frames": 5000}).ok
    wait_for(lambda: run.ctl("status").result["scan"]["stages"]["writer"]["written"] > 50, 20,
             "frames at the writer")
    reply = run.ctl("abort", {"scan_id": "doomed"})
    assert reply.ok and reply.result["scan_id"] == "doomed"
    aborted = run.out / "doomed_raw.cxi"
    with h5py.File(aborted, "r") as f:
        kept = len(f["entry_1/data_1/frame_number"])
    assert 50 < kept < 5000
    assert run.ctl("start_scan", {"scan_id": "after", "n_frames": 300}).ok
    finished = run.wait_scan("after")
    assert finished["summary"]["frames_written"] == 300 and finished["summary"]["frames_lost"] == 0
    with h5py.File(aborted, "r") as f:
        assert len(f["entry_1/data_1/frame_number"]) == kept, "the aborted scan's file changed after abort"
    assert not list(run.out.glob("doomed_raw.part*")), "frames of the aborted epoch reached the writer"
    with h5py.File(run.out / "after_raw.cxi", "r") as f:
        np.testing.assert_array_equal(f["entry_1/data_1/frame_number"][...], np.arange(300))


def test_configure_changes_the_following_frames_and_refuses_bad_values(run):
    # 3 s of frames at 500 Hz: the status (1 Hz heartbeats) shows the writer busy well before the end.
    assert run.ctl("start_scan", {"scan_id": "tuned", "n_frames": 1500}).ok
    wait_for(lambda: run.ctl("status").result["scan"]["stages"]["writer"]["written"] > 100, 20,
             "frames at the writer")
    reply = run.ctl("configure", {"stage": "worker", "params": {"offset": 100}})
    assert reply.ok and reply.result["params"]["offset"] == 100
    for bad in ({"offset": -5}, {"offset": "lots"}, {"no_such_param": 1}):
        refused = run.ctl("configure", {"stage": "worker", "params": bad})
        assert not refused.ok and refused.error["type"] == "ParameterError", refused
    for service in run.ctl("status").result["services"]:
        if service["stage"] == "worker" and service["state"] == "up":
            status = client.call(service["command_endpoint"], "status").result
            assert status["params"]["offset"] == 100
    run.wait_scan("tuned")
    with h5py.File(run.out / "tuned_raw.cxi", "r") as f:
        corner = f["entry_1/data_1/data"][:, -1, -1].astype(int)
    offset = corner - np.arange(1500) % 251
    assert set(offset) == {0, 100}
    assert offset[:50].max() == 0 and offset[-50:].min() == 100
    assert run.ctl("configure", {"stage": "worker", "params": {"offset": 0}}).ok


def test_a_service_takes_changes_only_from_its_handler(run):
    """`configure` sent straight to a worker's own port once moved its parameters behind the
    handler's back: now anyone may ask it `ping` and `status`, but a change is refused, saying
    where to send it, and the parameters in force stay."""
    worker = run.service("worker.1")
    before = client.call(worker["command_endpoint"], "status").result["params"]
    for cmd, args in (("configure", {"params": {"offset": 7}}), ("abort", {"epoch": 99}), ("shutdown", {})):
        reply = client.call(worker["command_endpoint"], cmd, args)
        assert not reply.ok and reply.error["type"] == "AccessRefused", reply
        assert f"send it to the handler at {run.endpoint}" in reply.error["message"]
    assert client.call(worker["command_endpoint"], "status").result["params"] == before
    assert run.service("worker.1")["instance"] == worker["instance"]  # still up: the shutdown was refused


def test_a_subscriber_that_connects_late_is_given_the_events_its_link_missed(run):
    """A PUB sends nothing before a subscriber has connected (a restarted handler's first events
    pass a web process by): the handler numbers its events, and a gap is asked for (`events`)."""
    from libs.web.feed import Feed

    published = run.ctl("status").result["events_published"]
    assert published >= 4  # a service_up for each process, all before these subscribers
    late = client.StatusFeed(run.pipeline.handler.status, command=run.endpoint)
    web = Feed(run.pipeline.handler.status, command=run.endpoint).start()
    try:
        wait_for(lambda: late.pump(0.2) is not None and late.status, 10, "a snapshot")
        numbers = [e["handler_seq"] for e in late.events]
        assert numbers[:published] == list(range(1, published + 1)), numbers
        assert {"service_up"} <= {e["kind"] for e in late.events}
        wait_for(lambda: web.last_seq() >= published, 10, "the web feed's catch-up")
        kept = web.events_after(0).events
        assert [e["handler_seq"] for e in kept[:published]] == numbers[:published]
        assert [e["seq"] for e in kept] == list(range(1, len(kept) + 1))  # the web feed's own numbers
    finally:
        late.close()
        web.close()
    # Asked directly: events after a number, as many as the handler keeps.
    reply = run.ctl("events", {"since": published - 1}).result
    assert [e["handler_seq"] for e in reply["events"]][:1] == [published]
    assert not run.ctl("events", {"since": -1}).ok
