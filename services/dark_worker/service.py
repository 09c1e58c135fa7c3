"""The dark stage: per-pixel dark statistics of a scan's first `n_dark` frames, published to every
frame worker as the scan's `calibration` header (mean dark, bad pixels, diffraction centre).

The centre comes from the scan description, else the detector header; failing both, from the
centre of mass of the mean of the first `centre_frames` data frames (the stage's edge must then
take `all` frames). A scan without darks still gets a calibration (no dark, detector mask only),
since the frame workers wait for one.

Every frame that goes into the calibration is held (unacknowledged) until the calibration is
checkpointed (`calibration.npz` in the stage's checkpoint folder: the header's arrays and meta,
written atomically) and published; then all of them are released. So a process killed during the
darks loses none: they are re-sent to its successor. A successor that starts mid-scan restores the
checkpoint, if there is one, and publishes the same calibration again instead of waiting for darks
that will not come again (the re-sent ones are acknowledged: they are in it already).
"""

from __future__ import annotations

import logging
import shutil

import numpy as np
from pydantic import ValidationError

from libs.common import checkpoint
from libs.common.contracts import DETECTOR_HEADER, Calibration, DetectorHeader, ScanHeader, header_name
from libs.common.frames import Frame
from libs.common.messages import ScanDescription, describe
from libs.common.runtime import Service as Runtime, Token
from services.dark_worker.dark_statistics import DarkStatistics, centre_of_mass
from services.dark_worker.params import Params

logger = logging.getLogger(__name__)

CHECKPOINT = "calibration.npz"
SAVE_RETRY_S = 2.0


class Service(Runtime):
    Params = Params
    _detector: ScanHeader[DetectorHeader] | None = None
    """The detector's header of the scan, its meta parsed as it came."""
    _calibration: Frame | None = None
    _save_failed = False
    _published = True

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._early: list[tuple[Token, Frame]] = []
        """Frames that came before the scan start (a process that joins a running scan can be sent
        frames before it hears of the scan): held, and taken once it starts."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._darks: DarkStatistics | None = None
        self._centre_sum: np.ndarray | None = None
        self._dark_mean: np.ndarray | float | None = None
        self._centre_count = 0
        self._published = False
        self._held: list[Token] = []
        """The frames in the calibration being built: acknowledged once it is checkpointed."""
        self._calibration = None
        self._save_failed = False
        if not self._restore():
            self._publish_when_ready()
        early, self._early = self._early, []
        for token, frame in early:
            if frame.header.epoch == self.epoch:
                self._take(token, frame)

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        if header_name(header) == DETECTOR_HEADER:
            self._detector = ScanHeader.of(header)
            self._publish_when_ready()

    def on_frame(self, frame: Frame) -> None:
        token = self.hold()
        if self.scan is None:
            self._early.append((token, frame))
            return
        self._take(token, frame)

    def on_abort(self) -> int:
        dropped, self._early = len(self._early), []
        self._detector = None
        return dropped

    def _take(self, token: Token, frame: Frame) -> None:
        """One frame, held: released at once unless it goes into the calibration being built."""
        if self._published or (frame.header.frame >= self.scan.n_dark and self._centre() is not None):
            self.release(token)  # in the calibration already (a re-sent dark), or not needed
            return
        self._held.append(token)
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
        info = self._detector.meta.detector if self._detector else None
        if info is not None and info.beam_center_px is not None:
            return info.beam_center_px
        if self._centre_count and self._centre_count >= self.params.centre_frames:
            return centre_of_mass(self._centre_sum / self._centre_count)
        return None

    def _publish_when_ready(self) -> None:
        if self._published or self.scan is None or self._detector is None:
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
                self.count("lost", len(self._held))
                self._release_held()
            return
        bad = None
        arrays = {}
        if self._darks is not None:
            model = self._darks.result(hot_factor=self.params.hot_factor)
            bad = model.bad
            arrays["dark"] = model.mean
        if "pixel_mask" in self._detector.names:
            masked = self._detector.array("pixel_mask") != 0
            bad = masked if bad is None else bad | masked
        if bad is not None:
            arrays["bad"] = bad.view(np.uint8)
        self._published = True
        logger.info("scan %s: calibration from %d darks: %d bad pixels, centre %s",
                    self.scan.scan_id, darks, 0 if bad is None else int(bad.sum()), centre)
        self._calibration = Frame.from_arrays(
            scan_id=self.scan.scan_id, epoch=self.epoch, frame=0, origin=self.name, arrays=arrays,
            meta=Calibration(darks=darks, centre_px=(float(centre[0]), float(centre[1]))).to_meta())
        # Published even if it cannot be saved: the frame workers wait for it. Its frames stay
        # unacknowledged until it is saved (retried), so a successor could build it again.
        self.send_header(self._calibration)
        self.counters.delivered = darks
        self._save()

    def _save(self) -> None:
        """Checkpoint the calibration, then acknowledge the frames in it; retried until it works."""
        calibration, path = self._calibration, f"the checkpoint folder of scan {self.scan.scan_id}"
        try:
            path = self.checkpoint_dir() / CHECKPOINT
            checkpoint.save(path, {spec.name: calibration.array(spec.name) for spec in calibration.header.arrays},
                            calibration.header.meta)
        except OSError as exc:
            if not self._save_failed:
                self.report("checkpoint_failed", f"scan {self.scan.scan_id}: the calibration could not be saved "
                            f"to {path}: {exc}; its {len(self._held)} frames stay unacknowledged until it is "
                            f"(retried every {SAVE_RETRY_S:.0f} s)", path=str(path), errno=exc.errno)
            self._save_failed = True
            self.after(SAVE_RETRY_S, self._retry_save)
            return
        if self._save_failed:
            logger.info("scan %s: calibration saved to %s at last", self.scan.scan_id, path)
        self._save_failed = False
        self._release_held()

    def _retry_save(self) -> None:
        if self._save_failed and self.scan is not None and self._calibration is not None:
            self._save()

    def _release_held(self) -> None:
        held, self._held = self._held, []
        for token in held:
            self.release(token)

    def _restore(self) -> bool:
        """A successor mid-scan: publish the calibration its predecessor checkpointed, if any."""
        try:
            found = checkpoint.load(self.checkpoint_dir() / CHECKPOINT)
        except OSError as exc:
            logger.warning("scan %s: no checkpoint folder (%s); the calibration is built from the darks",
                           self.scan.scan_id, exc)
            return False
        if found is None:
            return False
        arrays, saved = found
        try:
            meta = Calibration.model_validate(saved)
        except ValidationError as exc:
            logger.warning("scan %s: the calibration checkpoint's meta is not a calibration (%s); it is built "
                           "from the darks", self.scan.scan_id, describe(exc))
            return False
        self._published = True
        self._calibration = Frame.from_arrays(scan_id=self.scan.scan_id, epoch=self.epoch, frame=0,
                                              origin=self.name, arrays=arrays, meta=meta.to_meta())
        logger.info("scan %s: calibration from %d darks restored from the checkpoint; publishing it again",
                    self.scan.scan_id, meta.darks)
        self.send_header(self._calibration)
        self.counters.delivered = meta.darks
        return True

    def on_scan_end(self) -> None:
        # Every frame of the scan is delivered: nothing is left to restore.
        try:
            shutil.rmtree(self.checkpoint_dir(), ignore_errors=True)
        except OSError:
            pass
