"""The JSON command port every Surveyor process serves (a bound ROUTER).

A client may be a REQ socket (envelope `[identity, b""]`) or a DEALER (`[identity]`); the reply
goes back with whatever envelope came in. Whatever arrives, the answer is an `ok: false` reply
naming the problem, or, for a message with no room for a reply, a log line; the port never raises.
A handler may return `DEFERRED` and call `reply` later (the handler waits for its services).
A port given `admit` asks it first whether the sender (its CURVE key, security.py) may send the
command: a service's own port takes changes only from an operator's key.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import zmq
from pydantic import TypeAdapter

from libs.common import messages, security
from libs.common.errors import SurveyorError
from libs.common.loop import drain

logger = logging.getLogger(__name__)

DEFERRED = object()
"""Returned by a command handler that will answer later through `CommandPort.reply`."""

Envelope = list[bytes]
Dispatch = Callable[[Any, Envelope], Any]
Admit = Callable[[Any, bytes | None], None]
"""Raises a SurveyorError when the sender (its public key, None on a plain socket) may not send
the request."""


class CommandPort:
    def __init__(self, socket: zmq.Socket, adapter: TypeAdapter, dispatch: Dispatch,
                 admit: Admit | None = None) -> None:
        self.socket = socket
        self.adapter = adapter
        self.dispatch = dispatch
        self.admit = admit

    def drain(self) -> int:
        """Serve every request waiting on the socket; returns how many were served."""
        return drain(self.socket, self.take, copy=self.admit is None)

    def take(self, parts: list[Any]) -> None:
        """One message as received: `[envelope..., payload]` (bytes, or frames for `admit`)."""
        if len(parts) < 2:
            logger.warning("dropped a command message of %d part(s): no room for a reply", len(parts))
            return
        if self.admit is None:
            self.serve(parts[:-1], parts[-1])
        else:
            self.serve([p.bytes for p in parts[:-1]], parts[-1].bytes, security.sender(parts[-1]))

    def serve(self, envelope: Envelope, payload: bytes, sender: bytes | None = None) -> None:
        try:
            request = messages.parse_request(payload, self.adapter)
            if self.admit is not None:
                self.admit(request, sender)
        except SurveyorError as exc:
            logger.info("refused a command: %s", exc)
            self.reply(envelope, messages.error(messages.request_id(payload), exc))
            return
        self.answer(envelope, request)

    def answer(self, envelope: Envelope, request: Any) -> None:
        """Dispatch a parsed request and reply (now, or later when it was DEFERRED)."""
        try:
            result = self.dispatch(request, envelope)
        except SurveyorError as exc:
            logger.warning("command %s refused: %s", request.cmd, exc)
            self.reply(envelope, messages.error(request.id, exc))
            return
        except Exception as exc:  # noqa: BLE001 - a bug in one command must not end the service
            logger.exception("command %s failed", request.cmd)
            self.reply(envelope, messages.error(request.id, exc))
            return
        if result is not DEFERRED:
            self.reply(envelope, messages.ok(request.id, result))

    def reply(self, envelope: Envelope, payload: bytes) -> None:
        try:
            self.socket.send_multipart([*envelope, payload], zmq.NOBLOCK)
        except zmq.ZMQError as exc:
            logger.warning("could not send a reply (%s); the client has gone", exc)
