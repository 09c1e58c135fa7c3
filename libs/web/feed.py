"""The web process's view of one handler: a subscriber to its status port (INTERFACES.md) that keeps
what front-ends ask for. The newest status snapshot, the last EVENTS_KEPT events, each numbered
(`seq`, counting up from 1 in this process, so that a browser resumes where it stopped), and the
newest preview of each (stage, name) with its arrays as numpy arrays.

It never joins the data plane and never slows the handler: it only reads a PUB, which drops
for a subscriber that falls behind (RCVHWM) and never waits for one. One thread reads the socket
and parses every message once (`feeds.parse`); whatever it reads replaces what it held, so memory
is bounded by the number of previews and EVENTS_KEPT. A message that does not parse is counted
and dropped, never fatal. ZeroMQ connects again by itself when the handler restarts at the same
endpoint; the state held here (events, previews) stays, and `seq` goes on counting.

A `stream` id, new for every Feed, tells a client that a `seq` it kept belongs to an earlier web
process: numbers count from 1 again.
"""

from __future__ import annotations

import json
import logging
import math
import secrets
import threading
import time
from collections import OrderedDict, deque
from dataclasses import dataclass
from typing import Any, Callable, Literal

import numpy as np
import zmq

from libs.common import client, feeds, security

logger = logging.getLogger(__name__)

EVENTS_KEPT = 1000
PREVIEWS_KEPT = 256
"""(stage, name) pairs kept; the least recently updated goes first."""
STALE_S = 3.0
"""No snapshot for this long (the handler publishes one a second): not connected."""
BATCH = 100
"""Messages read per turn before the stop flag is checked again."""
TOPICS = (b"status", b"event", b"preview.")

Change = Literal["status", "event", "preview"]


@dataclass(frozen=True)
class Preview:
    header: feeds.PreviewHeader
    arrays: dict[str, np.ndarray]
    seq: int
    """Counts every preview this feed took: a new one of the same (stage, name) has a higher seq."""

    @property
    def key(self) -> tuple[str, str]:
        return (self.header.stage, self.header.name)


@dataclass(frozen=True)
class Events:
    """Events after a sequence number, with what a client needs to resume."""

    events: list[dict[str, Any]]
    missed: int
    """Events after the asked-for seq that are no longer kept (the client fell behind the ring)."""
    last: int
    """The seq of the newest event kept (0: none yet): resume with since=last."""


class Feed:
    """Start it, read it from any thread, close it. `on_change` callbacks run on the feed's thread
    after each message (keep them short: hand the news to another loop)."""

    def __init__(self, endpoint: str, *, command: str | None = None, events_kept: int = EVENTS_KEPT,
                 previews_kept: int = PREVIEWS_KEPT, context: zmq.Context | None = None) -> None:
        """`command`: the handler's command endpoint, to ask for the events the link missed."""
        self.endpoint = endpoint
        self._command = command
        self._cursor = feeds.EventCursor()
        self.stream = secrets.token_hex(4)
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._listeners: list[Callable[[Change], None]] = []
        self._snapshot: dict[str, Any] | None = None
        self._snapshot_at: float | None = None
        self.snapshots = 0
        """Snapshots taken so far: changes with each new one."""
        self._events: deque[dict[str, Any]] = deque(maxlen=events_kept)
        self._seq = 0
        self._previews: OrderedDict[tuple[str, str], Preview] = OrderedDict()
        self._previews_kept = previews_kept
        self._preview_seq = 0
        self.rejected = 0
        """Messages that did not parse (their model, or buffers that do not fit their header)."""

    # --- running ------------------------------------------------------------------------------

    def start(self) -> Feed:
        self._thread = threading.Thread(target=self._run, name=f"feed {self.endpoint}", daemon=True)
        self._thread.start()
        return self

    def close(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def on_change(self, callback: Callable[[Change], None]) -> None:
        self._listeners.append(callback)

    def _run(self) -> None:
        socket = self._context.socket(zmq.SUB)
        socket.setsockopt(zmq.LINGER, 0)
        security.connect_as_client(socket, security.configured())
        for topic in TOPICS:
            socket.setsockopt(zmq.SUBSCRIBE, topic)
        socket.connect(self.endpoint)
        logger.info("following the status feed at %s", self.endpoint)
        try:
            while not self._stop.is_set():
                if not socket.poll(200):
                    continue
                for _ in range(BATCH):
                    try:
                        parts = socket.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    self._take(parts)
        except Exception:
            logger.exception("the status feed reader at %s stopped", self.endpoint)
            raise
        finally:
            socket.close(linger=0)

    def take(self, parts: list[bytes]) -> None:
        """One message as received (what the thread does with each; tests feed it directly)."""
        self._take(parts)

    def _take(self, parts: list[bytes]) -> None:
        if len(parts) < 2:
            return self._reject(f"a message of {len(parts)} part(s); expected [topic, JSON, buffers...]")
        topic, body, *buffers = parts
        try:
            message = feeds.parse(topic, body)
        except ValueError as exc:  # pydantic's ValidationError is one
            return self._reject(f"topic {topic[:40]!r}: {exc}")
        if isinstance(message, feeds.StatusSnapshot):
            snapshot = json.loads(body)
            self._catch_up(self._cursor.after_snapshot(snapshot))
            change = self._take_snapshot(snapshot)
        elif isinstance(message, feeds.Event):
            event = json.loads(body)
            self._catch_up(self._cursor.after_event(event))
            change = self._take_event(event)
        else:
            change = self._take_preview(message, buffers)
        if change is not None:
            self._tell(change)

    def _catch_up(self, missing: tuple[float, int, int] | None) -> None:
        """Events the link missed (a restarted handler's first ones), asked of the handler."""
        if missing is None or self._command is None:
            return
        found = client.missed_events(self._command, missing)
        _, after, upto = missing
        if len(found) < upto - after:
            logger.warning("status feed %s: %d of the handler's events %d-%d missed, not to be had again",
                           self.endpoint, upto - after - len(found), after + 1, upto)
        for event in found:
            self._take_event(event)
            self._tell("event")

    def _tell(self, change: Change) -> None:
        for listener in self._listeners:
            try:
                listener(change)
            except Exception:
                logger.exception("a status feed listener failed on %s", change)

    def _reject(self, why: str) -> None:
        self.rejected += 1
        if self.rejected == 1 or math.log2(self.rejected).is_integer():  # 1, 2, 4, 8...: never a flood
            logger.warning("status feed %s: message dropped (%d so far): %s", self.endpoint, self.rejected, why)

    def _take_snapshot(self, snapshot: dict[str, Any]) -> Change:
        with self._lock:
            self._snapshot, self._snapshot_at = snapshot, time.monotonic()
            self.snapshots += 1
        return "status"

    def _take_event(self, event: dict[str, Any]) -> Change:
        with self._lock:
            self._seq += 1
            self._events.append({**event, "seq": self._seq})
        return "event"

    def _take_preview(self, header: feeds.PreviewHeader, buffers: list[bytes]) -> Change | None:
        if len(buffers) != len(header.arrays):
            self._reject(f"preview {header.stage}/{header.name}: {len(header.arrays)} arrays, {len(buffers)} buffers")
            return None
        arrays = {}
        for spec, buffer in zip(header.arrays, buffers):
            try:
                arrays[spec.name] = np.frombuffer(buffer, dtype=spec.dtype).reshape(spec.shape)
            except (TypeError, ValueError) as exc:
                self._reject(f"preview {header.stage}/{header.name}: array {spec.name} {spec.dtype}"
                             f"{list(spec.shape)} does not fit its {len(buffer)} bytes: {exc}")
                return None
        with self._lock:
            self._preview_seq += 1
            preview = Preview(header, arrays, self._preview_seq)
            self._previews.pop(preview.key, None)
            self._previews[preview.key] = preview
            while len(self._previews) > self._previews_kept:
                self._previews.popitem(last=False)
        return "preview"

    # --- reading ------------------------------------------------------------------------------

    def snapshot(self) -> tuple[dict[str, Any] | None, int]:
        """The newest snapshot (None before the first) and its number (`snapshots`)."""
        with self._lock:
            return self._snapshot, self.snapshots

    def age_s(self) -> float | None:
        """Seconds since the newest snapshot came (None: none yet)."""
        with self._lock:
            at = self._snapshot_at
        return None if at is None else time.monotonic() - at

    def connected(self) -> bool:
        age = self.age_s()
        return age is not None and age < STALE_S

    def last_seq(self) -> int:
        with self._lock:
            return self._seq

    def events_after(self, since: int, limit: int = EVENTS_KEPT) -> Events:
        """Events with seq > `since`, oldest first, at most `limit`. A `since` past the newest seq
        (a number from an earlier web process) starts from the oldest kept."""
        with self._lock:
            last = self._seq
            since = 0 if since > last else max(0, since)
            first = self._events[0]["seq"] if self._events else last + 1
            missed = max(0, first - 1 - since)
            start = max(0, since + 1 - first)
            events = [self._events[i] for i in range(start, min(len(self._events), start + max(0, limit)))]
        return Events(events, missed, last)

    def previews(self) -> list[Preview]:
        with self._lock:
            return list(self._previews.values())

    def preview(self, stage: str, name: str) -> Preview | None:
        with self._lock:
            return self._previews.get((stage, name))

    def latest_named(self, name: str) -> Preview | None:
        """The newest preview called `name` of any stage (the receivers' `last_frame`)."""
        with self._lock:
            found = [p for p in self._previews.values() if p.header.name == name]
        return max(found, key=lambda p: p.seq, default=None)
