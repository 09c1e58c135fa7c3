"""The service runtime: what every Surveyor process but the handler runs.

A service subclasses `Service`, names its `Params` model and implements `on_frame` (workers and
sinks) or `produce` (sources), plus the scan hooks it needs. The runtime owns the rest, in parts:

- the loop (here): one `zmq.Poller`; commands are served between batches of frames;
- the link to the handler (handler_link.py): registration, a heartbeat every `heartbeat_s`, the
  handler's requests, back-off and rejoin when it goes silent, while data keeps flowing;
- the delivery ledger (ledger.py): holds, chained acknowledgements, duplicates, epochs;
- data in and out (flow.py): an `Inlet` from every live producer of its input stages and an
  `Outlet` to its consumers;
- timers (timers.py): `after` and `every`, the clocks of flushes, retries and previews;
- heavy work off the loop (offload.py): a service's hooks run on a worker thread while the loop
  keeps answering, so a frame that takes seconds never costs a heartbeat;
- a JSON command port of its own (ping, status, configure, abort, shutdown) and per-scan
  counters, reported with heartbeats and when the scan ends;
- SIGTERM / SIGINT / `shutdown`: leave the loop, tell the handler, close every socket, exit 0.
"""

from __future__ import annotations

import base64
import gc
import logging
import os
import socket as net
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any, Callable, ClassVar, Iterable

import numpy as np
import zmq
from pydantic import BaseModel, ValidationError

from libs.common import messages, security
from libs.common.contracts import DETECTOR_HEADER, header_name
from libs.common.errors import AccessRefused, FrameError, MessageError, ParameterError, SurveyorError
from libs.common.flow import HEADER, RESENT, Inlet, Outlet
from libs.common.frames import Frame, decode
from libs.common.handler_link import HandlerLink, OnReply
from libs.common.hooks import Hooks
from libs.common.ledger import Ledger, Token
from libs.common.loop import readable, stop_on_signals
from libs.common.messages import (Abort, Configure, Ping, ScanCounters, ScanDescription, ScanEnd,
                                  ScanStart, ServiceIdentity, ServiceStats, Shutdown, Status, Told, Topology)
from libs.common.offload import Offload
from libs.common.pipeline import NoParams, Pipeline, from_dict
from libs.common.ports import DEFERRED, CommandPort, Envelope
from libs.common.timers import Timer, Timers

__all__ = ["Service", "Token"]

logger = logging.getLogger(__name__)

FRAMES_PER_TURN = 8
"""Messages taken from one producer link per loop turn; commands are still served between them."""
ALWAYS_ANSWERED = (Ping, Status)
"""Served at once even while a hook runs; other commands wait for it to return (a new parameter
is in force from the next frame, an abort drops what the hook was working on)."""

Hook = Callable[..., Any]


def advertised(host: str) -> str:
    """The address others use to reach a port bound on `host`."""
    return net.gethostname() if host in ("0.0.0.0", "*", "") else host


class Service(Hooks):
    """Base of every Surveyor service process; see the module docstring for the contract."""

    Params: ClassVar[type[BaseModel]] = NoParams
    offload: ClassVar[bool] = True
    """Run the hooks on the worker thread (offload.py). Sources whose work is reading a socket as
    fast as it fills keep it on the loop thread."""

    def __init__(self, *, pipeline: Pipeline, stage: str, name: str, handler: str,
                 context: zmq.Context | None = None, bind: str | None = None) -> None:
        """`bind`: the address this process binds and advertises its ports on, instead of the
        pipeline's `data_host` (a host's own address in a pipeline spread over several)."""
        self.pipeline = pipeline
        self.stage = stage
        self.name = name
        self.instance = f"{name}-{uuid.uuid4().hex[:8]}"
        self.params: BaseModel = pipeline.params(stage)
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
        self._registered = False
        self._rejoining = False
        """Registering again after losing the handler (see `_reconnect_inputs`)."""
        self._topology_version = -1
        self._producer_stage: dict[str, str] = {}
        self._owed: dict[str, int] = {}
        self._current: Token | None = None
        self.redelivered = False
        """While a frame is handled: whether its producer sent it before (to a process that died
        or lost its link), so that what was derived from it may already be downstream."""
        self._input_paused = False
        self._ended: tuple[int, ScanCounters] | None = None
        """The last scan this process finished, with its counters: a repeated scan_end (from a
        handler that restarted while ending the scan) gets the same answer."""
        self._ending: tuple[int, list[Callable[[dict[str, Any]], None]], float, str] | None = None
        """A scan_end answered once what `on_scan_end` emitted is acknowledged downstream."""
        self._source_done: tuple[int, int] | None = None
        self._next_produce: float | None = None
        self._watched: dict[zmq.Socket, Callable[[], None]] = {}
        self._watching = False
        self._in_hook = False
        self._later: list[Callable[[], None]] = []
        """Commands and replies that came while a hook ran, served once it returned."""
        self.timers = Timers()
        self._offload = Offload(self.context) if self.offload else None

        host = bind or pipeline.handler.data_host
        self.keys = pipeline.keys()
        self._command_socket = self.context.socket(zmq.ROUTER)
        self._command_socket.setsockopt(zmq.LINGER, 0)
        self._command_socket.setsockopt(zmq.MAXMSGSIZE, 16 * messages.MAX_COMMAND_BYTES)
        security.serve(self._command_socket, self.keys)
        port = self._command_socket.bind_to_random_port(f"tcp://{host}")
        self.command_endpoint = f"tcp://{advertised(host)}:{port}"
        self._commands = CommandPort(self._command_socket, messages.SERVICE_REQUESTS,
                                     lambda request, envelope: self._dispatch(request, envelope, self._commands),
                                     admit=self._admit)
        self._poller.register(self._command_socket, zmq.POLLIN)

        self.outlet = Outlet(self.context, host=host, keys=self.keys,
                             on_delivered=lambda parents: self._ledger.delivered(parents))
        self._poller.register(self.outlet.socket, zmq.POLLIN)
        self._wire(pipeline)
        self.inlet = Inlet(self.context, self._poller, identity=self.instance.encode(), stage=stage,
                           credit=pipeline.stages[stage].credit, keys=self.keys)
        self._ledger = Ledger(self.inlet.ack)
        self._link = HandlerLink(self.context, self._poller, handler, self.instance.encode(),
                                 lambda request, envelope: self._dispatch(request, envelope, self._link.port),
                                 heartbeat_s=pipeline.handler.heartbeat_s, liveness=pipeline.handler.liveness,
                                 keys=self.keys)

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
        family = tuple({parent, *parents} - {None}) if parents else (parent,) if parent else ()
        blobs = frame.encode()  # on the worker thread when the hook runs there
        self._effect(partial(self._send_frame, frame, blobs, family))

    def _send_frame(self, frame: Frame, blobs: list[Any], family: tuple[Token, ...]) -> None:
        expected = self.outlet.send(frame.key, blobs, parent=family or None, stages=self._stages_for(frame))
        if expected:
            self._ledger.derived(family, expected)
        self.count("frames_out")

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
        self._effect(partial(self.outlet.send_header, header.header.epoch, name, header.encode()))

    def preview(self, name: str, arrays: dict[str, np.ndarray], **meta: Any) -> None:
        """Publish small arrays for front-ends (`preview.<stage>` on the handler's status port)."""
        if not self._registered or self.scan is None:
            return
        specs = [{"name": key, "dtype": a.dtype.str, "shape": list(a.shape),
                  "data": base64.b64encode(np.ascontiguousarray(a).tobytes()).decode()}
                 for key, a in arrays.items()]
        self._send("preview", {"instance": self.instance, "name": name, "scan_id": self.scan.scan_id,
                               "meta": meta, "arrays": specs})

    def tell(self, stage: str, body: dict[str, Any], *, rank: int = 0) -> None:
        """A message for the processes of `stage` (`on_told`), relayed by the handler: to every
        one (rank 0) or to the one named `<stage>.<rank>`. `body` is JSON."""
        self._send("tell", {"instance": self.instance, "stage": stage, "rank": rank, "body": body})

    def hold(self) -> Token:
        """Inside `on_frame`: do not acknowledge this frame yet (it is not safe: not on disk, or
        its contribution not checkpointed); `release` the returned token when it is. Until then the
        producer keeps it and re-sends it to another process if this one dies."""
        self._ledger.hold(self._current)
        return self._current

    def release(self, token: Token) -> None:
        """A held frame is safe; it is acknowledged once what was derived from it is, too."""
        self._effect(partial(self._ledger.release, token))

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
        """Sources: have `produce` called in `delay` seconds, or sooner if already due."""
        due = time.monotonic() + delay
        self._next_produce = due if self._next_produce is None else min(self._next_produce, due)

    def after(self, delay: float, callback: Callable[[], None]) -> Timer:
        """Call `callback` once in `delay` seconds (armed again before it fired: at the earlier
        time). Timers are of the current scan: a new epoch clears them."""
        return self.timers.after(delay, callback)

    def every(self, period: float, callback: Callable[[], None]) -> Timer:
        """Call `callback` every `period` seconds until the timer is cancelled or the scan ends."""
        return self.timers.every(period, callback)

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

    def _effect(self, effect: Callable[[], None]) -> None:
        """Do what touches a socket now, or, from the worker thread, once the hook has returned."""
        if self._offload is not None and self._offload.in_worker():
            self._offload.defer(effect)
        else:
            effect()

    def ask_handler(self, cmd: str, args: dict[str, Any], on_reply: OnReply) -> None:
        """Send the handler a request; `on_reply` gets its answer from the event loop."""
        self._send(cmd, args, on_reply)

    def _send(self, cmd: str, args: dict[str, Any], on_reply: OnReply | None = None) -> None:
        self._effect(partial(self._link.send, cmd, args, on_reply))

    def stop(self) -> None:
        self._stopping = True

    # --- loop -----------------------------------------------------------------------------------

    def run(self) -> int:
        stop_on_signals(self.stop)
        # What the process holds by now (modules, numba's compiler, the service) lives as long as it
        # does: the cyclic collector need not walk it again at every full collection, which the
        # thousands of small objects a second made per frame set off.
        gc.freeze()
        logger.info("%s starting: stage %s, commands at %s, data out at %s, handler %s",
                    self.name, self.stage, self.command_endpoint, self.outlet.endpoint, self._link.endpoint)
        try:
            while not self._stopping:
                self._step()
        finally:
            self._leave()
        return self._exit_code

    def _step(self) -> None:
        now = time.monotonic()
        wait = max(0.0, self._link.next_heartbeat - now)
        if self._next_produce is not None and self.can_produce():
            wait = min(wait, max(0.0, self._next_produce - now))
        timer = self.timers.due_in(now)
        if timer is not None:
            wait = min(wait, timer)
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
                received = self.inlet.receive(sock) if producer else None
                if received is None:
                    break
                self._take_message(producer, received)
                self._drain_control()
        if self._next_produce is not None and self.can_produce() and time.monotonic() >= self._next_produce:
            self._next_produce = self._call_produce()
        for callback in self.timers.take_due(time.monotonic()):
            self._guarded(callback, "a timer of")
        self._settle()
        if time.monotonic() >= self._link.next_heartbeat:
            self._heartbeat()

    def _hook(self, hook: Hook, *args: Any) -> Any:
        """Run a service hook: on the worker thread when the service offloads, while this thread
        answers the handler (`_pump`); then send what the hook sent, in order."""
        if self._offload is None or self._in_hook:
            return hook(*args)
        self._in_hook = True
        try:
            self._offload.start(partial(hook, *args))
            while not readable(self._offload.wake):
                self._pump()
            return self._offload.finish()
        finally:
            self._in_hook = False
            with self.outlet.batch():
                for effect in self._offload.effects():
                    effect()

    def _pump(self) -> None:
        """While a hook runs: heartbeats, ping and status; the rest waits for the hook (`_later`)."""
        poller = zmq.Poller()
        for socket in (self._offload.wake, self._command_socket, self._link.socket):
            poller.register(socket, zmq.POLLIN)
        poller.poll(max(0.0, min(self._link.next_heartbeat - time.monotonic(), 0.1)) * 1000)
        self._drain_control()
        if time.monotonic() >= self._link.next_heartbeat:
            self._heartbeat()

    def _guarded(self, hook: Hook, what: str) -> None:
        started = time.perf_counter()
        try:
            self._hook(hook)
        except Exception:  # noqa: BLE001 - a bug in a timer is logged, the service stays up
            logger.exception("%s %s failed (scan %s)", what, self.stage, self.scan.scan_id if self.scan else None)
        self._busy(time.perf_counter() - started)

    def _call_produce(self) -> float | None:
        started = time.perf_counter()
        try:
            delay = self._hook(self.produce)
        except Exception:  # noqa: BLE001 - a source bug is logged, the service stays up
            logger.exception("producing frames of scan %s failed; the source stops for this scan",
                             self.scan.scan_id if self.scan else None)
            return None
        finally:
            self._busy(time.perf_counter() - started)
        return None if delay is None else time.monotonic() + delay

    def _drain_control(self) -> None:
        """Serve waiting commands and the handler's messages; then what had to wait for a hook."""
        if readable(self._command_socket):
            self._commands.drain()
        if self._link.readable():
            self._link.drain(self._on_reply)
        if self._later and not self._in_hook:
            later, self._later = self._later, []
            for action in later:
                action()

    def _on_reply(self, callback: OnReply, reply: messages.Reply) -> None:
        if self._in_hook and callback != self._on_heartbeat_reply:
            self._later.append(partial(callback, reply))
        else:
            callback(reply)

    def _settle(self) -> None:
        """Grant the credit owed once there is room downstream, send acks, report a finished source
        or a scan end whose last frames are acknowledged."""
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
        if self._ending is not None:
            self._finish_scan_end()

    def _busy(self, seconds: float) -> None:
        self.totals.busy_s += seconds
        self.counters.busy_s += seconds

    # --- data -----------------------------------------------------------------------------------

    def _take_message(self, producer: str, received: list[tuple[bytes, list[Any]]]) -> None:
        """One message from a producer: headers and frames in their order, the frames handed to
        the hooks together (one trip to the worker thread for a batch)."""
        batch: list[tuple[Hook, Frame, Token, bool, bool]] = []
        for tag, parts in received:
            self._owed[producer] = self._owed.get(producer, 0) + (tag != HEADER)
            if not parts:
                continue
            try:
                frame = decode(parts)
            except FrameError as exc:
                self.count("rejected")
                logger.warning("rejected a %s from %s: %s", "scan header" if tag == HEADER else "frame", producer, exc)
                continue
            if tag == HEADER or frame.header.epoch > self.epoch:
                self._work(batch)
                batch = []
            if tag == HEADER:
                self._on_header(frame)
                continue
            item = self._arrived(producer, frame, redelivered=tag == RESENT)
            if item is not None:
                batch.append(item)
        self._work(batch)

    def _arrived(self, producer: str, frame: Frame, redelivered: bool) -> tuple[Hook, Frame, Token, bool, bool] | None:
        """The ledger's view of a frame: stale (acknowledged and dropped), new, or a duplicate;
        returns the hook it goes to, and whether it is settled when the hook returns."""
        epoch, number = frame.key
        if epoch < self.epoch:
            self.count("dropped")
            self.inlet.ack(producer, frame.key)
            return None
        if epoch > self.epoch:
            logger.warning("frame %d of epoch %d arrived before the scan start; taking it", number, epoch)
            self._new_epoch(epoch)
        token, duplicate, pending = self._ledger.arrived(producer, self._producer_stage.get(producer, ""), frame.key)
        if not duplicate:
            self.count("frames_in")
            return self.on_frame, frame, token, redelivered, True
        self.count("duplicates")
        logger.debug("duplicate of frame %d of scan %s", number, frame.header.scan_id)
        # Still being made safe here, the new copy is acknowledged when the old one would be.
        return self.on_duplicate, frame, token, redelivered, not pending

    def _work(self, batch: list[tuple[Hook, Frame, Token, bool, bool]]) -> None:
        if not batch:
            return
        self._hook(self._run_hooks, batch)
        for _, _, token, _, settle in batch:
            if settle:
                self._ledger.settle(token)

    def _run_hooks(self, batch: list[tuple[Hook, Frame, Token, bool, bool]]) -> None:
        started = time.perf_counter()
        try:
            for hook, frame, token, redelivered, _ in batch:
                self._current, self.redelivered = token, redelivered
                try:
                    hook(frame)
                except Exception:  # noqa: BLE001 - one bad frame must not end the service
                    self.count("rejected")
                    logger.exception("frame %d of scan %s failed in %s", frame.header.frame, frame.header.scan_id,
                                     self.stage)
                finally:
                    self._current, self.redelivered = None, False
        finally:
            self._busy(time.perf_counter() - started)

    def _on_header(self, header: Frame) -> None:
        """Every producer process forwards the header; the first one of an epoch counts."""
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
            self._hook(self.on_header, header)
        except Exception:  # noqa: BLE001 - a bad header must not end the service
            logger.exception("scan header of %s failed in %s", header.header.scan_id, self.stage)

    def count(self, name: str, n: int = 1) -> None:
        """Add to a counter of the scan and of the lifetime totals."""
        self.counters.add(name, n)
        self.totals.add(name, n)

    def _new_epoch(self, epoch: int) -> int:
        dropped = self.outlet.drop_before(epoch) + self._hook(self.on_abort)
        self._ledger.new_epoch(epoch)
        self.timers.clear()
        self._input_paused = False
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

    def _heartbeat(self) -> None:
        now = time.monotonic()
        if self._link.silent(now):
            self._link.back_off(now)
            self._registered = False
            self._rejoining = True
            return
        self._link.beat(now)
        if not self._registered:
            identity = ServiceIdentity(name=self.name, stage=self.stage, instance=self.instance,
                                       host=net.gethostname(), pid=os.getpid(),
                                       command_endpoint=self.command_endpoint,
                                       data_endpoint=self.outlet.endpoint,
                                       data_endpoint_local=self.outlet.local_endpoint,
                                       server_key=self.keys.public.decode() if self.keys else None,
                                       pipeline=self.pipeline.identity, epoch=self.epoch)
            self._link.send("register", identity.model_dump(), self._on_registered)
            return
        self._link.send("heartbeat", {"instance": self.instance, "topology_version": self._topology_version,
                                      "stats": self.stats().model_dump()}, self._on_heartbeat_reply)

    def _on_registered(self, reply: messages.Reply) -> None:
        if not reply.ok:
            logger.error("the handler refused registration: %s", reply.error.get("message") if reply.error else "")
            self._exit_code = 2
            self.stop()
            return
        result = messages.RegisterReply.model_validate(reply.result)
        if result.pipeline != self.pipeline.model_dump(mode="json"):
            # The handler's pipeline differs from the file (parameters configured since): its own.
            self._wire(from_dict(result.pipeline, origin="pipeline from the handler"))
            self.params = self.pipeline.params(self.stage)
        self._registered = True
        self._link.joined(self.pipeline.handler.heartbeat_s)
        if self._rejoining:
            self._rejoining = False
            self._reconnect_inputs()
            self._hook(self.on_rejoin)
        logger.info("registered with the handler as %s (epoch %d)", self.instance, result.epoch)
        # Registering again within the scan this process is in keeps what it holds of it.
        in_scan = result.epoch == self.epoch and self.scan is not None
        if result.epoch != self.epoch:
            self._new_epoch(result.epoch)
        if result.scan is not None and not in_scan:
            try:
                self._start_scan(result.scan)
            except SurveyorError as exc:
                logger.error("cannot take part in the running scan %s: %s", result.scan.scan_id, exc)
                self.report("scan_refused", f"{self.name} cannot take part in scan {result.scan.scan_id}: {exc}",
                            scan_id=result.scan.scan_id)
        self._apply_topology(result.topology)

    def _on_heartbeat_reply(self, reply: messages.Reply) -> None:
        if not reply.ok:
            logger.warning("the handler does not know this process (%s); registering again",
                           reply.error.get("message") if reply.error else "")
            self._registered = False
            self._rejoining = True
            self._link.next_heartbeat = 0.0

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
                self.inlet.connect(service.instance, local or service.data_endpoint, service.server_key)

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

    def _admit(self, request: Any, sender: bytes | None) -> None:
        """This process's own command port: anyone let in may ask `ping` and `status`; a change
        comes from the handler (over its link), or from a key in the operators' list."""
        if isinstance(request, ALWAYS_ANSWERED):
            return
        operator = self.keys.operators().get(sender) if self.keys and sender else None
        if operator is None:
            raise AccessRefused(f"{self.name} takes {request.cmd!r} only from its handler"
                                + (" or an operator's key" if self.keys else "") +
                                f": send it to the handler at {self._link.endpoint} (`surveyor ctl {request.cmd}`)")
        logger.warning("operator %s sent %s to this process directly; the handler is told", operator, request.cmd)
        self.report("operator_command", f"operator {operator} sent {request.cmd} to {self.name} directly",
                    operator=operator, cmd=request.cmd, args=request.args.model_dump(mode="json"))

    def _dispatch(self, request: Any, envelope: Envelope, port: CommandPort) -> Any:
        if self._in_hook and not isinstance(request, ALWAYS_ANSWERED):
            self._later.append(partial(port.answer, envelope, request))
            return DEFERRED
        if isinstance(request, ScanEnd):
            return self._cmd_scan_end(request.args, partial(self._answer_later, port, envelope, request.id))
        handler = {Ping: self._cmd_ping, Status: self._cmd_status, Configure: self._cmd_configure,
                   Abort: self._cmd_abort, Shutdown: self._cmd_shutdown, Topology: self._cmd_topology,
                   ScanStart: self._cmd_scan_start, Told: self._cmd_told}[type(request)]
        return handler(request.args)

    @staticmethod
    def _answer_later(port: CommandPort, envelope: Envelope, rid: Any, result: dict[str, Any]) -> None:
        port.reply(envelope, messages.ok(rid, result))

    def _cmd_ping(self, _: Any) -> dict[str, Any]:
        return {"pong": True, "version": messages.VERSION, "service": self.name}

    def _cmd_status(self, _: Any) -> dict[str, Any]:
        return {"service": self.name, "stage": self.stage, "instance": self.instance,
                "epoch": self.epoch, "scan": self.scan.scan_id if self.scan else None,
                "params": self.params.model_dump(mode="json"), "stats": self.stats().model_dump()}

    def _cmd_configure(self, args: messages.ConfigureArgs) -> dict[str, Any]:
        if args.stage is not None and args.stage != self.stage:
            raise MessageError(f"this process serves stage {self.stage!r}, not {args.stage!r}")
        before = self.params.model_dump()
        try:
            params = self.Params.model_validate({**before, **args.params})
        except ValidationError as exc:
            raise ParameterError(f"stage {self.stage}: {messages.describe(exc)}; "
                                 "the parameters in force did not change") from None
        changed = {key for key, value in params.model_dump().items() if before.get(key) != value}
        self.params = params
        self._hook(self.on_configure, params, changed)
        logger.info("parameters now %s (changed: %s)", params.model_dump(mode="json"), sorted(changed) or "none")
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

    def _cmd_told(self, args: messages.ToldArgs) -> dict[str, Any]:
        self._hook(self.on_told, args.body)
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
        self._ended = None
        try:
            self._hook(self.on_scan_start, scan)
        except Exception:
            self.scan = None
            raise
        logger.info("scan %s started (epoch %d)", scan.scan_id, self.epoch)
        self._next_produce = time.monotonic()

    def _cmd_scan_end(self, args: messages.EpochArgs, answer: Callable[[dict[str, Any]], None]) -> Any:
        """Finish the scan, and answer once what `on_scan_end` sent is acknowledged downstream (a
        collector's consumers have it before they are asked to end), or half the handler's wait."""
        if self._ending is not None and self._ending[0] == args.epoch:
            self._ending[1].append(answer)  # asked again by a handler that restarted meanwhile
            return DEFERRED
        if self._ended is not None and self._ended[0] == args.epoch:
            return self._ended[1].model_dump()
        if args.epoch != self.epoch or self.scan is None:
            return ScanCounters().model_dump()
        self._next_produce = None
        self._hook(self.on_scan_end)
        self.timers.clear()
        deadline = time.monotonic() + self.pipeline.handler.scan_end_timeout_s / 2
        self._ending = (args.epoch, [answer], deadline, self.scan.scan_id)
        self.scan = None
        self._finish_scan_end()
        return DEFERRED

    def _finish_scan_end(self) -> None:
        epoch, answers, deadline, scan_id = self._ending
        left = self.outlet.outstanding(epoch)
        if left and time.monotonic() < deadline:
            return
        if left:
            logger.warning("scan %s: %d frames sent at its end not acknowledged downstream in %.0f s",
                           scan_id, left, self.pipeline.handler.scan_end_timeout_s / 2)
        self._ending = None
        counters = self.scan_counters()
        logger.info("scan %s ended: %s", scan_id, counters.model_dump())
        self._ended = (epoch, counters)
        for answer in answers:
            answer(counters.model_dump())

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
        self._link.close()
        self._command_socket.close(linger=0)
        if self._offload is not None:
            self._offload.close()
        security.Gatekeeper.stop_for(self.context)
        if self._own_context:
            self.context.term()
        logger.info("%s stopped", self.name)
