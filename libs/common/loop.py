"""What every Surveyor event loop shares, the handler's and the services': reading a socket dry
without blocking, and leaving the loop on SIGTERM or SIGINT."""

from __future__ import annotations

import signal
import threading
from typing import Any, Callable

import zmq


def drain(socket: zmq.Socket, handle: Callable[[list[Any]], None], *, copy: bool = True) -> int:
    """Give `handle` every message waiting on `socket` (as `zmq.Frame`s, which say who sent
    them, when not `copy`); returns how many there were."""
    served = 0
    while True:
        try:
            parts = socket.recv_multipart(zmq.NOBLOCK, copy=copy)
        except zmq.Again:
            return served
        served += 1
        handle(parts)


def readable(socket: zmq.Socket) -> bool:
    """Whether a message waits on `socket` (cheaper than a poll, between frames)."""
    return bool(socket.getsockopt(zmq.EVENTS) & zmq.POLLIN)


def stop_on_signals(stop: Callable[[], None]) -> None:
    """SIGTERM and SIGINT end the loop cleanly (only the main thread can take signals)."""
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stop())
