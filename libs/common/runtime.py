"""The service runtime: what every Surveyor process but the handler runs.

A service subclasses `Service`, names its `Params` model and implements `on_frame` (workers and
sinks) or `produce` (sources), plus the scan hooks it needs. The runtime owns the rest:

- one `zmq.Poller` loop; commands are drained before every data frame, so a command waits at most
  one frame's processing time (an asyncio loop would starve them: reference/zmq_patterns.md 3.5);
- a link to the handler (a DEALER on its command endpoint): registration, a heartbeat every
  `heartbeat_s`, and the handler's requests (topology, scan start/end, abort, configure, shutdown);
  a silent handler is re-registered with, with back-off, while data keeps flowing;
- a JSON command port of its own (ping, status, configure, abort, shutdown);
- data: an `Inlet` from every live producer of its input stages and an `Outlet` to its consumers
  (libs/common/flow.py), chained acknowledgements, duplicate and stale-epoch dropping;
- per-scan counters, reported with heartbeats and when the scan ends;
- SIGTERM / SIGINT / `shutdown`: leave the loop, tell the handler, close every socket.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import signal
import socket as net
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import zmq
from pydantic import BaseModel, ValidationError

from libs.common import messages
from libs.common.contracts import DETECTOR_HEADER, header_name
from libs.common.errors import FrameError, MessageError, ParameterError, SurveyorError
from libs.common.flow import HEADER, RESENT, Inlet, Outlet
from libs.common.frames import Frame, FrameKey, decode
from libs.common.messages import (Abort, Configure, Ping, ScanCounters, ScanDescription, ScanEnd,
                                  ScanStart, ServiceIdentity, ServiceStats, Shutdown, Status, Topology)
from libs.common.pipeline import NoParams, Pipeline, from_dict
from libs.common.ports import CommandPort

logger = logging.getLogger(__name__)

FRAMES_PER_TURN = 8
"""Frames taken from one producer link per loop turn; commands are still served between frames."""

Token = tuple[str, FrameKey]
"""A frame being worked on: (producer stage, (epoch, frame)). It names the frame, not the link it
came by: when a producer re-sends a frame this process still holds (after a reconnection, or from
a successor of a dead producer), the hold and the pending children carry over to the new copy."""


def advertised(host: str) -> str:
    """The address others use to reach a port bound on `host`."""
    return net.gethostname() if host in ("0.0.0.0", "*", "") else host


class Service:
    """Base of every Surveyor service process; see the module docstring for the contract."""

    Params: ClassVar[type[BaseModel]] = NoParams

    def __init__(self, *, pipeline: Pipeline, stage: str, name: str, handler: str,
                 context: zmq.Context | None = None) -> None:
        self.pipeline = pipeline
        self.stage = stage
        self.name = name
        self.instance = f"{name}-{uuid.uuid4().hex[:8]}"
        self.params: BaseModel = self.Params.model_validate(pipeline.stages[stage].params)
        self.epoch = 0
        self.scan: ScanDescription | None = None
        self.headers: dict[str, Frame] = {}
        """The scan headers of the current epoch by name (`header_name`): "detector" and others."""
        self.totals = ScanCounters()
        self.counters = ScanCounters()
        self.context = context or zmq.Context()
        self._own_context = context is None
        self._poller = zmq.Poller()
        self._stopping = False
        self._exit_code = 0
        self._handler_endpoint = handler
        self._registered = False
        self._next_heartbeat = 0.0
        self._handler_seen = time.monotonic()
        self._backoff = pipeline.handler.heartbeat_s
        self._topology_version = -1
        self._waiting: dict[str, Callable[[messages.Reply], None]] = {}
        self._sequence = 0
        self._producer_stage: dict[str, str] = {}
        self._children: dict[Token, int] = {}
        self._on_hold: set[Token] = set()
        self._producer_of: dict[Token, set[str]] = {}
        """The producer instances that sent each frame not yet acknowledged: where the ack goes
        (more than one when a producer declared dead, only stalled, sends it again too)."""
        self._current: Token | None = None
        self.redelivered = False
        """While a frame is handled: whether its producer sent it before (to a process that died
        or lost its link), so that what was derived from it may already be downstream."""
        self._input_paused = False
        self._ended: tuple[int, ScanCounters] | None = None
        """The last scan this process finished, with its counters: a repeated scan_end (from a
        handler that restarted while ending the scan) gets the same answer."""
        self._owed: dict[str, int] = {}
        self._seen: dict[str, set[int]] = {}
        self._source_done: tuple[int, int] | None = None
        self._next_produce: float | None = None
        self._watched: dict[zmq.Socket, Callable[[], None]] = {}
        self._watching = False
        self._rejoining = False
        """Registering again after losing the handler (see `_reconnect_inputs`)."""

        host = pipeline.handler.data_host
        self._command_socket = self.context.socket(zmq.ROUTER)
        self._command_socket.setsockopt(zmq.LINGER, 0)
        self._command_socket.setsockopt(zmq.MAXMSGSIZE, 16 * messages.MAX_COMMAND_BYTES)
        port = self._command_socket.bind_to_random_port(f"tcp://{host}")
        self.command_endpoint = f"tcp://{advertised(host)}:{port}"
        self._commands = CommandPort(self._command_socket, messages.SERVICE_REQUESTS, self._dispatch)
        self._poller.register(self._command_socket, zmq.POLLIN)

        self.outlet = Outlet(self.context, host=host, on_delivered=self._delivered)
        self._poller.register(self.outlet.socket, zmq.POLLIN)
        self._wire(pipeline)
        self.inlet = Inlet(self.context, self._poller, identity=self.instance.encode(), stage=stage,
                           credit=pipeline.stages[stage].credit)
        self._handler_link: zmq.Socket | None = None
        self._handler_port: CommandPort | None = None
        self._connect_handler()

    # --- hooks for services -------------------------------------------------------------------

    def on_frame(self, frame: Frame) -> None:
        """Handle one input frame; call `emit` for what goes downstream."""

    def produce(self) -> float | None:
        """Sources: emit the next frames of the current scan. Return seconds until the next call
        is wanted (0 = at once), or None when there is nothing to do until something changes."""
        return None

    def on_duplicate(self, frame: Frame) -> None:
        """A frame this process already took came again (its producer re-sent it after a link or
        a process was lost). It is not processed again; a sink that merges partial results riding
        on frames (class sums) takes what the first copy's may have lost. `hold` works as in
        `on_frame`."""

    def on_rejoin(self) -> None:
        """This process was declared dead (stalled) and registered again: its producers have sent
        what it held to the others, where it is derived again. Drop partial results of those
        frames that have not left yet (a sum over many frames), or they would count twice."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        """A scan starts; `self.scan` and `self.epoch` are already set. Raise a SurveyorError to
        refuse it (an output directory that cannot take it): the handler then starts nothing."""

    def on_header(self, header: Frame) -> None:
        """A scan header arrived (`self.headers[header_name(header)]`): the detector's (geometry,
        flatfield, pixel mask; also `self.header`) or another stage's (a calibration). Before
        any frame that follows it from the same producer. Passed on downstream unless a service
        overrides this."""
        self.send_header(header)

    def on_scan_end(self) -> None:
        """Every frame of the scan has been delivered; finish its outputs (counters in `self.counters`)."""

    def on_abort(self) -> int:
        """Drop what the service holds of the current scan; return how many frames that was."""
        return 0

    def on_configure(self, params: BaseModel) -> None:
        """New parameters are in force from the next frame (`self.params` is already `params`)."""

    def close(self) -> None:
        """Release what the service opened (files); called once when the loop ends."""

    # --- API for services ---------------------------------------------------------------------

    @property
    def header(self) -> Frame | None:
        """The detector's scan header, once it has come."""
        return self.headers.get(DETECTOR_HEADER)

    def emit(self, frame: Frame, parent: Token | None = None, *, parents: Iterable[Token] = ()) -> None:
        """Send a frame downstream, as a child of `parent` (a held token), else of the frame
        being handled (if any), and of every token in `parents` (a sum over many frames): each
        parent is acknowledged once every child is.

        Stages whose edge takes only `darks` or `data` (pipeline `frames`) get only those frames,
        told apart by the frame number and the scan's `n_dark`."""
        parent = parent or self._current
        family = {parent, *parents} - {None}
        expected = self.outlet.send(frame.key, frame.encode(), parent=tuple(family) if family else None,
                                    stages=self._stages_for(frame))
        for token in family if expected else ():
            self._children[token] = self._children.get(token, 0) + expected
        self.counters.frames_out += 1
        self.totals.frames_out += 1

    def _stages_for(self, frame: Frame) -> list[str] | None:
        if not self._selective:
            return None
        dark = frame.header.frame < (self.scan.n_dark if self.scan else 0)
        return [name for name, wanted in self._selective.items()
                if wanted == "all" or (wanted == "darks") == dark]

    def send_header(self, header: Frame) -> None:
        """Give every downstream process a scan header, before the frames emitted after it."""
        name = header_name(header)
        self.headers[name] = header
        self.outlet.send_header(header.header.epoch, name, header.encode())

    def preview(self, name: str, arrays: dict[str, np.ndarray], **meta: Any) -> None:
        """Publish small arrays for front-ends (`preview.<stage>` on the handler's status port)."""
        if not self._registered or self.scan is None:
            return
        specs = [{"name": key, "dtype": a.dtype.str, "shape": list(a.shape),
                  "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
                 for key, a in arrays.items()]
        self._send("preview", {"instance": self.instance, "name": name, "scan_id": self.scan.scan_id,
                               "meta": meta, "arrays": specs})

    def hold(self) -> Token:
        """Inside `on_frame`: do not acknowledge this frame yet (it is not safe: not on disk, or
        its contribution not checkpointed); `release` the returned token when it is. Until then the
        producer keeps it and re-sends it to another process if this one dies."""
        self._on_hold.add(self._current)
        return self._current

    def release(self, token: Token) -> None:
        """A held frame is safe; it is acknowledged once what was derived from it is, too."""
        self._on_hold.discard(token)
        if not self._children.get(token):
            self._ack(token)

    def checkpoint_dir(self) -> Path:
        """Where this stage keeps, for the current scan, what a successor restores after a crash:
        the same folder for every process of the stage, one per scan and epoch."""
        path = self.pipeline.state_path / "scans" / f"{self.scan.scan_id}.{self.epoch}" / self.stage
        path.mkdir(parents=True, exist_ok=True)
        return path

    def pause_input(self, paused: bool = True) -> None:
        """Stop (or resume) granting credit to producers: back-pressure when this process cannot
        make frames safe (a full disk). Frames already here stay held."""
        self._input_paused = paused

    def finish_source(self, frames: int) -> None:
        """Sources: every frame of the current scan is emitted; the handler hears of it once
        all of them are delivered."""
        self._source_done = (self.epoch, frames)

    def can_produce(self) -> bool:
        return self._registered and not self.outlet.full()

    def wants_input(self) -> bool:
        """Sources: whether watched sockets are read now (see `watch`)."""
        return self.can_produce()

    def wake(self, delay: float) -> None:
        """Sources: have `produce` called in `delay` seconds (a timer), or sooner if already due."""
        due = time.monotonic() + delay
        self._next_produce = due if self._next_produce is None else min(self._next_produce, due)

    def watch(self, socket: zmq.Socket, on_readable: Callable[[], None]) -> None:
        """Sources: call `on_readable` when `socket` has input, while downstream has room (a
        full pipeline leaves the input queued in the socket: backpressure to the sender)."""
        self._watched[socket] = on_readable

    def unwatch(self, socket: zmq.Socket) -> None:
        if self._watched.pop(socket, None) is not None and self._watching:
            self._poller.unregister(socket)

    def report(self, kind: str, message: str, **details: Any) -> None:
        """An event for front-ends, published by the handler in this service's name."""
        if self._registered:
            self._send("event", {"instance": self.instance, "kind": kind, "message": message, "details": details})

    def ask_handler(self, cmd: str, args: dict[str, Any], on_reply: Callable[[messages.Reply], None]) -> None:
        """Send the handler a request; `on_reply` gets its answer from the event loop."""
        self._send(cmd, args, on_reply)

    def stop(self) -> None:
        self._stopping = True

    # --- loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: self.stop())
        logger.info("%s starting: stage %s, commands at %s, data out at %s, handler %s",
                    self.name, self.stage, self.command_endpoint, self.outlet.endpoint,
                    self._handler_endpoint)
        try:
            while not self._stopping:
                self._step()
        finally:
            self._leave()
        return self._exit_code

    def _step(self) -> None:
        now = time.monotonic()
        wait = max(0.0, self._next_heartbeat - now)
        if self._next_produce is not None and self.can_produce():
            wait = min(wait, max(0.0, self._next_produce - now))
        if self._watched and self.wants_input() != self._watching:
            self._watching = not self._watching
            for socket in self._watched:
                if self._watching:
                    self._poller.register(socket, zmq.POLLIN)
                else:
                    self._poller.unregister(socket)
        events = dict(self._poller.poll(min(wait, 0.1) * 1000))
        self._drain_control()
        with self.outlet.batch():
            for socket in [s for s in events if s in self._watched]:
                started = time.perf_counter()
                self._watched[socket]()
                self._busy(time.perf_counter() - started)
        if self.outlet.socket in events:
            self.outlet.receive()
        for sock in [s for s in events if s in self.inlet.links]:
            for _ in range(FRAMES_PER_TURN):
                producer = self.inlet.links.get(sock)
                messages = self.inlet.receive(sock) if producer else None
                if messages is None:
                    break
                for tag, parts in messages:
                    if tag == HEADER:
                        self._on_header_message(parts)
                    else:
                        self._on_data(producer, parts, redelivered=tag == RESENT)
                self._drain_control()
        if self._next_produce is not None and self.can_produce() and time.monotonic() >= self._next_produce:
            started = time.perf_counter()
            self._next_produce = self._call_produce()
            self._busy(time.perf_counter() - started)
        self._settle()
        if time.monotonic() >= self._next_heartbeat:
            self._heartbeat()

    def _call_produce(self) -> float | None:
        try:
            delay = self.produce()
        except Exception:  # noqa: BLE001 - a source bug is logged, the service stays up
            logger.exception("producing frames of scan %s failed; the source stops for this scan",
                             self.scan.scan_id if self.scan else None)
            return None
        return None if delay is None else time.monotonic() + delay

    def _drain_control(self) -> None:
        """Serve waiting commands; checking EVENTS first keeps this cheap between frames."""
        if self._command_socket.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._commands.drain()
        if self._handler_link.getsockopt(zmq.EVENTS) & zmq.POLLIN:
            self._drain_link()

    def _settle(self) -> None:
        """Grant the credit owed once there is room downstream, send acks, report a finished source."""
        if self._owed and not self._input_paused and not self.outlet.full():
            for producer, credit in self._owed.items():
                self.inlet.grant(producer, credit)
            self._owed.clear()
        self.inlet.flush()
        if self._source_done and self._source_done[0] == self.epoch \
                and self.outlet.outstanding(self.epoch) == 0:
            epoch, frames = self._source_done
            self._source_done = None
            self.counters.source_done = frames
            self._send("source_done", {"instance": self.instance, "epoch": epoch, "frames": frames})
            logger.info("scan %s: all %d frames delivered", self.scan.scan_id if self.scan else "?", frames)

    def _busy(self, seconds: float) -> None:
        self.totals.busy_s += seconds
        self.counters.busy_s += seconds

    # --- data -----------------------------------------------------------------------------------

    def _on_data(self, producer: str, parts: list[Any], redelivered: bool = False) -> None:
        self._owed[producer] = self._owed.get(producer, 0) + 1
        if not parts:
            return
        try:
            frame = decode(parts)
        except FrameError as exc:
            self.count("rejected")
            logger.warning("rejected a frame from %s: %s", producer, exc)
            return
        epoch, number = frame.key
        if epoch < self.epoch:
            self.count("dropped")
            self.inlet.ack(producer, frame.key)
            return
        if epoch > self.epoch:
            logger.warning("frame %d of epoch %d arrived before the scan start; taking it", number, epoch)
            self._new_epoch(epoch)
        stage = self._producer_stage.get(producer, "")
        token = (stage, frame.key)
        seen = self._seen.setdefault(stage, set())
        duplicate = number in seen
        if duplicate:
            self.count("duplicates")
            logger.debug("duplicate of frame %d of scan %s", number, frame.header.scan_id)
            # Still being made safe here, the new copy is acknowledged when the old one would be.
            pending = token in self._on_hold or self._children.get(token)
            self._producer_of.setdefault(token, set()).add(producer)
            if pending:
                self._call(self.on_duplicate, frame, token, redelivered)
                return
        else:
            seen.add(number)
            self.count("frames_in")
            self._producer_of[token] = {producer}
        self._call(self.on_duplicate if duplicate else self.on_frame, frame, token, redelivered)
        if not self._children.get(token) and token not in self._on_hold:
            self._children.pop(token, None)
            self._ack(token)

    def _call(self, hook: Callable[[Frame], None], frame: Frame, token: Token, redelivered: bool) -> None:
        self._current, self.redelivered = token, redelivered
        started = time.perf_counter()
        try:
            hook(frame)
        except Exception:  # noqa: BLE001 - one bad frame must not end the service
            self.count("rejected")
            logger.exception("frame %d of scan %s failed in %s", frame.header.frame, frame.header.scan_id, self.stage)
        finally:
            self._current, self.redelivered = None, False
            self._busy(time.perf_counter() - started)

    def _ack(self, token: Token) -> None:
        for producer in self._producer_of.pop(token, ()):
            self.inlet.ack(producer, token[1])

    def _on_header_message(self, parts: list[Any]) -> None:
        """Every producer process forwards the header; the first one of an epoch counts."""
        try:
            header = decode(parts)
        except FrameError as exc:
            logger.warning("ignored a scan header that is not a frame: %s", exc)
            return
        epoch = header.header.epoch
        name = header_name(header)
        known = self.headers.get(name)
        if epoch < self.epoch or (known is not None and known.header.epoch == epoch):
            return
        if epoch > self.epoch:
            self._new_epoch(epoch)
        self.headers[name] = header
        logger.info("scan %s: %s header from %s", header.header.scan_id, name, header.header.origin)
        try:
            self.on_header(header)
        except Exception:  # noqa: BLE001 - a bad header must not end the service
            logger.exception("scan header of %s failed in %s", header.header.scan_id, self.stage)

    def _delivered(self, parents: tuple[Token, ...]) -> None:
        for parent in parents:
            left = self._children.get(parent)
            if left is None:
                continue
            if left > 1:
                self._children[parent] = left - 1
            else:
                del self._children[parent]
                if parent not in self._on_hold:
                    self._ack(parent)

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter of the scan and of the lifetime totals."""
        setattr(self.counters, name, getattr(self.counters, name) + n)
        setattr(self.totals, name, getattr(self.totals, name) + n)

    def _new_epoch(self, epoch: int) -> int:
        dropped = self.outlet.drop_before(epoch) + self.on_abort()
        self._children = {t: n for t, n in self._children.items() if t[1][0] >= epoch}
        self._on_hold = {t for t in self._on_hold if t[1][0] >= epoch}
        self._producer_of = {t: p for t, p in self._producer_of.items() if t[1][0] >= epoch}
        self._input_paused = False
        self._seen.clear()
        self.headers = {}
        self._source_done = None
        self._next_produce = None
        self.epoch = epoch
        self.counters = ScanCounters()
        return dropped

    def _wire(self, pipeline: Pipeline) -> None:
        self.pipeline = pipeline
        downstream = pipeline.downstream(self.stage)
        for name, stage in downstream.items():
            self.outlet.add_route(name, latest=stage.delivery == "latest", depth=stage.queue)
        selective = any(stage.frames != "all" for stage in downstream.values())
        self._selective = {name: stage.frames for name, stage in downstream.items()} if selective else {}

    # --- handler link ------------------------------------------------------------------------

    def _connect_handler(self) -> None:
        if self._handler_link is not None:
            self._poller.unregister(self._handler_link)
            self._handler_link.close(linger=0)
        self._handler_link = self.context.socket(zmq.DEALER)
        self._handler_link.setsockopt(zmq.ROUTING_ID, self.instance.encode())
        self._handler_link.setsockopt(zmq.LINGER, 0)
        self._handler_link.connect(self._handler_endpoint)
        self._handler_port = CommandPort(self._handler_link, messages.SERVICE_REQUESTS, self._dispatch)
        self._poller.register(self._handler_link, zmq.POLLIN)
        self._registered = False
        self._waiting.clear()

    def _send(self, cmd: str, args: dict[str, Any], on_reply: Callable[[messages.Reply], None] | None = None) -> None:
        self._sequence += 1
        rid = f"{cmd}-{self._sequence}"
        if on_reply is not None:
            self._waiting[rid] = on_reply
        try:
            self._handler_link.send(messages.request(cmd, args, rid), zmq.NOBLOCK)
        except zmq.Again:
            logger.warning("handler link is full; %s not sent", cmd)

    def _drain_link(self) -> None:
        while True:
            try:
                parts = self._handler_link.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._handler_seen = time.monotonic()
            payload = parts[-1]
            try:
                body = json.loads(payload)
            except ValueError:
                body = None
            if isinstance(body, dict) and "ok" in body:
                try:
                    reply = messages.REPLIES.validate_python(body)
                except ValidationError as exc:
                    logger.warning("ignored a malformed reply from the handler: %s", messages.describe(exc))
                    continue
                callback = self._waiting.pop(reply.id, None)
                if callback is not None:
                    callback(reply)
            else:
                self._handler_port.serve(parts[:-1], payload)

    def _heartbeat(self) -> None:
        config = self.pipeline.handler
        now = time.monotonic()
        if now - self._handler_seen > config.heartbeat_s * config.liveness:
            logger.warning("handler at %s silent for %.1f s; reconnecting in %.0f s",
                           self._handler_endpoint, now - self._handler_seen, self._backoff)
            self._connect_handler()
            self._rejoining = True
            self._handler_seen = now + self._backoff
            self._next_heartbeat = now + self._backoff
            self._backoff = min(self._backoff * 2, 32.0)
            return
        self._next_heartbeat = now + config.heartbeat_s
        if not self._registered:
            identity = ServiceIdentity(name=self.name, stage=self.stage, instance=self.instance,
                                       host=net.gethostname(), pid=os.getpid(),
                                       command_endpoint=self.command_endpoint,
                                       data_endpoint=self.outlet.endpoint,
                                       data_endpoint_local=self.outlet.local_endpoint,
                                       pipeline=self.pipeline.identity, epoch=self.epoch)
            self._send("register", identity.model_dump(), self._on_registered)
            return
        self._send("heartbeat", {"instance": self.instance, "topology_version": self._topology_version,
                                 "stats": self.stats().model_dump()}, self._on_heartbeat_reply)

    def _on_registered(self, reply: messages.Reply) -> None:
        if not reply.ok:
            logger.error("the handler refused registration: %s", reply.error.get("message") if reply.error else "")
            self._exit_code = 2
            self.stop()
            return
        result = reply.result
        pipeline = from_dict(result["pipeline"], origin="pipeline from the handler")
        self._wire(pipeline)
        self.params = self.Params.model_validate(pipeline.stages[self.stage].params)
        self._registered = True
        self._backoff = pipeline.handler.heartbeat_s
        if self._rejoining:
            self._rejoining = False
            self._reconnect_inputs()
            self.on_rejoin()
        logger.info("registered with the handler as %s (epoch %d)", self.instance, result["epoch"])
        # Registering again within the scan this process is in keeps what it holds of it.
        in_scan = result["epoch"] == self.epoch and self.scan is not None
        if result["epoch"] != self.epoch:
            self._new_epoch(result["epoch"])
        if result.get("scan") and not in_scan:
            scan = ScanDescription.model_validate(result["scan"])
            try:
                self._start_scan(scan)
            except SurveyorError as exc:
                logger.error("cannot take part in the running scan %s: %s", scan.scan_id, exc)
                self.report("scan_refused", f"{self.name} cannot take part in scan {scan.scan_id}: {exc}",
                            scan_id=scan.scan_id)
        self._apply_topology(messages.TopologyArgs.model_validate(result["topology"]))

    def _on_heartbeat_reply(self, reply: messages.Reply) -> None:
        if not reply.ok:
            logger.warning("the handler does not know this process (%s); registering again",
                           reply.error.get("message") if reply.error else "")
            self._registered = False
            self._rejoining = True
            self._next_heartbeat = 0.0

    def _apply_topology(self, topology: messages.TopologyArgs) -> None:
        self._topology_version = topology.version
        inputs = set(self.pipeline.stages[self.stage].inputs)
        for service in topology.services:
            if service.state == "dead":
                self.inlet.disconnect(service.instance)
                self._forget_producer(service.instance)
                self.outlet.consumer_lost(service.instance.encode())
            elif service.stage in inputs and service.data_endpoint:
                self._producer_stage[service.instance] = service.stage
                local = service.host == net.gethostname() and service.data_endpoint_local
                self.inlet.connect(service.instance, local or service.data_endpoint)

    def _reconnect_inputs(self) -> None:
        """Registered again (the handler had declared this process dead, or restarted): producers
        may have given away what they had sent here, so every input link starts afresh."""
        for producer in self.inlet.producers():
            self.inlet.disconnect(producer)
            self._forget_producer(producer)

    def _forget_producer(self, producer: str) -> None:
        """A producer link is gone: no credit is owed to it. What it had sent and this process
        still holds stays held: a re-sent copy takes over its acknowledgement."""
        self._owed.pop(producer, None)
        self._producer_stage.pop(producer, None)

    # --- commands -----------------------------------------------------------------------------

    def _dispatch(self, request: Any, envelope: list[bytes]) -> dict[str, Any] | None:
        handler = {Ping: self._cmd_ping, Status: self._cmd_status, Configure: self._cmd_configure,
                   Abort: self._cmd_abort, Shutdown: self._cmd_shutdown, Topology: self._cmd_topology,
                   ScanStart: self._cmd_scan_start, ScanEnd: self._cmd_scan_end}[type(request)]
        return handler(request.args)

    def _cmd_ping(self, _: Any) -> dict[str, Any]:
        return {"pong": True, "version": messages.VERSION, "service": self.name}

    def _cmd_status(self, _: Any) -> dict[str, Any]:
        return {"service": self.name, "stage": self.stage, "instance": self.instance,
                "epoch": self.epoch, "scan": self.scan.scan_id if self.scan else None,
                "params": self.params.model_dump(mode="json"), "stats": self.stats().model_dump()}

    def _cmd_configure(self, args: messages.ConfigureArgs) -> dict[str, Any]:
        if args.stage is not None and args.stage != self.stage:
            raise MessageError(f"this process serves stage {self.stage!r}, not {args.stage!r}")
        merged = {**self.params.model_dump(), **args.params}
        try:
            params = self.Params.model_validate(merged)
        except ValidationError as exc:
            raise ParameterError(f"stage {self.stage}: {messages.describe(exc)}; "
                                 "the parameters in force did not change") from None
        self.params = params
        self.on_configure(params)
        logger.info("parameters now %s", params.model_dump(mode="json"))
        return {"stage": self.stage, "params": params.model_dump(mode="json")}

    def _cmd_abort(self, args: messages.AbortArgs) -> dict[str, Any]:
        if args.epoch is None:
            raise MessageError("a service aborts to a new epoch: args.epoch is required "
                               "(send abort to the handler to abort the scan everywhere)")
        scan = self.scan.scan_id if self.scan else None
        dropped = self._new_epoch(max(args.epoch, self.epoch))
        self.scan = None
        logger.info("scan %s aborted: dropped %d frames; now at epoch %d", scan, dropped, self.epoch)
        return {"dropped": dropped}

    def _cmd_shutdown(self, _: Any) -> dict[str, Any]:
        logger.info("shutdown requested")
        self.stop()
        return {}

    def _cmd_topology(self, args: messages.TopologyArgs) -> dict[str, Any]:
        # Before the registration reply (which carries the scan and the topology), wiring inputs
        # would let frames in ahead of their scan.
        if self._registered:
            self._apply_topology(args)
        return {}

    def _cmd_scan_start(self, args: messages.ScanStartArgs) -> dict[str, Any]:
        if args.epoch == self.epoch and self.scan is not None and self.scan.scan_id == args.scan.scan_id:
            return {}  # told again by a handler that restarted while starting the scan
        if args.epoch != self.epoch:
            self._new_epoch(args.epoch)
        self._start_scan(args.scan)
        return {}

    def _start_scan(self, scan: ScanDescription) -> None:
        self.scan = scan
        self.counters = ScanCounters()
        try:
            self.on_scan_start(scan)
        except Exception:
            self.scan = None
            raise
        logger.info("scan %s started (epoch %d)", scan.scan_id, self.epoch)
        self._next_produce = time.monotonic()

    def _cmd_scan_end(self, args: messages.EpochArgs) -> dict[str, Any]:
        if self._ended is not None and self._ended[0] == args.epoch:
            return self._ended[1].model_dump()
        if args.epoch != self.epoch or self.scan is None:
            return ScanCounters().model_dump()
        self._next_produce = None
        self.on_scan_end()
        counters = self.scan_counters()
        logger.info("scan %s ended: %s", self.scan.scan_id, counters.model_dump())
        self._ended = (args.epoch, counters)
        self.scan = None
        return counters.model_dump()

    # --- reporting ------------------------------------------------------------------------------

    def scan_counters(self) -> ScanCounters:
        return self.counters.model_copy(update={"busy_s": round(self.counters.busy_s, 4),
                                                "outputs": list(self.counters.outputs),
                                                "unacknowledged": self.outlet.outstanding(self.epoch)})

    def stats(self) -> ServiceStats:
        t = self.totals
        state = "running" if self.scan else "idle"
        return ServiceStats(state=state, frames_in=t.frames_in, frames_out=t.frames_out,
                            queue_depth=self.outlet.pending, inflight=self.outlet.inflight,
                            rejected=t.rejected, duplicates=t.duplicates,
                            dropped=t.dropped + self.outlet.dropped, busy_s=round(t.busy_s, 3),
                            epoch=self.epoch, scan=self.scan_counters())

    def _leave(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001
            logger.exception("closing %s failed", self.name)
        if self._registered:
            self._send("unregister", {"instance": self.instance})
        self.inlet.close()
        self.outlet.close()
        self._handler_link.close(linger=200)
        self._command_socket.close(linger=0)
        if self._own_context:
            self.context.term()
        logger.info("%s stopped", self.name)
