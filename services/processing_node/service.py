"""A processing node of OM's Processing Protocol (libs/common/processing.py): a scientist's class
runs `process_data` on every frame this process is given, and each result goes downstream as a
record (processing_wire.py) to the collecting node.

Rank: the N of this process's name `<stage>.N`; `node_pool_size`: the stage's processes + 1.
One instance of the class per scan, built at the scan start (also when this process joins a
running scan after a restart) and ended at the scan end, its last dict sent as an end record
(before the scan_end reply: the runtime answers once the collector has it). A record is a child
of its frame, so the frame is acknowledged only once the collector has the record: if this
process is killed, its frames are re-sent to another node, and the collector drops the records
it already has. Feedback from the collector (`tell`, relayed by the handler) is merged into the
next frame's `data`. A live `configure` of `parameters` reaches the instance's `configure` if it
has one, else the next scan's instance; a new `processing` class is loaded at the next scan.

A frame whose `process_data` raises (or returns what cannot travel) is counted lost, with the
first failure of a scan reported as a `processing_failed` event and its traceback in the log.

A class that cannot be built (or, for the collector, an output_dir that cannot be made) refuses
the scan start, and the handler starts nothing, saying why; in a process restarted into a running
scan, it takes no more frames and counts those it was sent lost (the runtime offers no way to
hand them back).
"""

from __future__ import annotations

import logging
from typing import Any

from libs.common import processing
from libs.common.errors import ParameterError
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.processing_wire import END_FRAME, END_RECORD, RECORD, from_feedback, to_record
from libs.common.runtime import Service as Runtime, Token
from services.processing_node.params import Params

logger = logging.getLogger(__name__)


class Service(Runtime):
    Params = Params

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.rank = processing.rank_of(self.name, self.stage)
        processing.load(self.params.processing)  # a wrong class stops the process at its start, saying why
        if self.rank >= self.pool_size:
            logger.warning("%s has rank %d, beyond the %d processes of stage %s in the pipeline: node_pool_size "
                           "(%d) does not count it", self.name, self.rank, self.pool_size - 1, self.stage,
                           self.pool_size)
        self._node: processing.ProcessingNode | None = None
        self._scan_data: dict[str, Any] = {}
        self._early: list[tuple[Token, Frame]] = []
        """Frames that came before this process heard of their scan: held, taken at its start."""
        self._refused: int | None = None
        """The epoch of a scan whose class could not be built here."""
        self._failures = 0

    @property
    def pool_size(self) -> int:
        return self.pipeline.stages[self.stage].processes + 1

    def on_scan_start(self, scan: ScanDescription) -> None:
        try:
            cls = processing.load(self.params.processing)
            self._node = processing.ProcessingNode(cls, parameters=self.params.parameters, rank=self.rank,
                                                   pool_size=self.pool_size)
        except processing.ProcessingError:
            self._refuse()
            raise
        self._scan_data = scan.model_dump(mode="json")
        self._failures = 0
        early, self._early = self._early, []
        for token, frame in early:
            if frame.header.epoch == self.epoch:
                self._process(frame, token)
                self.release(token)

    def on_frame(self, frame: Frame) -> None:
        if self._node is None and frame.header.epoch == self._refused:
            self._lose(frame)
            return
        if self._node is None:
            self._early.append((self.hold(), frame))
            return
        self._process(frame)

    def _process(self, frame: Frame, parent: Token | None = None) -> None:
        data = processing.FrameData(frame, scan=self._scan_data, detector=self.header)
        h = frame.header
        try:
            values, rank = self._node.process(data)
            record = to_record(values, kind=RECORD, rank=rank, frame=h.frame, scan_id=h.scan_id, epoch=h.epoch,
                               origin=self.name, where=f"{self._node.name}.process_data")
        except Exception as exc:  # noqa: BLE001 - the class's failure costs this frame, not the service
            self._failed(h.frame, exc)
            return
        self.emit(record, parent)

    def _failed(self, frame: int, exc: Exception) -> None:
        self.count("lost")
        self._failures += 1
        if self._failures > 1:
            logger.debug("frame %d failed in %s", frame, self._node.name, exc_info=True)
            return
        logger.exception("frame %d of scan %s failed in %s; the frame is lost, the scan goes on (later failures "
                         "are counted, their tracebacks at DEBUG)", frame, self.scan.scan_id, self._node.name)
        self.report("processing_failed", f"{self.name}: {self._node.name}.process_data failed on frame {frame}: "
                    f"{type(exc).__name__}: {exc}; fix the class (its log has the traceback)",
                    frame=frame, error=f"{type(exc).__name__}: {exc}")

    def on_told(self, body: dict[str, Any]) -> None:
        if self._node is None or body.get("epoch") != self.epoch:
            return  # feedback on a scan that is over
        self._node.feedback(from_feedback(body["feedback"]))

    def on_scan_end(self) -> None:
        node, self._node = self._node, None
        if self._failures:
            logger.warning("scan %s: %d frames failed in %s.process_data", self.scan.scan_id, self._failures,
                           node.name)
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

    def _refuse(self) -> None:
        """The class cannot be built here for this scan (a scan start refused, or a running scan this
        restarted process cannot join): no credit for more frames, and those here are counted lost,
        not held (held, the scan could never end)."""
        self._refused = self.epoch
        self.pause_input()
        early, self._early = self._early, []
        for token, frame in early:
            self._lose(frame)
            self.release(token)

    def _lose(self, frame: Frame) -> None:
        self.count("lost")
        logger.warning("frame %d of scan %s lost: the class could not be built in this process (see above)",
                       frame.header.frame, frame.header.scan_id)

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
