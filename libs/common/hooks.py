"""What a service implements: the hooks the runtime calls (runtime.py), each a no-op here.

They run on the process's worker thread (offload.py) unless the service says otherwise, one at a
time, never beside one another: a hook may use the service's state freely, and what it sends
(`emit`, `release`, `report`, ...) leaves once it returns.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from libs.common.frames import Frame
from libs.common.messages import ScanDescription


class Hooks:
    def on_frame(self, frame: Frame) -> None:
        """Handle one input frame; call `emit` for what goes downstream."""

    def produce(self) -> float | None:
        """Sources: emit the next frames of the current scan. Return seconds until the next call
        is wanted (0 = at once), or None when there is nothing to do until something changes."""
        return None

    def on_duplicate(self, frame: Frame) -> None:
        """A frame this process already took came again (its producer re-sent it after a link or
        a process was lost). It is not processed again; a sink that merges partial results riding
        on frames (class sums) takes what the first copy's may have lost. `hold` works as in
        `on_frame`."""

    def on_rejoin(self) -> None:
        """This process was declared dead (stalled) and registered again: its producers have sent
        what it held to the others, where it is derived again. Drop partial results of those
        frames that have not left yet (a sum over many frames), or they would count twice."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        """A scan starts; `self.scan` and `self.epoch` are already set. Raise a SurveyorError to
        refuse it (an output directory that cannot take it): the handler then starts nothing."""

    def on_header(self, header: Frame) -> None:
        """A scan header arrived (`self.headers[header_name(header)]`): the detector's (geometry,
        flatfield, pixel mask; also `self.header`) or another stage's (a calibration). Before
        any frame that follows it from the same producer. Passed on downstream unless a service
        overrides this."""
        self.send_header(header)

    def on_scan_end(self) -> None:
        """Every frame of the scan has been delivered; finish its outputs (counters in `self.counters`)."""

    def on_abort(self) -> int:
        """Drop what the service holds of the current scan; return how many frames that was."""
        return 0

    def on_configure(self, params: BaseModel, changed: set[str]) -> None:
        """New parameters are in force from the next frame (`self.params` is already `params`);
        `changed` names those whose value changed: rebuild only what they invalidate."""

    def on_told(self, body: dict[str, Any]) -> None:
        """A message from a process of another stage (`tell`), relayed by the handler."""

    def close(self) -> None:
        """Release what the service opened (files); called once when the loop ends."""

