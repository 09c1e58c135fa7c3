"""Websockets that a slow browser cannot turn against the pipeline.

No client has a queue of its own. The feed keeps the newest snapshot and a bounded ring of events;
every client task only holds a cursor into them and is woken (`Changes`) when something new is
there. A client that is busy sending misses wake-ups instead of queueing them, and reads the
newest state when it is ready again: snapshots coalesce into the latest one, events come in
batches from its cursor, and events that fell out of the ring meanwhile are counted as `missed`.
A client that cannot take one message in SEND_TIMEOUT_S is closed. Each websocket is two tasks,
one sending and one reading (so that a close is seen at once); either ending ends both.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

logger = logging.getLogger(__name__)

SEND_TIMEOUT_S = 10.0


class Changes:
    """Wakes every waiting task on `notify` (on the event loop). Take the ticket, look at the
    state, then wait on the ticket: a change after the look is never missed."""

    def __init__(self) -> None:
        self._ticket = asyncio.Event()

    def ticket(self) -> asyncio.Event:
        return self._ticket

    def notify(self) -> None:
        ticket, self._ticket = self._ticket, asyncio.Event()
        ticket.set()


async def wait(ticket: asyncio.Event, timeout_s: float | None) -> bool:
    """True when the ticket fired, False after `timeout_s`."""
    try:
        await asyncio.wait_for(ticket.wait(), timeout_s)
        return True
    except TimeoutError:
        return False


class SlowClient(Exception):
    """The client took no message for SEND_TIMEOUT_S."""


async def send(websocket: WebSocket, text: str) -> None:
    try:
        await asyncio.wait_for(websocket.send_text(text), SEND_TIMEOUT_S)
    except TimeoutError:
        raise SlowClient(f"no message taken in {SEND_TIMEOUT_S} s") from None


class Clients:
    """The websockets open now, by kind: what `web.clients` in /api/status reports."""

    def __init__(self) -> None:
        self.open: dict[str, int] = {}

    async def serve(self, websocket: WebSocket, kind: str, sender: Callable[[WebSocket], Awaitable[None]]) -> None:
        await websocket.accept()
        self.open[kind] = self.open.get(kind, 0) + 1
        tasks = [asyncio.create_task(sender(websocket)), asyncio.create_task(_drain(websocket))]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    continue
                problem = task.exception()
                if isinstance(problem, SlowClient):
                    logger.info("%s websocket of %s closed: %s", kind, websocket.client, problem)
                elif problem is not None and not _closed(problem):
                    logger.error("%s websocket of %s failed", kind, websocket.client, exc_info=problem)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            self.open[kind] -= 1
            if websocket.application_state == WebSocketState.CONNECTED:
                try:
                    await websocket.close()
                except (WebSocketDisconnect, RuntimeError, OSError):
                    pass  # the client went away meanwhile


async def _drain(websocket: WebSocket) -> None:
    """Read (and drop) what the client sends, until it closes."""
    while True:
        message = await websocket.receive()
        if message["type"] == "websocket.disconnect":
            return


def _closed(problem: BaseException) -> bool:
    """An exception that only says the client went away."""
    if isinstance(problem, (WebSocketDisconnect, ConnectionError, OSError)):  # uvicorn's ClientDisconnected too
        return True
    if isinstance(problem, RuntimeError):  # starlette: "Cannot call send once a close message has been sent"
        return "close" in str(problem) or "disconnect" in str(problem)
    return type(problem).__name__.startswith("ConnectionClosed")
