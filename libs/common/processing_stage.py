"""The runtime side both generic stages of OM's Processing Protocol share (libs/common/processing.py):
`services/processing_node` and `services/collecting_node` subclass `ProcessingStage`, which keeps
one instance of the scientist's class per scan and what happens around it. A subclass says how
the instance is built (`build`), what a scan needs once it is (`begin`), and what it does with
each input (`take`: process a frame, or collect a record); it must not hold, refuse or lose inputs
itself.

One instance per scan, built at the scan start, also when this process joins a running scan after
a restart. Inputs that come before this process heard of their scan are held and taken once the
instance is built. A class that cannot be built (or, for the collector, an output_dir that cannot
be made) refuses the scan start, and the handler starts nothing, saying why; in a process
restarted into a running scan, it takes no more inputs and counts those it was sent lost (the
runtime offers no way to hand them back). A live `configure` of `parameters` reaches the
instance's `configure` if it has one (which may refuse them: the old parameters stay), else the
next scan's instance; a new `processing` class is loaded at the next scan. The first failure of
the class in a scan is reported as a `processing_failed` event with its traceback in the log;
later ones are counted, their tracebacks at DEBUG.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from pydantic import BaseModel

from libs.common import processing
from libs.common.errors import ParameterError, SurveyorError
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service, Token

logger = logging.getLogger(__name__)

NodeT = TypeVar("NodeT", processing.ProcessingNode, processing.CollectingNode)


class ProcessingStage(Service, Generic[NodeT]):
    """Base of the processing and collecting nodes; see the module docstring for the contract."""

    inputs_are: ClassVar[str] = "frame"
    """What this stage's inputs are called in its log ("record" on the collector)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.processing_class()  # a wrong class stops the process at its start, saying why
        self._node: NodeT | None = None
        self._early: list[tuple[Token, Frame]] = []
        """Inputs that came before this process heard of their scan: held, taken at its start."""
        self._refused: int | None = None
        """The epoch of a scan whose class could not be built here."""
        self._failures = 0

    def processing_class(self) -> type:
        """The class the stage runs; a relative file is taken from the pipeline file's folder."""
        return processing.load(self.params.processing, Path(self.pipeline.directory) if self.pipeline.directory else None)

    # --- what a node supplies -------------------------------------------------------------------

    def build(self, scan: ScanDescription) -> NodeT:
        """This scan's instance of the class; raise a SurveyorError to refuse the scan."""
        raise NotImplementedError

    def begin(self, scan: ScanDescription) -> None:
        """The instance is built (`self._node`): set up the scan before the held inputs are taken."""

    def take(self, frame: Frame, parent: Token | None = None) -> None:
        """One input of the running scan; `parent` is its held token when it came early."""
        raise NotImplementedError

    # --- the runtime's hooks --------------------------------------------------------------------

    def on_scan_start(self, scan: ScanDescription) -> None:
        try:
            self._node = self.build(scan)
        except SurveyorError:
            self._refuse()
            raise
        self._failures = 0
        self.begin(scan)
        early, self._early = self._early, []
        for token, frame in early:
            if frame.header.epoch == self.epoch:
                self.take(frame, token)
                self.release(token)

    def on_frame(self, frame: Frame) -> None:
        if self._node is None and frame.header.epoch == self._refused:
            self._lose(frame)
            return
        if self._node is None:
            self._early.append((self.hold(), frame))
            return
        self.take(frame)

    def on_abort(self) -> int:
        dropped = len(self._early)
        self._node, self._early = None, []
        return dropped

    def on_configure(self, params: BaseModel, changed: set[str]) -> None:
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

    # --- for nodes ------------------------------------------------------------------------------

    def end_node(self) -> NodeT:
        """At the scan end: the scan's instance, let go of (its end runs once), the scan's failures summed up."""
        node, self._node = self._node, None
        if self._failures:
            logger.warning("scan %s: %d failures in %s (the first is in this log)", self.scan.scan_id,
                           self._failures, node.name)
        return node

    def failed(self, name: str, what: str, exc: Exception, **details: Any) -> None:
        """The class `name` failed (`what`: "process_data failed on frame 7"): the first failure of a
        scan is reported with its traceback; later ones are counted, their tracebacks at DEBUG."""
        self._failures += 1
        if self._failures > 1:
            logger.debug("%s.%s", name, what, exc_info=exc)
            return
        logger.error("scan %s: %s.%s (later failures are counted, their tracebacks at DEBUG)",
                     self.scan.scan_id if self.scan else "?", name, what, exc_info=exc)
        self.report("processing_failed", f"{self.name}: {name}.{what}: {type(exc).__name__}: {exc}; "
                    "fix the class (its log has the traceback)", error=f"{type(exc).__name__}: {exc}", **details)

    def _refuse(self) -> None:
        """The class cannot be built here for this scan (a scan start refused, or a running scan this
        restarted process cannot join): no credit for more inputs, and those here are counted lost,
        not held (held, the scan could never end)."""
        self._refused = self.epoch
        self.pause_input()
        early, self._early = self._early, []
        for token, frame in early:
            self._lose(frame)
            self.release(token)

    def _lose(self, frame: Frame) -> None:
        self.count("lost")
        logger.warning("%s %d of scan %s lost: the class could not be built in this process (see above)",
                       self.inputs_are, frame.header.frame, frame.header.scan_id)
