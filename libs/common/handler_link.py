"""A service process's link to the handler: one DEALER on the handler's command endpoint.

Requests go out with a callback for their reply; the handler's own requests (topology, scan start
and end, abort, configure) come in on the same socket and are served by a `CommandPort`. The link
keeps the clock of the conversation: when the next heartbeat is due, when the handler was last
heard from, and the back-off before trying a silent handler again, so a handler that restarts
is found again without a storm of registrations.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable

import zmq

from libs.common import messages, security
from libs.common.loop import drain, readable
from libs.common.ports import CommandPort, Dispatch
from libs.common.security import Keys

logger = logging.getLogger(__name__)

OnReply = Callable[[messages.Reply], None]
MAX_BACKOFF_S = 32.0


class HandlerLink:
    def __init__(self, context: zmq.Context, poller: zmq.Poller, endpoint: str, identity: bytes,
                 dispatch: Dispatch, *, heartbeat_s: float, liveness: int, keys: Keys | None = None) -> None:
        self.endpoint = endpoint
        self.keys = keys
        self.heartbeat_s = heartbeat_s
        self.liveness = liveness
        self._context = context
        self._poller = poller
        self._identity = identity
        self._dispatch = dispatch
        self._waiting: dict[str, OnReply] = {}
        self._sequence = 0
        self.socket: zmq.Socket | None = None
        self.port: CommandPort | None = None
        self.next_heartbeat = 0.0
        self._seen = time.monotonic()
        self._backoff = heartbeat_s
        self.connect()

    def connect(self) -> None:
        """A fresh socket (a new connection, nothing owed on the old one)."""
        if self.socket is not None:
            self._poller.unregister(self.socket)
            self.socket.close(linger=0)
        self.socket = self._context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.ROUTING_ID, self._identity)
        self.socket.setsockopt(zmq.LINGER, 0)
        security.connect_as_client(self.socket, self.keys)
        self.socket.connect(self.endpoint)
        self.port = CommandPort(self.socket, messages.SERVICE_REQUESTS, self._dispatch)
        self._poller.register(self.socket, zmq.POLLIN)
        self._waiting.clear()

    def send(self, cmd: str, args: dict[str, Any], on_reply: OnReply | None = None) -> None:
        self._sequence += 1
        rid = f"{cmd}-{self._sequence}"
        if on_reply is not None:
            self._waiting[rid] = on_reply
        try:
            self.socket.send(messages.request(cmd, args, rid), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("handler link is full; %s not sent", cmd)

    def readable(self) -> bool:
        return readable(self.socket)

    def drain(self, on_reply: Callable[[OnReply, messages.Reply], None] | None = None) -> None:
        """Serve the handler's requests and give each reply to its callback (through `on_reply`
        when given: a caller that must put some of them off)."""
        drain(self.socket, lambda parts: self._take(parts, on_reply))

    def _take(self, parts: list[bytes], on_reply: Callable[[OnReply, messages.Reply], None] | None) -> None:
        self._seen = time.monotonic()
        reply = messages.as_reply(parts[-1])
        if reply is None:
            self.port.serve(parts[:-1], parts[-1])
            return
        callback = self._waiting.pop(str(reply.id), None)
        if callback is not None:
            (on_reply or (lambda c, r: c(r)))(callback, reply)

    def silent(self, now: float) -> bool:
        return now - self._seen > self.heartbeat_s * self.liveness

    def back_off(self, now: float) -> float:
        """The handler is silent: reconnect, and wait longer each time before the next try."""
        backoff = self._backoff
        logger.warning("handler at %s silent for %.1f s; reconnecting in %.0f s%s", self.endpoint, now - self._seen,
                       backoff, "" if self.keys is None else
                       f" (with CURVE: is this host's {self.keys.directory}/client.key in the handler host's "
                       f"allowed/, and {self.keys.directory}/handler.key the handler's server key?)")
        self.connect()
        self._seen = now + backoff
        self.next_heartbeat = now + backoff
        self._backoff = min(backoff * 2, MAX_BACKOFF_S)
        return backoff

    def beat(self, now: float) -> None:
        self.next_heartbeat = now + self.heartbeat_s

    def joined(self, heartbeat_s: float) -> None:
        """Registered: heartbeats at the pipeline's pace, back-off from the start again."""
        self.heartbeat_s = heartbeat_s
        self._backoff = heartbeat_s

    def close(self) -> None:
        self.socket.close(linger=200)
