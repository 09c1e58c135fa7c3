"""Control-plane messages: commands, replies, scans, heartbeats, topology. One definition each.

Every command travels as JSON `{"cmd": NAME, "id": ANY, "args": {...}}` and is parsed once at the
port by a `TypeAdapter` over a union discriminated by `cmd`, so an unknown verb or a bad argument
is refused with a message that names it. Replies echo the request's `id`:

    {"ok": true,  "id": 7, "result": {"pong": true, "version": "0.1.0"}}
    {"ok": false, "id": 7, "error": {"type": "MessageError", "message": "args.scan_id: ..."}}

The handler's port and a service's port accept different unions (`HandlerRequest`,
`ServiceRequest`); the models they share are defined once here.
"""

from __future__ import annotations

import json
import math
import re
from typing import Annotated, Any, Literal, NewType, Union

import numpy as np
from pydantic import (Base64Bytes, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator,
                      model_validator)

from libs.common.errors import MessageError, SurveyorError, UnknownCommand

ScanId = NewType("ScanId", str)
Epoch = NewType("Epoch", int)
FrameNumber = NewType("FrameNumber", int)
ServiceName = NewType("ServiceName", str)
InstanceId = NewType("InstanceId", str)

VERSION = "0.1.0"
MAX_COMMAND_BYTES = 1 << 20
"""Commands are small; anything larger is refused before it is parsed."""


class Strict(BaseModel):
    """Base of every message model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- scans -------------------------------------------------------------------------------------


class ProbeModel(Strict):
    """The optics the probe starts from (Fresnel zone plate)."""

    outer_zone_width_m: float = Field(gt=0)
    diameter_m: float = Field(gt=0)
    central_stop_diameter_m: float = Field(ge=0)
    defocus_m: float = 0.0


_SAFE_SCAN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")


class ScanDescription(Strict):
    """What `start_scan` tells the pipeline about a scan (INTERFACES.md). SI units."""

    scan_id: ScanId
    technique: Literal["ptychography", "crystallography", "raw"] = "raw"
    n_dark: int = Field(0, ge=0)
    n_frames: int | None = Field(None, ge=0)
    energy_ev: float | None = Field(None, gt=0)
    distance_m: float | None = Field(None, gt=0)
    pixel_size_m: float | None = Field(None, gt=0)
    positions_m: list[tuple[float, float]] | None = None
    beam_center_px: tuple[float, float] | None = None
    adu_per_photon: float | None = Field(None, gt=0)
    probe_model: ProbeModel | None = None
    metadata: dict[str, Any] = Field(default_factory=dict)

    @field_validator("scan_id")
    @classmethod
    def _file_name_safe(cls, value: str) -> str:
        if not _SAFE_SCAN_ID.match(value):
            raise ValueError(
                "scan_id is used in file names: 1-128 characters of letters, digits, '_', '.', '-',"
                " starting with a letter or digit"
            )
        return value


# --- services, topology, heartbeats ----------------------------------------------------------


class ServiceIdentity(Strict):
    """Who a service process is and where it listens; sent once, at registration."""

    name: ServiceName
    stage: str
    instance: InstanceId
    host: str
    pid: int
    command_endpoint: str
    data_endpoint: str | None = None
    data_endpoint_local: str | None = None
    """The same data port over a Unix socket, for consumers on the same host."""
    server_key: str | None = None
    """The CURVE public key (Z85) its ports serve with, when the pipeline runs with keys."""
    pipeline: str = ""
    """The identity of the pipeline this process was started for (`Pipeline.identity`)."""
    epoch: int = 0
    """The epoch the process is in: a handler that lost its journal never goes back behind it."""


class ServiceInfo(ServiceIdentity):
    state: Literal["up", "dead"] = "up"


class ScanCounters(BaseModel):
    """What one service did: for one scan (returned when it ends) or since it started.

    Mutable: the runtime counts into it as frames go by."""

    model_config = ConfigDict(extra="forbid")

    frames_in: int = 0
    frames_out: int = 0
    rejected: int = 0
    duplicates: int = 0
    dropped: int = 0
    written: int = 0
    """Frames of the scan on disk, counted once across every file of the scan (continuations too)."""
    delivered: int | None = None
    """Output stages: distinct frames of the scan kept as an output (on disk; in the calibration);
    None for stages that are not outputs."""
    lost: int = 0
    """Frames this process gave up on (each with an event saying why)."""
    unacknowledged: int = 0
    """Sources: frames emitted that some stage has not acknowledged yet."""
    source_done: int | None = None
    """Sources: every frame of the scan emitted and delivered (how many); also in heartbeats, so a
    handler that restarted learns it."""
    busy_s: float = 0.0
    outputs: list[str] = Field(default_factory=list)

    def add(self, name: str, n: int = 1) -> None:
        """Count `n` more: per frame, without pydantic's assignment hook (a few microseconds, as
        much as the rest of the frame's bookkeeping)."""
        self.__dict__[name] += n


class ServiceStats(Strict):
    """What a service reports with every heartbeat: totals since it started, and `scan` for the current scan."""

    state: str = "idle"
    frames_in: int = 0
    frames_out: int = 0
    queue_depth: int = 0
    inflight: int = 0
    rejected: int = 0
    duplicates: int = 0
    dropped: int = 0
    busy_s: float = 0.0
    epoch: int = 0
    scan: ScanCounters = ScanCounters()


# --- commands --------------------------------------------------------------------------------


class NoArgs(Strict):
    pass


class AbortArgs(Strict):
    scan_id: ScanId | None = None
    epoch: Epoch | None = None


class ConfigureArgs(Strict):
    stage: str | None = None
    params: dict[str, Any]


class HeartbeatArgs(Strict):
    instance: InstanceId
    topology_version: int = -1
    stats: ServiceStats = ServiceStats()


class InstanceArgs(Strict):
    instance: InstanceId


class SourceDoneArgs(Strict):
    instance: InstanceId
    epoch: Epoch
    frames: int = Field(ge=0)


class EventArgs(Strict):
    instance: InstanceId
    kind: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    message: str = Field(max_length=2000)
    details: dict[str, Any] = Field(default_factory=dict)


class PreviewArray(Strict):
    name: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]{0,63}$")
    dtype: Literal["<f4", "<f8", "<c8", "|u1", "<u2", "<u4", "<i4"]
    shape: tuple[int, ...]
    data: Base64Bytes

    @model_validator(mode="after")
    def _size(self) -> PreviewArray:
        expected = math.prod(self.shape) * np.dtype(self.dtype).itemsize
        if len(self.data) != expected:
            raise ValueError(f"array {self.name}: {len(self.data)} bytes for shape {self.shape} "
                             f"{self.dtype}, which needs {expected}")
        return self


class PreviewArgs(Strict):
    """Small arrays for front-ends (a reconstruction, a STXM image), published by the handler."""

    instance: InstanceId
    name: str = Field(pattern=r"^[a-z][a-z0-9_]{0,63}$")
    scan_id: ScanId
    meta: dict[str, Any] = Field(default_factory=dict)
    arrays: list[PreviewArray] = Field(max_length=16)


class TellArgs(Strict):
    """A message for the processes of another stage (feedback from a collector), relayed by the
    handler: to every process of `stage` (rank 0) or to the one named `<stage>.<rank>`."""

    instance: InstanceId
    stage: str
    rank: int = Field(0, ge=0)
    body: dict[str, Any]


class ToldArgs(Strict):
    sender: ServiceName
    body: dict[str, Any]


class TopologyArgs(Strict):
    version: int
    services: list[ServiceInfo]


class RegisterReply(Strict):
    """The handler's answer to `register`: the pipeline as it runs (parameters configured since
    it started included), the epoch, the scan in progress to join, and who is where."""

    pipeline: dict[str, Any]
    epoch: Epoch
    scan: ScanDescription | None = None
    topology: TopologyArgs


class ScanStartArgs(Strict):
    epoch: Epoch
    scan: ScanDescription


class EpochArgs(Strict):
    epoch: Epoch


class EventsArgs(Strict):
    since: int = Field(0, ge=0, description="the handler_seq after which events are wanted")


class _Request(Strict):
    id: Any = None


class Ping(_Request):
    cmd: Literal["ping"]
    args: NoArgs = NoArgs()


class Status(_Request):
    cmd: Literal["status"]
    args: NoArgs = NoArgs()


class StartScan(_Request):
    cmd: Literal["start_scan"]
    args: ScanDescription


class Abort(_Request):
    cmd: Literal["abort"]
    args: AbortArgs = AbortArgs()


class Configure(_Request):
    cmd: Literal["configure"]
    args: ConfigureArgs


class Shutdown(_Request):
    cmd: Literal["shutdown"]
    args: NoArgs = NoArgs()


class Register(_Request):
    cmd: Literal["register"]
    args: ServiceIdentity


class Heartbeat(_Request):
    cmd: Literal["heartbeat"]
    args: HeartbeatArgs


class Unregister(_Request):
    """A service is leaving cleanly: what it holds should go to the others at once."""

    cmd: Literal["unregister"]
    args: InstanceArgs


class SourceDone(_Request):
    """A source has emitted every frame of a scan and all of them were delivered."""

    cmd: Literal["source_done"]
    args: SourceDoneArgs


class Event(_Request):
    """Something front-ends should hear of (a rejected frame, a series that timed out)."""

    cmd: Literal["event"]
    args: EventArgs


class Preview(_Request):
    cmd: Literal["preview"]
    args: PreviewArgs


class Events(_Request):
    """The handler's newest events after `since` (those a subscriber's PUB link missed)."""

    cmd: Literal["events"]
    args: EventsArgs = EventsArgs()


class Tell(_Request):
    cmd: Literal["tell"]
    args: TellArgs


class Told(_Request):
    cmd: Literal["told"]
    args: ToldArgs


class Topology(_Request):
    cmd: Literal["topology"]
    args: TopologyArgs


class ScanStart(_Request):
    cmd: Literal["scan_start"]
    args: ScanStartArgs


class ScanEnd(_Request):
    cmd: Literal["scan_end"]
    args: EpochArgs


HandlerRequest = Annotated[
    Union[Ping, Status, StartScan, Abort, Configure, Shutdown, Register, Heartbeat, Unregister,
          SourceDone, Event, Preview, Tell, Events],
    Field(discriminator="cmd"),
]
ServiceRequest = Annotated[
    Union[Ping, Status, Abort, Configure, Shutdown, Topology, ScanStart, ScanEnd, Told],
    Field(discriminator="cmd"),
]
HANDLER_REQUESTS: TypeAdapter = TypeAdapter(HandlerRequest)
SERVICE_REQUESTS: TypeAdapter = TypeAdapter(ServiceRequest)


def describe(error: ValidationError) -> str:
    """One line per problem, with the path of the offending key: what an operator reads."""
    lines = []
    for problem in error.errors(include_url=False):
        where = ".".join(str(p) for p in problem["loc"]) or "message"
        if problem["type"] == "union_tag_invalid":
            lines.append(f"unknown cmd {problem['input'].get('cmd')!r}: expected one of "
                         f"{problem['ctx']['expected_tags']}")
        elif problem["type"] == "union_tag_not_found":
            lines.append("missing 'cmd': a request is {\"cmd\": NAME, \"id\": ..., \"args\": {...}}")
        else:
            lines.append(f"{where}: {problem['msg']}")
    return "; ".join(lines)


def parse_request(raw: bytes, adapter: TypeAdapter) -> Any:
    """Parse one JSON request with `adapter`; raise MessageError saying what is wrong."""
    if len(raw) > MAX_COMMAND_BYTES:
        raise MessageError(f"command of {len(raw)} bytes refused: at most {MAX_COMMAND_BYTES}")
    try:
        return adapter.validate_json(raw)
    except ValidationError as error:
        if any(p["type"] == "union_tag_invalid" for p in error.errors()):
            raise UnknownCommand(describe(error)) from None
        if any(p["type"] == "json_invalid" for p in error.errors()):
            raise MessageError("not a JSON document: a request is "
                               "{\"cmd\": NAME, \"id\": ..., \"args\": {...}}") from None
        if any(p["type"] in ("model_type", "dict_type") and not p["loc"] for p in error.errors()):
            raise MessageError("a request must be a JSON object {\"cmd\": NAME, \"args\": {...}}") from None
        raise MessageError(describe(error)) from None


def request_id(raw: bytes) -> Any:
    """Best-effort `id` of a request that failed to parse, so the error reply can echo it."""
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return None
    return value.get("id") if isinstance(value, dict) else None


def ok(rid: Any, result: dict[str, Any] | None = None) -> bytes:
    return json.dumps({"ok": True, "id": rid, "result": result or {}}).encode()


def error(rid: Any, exc: BaseException) -> bytes:
    kind = type(exc).__name__ if isinstance(exc, SurveyorError) else "InternalError"
    return json.dumps({"ok": False, "id": rid,
                       "error": {"type": kind, "message": str(exc)}}).encode()


def request(cmd: str, args: dict[str, Any] | None = None, rid: Any = None) -> bytes:
    return json.dumps({"cmd": cmd, "id": rid, "args": args or {}}).encode()


class Reply(BaseModel):
    """A reply as received; `result` or `error` depending on `ok`."""

    model_config = ConfigDict(extra="forbid")
    ok: bool
    id: Any = None
    result: dict[str, Any] = Field(default_factory=dict)
    error: dict[str, str] | None = None


REPLIES: TypeAdapter = TypeAdapter(Reply)


def as_reply(payload: bytes) -> Reply | None:
    """The reply in `payload`, or None when it is a request: a DEALER or ROUTER that both sends
    requests and answers them reads both on one socket (`ok` and `error` always lead a reply)."""
    if not payload.startswith(b'{"ok"'):
        return None
    try:
        return REPLIES.validate_json(payload)
    except ValidationError:
        return None
