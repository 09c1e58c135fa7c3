"""What front-ends read from the handler's status port (INTERFACES.md), one model each: the status
snapshot (topic `status`, every second), events (`event`), previews (`preview.<stage>`) and a
scan's summary (in `scan_finished` events and in summary.json). The handler builds every message
from these models; a front-end parses each one once, with `parse(topic, body)`.

An event as it goes out (`kind`, `service`, `message` always; what else depends on the kind):

    {"time": 1764590000.1, "kind": "service_down", "service": "peak_worker.2",
     "message": "missed heartbeats for 3.1 s", "instance": "peak_worker.2-1a2b3c4d"}
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


class Event(BaseModel):
    """Something happened. Open: each kind adds its own details (`scan_id`, `instance`, ...)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    time: float
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    service: str
    message: str


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
