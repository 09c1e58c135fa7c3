"""Credit-based delivery between one producer and its consumers, over real sockets in one process."""

from __future__ import annotations

import time

import numpy as np
import pytest
import zmq

from libs.common.flow import FRAME, RESENT, Inlet, Outlet
from libs.common.frames import Frame, decode


@pytest.fixture
def context():
    context = zmq.Context()
    yield context
    context.term()


def frame(number: int, epoch: int = 1) -> Frame:
    return Frame.from_arrays(scan_id="s", epoch=epoch, frame=number, origin="p",
                             arrays={"data": np.full((8, 8), number, np.uint16)})


class Consumer:
    def __init__(self, context, outlet, name, credit):
        self.poller = zmq.Poller()
        self.inlet = Inlet(context, self.poller, identity=name.encode(), stage="w", credit=credit)
        self.inlet.connect("producer", outlet.endpoint)
        self.received: list[int] = []
        self.resent: list[int] = []

    def take(self, outlet, *, ack: bool, rounds: int = 20) -> None:
        for _ in range(rounds):
            outlet.receive()
            for socket, _ in self.poller.poll(5):
                for tag, parts in self.inlet.receive(socket) or []:
                    if tag not in (FRAME, RESENT):
                        continue
                    got = decode(parts)
                    self.received.append(got.header.frame)
                    if tag == RESENT:
                        self.resent.append(got.header.frame)
                    if ack:
                        self.inlet.ack("producer", got.key)
                        self.inlet.grant("producer")
            self.inlet.flush()


def settle(outlet, consumers, *, acks, seconds=0.5):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for consumer, ack in zip(consumers, acks, strict=True):
            consumer.take(outlet, ack=ack, rounds=1)


def test_frames_go_to_consumers_with_credit_and_come_back_when_one_dies(context):
    delivered = []
    outlet = Outlet(context, host="127.0.0.1", on_delivered=delivered.append, max_pending=100)
    outlet.add_route("w", latest=False, depth=2)
    stuck = Consumer(context, outlet, "stuck", credit=2)
    busy = Consumer(context, outlet, "busy", credit=2)
    settle(outlet, [stuck, busy], acks=[False, True], seconds=0.2)
    for number in range(30):
        assert outlet.send(frame(number).key, frame(number).encode(), parent=number) == 1
    settle(outlet, [stuck, busy], acks=[False, True])
    assert len(stuck.received) == 2, "a consumer that returns no credit gets only its first credit"
    assert sorted(busy.received) == sorted(set(range(30)) - set(stuck.received))
    assert outlet.outstanding(1) == 2 and sorted(delivered) == sorted(busy.received)
    assert outlet.consumer_lost(b"stuck") == 2
    settle(outlet, [busy], acks=[True])
    assert sorted(busy.received) == list(range(30)) and outlet.outstanding(1) == 0
    assert sorted(busy.resent) == sorted(stuck.received), "what the lost consumer held comes tagged as re-sent"
    assert sorted(delivered) == list(range(30))
    for closing in (outlet, stuck.inlet, busy.inlet):
        closing.close()


def test_latest_edges_keep_the_newest_and_count_what_they_drop(context):
    outlet = Outlet(context, host="127.0.0.1", on_delivered=lambda parent: None)
    outlet.add_route("w", latest=True, depth=2)
    for number in range(5):
        assert outlet.send(frame(number).key, frame(number).encode()) == 0
    assert outlet.dropped == 3 and not outlet.full()
    viewer = Consumer(context, outlet, "viewer", credit=5)
    settle(outlet, [viewer], acks=[False], seconds=0.3)
    assert viewer.received == [3, 4] and outlet.inflight == 0
    outlet.close()
    viewer.inlet.close()


def test_back_pressure_and_dropping_old_epochs(context):
    outlet = Outlet(context, host="127.0.0.1", on_delivered=lambda parent: None, max_pending=3)
    outlet.add_route("w", latest=False, depth=2)
    for number in range(3):
        outlet.send(frame(number).key, frame(number).encode())
    assert outlet.full()
    outlet.send(frame(0, epoch=2).key, frame(0, epoch=2).encode())
    assert outlet.drop_before(2) == 3 and outlet.pending == 1 and not outlet.full()
    outlet.close()


def test_a_consumer_that_says_hello_before_the_route_exists_is_served_once_it_does(context):
    outlet = Outlet(context, host="127.0.0.1", on_delivered=lambda parent: None)
    early = Consumer(context, outlet, "early", credit=2)
    settle(outlet, [early], acks=[True], seconds=0.2)  # hello arrives, no route yet
    outlet.add_route("w", latest=False, depth=2)
    outlet.send(frame(0).key, frame(0).encode(), parent=0)
    settle(outlet, [early], acks=[True], seconds=0.3)
    assert early.received == [0] and outlet.outstanding(1) == 0
    outlet.close()
    early.inlet.close()


def test_frames_sent_in_a_batch_travel_together_and_arrive_in_order(context):
    """Inside `batch()` frames queue; they leave as one message per consumer, as many as its credit."""
    outlet = Outlet(context, host="127.0.0.1", on_delivered=lambda _: None, max_pending=100)
    outlet.add_route("w", latest=False, depth=0)
    consumer = Consumer(context, outlet, "c1", credit=10)
    settle(outlet, [consumer], acks=[False], seconds=0.3)
    with outlet.batch():
        for number in range(25):
            outlet.send(frame(number).key, frame(number).encode(), parent=number)
        assert consumer.received == [], "nothing leaves before the batch closes"
    messages: list[list[int]] = []
    deadline = time.monotonic() + 5
    while len(sum(messages, [])) < 10 and time.monotonic() < deadline:
        for socket, _ in consumer.poller.poll(10):
            messages.append([decode(parts).header.frame for _, parts in consumer.inlet.receive(socket)])
    assert messages == [list(range(10))], "one message of as many frames as the credit"
    consumer.received = sum(messages, [])
    for number in consumer.received:
        consumer.inlet.ack("producer", frame(number).key)
    consumer.inlet.grant("producer", len(consumer.received))
    consumer.inlet.flush()
    settle(outlet, [consumer], acks=[True], seconds=0.5)
    consumer.inlet.close()
    outlet.close()
    assert consumer.received == list(range(25)) and outlet.pending == 0


def test_inside_a_batch_frames_with_credit_do_not_count_as_queued(context):
    """A source reads as many detector messages per turn as its consumers have credit for, plus
    the queue: they leave together when the batch closes. Outside a batch the queue alone counts."""
    outlet = Outlet(context, host="127.0.0.1", on_delivered=lambda _: None, max_pending=4)
    outlet.add_route("w", latest=False, depth=0)
    consumer = Consumer(context, outlet, "c1", credit=10)
    try:
        settle(outlet, [consumer], acks=[False], seconds=0.3)
        with outlet.batch():
            for number in range(13):
                outlet.send(frame(number).key, frame(number).encode(), parent=number)
                assert not outlet.full(), f"{number + 1} queued of 10 with credit + 4"
            outlet.send(frame(13).key, frame(13).encode(), parent=13)
            assert outlet.full()
        assert outlet.pending == 4, "10 went out in one message; 4 wait"
        assert outlet.full(), "no credit left: outside a batch the queue alone counts"
    finally:
        consumer.inlet.close()
        outlet.close()
