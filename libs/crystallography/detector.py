"""What the scan headers say about the detector, as the crystallography stages need it.

Shared by the peak stage (which searches corrected frames) and the hit server (which serves
them): the corrections of a frame and the geometry peakfinder8 works in.
"""

from __future__ import annotations

import logging

import numpy as np

from libs.common.contracts import CALIBRATION, DETECTOR_HEADER, header_name
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.crystallography.corrections import Corrections
from libs.crystallography.layouts import Layout

logger = logging.getLogger(__name__)


def _array(header: Frame | None, name: str, shape: tuple[int, int]) -> np.ndarray | None:
    if header is None or name not in {spec.name for spec in header.header.arrays}:
        return None
    array = header.array(name)
    if array.shape != shape:
        logger.warning("scan %s: the %s header's %s is %s, the frames are %s; not used",
                       header.header.scan_id, header_name(header), name, array.shape, shape)
        return None
    return array


def corrections(headers: dict[str, Frame], shape: tuple[int, int], *, flatfield: bool) -> Corrections:
    """The detector's pixel mask and flatfield (unless it says it applied it, or `flatfield` is
    off), and the dark stage's mean dark when the pipeline has one."""
    detector = headers.get(DETECTOR_HEADER)
    applied = bool(detector and detector.header.meta.get("config", {}).get("flatfield_correction_applied"))
    calibration = headers.get(CALIBRATION)
    return Corrections.build(shape, pixel_mask=_array(detector, "pixel_mask", shape),
                             flatfield=_array(detector, "flatfield", shape) if flatfield and not applied else None,
                             dark=_array(calibration, "dark", shape))


def beam_center(scan: ScanDescription | None, headers: dict[str, Frame], shape: tuple[int, int]) -> tuple[float, float]:
    """[y, x] from the scan description, else from the detector, else the frame's centre."""
    if scan is not None and scan.beam_center_px:
        return tuple(scan.beam_center_px)
    detector = headers.get(DETECTOR_HEADER)
    centre = detector.header.meta.get("detector", {}).get("beam_center_px") if detector else None
    if centre:
        return tuple(centre)
    logger.warning("no beam centre in the scan description or the detector header; using the frame's centre")
    return ((shape[0] - 1) / 2, (shape[1] - 1) / 2)


def layout(scan: ScanDescription | None, shape: tuple[int, int], asic_shape: tuple[int, int] | None) -> Layout:
    """The frame as a grid of ASICs: `asic_shape` from the stage's parameters, else from the scan's
    metadata, else the whole frame as one."""
    asic = asic_shape or (scan.metadata.get("asic_shape") if scan else None) or shape
    return Layout("detector", shape, tuple(asic))
