"""The receiver stage: where frames enter the pipeline.

Protocols: `synthetic` generates frames itself (the framework's built-in source, paced by the
pipeline's `[simulation]` table). Each accepted frame is emitted as it arrived; the runtime
delivers it and tells the handler when the scan's last frame has reached every sink.
"""

from __future__ import annotations

import logging
import time
from typing import Literal

from pydantic import BaseModel, ConfigDict

from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime
from services.receiver.synthetic import synthetic_frame

logger = logging.getLogger(__name__)

BATCH = 16
"""Frames produced per loop turn at most, so commands are never kept waiting."""


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    protocol: Literal["synthetic"] = "synthetic"
    source: str = ""


class Service(Runtime):
    Params = Params

    def on_scan_start(self, scan: ScanDescription) -> None:
        simulation = self.pipeline.simulation
        self._total = scan.n_frames if scan.n_frames is not None else simulation.frames
        self._sent = 0
        self._started = time.monotonic()
        if self._total == 0:
            self.finish_source(0)

    def produce(self) -> float | None:
        if self.scan is None or self._sent >= self._total:
            return None
        simulation = self.pipeline.simulation
        for _ in range(BATCH):
            if self.outlet.full():
                return 0.0
            if simulation.rate_hz > 0:
                due = self._started + self._sent / simulation.rate_hz
                if time.monotonic() < due:
                    return due - time.monotonic()
            self.emit(Frame.from_arrays(
                scan_id=self.scan.scan_id, epoch=self.epoch, frame=self._sent, origin=self.stage,
                arrays={"data": synthetic_frame(self._sent, simulation.shape, simulation.dtype)}))
            self._sent += 1
            if self._sent == self._total:
                self.finish_source(self._total)
                return None
        return 0.0
