"""A processing node of OM's Processing Protocol (libs/common/processing.py): a scientist's class
runs `process_data` on every frame this process is given, and each result goes downstream as a
record (processing_wire.py) to the collecting node. What both nodes share (one instance per
scan, frames held before the scan start, a class that cannot be built, a live `configure`) is
libs/common/processing_stage.py.

Rank: the N of this process's name `<stage>.N`; `node_pool_size`: the stage's processes + 1.
The instance is ended at the scan end, its last dict sent as an end record (before the scan_end
reply: the runtime answers once the collector has it). A record is a child of its frame, so the
frame is acknowledged only once the collector has the record: if this process is killed, its
frames are re-sent to another node, and the collector drops the records it already has.
Feedback from the collector (`tell`, relayed by the handler) is merged into the next frame's
`data`. A frame whose `process_data` raises (or returns what cannot travel) is counted lost.
"""

from __future__ import annotations

import logging
from typing import Any

from libs.common import processing
from libs.common.contracts import END_RECORD, RECORD
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.processing_stage import ProcessingStage
from libs.common.processing_wire import END_FRAME, from_feedback, to_record
from libs.common.runtime import Token
from services.processing_node.params import Params

logger = logging.getLogger(__name__)


class Service(ProcessingStage[processing.ProcessingNode]):
    Params = Params

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank = processing.rank_of(self.name, self.stage)
        if self.rank >= self.pool_size:
            logger.warning("%s has rank %d, beyond the %d processes of stage %s in the pipeline: node_pool_size "
                           "(%d) does not count it", self.name, self.rank, self.pool_size - 1, self.stage,
                           self.pool_size)
        self._scan_data: dict[str, Any] = {}

    @property
    def pool_size(self) -> int:
        return self.pipeline.stages[self.stage].processes + 1

    def build(self, scan: ScanDescription) -> processing.ProcessingNode:
        return processing.ProcessingNode(self.processing_class(), parameters=self.params.parameters,
                                         rank=self.rank, pool_size=self.pool_size)

    def begin(self, scan: ScanDescription) -> None:
        self._scan_data = scan.model_dump(mode="json")

    def take(self, frame: Frame, parent: Token | None = None) -> None:
        data = processing.FrameData(frame, scan=self._scan_data, detector=self.header)
        h = frame.header
        try:
            values, rank = self._node.process(data)
            record = to_record(values, kind=RECORD, rank=rank, frame=h.frame, scan_id=h.scan_id, epoch=h.epoch,
                               origin=self.name, where=f"{self._node.name}.process_data")
        except Exception as exc:  # noqa: BLE001 - the class's failure costs this frame, not the service
            self.count("lost")
            self.failed(self._node.name, f"process_data failed on frame {h.frame}", exc, frame=h.frame)
            return
        self.emit(record, parent)

    def on_told(self, body: dict[str, Any]) -> None:
        if self._node is None or body.get("epoch") != self.epoch:
            return  # feedback on a scan that is over
        self._node.feedback(from_feedback(body["feedback"]))

    def on_scan_end(self) -> None:
        node = self.end_node()
        try:
            end = node.end()
            if end is None:
                return
            record = to_record(end, kind=END_RECORD, rank=self.rank, frame=END_FRAME + self.rank,
                               scan_id=self.scan.scan_id, epoch=self.epoch, origin=self.name,
                               where=f"{node.name}.end_processing_on_processing_node")
        except Exception as exc:  # noqa: BLE001 - the class's failure is reported, the scan still ends
            logger.exception("scan %s: %s.end_processing_on_processing_node failed", self.scan.scan_id, node.name)
            self.report("processing_failed", f"{self.name}: {node.name}.end_processing_on_processing_node failed: "
                        f"{type(exc).__name__}: {exc}", error=f"{type(exc).__name__}: {exc}")
            return
        self.emit(record)
