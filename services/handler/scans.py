"""Scan bookkeeping in the handler: epochs, the current scan, and the record of each scan.

Every `start_scan` and every `abort` moves to a new epoch; every frame carries its epoch, so data
of an aborted scan is recognised and dropped wherever it still is.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

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

    def stage_sum(self, stage: str, key: str) -> float:
        return sum(getattr(c, key) for s, c in self.counters.values() if s == stage)

    def summary(self, pipeline: Pipeline) -> dict[str, Any]:
        """The scan's entry of summary.json (INTERFACES.md)."""
        received = sum(self.stage_sum(s, "frames_out") for s in pipeline.sources())
        # Acknowledgements are chained to the sinks, so a frame the sources no longer hold
        # reached every sink: what they still hold at the end is what was lost.
        lost = sum(self.stage_sum(s, "unacknowledged") for s in pipeline.sources())
        wall = (self.finished or time.time()) - self.started
        outputs = sorted({path for _, c in self.counters.values() for path in c.outputs})
        return {
            "scan_id": self.scan.scan_id,
            "epoch": self.epoch,
            "state": self.state,
            "frames_received": received,
            "frames_written": sum(c.written for _, c in self.counters.values()),
            "frames_lost": lost if self.state == "finished" else None,
            "frames_rejected": sum(c.rejected for _, c in self.counters.values()),
            "duplicates_dropped": sum(c.duplicates for _, c in self.counters.values()),
            "wall_s": round(wall, 3),
            "rate_hz": round(received / wall, 2) if wall > 0 else 0.0,
            "outputs": outputs,
            "truth": None,
            "stages": {name: {"processes": sum(1 for s, _ in self.counters.values() if s == name),
                              "frames_in": self.stage_sum(name, "frames_in"),
                              "frames_out": self.stage_sum(name, "frames_out"),
                              "busy_s": round(sum(c.busy_s for s, c in self.counters.values() if s == name), 3)}
                       for name in pipeline.stages},
        }


class ScanBook:
    def __init__(self) -> None:
        self.epoch = 0
        self.current: ScanRecord | None = None
        self.history: list[ScanRecord] = []

    def start(self, scan: ScanDescription) -> ScanRecord:
        self.epoch += 1
        self.current = ScanRecord(scan, self.epoch)
        return self.current

    def abort(self) -> ScanRecord | None:
        """Move to a new epoch; the current scan, if any, ends as aborted."""
        self.epoch += 1
        record = self.current
        if record is not None:
            self._close(record, "aborted")
        return record

    def finish(self, record: ScanRecord) -> None:
        self._close(record, "finished")

    def _close(self, record: ScanRecord, state: str) -> None:
        record.state = state
        record.finished = time.time()
        self.history.append(record)
        if self.current is record:
            self.current = None
