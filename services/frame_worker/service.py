"""The frame stage (run several): raw frames to clean, downsampled frames for the reconstruction.

It needs the scan's calibration (dark, bad pixels, centre) from the dark stage; frames that come
before it are held, not dropped, and cleaned once it arrives. Not forever: `calibration_timeout_s`
after the first frame held for it, the process gives up on them with a `calibration_missing`
event (the scan, what never came, what to do), counts them lost and acknowledges them, so the scan
can end and says what it lost; later frames of that scan without a calibration are lost at once.

Each clean frame carries its index in the scan (frame number minus `n_dark`) and its mask. The
geometry of the clean frames (crop, size, pixel size, distance, energy, the probe support, static
mask) is chosen from the scan at its first frame (libs/ptychography/geometry.py: every process of
the stage comes to the same choice from the same scan, calibration and detector) unless the
pipeline pins crop and size, and goes downstream once as the scan's `frames` header.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from libs.common.contracts import CALIBRATION, Calibration, CleanFrame, FramesHeader, ScanHeader, header_name
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime, Token
from libs.ptychography import geometry
from services.frame_worker.cleaning import clean_frame, static_mask
from services.frame_worker.params import CleaningParams, Params

logger = logging.getLogger(__name__)


class Service(Runtime):
    Params = Params
    _calibration: ScanHeader[Calibration] | None = None
    """The scan's calibration from the dark stage, its meta parsed as it came."""
    _waiting_since: float | None = None
    _gave_up = 0
    _cleaning: CleaningParams | None = None
    """This scan's cleaning, crop and size chosen (at its first frame)."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._uncalibrated: list[tuple[Token, Frame]] = []
        """Frames that came before the scan's calibration (or before the scan start: a process that
        joins a running scan can be sent frames before it hears of it), held until it does."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._uncalibrated = [(token, frame) for token, frame in self._uncalibrated
                              if frame.header.epoch == self.epoch]
        self._waiting_since = None
        self._gave_up = 0
        self._cleaning = None
        if self._calibration is not None:  # it came before the scan start
            self._calibrated()
        elif self._uncalibrated:
            self._start_waiting()

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        if header_name(header) == CALIBRATION:
            self._calibration = ScanHeader.of(header)
            if self.scan is not None:
                self._calibrated()

    def on_configure(self, params: Params, changed: set[str]) -> None:
        self._cleaning = None  # chosen again, with the new parameters, at the next frame

    def _calibrated(self) -> None:
        waiting, self._uncalibrated = self._uncalibrated, []
        self._waiting_since = None
        if self._gave_up:
            logger.info("scan %s: the calibration came after all; cleaning frames again", self.scan.scan_id)
        for token, frame in waiting:
            self._clean_held(token, frame)

    def on_frame(self, frame: Frame) -> None:
        token = self.hold()
        if self.scan is not None and self._calibration is not None:
            self._clean_held(token, frame)
            return
        if self.scan is not None and self._gave_up:
            self._gave_up += 1
            self.count("lost")
            logger.warning("scan %s: frame %d lost: still no calibration (%d given up on)",
                           frame.header.scan_id, frame.header.frame, self._gave_up)
            self.release(token)
            return
        self._uncalibrated.append((token, frame))
        if len(self._uncalibrated) == 1 and self.scan is not None:
            self._start_waiting()

    def _start_waiting(self) -> None:
        self._waiting_since = time.monotonic()
        self.after(self.params.calibration_timeout_s, self._calibration_overdue)
        logger.info("scan %s: holding frames until the calibration comes (at most %g s)",
                    self.scan.scan_id, self.params.calibration_timeout_s)

    def _clean_held(self, token: Token, frame: Frame) -> None:
        try:
            self._clean(frame, parent=token)
        except Exception:  # noqa: BLE001 - one bad frame must not end the service, nor stay held
            self.count("rejected")
            logger.exception("frame %d of scan %s failed in %s", frame.header.frame, self.scan.scan_id, self.stage)
        self.release(token)

    def _calibration_overdue(self) -> None:
        """The calibration timer: give up on the frames held for it once it is past."""
        if not self._uncalibrated or self._waiting_since is None or self.scan is None:
            return
        left = self._waiting_since + self.params.calibration_timeout_s - time.monotonic()
        if left > 0:
            self.after(left, self._calibration_overdue)
        else:
            self._give_up()

    def _give_up(self) -> None:
        waiting, self._uncalibrated = self._uncalibrated, []
        self._waiting_since = None
        self._gave_up = len(waiting)
        scan = self.scan
        inputs = self.pipeline.stages[self.stage].inputs
        darks = [name for name in inputs if self.pipeline.stages[name].service == "dark_worker"] or ["dark stage"]
        message = (f"scan {scan.scan_id}: the calibration (mean dark, bad pixels, centre) from {', '.join(darks)} "
                   f"({scan.n_dark} darks expected) did not come within {self.params.calibration_timeout_s:g} s "
                   f"of the first frame held for it; {len(waiting)} frames given up on and counted lost, and so "
                   f"will be the rest of the scan's frames here until it comes. Check that the {darks[0]} "
                   f"processes are up (their logs), that the scan's first {scan.n_dark} frames reach them, and "
                   "that they can find a diffraction centre (beam_center_px in start_scan, or centre_frames); "
                   "then run the scan again")
        logger.error(message)
        self.report("calibration_missing", message, scan_id=scan.scan_id, waiting_for=CALIBRATION,
                    stage=darks[0], n_dark=scan.n_dark, frames_lost=len(waiting),
                    timeout_s=self.params.calibration_timeout_s)
        self.count("lost", len(waiting))
        for token, _ in waiting:
            self.release(token)

    def on_abort(self) -> int:
        dropped, self._uncalibrated = len(self._uncalibrated), []
        self._waiting_since = None
        self._calibration = None
        return dropped

    def _clean(self, frame: Frame, parent: Token | None = None) -> None:
        calibration = self._calibration
        arrays = calibration.names
        if self._cleaning is None:
            self._cleaning = self._choose(frame.array("data").shape)
        clean, mask = clean_frame(
            frame.array("data"),
            dark=calibration.array("dark") if "dark" in arrays else None,
            bad=calibration.array("bad").view(bool) if "bad" in arrays else None,
            centre=calibration.meta.centre_px, adu_per_photon=self.scan.adu_per_photon or 1.0,
            params=self._cleaning)
        number = frame.header.frame
        self.emit(Frame.from_arrays(scan_id=frame.header.scan_id, epoch=self.epoch, frame=number, origin=self.name,
                                    arrays={"data": clean, "mask": mask},
                                    meta=CleanFrame(index=number - self.scan.n_dark).to_meta(),
                                    received=frame.header.received), parent)

    def _choose(self, shape: tuple[int, ...]) -> CleaningParams:
        """The scan's crop and size (pinned, or from its geometry); the frames header goes out."""
        scan, p, calibration = self.scan, self.params, self._calibration
        placed = scan.pixel_size_m and scan.distance_m and scan.energy_ev
        if not placed:
            self.report("scan_incomplete", f"scan {scan.scan_id}: energy_ev, distance_m and pixel_size_m are "
                        "needed to reconstruct; the clean frames are written without geometry")
        chosen = None
        if placed:
            chosen = geometry.choose(energy_ev=scan.energy_ev, distance_m=scan.distance_m,
                                     pixel_m=scan.pixel_size_m, detector_shape=shape[-2:],
                                     centre_px=calibration.meta.centre_px, probe_model=scan.probe_model,
                                     positions_m=scan.positions_m, crop=p.crop, size=p.size, max_size=p.max_size)
            logger.info("scan %s: geometry %s", scan.scan_id, chosen.describe())
        crop = chosen.crop if chosen else p.crop or min(512, 2 * (min(shape[-2:]) // 2))
        size = chosen.size if chosen else p.size or _divisor_near(crop, 128)
        cleaning = CleaningParams.model_validate({**p.model_dump(include=set(CleaningParams.model_fields)),
                                                  "crop": crop, "size": size})
        mask = np.ones((size, size), np.uint8)
        if "bad" in calibration.names:
            mask = static_mask(calibration.array("bad").view(bool), centre=calibration.meta.centre_px,
                               params=cleaning)
        meta = FramesHeader(size=size, crop=crop, downsample=p.downsample, centre_px=calibration.meta.centre_px,
                            pixel_size_m=scan.pixel_size_m * (crop // size) if scan.pixel_size_m else None,
                            distance_m=scan.distance_m, energy_ev=scan.energy_ev,
                            support_radius_px=chosen.support_radius_px if chosen else None,
                            probe_diameter_m=chosen.probe_diameter_m if chosen else None,
                            probe_from=chosen.probe_from if chosen else None,
                            geometry=chosen.describe() if chosen else f"crop {crop} px -> {size} px")
        self.send_header(Frame.from_arrays(scan_id=scan.scan_id, epoch=self.epoch, frame=0, origin=self.name,
                                           arrays={"mask": mask}, meta=meta.to_meta()))
        return cleaning


def _divisor_near(crop: int, wanted: int) -> int:
    """The divisor of `crop` nearest `wanted` (a clean size for a pinned crop without a scan geometry)."""
    return min((d for d in range(8, crop + 1) if crop % d == 0), key=lambda d: abs(d - wanted), default=crop)
