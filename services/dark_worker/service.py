"""The dark stage: per-pixel dark statistics of a scan's first `n_dark` frames, published to every
frame worker as the scan's `calibration` header (mean dark, bad pixels, diffraction centre).

The centre comes from the scan description, else the detector header; failing both, from the
centre of mass of the mean of the first `centre_frames` data frames (the stage's edge must then
take `all` frames). A scan without darks still gets a calibration (no dark, detector mask only),
since the frame workers wait for one.
"""

from __future__ import annotations

import logging

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime
from services.dark_worker.dark_statistics import DarkStatistics, centre_of_mass

logger = logging.getLogger(__name__)

CALIBRATION = "calibration"


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    hot_factor: float = Field(10.0, gt=1, description="hot: dark variance above this x the median")
    centre_frames: int = Field(0, ge=0, le=1000, description="data frames to find the centre in, if not given")


class Service(Runtime):
    Params = Params

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._darks: DarkStatistics | None = None
        self._centre_sum: np.ndarray | None = None
        self._dark_mean: np.ndarray | float | None = None
        self._centre_count = 0
        self._published = False
        self._publish_when_ready()

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        self._publish_when_ready()

    def on_frame(self, frame: Frame) -> None:
        if self._published or self.scan is None:
            return
        raw = frame.array("data")
        if frame.header.frame < self.scan.n_dark:
            if self._darks is None:
                self._darks = DarkStatistics(raw.shape)
            self._darks.update(raw)
        elif self._centre() is None:
            if self._dark_mean is None:
                self._dark_mean = self._darks.result().mean if self._darks else 0.0
            self._centre_sum = raw - self._dark_mean + (0 if self._centre_sum is None else self._centre_sum)
            self._centre_count += 1
        self._publish_when_ready()

    def _centre(self) -> tuple[float, float] | None:
        if self.scan and self.scan.beam_center_px is not None:
            return self.scan.beam_center_px
        centre = self.header.header.meta.get("detector", {}).get("beam_center_px") if self.header else None
        if centre is not None:
            return tuple(centre)
        if self._centre_count and self._centre_count >= self.params.centre_frames:
            return centre_of_mass(self._centre_sum / self._centre_count)
        return None

    def _publish_when_ready(self) -> None:
        if self._published or self.scan is None or self.header is None:
            return
        darks = self._darks.count if self._darks else 0
        if darks < self.scan.n_dark:
            return
        centre = self._centre()
        if centre is None:
            if not self.params.centre_frames:
                self._published = True
                self.report("calibration_failed", f"scan {self.scan.scan_id}: no diffraction centre: give "
                            "beam_center_px in start_scan, or set the dark stage's centre_frames")
            return
        bad = None
        arrays = {}
        if self._darks is not None:
            model = self._darks.result(hot_factor=self.params.hot_factor)
            bad = model.bad
            arrays["dark"] = model.mean
        if "pixel_mask" in {spec.name for spec in self.header.header.arrays}:
            masked = self.header.array("pixel_mask") != 0
            bad = masked if bad is None else bad | masked
        if bad is not None:
            arrays["bad"] = bad.view(np.uint8)
        self._published = True
        logger.info("scan %s: calibration from %d darks: %d bad pixels, centre %s",
                    self.scan.scan_id, darks, 0 if bad is None else int(bad.sum()), centre)
        self.send_header(Frame.from_arrays(scan_id=self.scan.scan_id, epoch=self.epoch, frame=0, origin=self.name,
                                           arrays=arrays, meta={"header": CALIBRATION, "darks": darks,
                                                                "centre_px": [float(c) for c in centre]}))
