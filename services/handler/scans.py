"""Scan bookkeeping in the handler: epochs, the current scan, and the record of each scan.

Every `start_scan` and every `abort` moves to a new epoch; every frame carries its epoch, so data
of an aborted scan is recognised and dropped wherever it still is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from libs.common.feeds import ScanSummary, StageSummary
from libs.common.messages import ScanCounters, ScanDescription
from libs.common.pipeline import Pipeline


@dataclass
class ScanRecord:
    scan: ScanDescription
    epoch: int
    state: str = "starting"
    started: float = field(default_factory=time.time)
    finished: float | None = None
    sources_done: dict[str, int] = field(default_factory=dict)
    counters: dict[str, tuple[str, ScanCounters]] = field(default_factory=dict)
    """instance -> (stage, what it reported at scan end, or in its last heartbeat if it died:
    a killed writer's file and frames still count)."""
    names: dict[str, str] = field(default_factory=dict)
    """instance -> process name, for the summary's words."""
    deaths: list[str] = field(default_factory=list)
    """Processes of source stages that died during the scan (what they held is gone)."""

    def by_stage(self, key: str) -> dict[str, list[Any]]:
        values: dict[str, list[Any]] = {}
        for stage, counters in self.counters.values():
            values.setdefault(stage, []).append(getattr(counters, key))
        return values

    def stage_sum(self, stage: str, key: str) -> float:
        return sum(self.by_stage(key).get(stage, ()))

    def outputs_count(self, key: str, pipeline: Pipeline) -> int | None:
        """Frames the output stages (those that report `delivered`) hold or have on disk
        (`written`): the largest report per stage, since each process of a stage reports the
        whole scan (a writer's successor counts its predecessor's file too); None if no stage
        reports it. Stages of the same frames (`Pipeline.share`: the raw writer beside the
        crystallography writer) are copies, each of which must have them all: the one with fewest
        counts. Stages of the scan's darks and of its other frames add up."""
        outputs = {stage for stage, values in self.by_stage("delivered").items()
                   if any(v is not None for v in values)}
        fewest: dict[str, int] = {}
        for stage, values in self.by_stage(key).items():
            if stage in outputs and any(v is not None for v in values):
                share, count = pipeline.share(stage), max(v for v in values if v is not None)
                fewest[share] = min(fewest.get(share, count), count)
        if not fewest:
            return None
        if "all" not in fewest:
            return fewest.get("darks", 0) + fewest.get("data", 0)
        if fewest.keys() == {"all"}:
            return fewest["all"]
        # The darks (or the data) with no stage of their own reach the outputs through the "all" stages.
        expected = self.expected if self.expected is not None else fewest["all"]
        darks = min(self.scan.n_dark, expected)
        return min(fewest["all"], fewest.get("darks", darks) + fewest.get("data", expected - darks))

    @property
    def expected(self) -> int | None:
        """The frames of the scan: as announced, or fewer when the sources finished it sooner
        (a series that ended early or timed out: its detector never sent the rest)."""
        announced = self.scan.n_frames + self.scan.n_dark if self.scan.n_frames is not None else None
        finished = max(self.sources_done.values(), default=None)
        if finished is None:
            return announced
        return finished if announced is None else min(announced, finished)

    def received(self, pipeline: Pipeline) -> int:
        """Frames the source processes took in; a restarted source that generates its frames
        again (the synthetic one) counts them again, so never more than the scan announced."""
        taken = int(sum(self.stage_sum(s, "frames_out") for s in pipeline.sources()))
        return taken if self.expected is None else min(taken, self.expected)

    def losses(self, pipeline: Pipeline) -> tuple[int, list[str]]:
        """How many frames of the scan reached no output, and why, in words."""
        expected = self.received(pipeline) if self.expected is None else self.expected
        delivered = self.outputs_count("delivered", pipeline)
        if delivered is None:
            # No output stage counts: acknowledgements are chained to the sinks, so what the
            # sources still held is what was lost.
            lost = sum(self.stage_sum(s, "unacknowledged") for s in pipeline.sources())
        else:
            lost = max(0, expected - delivered)
        reasons = [f"{self.names.get(instance, instance)} gave up on {c.lost} frames (see its events)"
                   for instance, (_, c) in self.counters.items() if c.lost]
        unexplained = lost - sum(c.lost for _, c in self.counters.values())
        if unexplained > 0:
            why = (f"; source process {', '.join(self.deaths)} died during the scan and a detector does not "
                   "send again what was in its buffers" if self.deaths else "")
            reasons.append(f"{unexplained} of {expected} frames reached no output{why}")
        return lost, reasons

    def summary(self, pipeline: Pipeline) -> ScanSummary:
        """The scan's entry of summary.json (INTERFACES.md)."""
        received = self.received(pipeline)
        lost, reasons = self.losses(pipeline)
        wall = (self.finished or time.time()) - self.started
        # In the order the processes reported them: a raw file before its NXmx master, parts in order.
        outputs = list(dict.fromkeys(path for _, c in self.counters.values() for path in c.outputs))
        written = self.outputs_count("written", pipeline)
        return ScanSummary(
            scan_id=self.scan.scan_id, epoch=self.epoch, state=self.state, frames_expected=self.expected,
            frames_received=received, frames_written=written or 0,
            frames_lost=lost if self.state == "finished" else None,
            losses=reasons if self.state == "finished" else [],
            frames_rejected=sum(c.rejected for _, c in self.counters.values()),
            duplicates_dropped=sum(c.duplicates for _, c in self.counters.values()),
            wall_s=round(wall, 3), rate_hz=round(received / wall, 2) if wall > 0 else 0.0, outputs=outputs,
            stages={name: StageSummary(processes=sum(1 for s, _ in self.counters.values() if s == name),
                                       frames_in=self.stage_sum(name, "frames_in"),
                                       frames_out=self.stage_sum(name, "frames_out"),
                                       busy_s=round(sum(c.busy_s for s, c in self.counters.values() if s == name), 3))
                    for name in pipeline.stages})

    def to_json(self) -> dict[str, Any]:
        return {"scan": self.scan.model_dump(mode="json"), "epoch": self.epoch, "state": self.state,
                "started": self.started, "finished": self.finished, "sources_done": self.sources_done,
                "counters": {i: [stage, c.model_dump()] for i, (stage, c) in self.counters.items()},
                "names": self.names, "deaths": self.deaths}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ScanRecord:
        return cls(scan=ScanDescription.model_validate(data["scan"]), epoch=data["epoch"], state=data["state"],
                   started=data["started"], finished=data["finished"], sources_done=data["sources_done"],
                   counters={i: (stage, ScanCounters.model_validate(c)) for i, (stage, c) in data["counters"].items()},
                   names=data.get("names", {}), deaths=data.get("deaths", []))


HISTORY = 100
"""Scans kept in the status and the journal."""


class ScanBook:
    def __init__(self) -> None:
        self.epoch = 0
        self.current: ScanRecord | None = None
        self.history: list[ScanRecord] = []

    def start(self, scan: ScanDescription) -> ScanRecord:
        self.epoch += 1
        self.current = ScanRecord(scan, self.epoch)
        return self.current

    def abort(self, state: str = "aborted") -> ScanRecord | None:
        """Move to a new epoch; the current scan, if any, ends as aborted (or refused)."""
        self.epoch += 1
        record = self.current
        if record is not None:
            self._close(record, state)
        return record

    def finish(self, record: ScanRecord) -> None:
        self._close(record, "finished")

    def _close(self, record: ScanRecord, state: str) -> None:
        record.state = state
        record.finished = time.time()
        self.history = [*self.history, record][-HISTORY:]
        if self.current is record:
            self.current = None

    def to_json(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "current": self.current.to_json() if self.current else None,
                "history": [r.to_json() for r in self.history]}

    def restore(self, data: dict[str, Any], *, fresh: bool) -> None:
        """Carry on from a journal; `fresh`: a new run, so a scan left running is closed as
        interrupted (its processes are gone) and the next scan gets a new epoch all the same."""
        self.epoch = int(data["epoch"])
        self.history = [ScanRecord.from_json(r) for r in data.get("history", [])]
        self.current = ScanRecord.from_json(data["current"]) if data.get("current") else None
        if fresh and self.current is not None:
            self.abort("interrupted")
