"""The frame stage (run several): raw frames to clean, downsampled frames for the reconstruction.

It needs the scan's calibration (dark, bad pixels, centre) from the dark stage; frames that come
before it are held, not dropped, and cleaned once it arrives. Each clean frame carries its index
in the scan (frame number minus `n_dark`) and its mask. The geometry of the clean frames (size,
pixel size, distance, energy, static mask) goes downstream once as the scan's `frames` header.
"""

from __future__ import annotations

import logging

import numpy as np

from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime, Token, header_name
from services.dark_worker.service import CALIBRATION
from services.frame_worker.cleaning import CleaningParams, clean_frame, static_mask

logger = logging.getLogger(__name__)

FRAMES_HEADER = "frames"


class Service(Runtime):
    Params = CleaningParams

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._uncalibrated: list[tuple[Token, Frame]] = []
        """Frames that came before the scan's calibration, held (unacknowledged) until it does."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._uncalibrated = []

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        if header_name(header) == CALIBRATION and self.scan is not None:
            self._send_geometry(header)
            waiting, self._uncalibrated = self._uncalibrated, []
            for token, frame in waiting:
                self._clean(frame, parent=token)

    def on_frame(self, frame: Frame) -> None:
        if CALIBRATION not in self.headers:
            self._uncalibrated.append((self.hold(), frame))
            if len(self._uncalibrated) == 1:
                logger.info("scan %s: holding frames until the calibration comes", frame.header.scan_id)
            return
        self._clean(frame)

    def on_abort(self) -> int:
        dropped, self._uncalibrated = len(self._uncalibrated), []
        return dropped

    def _clean(self, frame: Frame, parent: Token | None = None) -> None:
        calibration = self.headers[CALIBRATION]
        arrays = {spec.name for spec in calibration.header.arrays}
        clean, mask = clean_frame(
            frame.array("data"),
            dark=calibration.array("dark") if "dark" in arrays else None,
            bad=calibration.array("bad").view(bool) if "bad" in arrays else None,
            centre=tuple(calibration.header.meta["centre_px"]), adu_per_photon=self.scan.adu_per_photon or 1.0,
            params=self.params)
        number = frame.header.frame
        self.emit(Frame.from_arrays(scan_id=frame.header.scan_id, epoch=self.epoch, frame=number, origin=self.name,
                                    arrays={"data": clean, "mask": mask},
                                    meta={"index": number - self.scan.n_dark}), parent)

    def _send_geometry(self, calibration: Frame) -> None:
        scan, p = self.scan, self.params
        if scan.pixel_size_m is None or scan.distance_m is None or scan.energy_ev is None:
            self.report("scan_incomplete", f"scan {scan.scan_id}: energy_ev, distance_m and pixel_size_m are "
                        "needed to reconstruct; the clean frames are written without geometry")
        factor = p.crop // p.size
        mask = np.ones((p.size, p.size), np.uint8)
        if "bad" in {spec.name for spec in calibration.header.arrays}:
            mask = static_mask(calibration.array("bad").view(bool), centre=calibration.header.meta["centre_px"],
                               params=p)
        meta = {"header": FRAMES_HEADER, "size": p.size, "crop": p.crop, "downsample": p.downsample,
                "centre_px": calibration.header.meta["centre_px"],
                "pixel_size_m": scan.pixel_size_m * factor if scan.pixel_size_m else None,
                "distance_m": scan.distance_m, "energy_ev": scan.energy_ev}
        self.send_header(Frame.from_arrays(scan_id=scan.scan_id, epoch=self.epoch, frame=0, origin=self.name,
                                           arrays={"mask": mask}, meta=meta))
