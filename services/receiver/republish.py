"""Re-publication of the incoming stream in MAX IV secondary-port format (STINS).

A PUSH socket bound on the configured endpoint; a monitor counts connected consumers and
messages go out only while at least one is there, as streaming-receiver does, so an absent
consumer never holds the receiver back. A consumer that connects mid-series first gets the
series header again, so it always knows what the images are. The header's `filename` is the raw
file the series goes to, which a consumer (dranspose) may open. A consumer too slow to keep up
loses messages (counted), never the pipeline its frames.
"""

from __future__ import annotations

import logging

import zmq
from zmq.utils.monitor import recv_monitor_message

from libs.common.detector import Event, SeriesEnd, SeriesStart
from libs.common.detector.stins import Numbering
from libs.common.errors import ParameterError

logger = logging.getLogger(__name__)


class Republisher:
    def __init__(self, context: zmq.Context, endpoint: str) -> None:
        self.endpoint = endpoint
        self.socket = context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 256)
        self.socket.setsockopt(zmq.TCP_KEEPALIVE, 1)
        self.socket.setsockopt(zmq.TCP_KEEPALIVE_IDLE, 60)
        self.socket.setsockopt(zmq.TCP_KEEPALIVE_INTVL, 1)
        self._monitor = self.socket.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        try:
            self.socket.bind(endpoint)
        except zmq.ZMQError as exc:
            self.close()
            raise ParameterError(f"receiver: cannot bind the re-publication endpoint {endpoint}: {exc.strerror}; "
                                 f"give params.republish a free endpoint (\"\" for none)") from None
        self.peers = 0
        self.sent = 0
        self.dropped = 0
        self._numbering = Numbering()
        self._series: SeriesStart | None = None
        self._filename = ""

    def _update_peers(self) -> None:
        while self._monitor.poll(0):
            event = recv_monitor_message(self._monitor)["event"]
            before = self.peers
            self.peers += 1 if event == zmq.EVENT_ACCEPTED else -1
            logger.info("re-publication at %s: %d consumer(s)", self.endpoint, self.peers)
            if before <= 0 < self.peers and self._series is not None:
                self._send(self._series)

    def publish(self, event: Event, filename: str = "") -> None:
        """`filename`: a series header's raw file."""
        if isinstance(event, SeriesStart):
            self._series, self._filename = event, filename
        elif isinstance(event, SeriesEnd):
            self._series = None
        was_connected = self.peers > 0
        self._update_peers()
        if self.peers > 0 and (was_connected or not isinstance(event, SeriesStart)):
            self._send(event)

    def _send(self, event: Event) -> None:
        try:
            self.socket.send_multipart(self._numbering.encode(event, self._filename), zmq.NOBLOCK, copy=False)
            self.sent += 1
        except zmq.Again:
            self.dropped += 1

    def close(self) -> None:
        self.socket.disable_monitor()
        self._monitor.close(linger=0)
        self.socket.close(linger=0)
