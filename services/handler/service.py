"""The handler: the pipeline's control plane. Frames never pass through it.

It reads the pipeline graph, lets service processes register (any number per stage, from any
host), pushes the topology to them so they wire their data links themselves, declares silent
processes dead, runs scans (epochs, start, end, abort), forwards live parameter changes, and
publishes status and events for front-ends (INTERFACES.md).

Commands that involve the services (start_scan, abort, configure, shutdown) are answered once
every live process concerned has answered, or its time is up: a `Barrier`. They run one at a time.

A handler can be killed at any moment: its journal (journal.py) keeps the epoch, the running scan
and the processes that were up, and a restarted handler carries on with them. Until each of those
has heartbeated again or been declared dead (at most `liveness` x 2 heartbeats), it only listens;
then it finishes what it was doing (starting or ending the scan), so the scan completes with every
frame in its own files.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable

import zmq
from pydantic import BaseModel, ValidationError

from libs.common import feeds, messages, security
from libs.common.errors import MessageError, ParameterError, PipelineError
from libs.common.loop import drain, stop_on_signals
from libs.common.messages import (Abort, Configure, Event, Events, Heartbeat, Ping, Preview, Register,
                                  RegisterReply, ScanCounters, ScanDescription, ServiceIdentity, Shutdown, SourceDone,
                                  StartScan, Status, Tell, Unregister)
from libs.common.pipeline import Pipeline
from libs.common.ports import DEFERRED, CommandPort, Envelope
from libs.common.stages import params_model
from services.handler.journal import Journal
from services.handler.registry import Registry
from services.handler.scans import ScanBook, ScanRecord

logger = logging.getLogger(__name__)

STATUS_PERIOD_S = 1.0
SERVICE_TIMEOUT_S = 10.0
JOURNAL_PERIOD_S = 1.0
EVENTS_KEPT = 1000


@dataclass
class Barrier:
    waiting: set[str]
    deadline: float
    on_done: Callable[[dict[str, messages.Reply], set[str]], None]
    replies: dict[str, messages.Reply] = field(default_factory=dict)


class Handler:
    def __init__(self, pipeline: Pipeline, context: zmq.Context | None = None, *, fresh: bool = False) -> None:
        """`fresh`: a new run (the launcher's first start); a scan the journal has as running
        belonged to processes that are gone, and is closed as interrupted."""
        self.pipeline = pipeline
        self.registry = Registry()
        self.scans = ScanBook()
        self.journal = Journal(pipeline.state_path / "handler.json")
        self._awaited: set[str] = set()
        """Processes that were up when the previous handler stopped, not heard from again yet."""
        self._recovering_until = 0.0
        self._journal_due: float | None = None
        self._run_stamp = time.time()
        self._events: deque[feeds.Event] = deque(maxlen=EVENTS_KEPT)
        """The newest events published, numbered: what a subscriber that was not yet connected
        asks for (`events`)."""
        self._restore(fresh)
        self._context = context or zmq.Context()
        self._stopping = False
        self._barriers: dict[str, Barrier] = {}
        self._ids = itertools.count(1)
        self._operations: deque[Callable[[], None]] = deque()
        self._busy = False
        self._next_status = 0.0
        self._shutting_down = False

        self._command_socket = self._context.socket(zmq.ROUTER)
        self._command_socket.setsockopt(zmq.LINGER, 0)
        self._command_socket.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._command_socket.setsockopt(zmq.ROUTER_HANDOVER, 1)
        self._command_socket.setsockopt(zmq.MAXMSGSIZE, 16 * messages.MAX_COMMAND_BYTES)
        self._status_socket = self._context.socket(zmq.PUB)
        self._status_socket.setsockopt(zmq.LINGER, 0)
        self._status_socket.setsockopt(zmq.SNDHWM, 100)
        self.keys = pipeline.keys()
        for socket, endpoint, what in ((self._command_socket, pipeline.handler.command, "command"),
                                       (self._status_socket, pipeline.handler.status, "status")):
            security.serve(socket, self.keys)
            try:
                socket.bind(endpoint)
            except zmq.ZMQError as exc:
                self._command_socket.close(linger=0)
                self._status_socket.close(linger=0)
                security.Gatekeeper.stop_for(self._context)
                raise PipelineError(
                    f"cannot bind the handler's {what} endpoint {endpoint}: {exc.strerror}. Another pipeline's "
                    f"handler (or another program) holds it: stop it, or give this pipeline other endpoints "
                    f"([handler] command and status, or --set handler.{what}=...)") from None
        self._port = CommandPort(self._command_socket, messages.HANDLER_REQUESTS, self._dispatch)
        self._commands = {Ping: self.on_ping, Status: self.on_status, StartScan: self.on_start_scan,
                          Abort: self.on_abort, Configure: self.on_configure, Shutdown: self.on_shutdown,
                          Register: self.on_register, Heartbeat: self.on_heartbeat,
                          Unregister: self.on_unregister, SourceDone: self.on_source_done,
                          Event: self.on_event, Preview: self.on_preview, Tell: self.on_tell,
                          Events: self.on_events}

    # --- journal -----------------------------------------------------------------------------------

    def _restore(self, fresh: bool) -> None:
        state = self.journal.load()
        if state is None or state.get("pipeline") != self.pipeline.identity:
            if state is not None:
                logger.warning("journal %s is another pipeline's; only its epoch %d is kept", self.journal.path,
                               state.get("scans", {}).get("epoch", 0))
                self.scans.epoch = int(state.get("scans", {}).get("epoch", 0))
            self._save()
            return
        self.scans.restore(state["scans"], fresh=fresh)
        configured = {name: params for name, params in state.get("params", {}).items() if name in self.pipeline.stages}
        if configured:
            stages = {name: stage.model_copy(update={"params": configured.get(name, stage.params)})
                      for name, stage in self.pipeline.stages.items()}
            self.pipeline = self.pipeline.model_copy(update={"stages": stages})
        record = self.scans.current
        if record is not None:
            # The processes that were up are members again, as if they had just registered: those
            # that heartbeat carry on, those that died meanwhile expire as usual, and their
            # producers hear of it and send what they held to the others.
            for identity in state.get("up", []):
                member = self.registry.register(ServiceIdentity.model_validate(identity))
                self._awaited.add(member.identity.instance)
            config = self.pipeline.handler
            self._recovering_until = time.monotonic() + 2 * config.heartbeat_s * config.liveness
            logger.warning("restarted during scan %s (epoch %d, %s): waiting for %d processes to register again",
                           record.scan.scan_id, record.epoch, record.state, len(self._awaited))
        else:
            logger.info("journal %s: carrying on from epoch %d", self.journal.path, self.scans.epoch)
        self._save()

    def _save(self) -> None:
        """Journal the state now (a scan changed state)."""
        self._journal_due = None
        self.journal.save({"pipeline": self.pipeline.identity, "scans": self.scans.to_json(),
                           "params": {name: stage.params for name, stage in self.pipeline.stages.items()},
                           "up": [m.identity.model_dump() for m in self.registry.up()]})

    def _save_soon(self) -> None:
        """Journal counters at most once a JOURNAL_PERIOD_S."""
        if self._journal_due is None:
            self._journal_due = time.monotonic() + JOURNAL_PERIOD_S

    def _heard_from(self, instance: str) -> None:
        self._awaited.discard(instance)
        if self._recovering_until and not self._awaited:
            self._recovered()

    @property
    def recovering(self) -> bool:
        return bool(self._awaited) and time.monotonic() < self._recovering_until

    def _recovered(self) -> None:
        """Every process is back or declared dead (or the wait is over): finish what the old
        handler was doing."""
        self._recovering_until = 0.0
        self._awaited = set()
        record = self.scans.current
        if record is None:
            return
        logger.info("recovered scan %s (epoch %d) in state %s", record.scan.scan_id, record.epoch, record.state)
        self._event("handler_recovered", scan_id=record.scan.scan_id, epoch=record.epoch,
                    message=f"handler restarted; scan {record.scan.scan_id} goes on ({record.state})")
        if record.state == "starting":
            self._exclusive(lambda: self._arm(record, None, None))
        elif record.state == "ending":
            self._exclusive(lambda: self._end_scan(record, list(self.pipeline.topological_order)))
        else:
            self._maybe_end_scan()

    # --- loop -------------------------------------------------------------------------------------

    def run(self) -> int:
        stop_on_signals(self.stop)
        logger.info("handler for pipeline %s: commands at %s, status at %s", self.pipeline.name,
                    self.pipeline.handler.command, self.pipeline.handler.status)
        poller = zmq.Poller()
        poller.register(self._command_socket, zmq.POLLIN)
        try:
            while not self._stopping:
                poller.poll(100)
                self._receive()
                self._housekeeping()
        finally:
            self._command_socket.close(linger=0)
            self._status_socket.close(linger=0)
            security.Gatekeeper.stop_for(self._context)
            self._context.term()
            logger.info("handler stopped")
        return 0

    def stop(self) -> None:
        self._stopping = True

    def _receive(self) -> None:
        drain(self._command_socket, self._take)

    def _take(self, parts: list[bytes]) -> None:
        if len(parts) < 2 or not self._take_reply(parts[0], parts[-1]):
            self._port.take(parts)

    def _take_reply(self, identity: bytes, payload: bytes) -> bool:
        """A service's reply to one of our barrier requests? Then record it."""
        reply = messages.as_reply(payload)
        if reply is None:
            return False
        instance = identity.decode(errors="replace")
        self.registry.seen(instance)
        barrier = self._barriers.get(str(reply.id))
        if barrier is not None and instance in barrier.waiting:
            barrier.waiting.discard(instance)
            barrier.replies[instance] = reply
            self._settle(str(reply.id))
        return True

    def _housekeeping(self) -> None:
        config = self.pipeline.handler
        for member in self.registry.expire(config.heartbeat_s * config.liveness):
            self._service_down(member.identity.instance, member.identity.name, member.cause)
        now = time.monotonic()
        if self._recovering_until and not self.recovering:
            self._recovered()
        if self._journal_due is not None and now >= self._journal_due:
            self._save()
        for rid, barrier in list(self._barriers.items()):
            if now > barrier.deadline:
                logger.warning("no answer from %s in time", sorted(barrier.waiting))
                self._settle(rid, force=True)
        if now >= self._next_status:
            self._next_status = now + STATUS_PERIOD_S
            self._publish("status", self.snapshot())

    # --- talking to services -------------------------------------------------------------------

    def _request_all(self, instances: list[str], cmd: str, args: dict[str, Any], timeout_s: float,
                     on_done: Callable[[dict[str, messages.Reply], set[str]], None]) -> None:
        rid = f"h{next(self._ids)}"
        barrier = Barrier(set(), time.monotonic() + timeout_s, on_done)
        self._barriers[rid] = barrier
        payload = messages.request(cmd, args, rid)
        for instance in instances:
            try:
                self._command_socket.send_multipart([instance.encode(), payload], zmq.NOBLOCK)
                barrier.waiting.add(instance)
            except zmq.ZMQError as exc:
                logger.warning("cannot reach %s for %s: %s", instance, cmd, exc)
        self._settle(rid)

    def _settle(self, rid: str, force: bool = False) -> None:
        barrier = self._barriers.get(rid)
        if barrier is None or (barrier.waiting and not force):
            return
        del self._barriers[rid]
        barrier.on_done(barrier.replies, barrier.waiting)

    def _broadcast_topology(self) -> None:
        topology = self.registry.topology().model_dump()
        payload = messages.request("topology", topology, "topology")
        for member in self.registry.up():
            try:
                self._command_socket.send_multipart([member.identity.instance.encode(), payload], zmq.NOBLOCK)
            except zmq.ZMQError as exc:
                logger.warning("cannot send the topology to %s: %s", member.identity.name, exc)

    def _service_down(self, instance: str, name: str, cause: str) -> None:
        logger.log(logging.INFO if self._shutting_down else logging.WARNING,
                   "service %s (%s) is down: %s", name, instance, cause)
        record = self.scans.current
        member = self.registry.members.get(instance)
        if record is not None and member is not None and member.identity.stage in self.pipeline.sources() \
                and not self._shutting_down and instance not in record.sources_done:
            record.deaths.append(name)
        self._save()
        for barrier in self._barriers.values():
            barrier.waiting.discard(instance)
        for rid in list(self._barriers):
            self._settle(rid)
        if not self._shutting_down:
            self._broadcast_topology()
        self._event("service_down", service=name, message=cause, instance=instance)
        self._heard_from(instance)
        self._maybe_end_scan()

    # --- one operation at a time ----------------------------------------------------------------

    def _exclusive(self, operation: Callable[[], None]) -> None:
        self._operations.append(operation)
        if not self._busy:
            self._next_operation()

    def _next_operation(self) -> None:
        self._busy = bool(self._operations)
        if self._operations:
            self._operations.popleft()()

    # --- commands ------------------------------------------------------------------------------

    def _dispatch(self, request: Any, envelope: Envelope) -> Any:
        return self._commands[type(request)](request, envelope)

    def _answer(self, envelope: Envelope, rid: Any, result: dict[str, Any] | Exception) -> None:
        if isinstance(result, Exception):
            self._port.reply(envelope, messages.error(rid, result))
        else:
            self._port.reply(envelope, messages.ok(rid, result))

    def on_ping(self, request: Ping, envelope: Envelope) -> dict[str, Any]:
        return {"pong": True, "version": messages.VERSION, "pipeline": self.pipeline.name,
                "identity": self.pipeline.identity, "status_endpoint": self.pipeline.handler.status}

    def on_status(self, request: Status, envelope: Envelope) -> dict[str, Any]:
        return self.snapshot().model_dump(mode="json")

    def on_register(self, request: Register, envelope: Envelope) -> dict[str, Any]:
        identity = request.args
        if identity.pipeline and identity.pipeline != self.pipeline.identity:
            raise MessageError(f"this handler runs another pipeline ({self.pipeline.name}, identity "
                               f"{self.pipeline.identity}) than {identity.name} was started for (identity "
                               f"{identity.pipeline}): start it with this pipeline's file and --set options, "
                               "or point it at its own pipeline's handler")
        if identity.stage not in self.pipeline.stages:
            raise MessageError(f"stage {identity.stage!r} is not in pipeline {self.pipeline.name!r}; "
                               f"its stages are {sorted(self.pipeline.stages)}")
        if identity.epoch > self.scans.epoch:
            # A journal lost or behind: never hand out an epoch some process has already seen.
            logger.warning("%s is at epoch %d, past this handler's %d: moving on to it", identity.name,
                           identity.epoch, self.scans.epoch)
            self.scans.epoch = identity.epoch
            self._save()
        before = self.registry.members.get(identity.instance)
        if before is not None and not before.alive:
            # Alive all along: its heartbeats stopped (a stall, a loop held by a hook) for longer
            # than the liveness, and its frames went to the others meanwhile.
            message = (f"{identity.name} was declared dead ({before.cause}) {time.monotonic() - before.dead_since:.1f} s "
                       "ago and is alive: it had stalled (a SIGSTOP, an overloaded host, a blocked event loop); "
                       "it joins again")
            logger.warning("false service_down: %s", message)
            self._event("service_back", service=identity.name, instance=identity.instance, message=message)
        self.registry.register(identity)
        self._save()
        self._heard_from(identity.instance)
        logger.info("service %s of stage %s registered from %s pid %d", identity.name, identity.stage,
                    identity.host, identity.pid)
        self._broadcast_topology()
        self._event("service_up", service=identity.name, instance=identity.instance,
                    message=f"{identity.name} joined stage {identity.stage} on {identity.host}")
        record = self.scans.current
        return RegisterReply(pipeline=self.pipeline.model_dump(mode="json"), epoch=self.scans.epoch,
                             scan=record.scan if record and record.state != "starting" else None,
                             topology=self.registry.topology()).model_dump(mode="json")

    def on_heartbeat(self, request: Heartbeat, envelope: Envelope) -> dict[str, Any]:
        args = request.args
        if not self.registry.heartbeat(args.instance, args.stats):
            raise MessageError(f"unknown service instance {args.instance}: register again")
        self._heard_from(args.instance)
        record = self.scans.current
        if record is not None and record.state == "running" and args.stats.epoch == record.epoch:
            identity = self.registry.members[args.instance].identity
            record.counters[args.instance] = (identity.stage, args.stats.scan)
            record.names[args.instance] = identity.name
            self._save_soon()
            if args.stats.scan.source_done is not None and args.instance not in record.sources_done:
                # The source_done message went to a handler that died: the heartbeat says it too.
                record.sources_done[args.instance] = args.stats.scan.source_done
                self._maybe_end_scan()
        return {"epoch": self.scans.epoch, "topology_version": self.registry.version}

    def on_unregister(self, request: Unregister, envelope: Envelope) -> dict[str, Any]:
        member = self.registry.mark_dead(request.args.instance, "exited")
        if member is not None:
            self._service_down(member.identity.instance, member.identity.name, "exited")
        return {}

    def on_event(self, request: Event, envelope: Envelope) -> dict[str, Any]:
        """A service reports something for front-ends: published as an `event` in its name."""
        args = request.args
        member = self.registry.members.get(args.instance)
        if member is None:
            raise MessageError(f"unknown instance {args.instance!r}: register first")
        details = {k: v for k, v in args.details.items() if k not in feeds.Event.model_fields}
        self._event(args.kind, service=member.identity.name, message=args.message, **details)
        return {}

    def on_events(self, request: Events, envelope: Envelope) -> dict[str, Any]:
        since = request.args.since
        return {"handler_run": self._run_stamp,
                "events": [e.model_dump(mode="json") for e in self._events if e.handler_seq > since]}

    def on_preview(self, request: Preview, envelope: Envelope) -> Any:
        """Published as `preview.<stage>`: [topic, JSON (what and whose), one buffer per array].
        A service sends previews without waiting for an answer, so none is given."""
        args = request.args
        member = self.registry.members.get(args.instance)
        if member is None:
            logger.warning("preview from unknown instance %s ignored", args.instance)
            return DEFERRED
        stage = member.identity.stage
        body = feeds.PreviewHeader(
            time=time.time(), service=member.identity.name, stage=stage, name=args.name, scan_id=args.scan_id,
            meta=args.meta, arrays=[feeds.PreviewArraySpec(name=a.name, dtype=a.dtype, shape=a.shape)
                                    for a in args.arrays])
        self._publish(f"preview.{stage}", body, *(a.data for a in args.arrays))
        return DEFERRED

    def on_tell(self, request: Tell, envelope: Envelope) -> dict[str, Any]:
        """Relay a message to the processes of a stage: all of them (rank 0) or `<stage>.<rank>`."""
        args = request.args
        sender = self.registry.members.get(args.instance)
        if sender is None:
            raise MessageError(f"unknown instance {args.instance!r}: register first")
        if args.stage not in self.pipeline.stages:
            raise MessageError(f"stage {args.stage!r} is not in pipeline {self.pipeline.name!r}; "
                               f"its stages are {sorted(self.pipeline.stages)}")
        targets = [m.identity.instance for m in self.registry.up(args.stage)
                   if args.rank == 0 or m.identity.name == f"{args.stage}.{args.rank}"]
        self._request_all(targets, "told", {"sender": sender.identity.name, "body": args.body},
                          SERVICE_TIMEOUT_S, lambda replies, missing: None)
        return {"to": len(targets)}

    def on_start_scan(self, request: StartScan, envelope: Envelope) -> Any:
        self._exclusive(lambda: self._start_scan(request.args, request.id, envelope))
        return DEFERRED

    def _start_scan(self, scan: ScanDescription, rid: Any, envelope: Envelope) -> None:
        current = self.scans.current
        if current is not None:
            self._answer(envelope, rid, MessageError(
                f"scan {current.scan.scan_id} is still {current.state}: wait for it to finish or abort it"))
            self._next_operation()
            return
        record = self.scans.start(scan)
        self._save()
        self._arm(record, rid, envelope)

    def _arm(self, record: ScanRecord, rid: Any, envelope: Envelope | None) -> None:
        """Tell every process of the scan, downstream first, so no frame of the scan meets a stage
        that has not heard of it; then the sources. A stage that refuses (an output directory
        that cannot take it) stops the start: nothing runs, and the answer says why."""
        scan, sources = record.scan, set(self.pipeline.sources())
        args = {"epoch": record.epoch, "scan": scan.model_dump(mode="json")}
        arm = [m.identity.instance for m in self.registry.up() if m.identity.stage not in sources]

        def answer(result: dict[str, Any] | Exception) -> None:
            if envelope is not None:
                self._answer(envelope, rid, result)
            self._next_operation()

        def go(replies: dict[str, messages.Reply], missing: set[str]) -> None:
            refused = {self._name_of(i): r.error.get("message") for i, r in replies.items() if not r.ok and r.error}
            if refused:
                self._refuse(record, refused, answer)
                return
            record.state = "running"
            self._save()
            trigger = [m.identity.instance for m in self.registry.up() if m.identity.stage in sources]
            self._request_all(trigger, "scan_start", args, SERVICE_TIMEOUT_S, started)

        def started(replies: dict[str, messages.Reply], missing: set[str]) -> None:
            logger.info("scan %s started, epoch %d", scan.scan_id, record.epoch)
            self._event("scan_started", scan_id=scan.scan_id, epoch=record.epoch,
                        message=f"scan {scan.scan_id} started ({scan.technique})")
            answer({"scan_id": scan.scan_id, "epoch": record.epoch})

        self._request_all(arm, "scan_start", args, SERVICE_TIMEOUT_S, go)

    def _refuse(self, record: ScanRecord, refused: dict[str, str | None],
                answer: Callable[[dict[str, Any] | Exception], None]) -> None:
        self.scans.abort("refused")
        self._save()
        reasons = "; ".join(f"{name}: {why}" for name, why in sorted(refused.items()))
        logger.warning("scan %s refused: %s", record.scan.scan_id, reasons)
        self._event("scan_refused", scan_id=record.scan.scan_id, epoch=record.epoch,
                    message=f"scan {record.scan.scan_id} refused: {reasons}")
        # The processes that took the scan drop it: a new epoch, as for an abort.
        self._request_all([m.identity.instance for m in self.registry.up()], "abort", {"epoch": self.scans.epoch},
                          SERVICE_TIMEOUT_S,
                          lambda *_: answer(MessageError(f"scan {record.scan.scan_id} refused: {reasons}")))

    def on_source_done(self, request: SourceDone, envelope: Envelope) -> dict[str, Any]:
        record = self.scans.current
        if record is not None and record.epoch == request.args.epoch:
            record.sources_done[request.args.instance] = request.args.frames
            self._save()
            self._maybe_end_scan()
        return {}

    def _maybe_end_scan(self) -> None:
        record = self.scans.current
        if record is None or record.state != "running" or self.recovering:
            return
        sources = [m.identity.instance for s in self.pipeline.sources() for m in self.registry.up(s)]
        if sources and all(instance in record.sources_done for instance in sources):
            record.state = "ending"
            self._save()
            self._exclusive(lambda: self._end_scan(record, list(self.pipeline.topological_order)))

    def _end_scan(self, record: ScanRecord, stages: list[str]) -> None:
        """Ask each stage in graph order to finish the scan; every frame has been delivered."""
        if self.scans.current is not record:
            self._next_operation()
            return
        if not stages:
            self.scans.finish(record)
            self._save()
            summary = record.summary(self.pipeline).model_dump(mode="json")
            logger.info("scan %s finished: %s", record.scan.scan_id, summary)
            self._event("scan_finished", scan_id=record.scan.scan_id, epoch=record.epoch,
                        message=f"scan {record.scan.scan_id} finished", summary=summary,
                        services={self._name_of(instance): counters.model_dump()
                                  for instance, (_, counters) in record.counters.items()})
            self._next_operation()
            return
        stage, rest = stages[0], stages[1:]

        def collected(replies: dict[str, messages.Reply], missing: set[str]) -> None:
            for instance, reply in replies.items():
                member = self.registry.members.get(instance)
                if reply.ok and member is not None:
                    record.counters[instance] = (stage, ScanCounters.model_validate(reply.result))
                    record.names[instance] = member.identity.name
            self._save()
            self._end_scan(record, rest)

        members = [m.identity.instance for m in self.registry.up(stage)]
        self._request_all(members, "scan_end", {"epoch": record.epoch},
                          self.pipeline.handler.scan_end_timeout_s, collected)

    def _name_of(self, instance: str) -> str:
        member = self.registry.members.get(instance)
        return member.identity.name if member is not None else instance

    def on_abort(self, request: Abort, envelope: Envelope) -> Any:
        current = self.scans.current
        wanted = request.args.scan_id
        if wanted is not None and (current is None or current.scan.scan_id != wanted):
            raise MessageError(f"scan {wanted!r} is not running; the current scan is "
                               f"{current.scan.scan_id if current else None!r}")
        self._exclusive(lambda: self._abort(request.id, envelope))
        return DEFERRED

    def _abort(self, rid: Any, envelope: Envelope) -> None:
        record = self.scans.abort()
        self._save()
        scan_id = record.scan.scan_id if record else None

        def dropped(replies: dict[str, messages.Reply], missing: set[str]) -> None:
            total = sum(int(r.result.get("dropped", 0)) for r in replies.values() if r.ok)
            logger.info("scan %s aborted; %d frames dropped; epoch now %d", scan_id, total, self.scans.epoch)
            self._event("scan_aborted", scan_id=scan_id, epoch=self.scans.epoch,
                        message=f"scan {scan_id} aborted, {total} frames dropped", dropped=total)
            self._answer(envelope, rid, {"scan_id": scan_id, "dropped": total})
            self._next_operation()

        members = [m.identity.instance for m in self.registry.up()]
        self._request_all(members, "abort", {"epoch": self.scans.epoch}, SERVICE_TIMEOUT_S, dropped)

    def on_configure(self, request: Configure, envelope: Envelope) -> Any:
        name = request.args.stage
        if name is None:
            raise MessageError("args.stage is required: {\"stage\": NAME, \"params\": {...}}")
        stage = self.pipeline.stages.get(name)
        if stage is None:
            raise MessageError(f"no stage {name!r}; stages are {sorted(self.pipeline.stages)}")
        merged = {**stage.params, **request.args.params}
        try:
            params = params_model(stage.service).model_validate(merged)
        except ValidationError as exc:
            raise ParameterError(f"stage {name}: {messages.describe(exc)}; "
                                 "the parameters in force did not change") from None
        self._exclusive(lambda: self._configure(name, params.model_dump(mode="json"), request.id, envelope))
        return DEFERRED

    def _configure(self, name: str, params: dict[str, Any], rid: Any, envelope: Envelope) -> None:
        stages = dict(self.pipeline.stages)
        stages[name] = stages[name].model_copy(update={"params": params})
        self.pipeline = self.pipeline.model_copy(update={"stages": stages})

        def applied(replies: dict[str, messages.Reply], missing: set[str]) -> None:
            refused = {i: r.error for i, r in replies.items() if not r.ok}
            if refused:
                self._answer(envelope, rid, ParameterError(f"stage {name}: refused by {refused}"))
            else:
                logger.info("stage %s parameters now %s", name, params)
                self._save()
                self._event("config_changed", message=f"stage {name} parameters changed",
                            stage=name, params=params)
                self._answer(envelope, rid, {"stage": name, "params": params})
            self._next_operation()

        members = [m.identity.instance for m in self.registry.up(name)]
        self._request_all(members, "configure", {"stage": name, "params": params}, SERVICE_TIMEOUT_S, applied)

    def on_shutdown(self, request: Shutdown, envelope: Envelope) -> Any:
        self._shutting_down = True

        def done(replies: dict[str, messages.Reply], missing: set[str]) -> None:
            logger.info("shutdown: %d services acknowledged, %d did not answer", len(replies), len(missing))
            self._answer(envelope, request.id, {})
            self.stop()

        self._request_all([m.identity.instance for m in self.registry.up()], "shutdown", {}, 5.0, done)
        return DEFERRED

    # --- status --------------------------------------------------------------------------------

    def snapshot(self) -> feeds.StatusSnapshot:
        now = time.monotonic()
        services = [feeds.ProcessRow(
            name=m.identity.name, stage=m.identity.stage, host=m.identity.host, pid=m.identity.pid,
            instance=m.identity.instance, state="up" if m.alive else "dead",
            heartbeat_age_s=round(now - m.last_seen, 2), frames_in=m.stats.frames_in, frames_out=m.stats.frames_out,
            queue_depth=m.stats.queue_depth, inflight=m.stats.inflight, busy_s=m.stats.busy_s,
            command_endpoint=m.identity.command_endpoint, server_key=m.identity.server_key)
            for m in self.registry.members.values()]
        record = self.scans.current
        scan = None
        if record is not None:
            def scan_sum(stage: str, key: str) -> int:
                return sum(getattr(m.stats.scan, key) for m in self.registry.up(stage)
                           if m.stats.epoch == record.epoch)

            scan = feeds.ScanProgress(
                scan_id=record.scan.scan_id, epoch=record.epoch, state=record.state, n_frames=record.scan.n_frames,
                n_dark=record.scan.n_dark,
                stages={name: {key: scan_sum(name, key) for key in ("frames_in", "frames_out", "written", "rejected")}
                        for name in self.pipeline.stages})
        return feeds.StatusSnapshot(
            time=time.time(), version=messages.VERSION, pipeline=self.pipeline.name, epoch=self.scans.epoch,
            services=services, stages={name: self.registry.stage_totals(name) for name in self.pipeline.stages},
            scan=scan, scans=[r.summary(self.pipeline) for r in self.scans.history], handler_run=self._run_stamp,
            events_published=self._events[-1].handler_seq if self._events else 0)

    def _publish(self, topic: str, body: BaseModel, *buffers: bytes) -> None:
        try:
            self._status_socket.send_multipart([topic.encode(), feeds.dumps(body), *buffers], zmq.NOBLOCK)
        except zmq.Again:
            pass

    def _event(self, kind: str, *, message: str, service: str = "handler", **extra: Any) -> None:
        number = self._events[-1].handler_seq + 1 if self._events else 1
        event = feeds.Event(time=time.time(), kind=kind, service=service, message=message, **extra,
                            handler_run=self._run_stamp, handler_seq=number)
        self._events.append(event)
        self._publish("event", event)
