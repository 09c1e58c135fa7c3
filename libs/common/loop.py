"""What every Surveyor event loop shares, the handler's and the services': reading a socket dry
without blocking, multipart messages in and out at the least cost per part, and leaving the loop
on SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

import zmq

_NOBLOCK, _RCVMORE, _SNDMORE = int(zmq.NOBLOCK), int(zmq.RCVMORE), int(zmq.SNDMORE)
_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)
"""As plain ints: pyzmq's flag enums cost a few microseconds per part in arithmetic, as much as
the rest of receiving a small frame (thousands of messages a second on the data path)."""


def receive(socket: zmq.Socket, *, copy: bool = True) -> list[Any]:
    """`socket.recv_multipart(zmq.NOBLOCK, copy=copy)`: zmq.Again when nothing waits. A
    `zmq.Frame` says itself whether more parts follow: half the cost of asking the socket, whose
    every option read goes through an enum."""
    if copy:
        parts = [socket.recv(_NOBLOCK)]
        while socket.get(_RCVMORE):
            parts.append(socket.recv(_NOBLOCK))
        return parts
    part = socket.recv(_NOBLOCK, copy=False)
    parts = [part]
    while part.more:
        part = socket.recv(_NOBLOCK, copy=False)
        parts.append(part)
    return parts


def send(socket: zmq.Socket, parts: list[Any], *, copy: bool = True) -> None:
    """`socket.send_multipart(parts, copy=copy)`, blocking as it does."""
    last = len(parts) - 1
    for index, part in enumerate(parts):
        socket.send(part, _SNDMORE if index < last else 0, copy=copy)


def drain(socket: zmq.Socket, handle: Callable[[list[Any]], None], *, copy: bool = True) -> int:
    """Give `handle` every message waiting on `socket` (as `zmq.Frame`s, which say who sent
    them, when not `copy`); returns how many there were."""
    served = 0
    while True:
        try:
            parts = receive(socket, copy=copy)
        except zmq.Again:
            return served
        served += 1
        handle(parts)


def readable(socket: zmq.Socket) -> bool:
    """Whether a message waits on `socket` (cheaper than a poll, between frames)."""
    return bool(socket.get(_EVENTS) & _POLLIN)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT end the loop cleanly (only the main thread can take signals)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop())
