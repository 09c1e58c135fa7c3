"""Sending one command to a handler or service port and waiting for its reply, with a timeout.

A fresh DEALER per call (the Lazy Pirate way): a lost reply never poisons the next request.
"""

from __future__ import annotations

import itertools
import json
import os
from typing import Any

import zmq

from libs.common import messages, security
from libs.common.security import Keys

_ids = itertools.count(1)


class NoReply(TimeoutError):
    """The port did not answer in time (not running, or wedged)."""


def call(endpoint: str, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float = 5.0,
         context: zmq.Context | None = None, keys: Keys | None = None,
         server_key: str | None = None) -> messages.Reply:
    """Send `cmd` to `endpoint` and return the parsed reply; NoReply after `timeout_s`.
    With CURVE (`keys`, else $SURVEYOR_KEYS) the port's `server_key` is the handler's unless given."""
    return send_raw(endpoint, messages.request(cmd, args, f"{os.getpid()}-{next(_ids)}"),
                    timeout_s=timeout_s, context=context, keys=keys, server_key=server_key)


def send_raw(endpoint: str, payload: bytes | list[bytes], *, timeout_s: float = 5.0,
             context: zmq.Context | None = None, keys: Keys | None = None,
             server_key: str | None = None) -> messages.Reply:
    """Send any bytes (or multipart) and parse the answer: what the tests of bad input use."""
    ctx = context or zmq.Context.instance()
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    keys = keys or security.configured()
    security.connect_as_client(socket, keys, server_key)
    try:
        socket.connect(endpoint)
        socket.send_multipart(payload if isinstance(payload, list) else [payload])
        if not socket.poll(timeout_s * 1000):
            hint = "" if keys is None else (f", and does it let in this client's key ({keys.directory}/client.key) "
                                            f"and is {keys.directory}/handler.key its server key?")
            raise NoReply(f"no reply from {endpoint} within {timeout_s} s: is it running{hint or '?'}")
        return messages.REPLIES.validate_json(socket.recv_multipart()[-1])
    finally:
        socket.close(linger=0)


def missed_events(command: str, missing: tuple[float, int, int], timeout_s: float = 2.0,
                  keys: Keys | None = None) -> list[dict[str, Any]]:
    """The events a subscriber missed, (handler run, after, upto) as an EventCursor names them,
    asked of the handler at `command`; oldest first. None when the handler does not answer, has
    restarted again, or keeps them no longer."""
    run, after, upto = missing
    try:
        reply = call(command, "events", {"since": after}, timeout_s=timeout_s, keys=keys)
    except NoReply:
        return []
    if not reply.ok or reply.result.get("handler_run") != run:
        return []
    return [e for e in reply.result["events"] if after < e["handler_seq"] <= upto]


class StatusFeed:
    """A subscriber to the handler's status PUB: keeps the newest snapshot and every event seen.
    Given the handler's `command` endpoint, it also asks for the events its link missed."""

    def __init__(self, endpoint: str, topics: tuple[bytes, ...] = (b"event", b"status"),
                 context: zmq.Context | None = None, command: str | None = None,
                 keys: Keys | None = None) -> None:
        from libs.common import feeds  # only subscribers pay for building the models

        self._feeds = feeds
        self._cursor = feeds.EventCursor() if command else None
        self._command = command
        self._events_wanted = b"event" in topics
        self._keys = keys
        self._socket = (context or zmq.Context.instance()).socket(zmq.SUB)
        self._socket.setsockopt(zmq.LINGER, 0)
        security.connect_as_client(self._socket, keys or security.configured())
        for topic in topics:
            self._socket.setsockopt(zmq.SUBSCRIBE, topic)
        self._socket.connect(endpoint)
        self.status: dict[str, Any] | None = None
        self.events: list[dict[str, Any]] = []

    def pump(self, timeout_s: float = 0.0) -> list[dict[str, Any]]:
        """Read what has arrived (waiting up to `timeout_s` for the first message); the new events."""
        new: list[dict[str, Any]] = []
        if self._socket.poll(timeout_s * 1000):
            while self._socket.poll(0):
                topic, body = self._socket.recv_multipart()[:2]
                self._feeds.parse(topic, body)  # each message meets its model, as a front-end parses it
                message = json.loads(body)
                if topic == b"status":
                    self.status = message
                    new.extend(self._catch_up(self._cursor and self._cursor.after_snapshot(message)))
                else:
                    new.extend(self._catch_up(self._cursor and self._cursor.after_event(message)))
                    new.append(message)
        self.events.extend(new)
        return new

    def _catch_up(self, missing: tuple[float, int, int] | None) -> list[dict[str, Any]]:
        return missed_events(self._command, missing, keys=self._keys) if missing and self._events_wanted else []

    def find(self, kind: str, **match: Any) -> dict[str, Any] | None:
        self.pump()
        return next((e for e in self.events
                     if e["kind"] == kind and all(e.get(k) == v for k, v in match.items())), None)

    def close(self) -> None:
        self._socket.close(linger=0)
