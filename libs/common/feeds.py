"""What front-ends read from the handler's status port (INTERFACES.md), one model each: the status
snapshot (topic `status`, every second), events (`event`), previews (`preview.<stage>`) and a
scan's summary (in `scan_finished` events and in summary.json). The handler builds every message
from these models; a front-end parses each one once, with `parse(topic, body)`.

An event as it goes out (`kind`, `service`, `message` always; what else depends on the kind):

    {"time": 1764590000.1, "kind": "service_down", "service": "peak_worker.2",
     "message": "missed heartbeats for 3.1 s", "instance": "peak_worker.2-1a2b3c4d",
     "handler_run": 1764589000.5, "handler_seq": 42}
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from libs.common.messages import InstanceId, ScanId, ServiceName, Strict


class ProcessRow(Strict):
    """One service process as the handler last heard of it."""

    name: ServiceName
    stage: str
    host: str
    pid: int
    instance: InstanceId
    state: Literal["up", "dead"]
    heartbeat_age_s: float
    frames_in: int
    frames_out: int
    queue_depth: int
    inflight: int
    busy_s: float
    command_endpoint: str
    server_key: str | None = None
    """The CURVE public key its command port serves with (a pipeline with keys)."""


class StageTotals(Strict):
    """A stage since the pipeline started: its live processes' counters plus those of the dead."""

    processes: int
    frames_in: float = 0
    frames_out: float = 0
    busy_s: float = 0
    queue_depth: float = 0
    rejected: float = 0
    duplicates: float = 0
    dropped: float = 0


class ScanProgress(Strict):
    """The scan in progress: its frames so far, per stage."""

    scan_id: ScanId
    epoch: int
    state: Literal["starting", "running", "ending"]
    n_frames: int | None
    n_dark: int
    stages: dict[str, dict[str, int]]


class StageSummary(Strict):
    processes: int
    frames_in: int
    frames_out: int
    busy_s: float


class ScanSummary(BaseModel):
    """A scan's entry of summary.json. Open: `surveyor run` adds the simulation's score to it."""

    model_config = ConfigDict(extra="allow", frozen=True)

    scan_id: ScanId
    epoch: int
    state: str
    frames_expected: int | None
    frames_received: int
    frames_written: int
    frames_lost: int | None = Field(description="None until the scan is finished")
    losses: list[str] = Field(description="why frames were lost, in words")
    frames_rejected: int
    duplicates_dropped: int
    wall_s: float
    rate_hz: float
    outputs: list[str] = Field(description="in the order the processes reported them")
    truth: str | None = None
    stages: dict[str, StageSummary]


class StatusSnapshot(Strict):
    time: float
    version: str
    pipeline: str
    epoch: int
    services: list[ProcessRow]
    stages: dict[str, StageTotals]
    scan: ScanProgress | None
    scans: list[ScanSummary]
    handler_run: float | None = None
    """When the handler process started: tells one handler's numbered events from another's."""
    events_published: int = 0
    """The number of this handler's newest event (`handler_seq`)."""


class Event(BaseModel):
    """Something happened. Open: each kind adds its own details (`scan_id`, `instance`, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    time: float
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    service: str
    message: str
    handler_run: float | None = None
    handler_seq: int | None = None
    """Counting from 1 in each handler process (`handler_run`); absent from older handlers."""


class EventCursor:
    """How far a subscriber has seen a handler's numbered events. A PUB sends nothing to a
    subscriber until it has connected again, so the first events of a restarted handler can pass
    it by; the gap shows in the next event's or snapshot's number, and the handler's `events`
    command fills it (`client.missed_events`)."""

    def __init__(self) -> None:
        self.run: float | None = None
        self.seen = 0

    def after_event(self, event: dict[str, Any]) -> tuple[float, int, int] | None:
        """An event arrived: (handler run, after, upto) of the events before it not seen, if any."""
        run, seq = event.get("handler_run"), event.get("handler_seq")
        return None if run is None or seq is None else self._missing(run, seq - 1, seq)

    def after_snapshot(self, snapshot: dict[str, Any]) -> tuple[float, int, int] | None:
        """A snapshot arrived: (handler run, after, upto) of the events it counts and that were not seen."""
        run, upto = snapshot.get("handler_run"), snapshot.get("events_published", 0)
        return None if run is None else self._missing(run, upto, upto)

    def _missing(self, run: float, upto: int, seen: int) -> tuple[float, int, int] | None:
        if run != self.run:
            self.run, self.seen = run, 0
        after, self.seen = self.seen, max(self.seen, seen)
        return (run, after, upto) if upto > after else None


class PreviewArraySpec(Strict):
    name: str
    dtype: str
    shape: tuple[int, ...]


class PreviewHeader(Strict):
    """The JSON part of a preview; one raw buffer per entry of `arrays` follows it."""

    time: float
    service: ServiceName
    stage: str
    name: str
    scan_id: ScanId
    meta: dict[str, Any]
    arrays: list[PreviewArraySpec]


def parse(topic: bytes, body: bytes) -> StatusSnapshot | Event | PreviewHeader:
    """One message of the status port, by its topic (ValueError for a topic it does not know)."""
    if topic == b"status":
        return StatusSnapshot.model_validate_json(body)
    if topic == b"event":
        return Event.model_validate_json(body)
    if topic.startswith(b"preview."):
        return PreviewHeader.model_validate_json(body)
    raise ValueError(f"unknown topic {topic!r}: expected status, event or preview.<stage>")


def dumps(message: BaseModel) -> bytes:
    return json.dumps(message.model_dump(mode="json")).encode()
