"""The image stage: STXM transmission, DPC phase and a probe estimate from the clean frames,
published as previews (`preview.<stage>`) every `preview_interval_s` while the scan runs and
once more at its end. Cheap per frame (a sum and a centre of mass); the images are rebuilt
only when a preview is due.
"""

from __future__ import annotations

import time

import numpy as np

from libs.common.contracts import FRAMES_HEADER, CleanFrame, FramesHeader, header_name
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime
from libs.ptychography import optics
from services.image_worker import stxm
from services.image_worker.params import Params


class Service(Runtime):
    Params = Params
    _geometry: FramesHeader | None = None
    """The frames header's meta (the geometry of the clean frames), parsed as it came."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        count = scan.n_frames or len(scan.positions_m or ())
        self._moments = np.full((count, 3), np.nan)
        self._pattern_sum: np.ndarray | None = None
        self._next_preview = time.monotonic() + self.params.preview_interval_s

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        if header_name(header) == FRAMES_HEADER:
            self._geometry = FramesHeader.of(header)

    def on_abort(self) -> int:
        self._geometry = None
        return 0

    def on_frame(self, frame: Frame) -> None:
        index = CleanFrame.of(frame).index
        data, mask = frame.array("data"), frame.array("mask")
        if 0 <= index < len(self._moments):
            self._moments[index] = stxm.frame_moments(data, mask)
        self._pattern_sum = data.astype(np.float64) + (0 if self._pattern_sum is None else self._pattern_sum)
        if time.monotonic() >= self._next_preview:
            self._publish()

    def on_scan_end(self) -> None:
        self._publish()

    def _publish(self) -> None:
        self._next_preview = time.monotonic() + self.params.preview_interval_s
        images = self.images()
        if images:
            self.preview("stxm", images, frames=int(np.isfinite(self._moments[:, 0]).sum()))

    def images(self) -> dict[str, np.ndarray]:
        """Transmission, DPC phase and the probe amplitude estimated from the mean pattern."""
        scan, geometry = self.scan, self._geometry
        if scan is None or not scan.positions_m or geometry is None or self._pattern_sum is None:
            return {}
        seen = np.isfinite(self._moments[:, 0])
        if seen.sum() < 4:
            return {}
        positions = np.asarray(scan.positions_m)[: len(self._moments)][seen]
        total, com_y, com_x = self._moments[seen].T
        step = stxm.scan_step_m(positions)
        transmission = stxm.on_grid(positions, total / total.max(), step)
        images = {"transmission": transmission.astype(np.float32)}
        if geometry.placed:
            wavelength = optics.wavelength_m(geometry.energy_ev)
            gradients = [stxm.on_grid(positions, stxm.phase_gradient(
                c - c.mean(), detector_pixel_m=geometry.pixel_size_m, distance_m=geometry.distance_m,
                wavelength_m=wavelength), step) for c in (com_y, com_x)]
            images["dpc_phase"] = stxm.integrate_gradients(*gradients, step).astype(np.float32)
        probe = optics.probe_from_patterns(self._pattern_sum / seen.sum())
        images["probe_amplitude"] = np.abs(probe).astype(np.float32)
        return images
