"""Sending one command to a handler or service port and waiting for its reply, with a timeout.

A fresh DEALER per call (the Lazy Pirate way): a lost reply never poisons the next request.
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import zmq

from libs.common import messages

_ids = itertools.count(1)


class NoReply(TimeoutError):
    """The port did not answer in time (not running, or wedged)."""


def call(endpoint: str, cmd: str, args: dict[str, Any] | None = None, *, timeout_s: float = 5.0,
         context: zmq.Context | None = None) -> messages.Reply:
    """Send `cmd` to `endpoint` and return the parsed reply; NoReply after `timeout_s`."""
    return send_raw(endpoint, messages.request(cmd, args, f"{os.getpid()}-{next(_ids)}"),
                    timeout_s=timeout_s, context=context)


def send_raw(endpoint: str, payload: bytes | list[bytes], *, timeout_s: float = 5.0,
             context: zmq.Context | None = None) -> messages.Reply:
    """Send any bytes (or multipart) and parse the answer: what the tests of bad input use."""
    ctx = context or zmq.Context.instance()
    socket = ctx.socket(zmq.DEALER)
    socket.setsockopt(zmq.LINGER, 0)
    try:
        socket.connect(endpoint)
        socket.send_multipart(payload if isinstance(payload, list) else [payload])
        if not socket.poll(timeout_s * 1000):
            raise NoReply(f"no reply from {endpoint} within {timeout_s} s: is it running?")
        return messages.REPLIES.validate_json(socket.recv_multipart()[-1])
    finally:
        socket.close(linger=0)
