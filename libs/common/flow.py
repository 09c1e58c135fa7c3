"""Reliable frame delivery between the processes of neighbouring stages.

Every producing process binds one ROUTER (`Outlet`); every consuming process connects one DEALER
to each live producer of its input stages (`Inlet`). The consumer grants credit ("send me n more")
and acknowledges frames; the producer sends a frame only to a consumer that has credit, least
recently served first. So a slow process gets fewer frames, nothing piles up in a dead process's
socket buffers, and the producer's ledger knows exactly which frames each consumer holds: when the
handler declares a consumer dead, its unacknowledged frames go back to the front of the queue for
the others (reference/zmq_patterns.md, sections 3.2-3.4).

Acknowledgements are chained: a worker acknowledges its input only when everything it derived from
it has been acknowledged downstream, so an acknowledged frame at the source is one that reached
every sink. Re-sent frames may arrive twice; consumers drop duplicates by (epoch, frame).

Edges with delivery `latest` (live monitoring) keep a short queue, drop the oldest frame when it is
full and count the drop; they are never acknowledged.

Scan headers (facts about the whole scan: the detector's series header with geometry, flatfield
and pixel mask; a calibration such as the dark model) go to every consumer of every stage rather
than to one, outside the credit, and to each consumer that connects later before any frame: a
restarted worker learns the mask before it sees pixels. An outlet keeps the latest header of
each name.

Wire (consumer -> producer): [b"H", msgpack {stage, credit}] once, then [b"C", msgpack {credit,
ack: [[epoch, frame], ...]}]. Producer -> consumer: [b"F", *frame parts], [b"R", *frame parts] (a
frame sent again after its consumer was lost: what was derived from it may be downstream already),
[b"B", msgpack [n1, n2, ...], *parts of n1, *parts of n2, ...] (several frames in one message, as
many as the consumer has credit for: per message ZeroMQ and Python cost more than per byte for
small compressed frames) or [b"S", *header parts]. Frames queued while `batch()` is open go out
when it closes, so a source that takes many detector messages per turn sends them together.
"""

from __future__ import annotations

import logging
import tempfile
import uuid
from collections import OrderedDict, deque
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import msgpack
import zmq

from libs.common import loop, security
from libs.common.frames import FrameKey
from libs.common.security import Keys

logger = logging.getLogger(__name__)

HELLO, CREDIT, FRAME, RESENT, HEADER, BATCH = b"H", b"C", b"F", b"R", b"S", b"B"
MAX_BATCH = 64
"""Frames in one message at most."""


@dataclass(slots=True)
class _Item:
    key: FrameKey
    parts: list[Any]
    parent: Any
    resent: bool = False
    """Sent before to a consumer that was lost: it goes out tagged RESENT."""


@dataclass
class _Consumer:
    identity: bytes
    credit: int = 0
    inflight: dict[FrameKey, _Item] = field(default_factory=dict)


@dataclass
class _Route:
    """One downstream stage: its queue and the processes that serve it."""

    stage: str
    latest: bool
    depth: int
    pending: deque[_Item] = field(default_factory=deque)
    consumers: OrderedDict[bytes, _Consumer] = field(default_factory=OrderedDict)
    dropped: int = 0


class Outlet:
    """Producer side: queues, credit-based least-recently-served dispatch, in-flight ledger."""

    def __init__(self, context: zmq.Context, *, host: str, on_delivered: Callable[[Any], None],
                 max_pending: int = 4, keys: Keys | None = None) -> None:
        self.socket = context.socket(zmq.ROUTER)
        security.serve(self.socket, keys)
        self.socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        # A consumer that reconnects (same identity, new link) takes its identity over at once.
        self.socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.setsockopt(zmq.SNDHWM, 64)
        port = self.socket.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        # Consumers on this host connect over a Unix socket instead: same semantics, less work
        # per byte than loopback TCP (reference/zmq_patterns.md 3.1). Its path holds 107 bytes at
        # most, so under a longer TMPDIR it goes in /tmp; where none can be bound, TCP serves all.
        name = f"surveyor-{uuid.uuid4().hex}.ipc"
        path = f"{tempfile.gettempdir()}/{name}"
        if len(path.encode()) > zmq.IPC_PATH_MAX_LEN:
            path = f"/tmp/{name}"
        self.local_endpoint: str | None = f"ipc://{path}"
        try:
            self.socket.bind(self.local_endpoint)
        except zmq.ZMQError as exc:
            logger.warning("no Unix socket at %s (%s); consumers on this host connect to %s",
                           self.local_endpoint, exc, self.endpoint)
            self.local_endpoint = None
        self.routes: dict[str, _Route] = {}
        self._owner: dict[bytes, _Route] = {}
        self._strangers: dict[bytes, tuple[str, int]] = {}
        """Consumers that said hello for a stage this outlet does not serve yet (wiring races)."""
        self._on_delivered = on_delivered
        self.max_pending = max_pending
        self._headers: dict[str, tuple[int, list[Any]]] = {}
        self._held = False
        """True inside `batch()`: frames queue and go out when it closes."""

    def add_route(self, stage: str, *, latest: bool, depth: int) -> None:
        """Serve a downstream stage (again: an existing queue is kept, its policy updated)."""
        route = self.routes.setdefault(stage, _Route(stage, latest, depth))
        route.latest, route.depth = latest, depth
        for identity, (wanted, credit) in list(self._strangers.items()):
            if wanted == stage:
                del self._strangers[identity]
                self._hello(identity, stage, credit)

    # --- producing ---------------------------------------------------------------------------

    def send(self, key: FrameKey, parts: list[Any], parent: Any = None,
             stages: Iterable[str] | None = None) -> int:
        """Queue a frame for every downstream stage (or those named); returns how many
        acknowledgements to expect."""
        expected = 0
        routes = self.routes.values() if stages is None else [self.routes[name] for name in stages]
        for route in routes:
            if route.latest:
                if len(route.pending) >= route.depth:
                    route.pending.popleft()
                    route.dropped += 1
                route.pending.append(_Item(key, parts, None))
            else:
                route.pending.append(_Item(key, parts, parent))
                expected += 1
            if not self._held:
                self._dispatch(route)
        return expected

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Frames sent inside go out together when it closes (as few messages as credit allows)."""
        self._held = True
        try:
            yield
        finally:
            self._held = False
            for route in self.routes.values():
                self._dispatch(route)

    def send_header(self, epoch: int, name: str, parts: list[Any]) -> None:
        """Give every consumer, now and later, the scan header `name` of `epoch`."""
        self._headers[name] = (epoch, parts)
        for identity in self._owner:
            self._send_header(identity, parts)

    def _send_header(self, identity: bytes, parts: list[Any]) -> None:
        try:
            self.socket.send_multipart([identity, HEADER, *parts], copy=False)
        except zmq.ZMQError as exc:
            logger.warning("scan header not delivered to %s: %s", identity.decode(errors="replace"), exc)

    def full(self) -> bool:
        """True while a stage that needs every frame cannot take more: time to stop producing.
        Inside `batch()`, frames its consumers have credit for do not count: they go out together
        when it closes (a source then takes as many detector messages per turn as can be sent)."""
        for route in self.routes.values():
            if route.latest:
                continue
            room = self.max_pending + (sum(c.credit for c in route.consumers.values()) if self._held else 0)
            if len(route.pending) >= room:
                return True
        return False

    def outstanding(self, epoch: int) -> int:
        """Frames of `epoch` not yet acknowledged by every stage that needs them."""
        count = 0
        for route in self.routes.values():
            if route.latest:
                continue
            count += sum(1 for item in route.pending if item.key[0] == epoch)
            for consumer in route.consumers.values():
                count += sum(1 for key in consumer.inflight if key[0] == epoch)
        return count

    @property
    def pending(self) -> int:
        return sum(len(r.pending) for r in self.routes.values())

    @property
    def inflight(self) -> int:
        return sum(len(c.inflight) for r in self.routes.values() for c in r.consumers.values())

    @property
    def dropped(self) -> int:
        return sum(r.dropped for r in self.routes.values())

    # --- consumers ---------------------------------------------------------------------------

    def receive(self) -> None:
        """Handle every waiting message from consumers (hello, credit, acknowledgements)."""
        while True:
            try:
                identity, tag, payload = self.socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            except ValueError:
                logger.warning("ignored a data-port message with the wrong number of parts")
                continue
            try:
                body = msgpack.unpackb(payload)
                if tag == HELLO:
                    self._hello(identity, body["stage"], int(body["credit"]))
                elif tag == CREDIT:
                    self._credit(identity, int(body["credit"]), body["ack"])
                else:
                    logger.warning("ignored data-port message with tag %r from %r", tag, identity)
            except (ValueError, KeyError, TypeError, msgpack.UnpackException) as exc:
                logger.warning("ignored malformed data-port message from %r: %s", identity, exc)

    def _hello(self, identity: bytes, stage: str, credit: int) -> None:
        route = self.routes.get(stage)
        if route is None:
            logger.warning("consumer %s of stage %r is not (yet) downstream of this stage",
                           identity.decode(errors="replace"), stage)
            self._strangers[identity] = (stage, credit)
            return
        if identity in route.consumers:
            # A consumer says hello again when it had been declared dead and came back: what it
            # held went with its old link, so it is sent again (to it or another process).
            self.consumer_lost(identity)
        consumer = route.consumers.setdefault(identity, _Consumer(identity))
        consumer.credit = credit
        self._owner[identity] = route
        logger.info("consumer %s of stage %s connected with credit %d",
                    identity.decode(errors="replace"), stage, credit)
        for _, parts in self._headers.values():
            self._send_header(identity, parts)
        self._dispatch(route)

    def _credit(self, identity: bytes, credit: int, acks: Iterable[Any]) -> None:
        route = self._owner.get(identity)
        if route is None:
            return
        consumer = route.consumers[identity]
        consumer.credit += credit
        for epoch, frame in acks:
            item = consumer.inflight.pop((epoch, frame), None)
            if item is not None and item.parent is not None:
                self._on_delivered(item.parent)
        self._dispatch(route)

    def consumer_lost(self, identity: bytes) -> int:
        """Forget a dead consumer and queue its unacknowledged frames first; returns how many."""
        self._strangers.pop(identity, None)
        route = self._owner.pop(identity, None)
        if route is None:
            return 0
        consumer = route.consumers.pop(identity)
        items = sorted(consumer.inflight.values(), key=lambda item: item.key, reverse=True)
        for item in items:
            item.resent = True
        route.pending.extendleft(items)
        if items:
            logger.warning("re-sending %d frames that %s held to the other processes of %s",
                           len(items), identity.decode(errors="replace"), route.stage)
        self._dispatch(route)
        return len(items)

    def consumers(self) -> list[bytes]:
        return list(self._owner)

    def drop_before(self, epoch: int) -> int:
        """Drop every queued or in-flight frame of an older epoch; returns how many."""
        self._headers = {name: h for name, h in self._headers.items() if h[0] >= epoch}
        dropped = 0
        for route in self.routes.values():
            keep = deque(item for item in route.pending if item.key[0] >= epoch)
            dropped += len(route.pending) - len(keep)
            route.pending = keep
            for consumer in route.consumers.values():
                stale = [key for key in consumer.inflight if key[0] < epoch]
                for key in stale:
                    del consumer.inflight[key]
                dropped += len(stale)
        return dropped

    def _dispatch(self, route: _Route) -> None:
        while route.pending:
            consumer = next((c for c in route.consumers.values() if c.credit > 0), None)
            if consumer is None:
                return
            items = [route.pending.popleft()]
            if not items[0].resent:  # a re-sent frame goes alone, tagged as such
                while (route.pending and len(items) < min(consumer.credit, MAX_BATCH)
                       and not route.pending[0].resent):
                    items.append(route.pending.popleft())
            if len(items) == 1:
                message = [consumer.identity, RESENT if items[0].resent else FRAME, *items[0].parts]
            else:
                message = [consumer.identity, BATCH, msgpack.packb([len(item.parts) for item in items]),
                           *(part for item in items for part in item.parts)]
            try:
                loop.send(self.socket, message, copy=False)
            except zmq.ZMQError as exc:
                route.pending.extendleft(reversed(items))
                if exc.errno == zmq.EAGAIN:
                    return
                logger.warning("consumer %s unreachable (%s)", consumer.identity.decode(errors="replace"), exc)
                self.consumer_lost(consumer.identity)
                continue
            consumer.credit -= len(items)
            if not route.latest:
                for item in items:
                    consumer.inflight[item.key] = item
            route.consumers.move_to_end(consumer.identity)

    def close(self) -> None:
        self.socket.close(linger=0)
        if self.local_endpoint is not None:
            Path(self.local_endpoint.removeprefix("ipc://")).unlink(missing_ok=True)


class Inlet:
    """Consumer side: one DEALER per producer process, credit and acknowledgements coalesced."""

    def __init__(self, context: zmq.Context, poller: zmq.Poller, *, identity: bytes, stage: str,
                 credit: int, keys: Keys | None = None) -> None:
        self._context = context
        self._keys = keys
        self._poller = poller
        self._identity = identity
        self._stage = stage
        self.credit = credit
        self.links: dict[zmq.Socket, str] = {}
        self._by_producer: dict[str, zmq.Socket] = {}
        self._grant: dict[str, int] = {}
        self._acks: dict[str, list[FrameKey]] = {}

    def connect(self, producer: str, endpoint: str, server_key: str | None = None) -> None:
        """A link to `producer`'s outlet (a CURVE server whose public key is `server_key`)."""
        if producer in self._by_producer:
            return
        socket = self._context.socket(zmq.DEALER)
        security.connect_as_client(socket, self._keys, server_key)
        socket.setsockopt(zmq.ROUTING_ID, self._identity)
        socket.setsockopt(zmq.LINGER, 0)
        socket.setsockopt(zmq.RCVHWM, 64)
        socket.connect(endpoint)
        socket.send_multipart([HELLO, msgpack.packb({"stage": self._stage, "credit": self.credit})])
        self._poller.register(socket, zmq.POLLIN)
        self.links[socket] = producer
        self._by_producer[producer] = socket
        logger.info("connected to producer %s at %s", producer, endpoint)

    def disconnect(self, producer: str) -> None:
        socket = self._by_producer.pop(producer, None)
        if socket is None:
            return
        self._poller.unregister(socket)
        del self.links[socket]
        self._grant.pop(producer, None)
        self._acks.pop(producer, None)
        socket.close(linger=0)
        logger.info("disconnected from producer %s", producer)

    def producers(self) -> list[str]:
        return list(self._by_producer)

    def receive(self, socket: zmq.Socket) -> list[tuple[bytes, list[Any]]] | None:
        """The (tag, parts) of each frame or header in the next message from this link (FRAME,
        RESENT or HEADER; a batch is split into its frames), or None when none waits."""
        try:
            parts = loop.receive(socket, copy=False)
        except zmq.Again:
            return None
        tag = parts[0].bytes
        if tag in (FRAME, RESENT, HEADER):
            return [(tag, parts[1:])]
        if tag == BATCH and len(parts) > 1:
            try:
                sizes = msgpack.unpackb(parts[1].bytes)
                if sum(sizes) == len(parts) - 2 and all(isinstance(n, int) and n > 0 for n in sizes):
                    ends = list(accumulate(sizes, initial=2))
                    return [(FRAME, parts[start:end]) for start, end in zip(ends, ends[1:])]
            except (ValueError, TypeError, msgpack.UnpackException):
                pass
        logger.warning("ignored a data message with tag %r from %s", tag[:8], self.links[socket])
        return []

    def grant(self, producer: str, credit: int = 1) -> None:
        if producer in self._by_producer:
            self._grant[producer] = self._grant.get(producer, 0) + credit

    def ack(self, producer: str, key: FrameKey) -> None:
        if producer in self._by_producer:
            self._acks.setdefault(producer, []).append(key)

    def flush(self) -> None:
        """Send the credit and acknowledgements gathered since the last flush, one message per link."""
        for producer in set(self._grant) | set(self._acks):
            socket = self._by_producer.get(producer)
            if socket is None:
                continue
            body = {"credit": self._grant.get(producer, 0), "ack": self._acks.get(producer, [])}
            try:
                socket.send_multipart([CREDIT, msgpack.packb(body)], zmq.NOBLOCK)
            except zmq.Again:
                logger.warning("producer %s is not reading credit; retrying", producer)
                continue
            self._grant.pop(producer, None)
            self._acks.pop(producer, None)

    def close(self) -> None:
        for producer in list(self._by_producer):
            self.disconnect(producer)
