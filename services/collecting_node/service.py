"""The collecting node of OM's Processing Protocol (libs/common/processing.py): rank 0, fed by one
processing_node stage. It calls `collect_data` on every record (each frame's exactly once: a
record that comes again, after a processing process died, is dropped by the runtime), sends the
feedback it returns to the processing nodes by rank (`tell`, relayed by the handler), calls
`wait_for_data` when no record came for `idle_s`, publishes the class's optional `preview` every
`preview_interval_s` (`preview.<stage>`), and at the scan end, once the processing nodes' end
records are in, writes what `end_processing_on_collecting_node` returns as
`<output_dir>/<scan_id>.<stage>.h5` (libs/common/processing_result.py), named in the scan's outputs. What both
nodes share (one instance per scan, records held before the scan start, a class that cannot be
built, a live `configure`) is libs/common/processing_stage.py.

An instance built when this process joins a running scan after a restart starts empty: what the
lost instance had collected is not checkpointed, so the result then covers the records since the
restart. The collecting node is not a frame output in the scan summary (it reports no
`delivered`): acknowledgements are chained through it, so a frame never collected stays
unacknowledged at the source, and a record whose `collect_data` raised is counted lost, with a
`processing_failed` event.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from libs.common import processing, processing_result
from libs.common.contracts import RECORD, ProcessingRecord
from libs.common.errors import FrameError, PipelineError, ProcessingError, SurveyorError
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.processing_stage import ProcessingStage
from libs.common.processing_wire import record_values, to_feedback
from libs.common.runtime import Token
from services.collecting_node import previews
from services.collecting_node.params import Params

logger = logging.getLogger(__name__)


class Service(ProcessingStage[processing.CollectingNode]):
    Params = Params
    inputs_are = "record"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        inputs = self.pipeline.stages[self.stage].inputs
        if len(inputs) != 1:
            raise PipelineError(f"stage {self.stage}: a collecting node takes the records of one processing_node "
                                f"stage (its ranks are that stage's processes); its inputs are {inputs}")
        self.source = inputs[0]
        self._frames = 0
        self._last_record = 0.0

    @property
    def pool_size(self) -> int:
        return self.pipeline.stages[self.source].processes + 1

    def build(self, scan: ScanDescription) -> processing.CollectingNode:
        try:
            processing_result.result_path(self.params.output_dir, scan.scan_id, self.stage).parent.mkdir(
                parents=True, exist_ok=True)
        except OSError as exc:
            raise SurveyorError(f"stage {self.stage}: cannot create output_dir {self.params.output_dir}: "
                                f"{exc.strerror or exc}; choose another output_dir") from None
        return processing.CollectingNode(self.processing_class(), parameters=self.params.parameters,
                                         pool_size=self.pool_size)

    def begin(self, scan: ScanDescription) -> None:
        self._preview_name = previews.name_of(self._node.name)
        self._frames = 0
        self._last_record = time.monotonic()
        self.every(self.params.preview_interval_s, self._publish)
        self.every(self.params.idle_s, self._idle)

    def take(self, record: Frame, parent: Token | None = None) -> None:
        try:
            meta = ProcessingRecord.of(record)
        except FrameError as exc:
            self.count("rejected")
            logger.warning("rejected the %s; stage %s takes the records of a processing_node stage", exc, self.stage)
            return
        try:
            feedback = self._node.collect(record_values(record), meta.rank)
            bodies = {rank: to_feedback(values, f"{self._node.name}.collect_data") for rank, values in feedback.items()}
        except Exception as exc:  # noqa: BLE001 - the class's failure costs this record, not the service
            self.count("lost")
            self.failed(self._node.name, f"collect_data failed on the record of frame {record.header.frame}", exc)
            return
        if meta.kind == RECORD:
            self._frames += 1
        for rank, body in bodies.items():
            self.tell(self.source, {"epoch": self.epoch, "feedback": body}, rank=rank)
        self._last_record = time.monotonic()

    def _idle(self) -> None:
        if self._node is None or time.monotonic() - self._last_record < self.params.idle_s:
            return
        try:
            self._node.wait()
        except Exception as exc:  # noqa: BLE001
            self.failed(self._node.name, "wait_for_data failed", exc)

    def _publish(self) -> None:
        if self._node is None:
            return
        try:
            arrays = self._node.preview()
        except Exception as exc:  # noqa: BLE001
            self.failed(self._node.name, "preview failed", exc)
            return
        if not arrays:
            return
        try:
            shown = previews.previewable(arrays)
        except ProcessingError as exc:
            self.failed(self._node.name, f"preview returned what front-ends cannot take: {exc}", exc)
            return
        self.preview(self._preview_name, shown, frames=self._frames)

    def on_scan_end(self) -> None:
        self._publish()
        node = self.end_node()
        try:
            result = node.end()
        except Exception as exc:  # noqa: BLE001 - reported; the scan still ends
            self.failed(node.name, "end_processing_on_collecting_node failed; no result file", exc)
            return
        if result is None:
            return
        path = processing_result.result_path(self.params.output_dir, self.scan.scan_id, self.stage)
        try:
            processing_result.write(path, result, scan_id=self.scan.scan_id, stage=self.stage,
                                    processing=self.params.processing, parameters=node.parameters,
                                    frames=self._frames)
        except (OSError, TypeError, ValueError) as exc:
            logger.exception("scan %s: result file %s not written", self.scan.scan_id, path)
            self.report("result_not_written", f"{self.name}: the result of scan {self.scan.scan_id} was not written "
                        f"to {path}: {exc}; free space or choose another output_dir", path=str(path))
            return
        self.counters.outputs.append(str(path))
        logger.info("scan %s: %d frames collected; result in %s", self.scan.scan_id, self._frames, path)
