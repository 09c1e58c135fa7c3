"""The collecting node of OM's Processing Protocol (libs/common/processing.py): rank 0, fed by one
processing_node stage. It calls `collect_data` on every record (each frame's exactly once: a
record that comes again, after a processing process died, is dropped by the runtime), sends the
feedback it returns to the processing nodes by rank (`tell`, relayed by the handler), calls
`wait_for_data` when no record came for `idle_s`, publishes the class's optional `preview` every
`preview_interval_s` (`preview.<stage>`), and at the scan end, once the processing nodes' end
records are in, writes what `end_processing_on_collecting_node` returns as
`<output_dir>/<scan_id>.<stage>.h5` (result_file.py), named in the scan's outputs.

One instance of the class per scan, built at the scan start, also when this process joins a
running scan after a restart: what the lost instance had collected is not checkpointed, so the
result then covers the records since the restart. The collecting node is not a frame output
in the scan summary (it reports no `delivered`): acknowledgements are chained through it, so a
frame never collected stays unacknowledged at the source, and a record whose `collect_data`
raised is counted lost, with a `processing_failed` event.

A class that cannot be built (or, for the collector, an output_dir that cannot be made) refuses
the scan start, and the handler starts nothing, saying why; in a process restarted into a running
scan, it takes no more records and counts those it was sent lost (the runtime offers no way to
hand them back).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from libs.common import processing
from libs.common.errors import ParameterError, PipelineError, SurveyorError
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.processing_wire import END_RECORD, RECORD, ProcessingError, from_record, to_feedback
from libs.common.runtime import Service as Runtime, Token
from services.collecting_node import previews, result_file
from services.collecting_node.params import Params

logger = logging.getLogger(__name__)


class Service(Runtime):
    Params = Params

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        inputs = self.pipeline.stages[self.stage].inputs
        if len(inputs) != 1:
            raise PipelineError(f"stage {self.stage}: a collecting node takes the records of one processing_node "
                                f"stage (its ranks are that stage's processes); its inputs are {inputs}")
        self.source = inputs[0]
        processing.load(self.params.processing)  # a wrong class stops the process at its start, saying why
        self._node: processing.CollectingNode | None = None
        self._early: list[tuple[Token, Frame]] = []
        """Records that came before this process heard of their scan: held, taken at its start."""
        self._refused: int | None = None
        """The epoch of a scan whose class could not be built here."""
        self._frames = 0
        self._failures = 0
        self._last_record = 0.0

    @property
    def pool_size(self) -> int:
        return self.pipeline.stages[self.source].processes + 1

    def on_scan_start(self, scan: ScanDescription) -> None:
        try:
            self._node = self._build(scan)
        except SurveyorError:
            self._refuse()
            raise
        self._preview_name = previews.name_of(self._node.name)
        self._frames = self._failures = 0
        self._last_record = time.monotonic()
        self.every(self.params.preview_interval_s, self._publish)
        self.every(self.params.idle_s, self._idle)
        early, self._early = self._early, []
        for token, record in early:
            if record.header.epoch == self.epoch:
                self._collect(record)
                self.release(token)

    def _build(self, scan: ScanDescription) -> processing.CollectingNode:
        try:
            result_file.result_path(self.params.output_dir, scan.scan_id, self.stage).parent.mkdir(
                parents=True, exist_ok=True)
        except OSError as exc:
            raise SurveyorError(f"stage {self.stage}: cannot create output_dir {self.params.output_dir}: "
                                f"{exc.strerror or exc}; choose another output_dir") from None
        return processing.CollectingNode(processing.load(self.params.processing), parameters=self.params.parameters,
                                         pool_size=self.pool_size)

    def on_frame(self, frame: Frame) -> None:
        if self._node is None and frame.header.epoch == self._refused:
            self._lose(frame)
            return
        if self._node is None:
            self._early.append((self.hold(), frame))
            return
        self._collect(frame)

    def _collect(self, record: Frame) -> None:
        kind = record.header.meta.get("kind")
        if kind not in (RECORD, END_RECORD):
            self.count("rejected")
            logger.warning("frame %d from %s is not a processing record (kind %r): stage %s takes the records of "
                           "a processing_node stage", record.header.frame, record.header.origin, kind, self.stage)
            return
        try:
            feedback = self._node.collect(*from_record(record))
            bodies = {rank: to_feedback(values, f"{self._node.name}.collect_data") for rank, values in feedback.items()}
        except Exception as exc:  # noqa: BLE001 - the class's failure costs this record, not the service
            self.count("lost")
            self._failed(self._node.name, f"collect_data failed on the record of frame {record.header.frame}", exc)
            return
        if kind == RECORD:
            self._frames += 1
        for rank, body in bodies.items():
            self.tell(self.source, {"epoch": self.epoch, "feedback": body}, rank=rank)
        self._last_record = time.monotonic()

    def _failed(self, name: str, what: str, exc: Exception) -> None:
        """The first failure of a scan is reported with its traceback; later ones are counted."""
        self._failures += 1
        if self._failures > 1:
            logger.debug("%s.%s", name, what, exc_info=True)
            return
        logger.exception("scan %s: %s.%s (later failures are counted, their tracebacks at DEBUG)",
                         self.scan.scan_id if self.scan else "?", name, what)
        self.report("processing_failed", f"{self.name}: {name}.{what}: {type(exc).__name__}: {exc}; "
                    "fix the class (its log has the traceback)", error=f"{type(exc).__name__}: {exc}")

    def _idle(self) -> None:
        if self._node is None or time.monotonic() - self._last_record < self.params.idle_s:
            return
        try:
            self._node.wait()
        except Exception as exc:  # noqa: BLE001
            self._failed(self._node.name, "wait_for_data failed", exc)

    def _publish(self) -> None:
        if self._node is None:
            return
        try:
            arrays = self._node.preview()
        except Exception as exc:  # noqa: BLE001
            self._failed(self._node.name, "preview failed", exc)
            return
        if not arrays:
            return
        try:
            shown = previews.previewable(arrays)
        except ProcessingError as exc:
            self._failed(self._node.name, f"preview returned what front-ends cannot take: {exc}", exc)
            return
        self.preview(self._preview_name, shown, frames=self._frames)

    def on_scan_end(self) -> None:
        self._publish()
        node, self._node = self._node, None
        if self._failures:
            logger.warning("scan %s: %d failures in %s (the first is in this log)", self.scan.scan_id,
                           self._failures, node.name)
        try:
            result = node.end()
        except Exception as exc:  # noqa: BLE001 - reported; the scan still ends
            self._failed(node.name, "end_processing_on_collecting_node failed; no result file", exc)
            return
        if result is None:
            return
        path = result_file.result_path(self.params.output_dir, self.scan.scan_id, self.stage)
        try:
            result_file.write(path, result, scan_id=self.scan.scan_id, stage=self.stage,
                              processing=self.params.processing, parameters=node.parameters, frames=self._frames)
        except (OSError, TypeError, ValueError) as exc:
            logger.exception("scan %s: result file %s not written", self.scan.scan_id, path)
            self.report("result_not_written", f"{self.name}: the result of scan {self.scan.scan_id} was not written "
                        f"to {path}: {exc}; free space or choose another output_dir", path=str(path))
            return
        self.counters.outputs.append(str(path))
        logger.info("scan %s: %d frames collected; result in %s", self.scan.scan_id, self._frames, path)

    def _refuse(self) -> None:
        """The class cannot be built here for this scan (a scan start refused, or a running scan this
        restarted process cannot join): no credit for more records, and those here are counted lost,
        not held (held, the scan could never end)."""
        self._refused = self.epoch
        self.pause_input()
        early, self._early = self._early, []
        for token, record in early:
            self._lose(record)
            self.release(token)

    def _lose(self, record: Frame) -> None:
        self.count("lost")
        logger.warning("record %d of scan %s lost: the class could not be built in this process (see above)",
                       record.header.frame, record.header.scan_id)

    def on_abort(self) -> int:
        dropped = len(self._early)
        self._node, self._early = None, []
        return dropped

    def on_configure(self, params: Params, changed: set[str]) -> None:
        if "parameters" not in changed or self._node is None:
            return
        try:
            taken = self._node.configure(params.parameters)
        except Exception as exc:  # noqa: BLE001 - the class refused: the old parameters stay
            self.params = params.model_copy(update={"parameters": self._node.parameters})
            raise ParameterError(f"stage {self.stage}: {self._node.name}.configure refused the parameters: "
                                 f"{type(exc).__name__}: {exc}; the parameters in force did not change") from None
        if not taken:
            logger.info("%s has no configure: the new parameters take effect at the next scan", self._node.name)
