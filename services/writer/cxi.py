"""CXI 1.6 conventions the writer's files share: time stamps, units, the mask bits, the detector's metadata."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timezone

import h5py
import numpy as np
from scipy.constants import electron_volt, physical_constants, speed_of_light

from libs.common.contracts import DetectorHeader, ScanHeader
from libs.common.detector import DetectorInfo
from libs.common.messages import ScanDescription

TIME = h5py.string_dtype("ascii", 40)

# CXI 1.6 mask bits for DECTRIS pixel-mask bits (gap, dead, cold, hot, noisy; others "bad").
CXI_INVALID, CXI_HOT, CXI_DEAD, CXI_BAD, CXI_MISSING, CXI_NOISY = 0x1, 0x4, 0x8, 0x80, 0x200, 0x400
EIGER_TO_CXI = ((0, CXI_MISSING), (1, CXI_DEAD), (2, CXI_BAD), (3, CXI_HOT), (4, CXI_NOISY))


def cxi_mask(pixel_mask: np.ndarray) -> np.ndarray:
    """A detector's pixel mask in CXI bits: every flagged pixel is also `invalid`."""
    pixel_mask = pixel_mask.astype(np.uint32)
    known = sum(1 << bit for bit, _ in EIGER_TO_CXI)
    # The known bits through a table of every combination of them (one pass over the pixels, not
    # one per bit: the recorded 1M's 1.1 Mpx in 9 ms instead of 44); any other bit is `bad`.
    table = np.zeros(known + 1, np.uint32)
    for value in range(1, known + 1):
        table[value] = CXI_INVALID | sum(cxi for bit, cxi in EIGER_TO_CXI if value & (1 << bit))
    mask = table[pixel_mask & np.uint32(known)]
    mask[(pixel_mask & ~np.uint32(known)) != 0] |= np.uint32(CXI_BAD | CXI_INVALID)
    return mask


def wavelength_a(energy_ev: float) -> float:
    """The X-ray wavelength in ångström of a photon energy in eV (hc = 12398.42 eV Å)."""
    return round(1e10 * physical_constants["Planck constant in eV/Hz"][0] * speed_of_light / energy_ev, 6)


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def map_filters(array: np.ndarray) -> dict:
    """h5py keywords for a detector map (pixel mask, flatfield), written at every scan's start and
    end (the master's copy too), where every millisecond holds up the scan's first frames: masks
    are mostly zeros and deflate fast (gzip, which every HDF5 reads); a flatfield's floats are
    stored as they are (the recorded 1M's 4.4 MB: a few ms, where shuffle and deflate took 100-240
    ms on two cores for a fifth less space)."""
    if array.dtype.kind == "f":
        return {}
    return {"compression": "gzip", "compression_opts": 2}


def put(group: h5py.Group, name: str, value: float | np.ndarray, unit: str) -> None:
    group[name] = value
    group[name].attrs["units"] = unit


@dataclass(frozen=True)
class Geometry:
    """What the scan description says, else what the detector's header says (SI, [y, x])."""

    energy_ev: float | None
    distance_m: float | None
    pixel_size_m: tuple[float, float] | None
    beam_center_px: tuple[float, float] | None

    @classmethod
    def of(cls, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None) -> Geometry:
        info = detector_info(header)
        pixel = info.pixel_size_m or ((scan.pixel_size_m,) * 2 if scan and scan.pixel_size_m else None)
        return cls(energy_ev=(scan.energy_ev if scan else None) or info.energy_ev,
                   distance_m=(scan.distance_m if scan else None) or info.distance_m,
                   pixel_size_m=tuple(pixel) if pixel else None,
                   beam_center_px=(scan.beam_center_px if scan else None) or info.beam_center_px)


def detector_info(header: ScanHeader[DetectorHeader] | None) -> DetectorInfo:
    """What the detector's header says of the detector (nothing, without one or for a synthetic series)."""
    return header.meta.detector if header is not None and header.meta.detector is not None else DetectorInfo()


def detector_metadata(entry: h5py.Group, scan: ScanDescription | None,
                      header: ScanHeader[DetectorHeader] | None) -> None:
    """Scan and detector facts (geometry, energy, mask, flatfield) under `entry`, CXI names and SI units."""
    detector = entry["instrument_1/detector_1"]
    info = detector_info(header)
    if scan is not None:
        entry["experiment_identifier"] = scan.scan_id
        entry["scan_description"] = scan.model_dump_json()
    geometry = Geometry.of(scan, header)
    if geometry.energy_ev:
        put(entry, "instrument_1/source_1/energy", geometry.energy_ev * electron_volt, "J")
    if geometry.distance_m:
        put(detector, "distance", geometry.distance_m, "m")
    if geometry.pixel_size_m:
        put(detector, "y_pixel_size", geometry.pixel_size_m[0], "m")
        put(detector, "x_pixel_size", geometry.pixel_size_m[1], "m")
    if geometry.beam_center_px:
        put(detector, "beam_center_y", geometry.beam_center_px[0], "pixel")
        put(detector, "beam_center_x", geometry.beam_center_px[1], "pixel")
    for key, name, unit in (("count_time_s", "count_time", "s"), ("frame_time_s", "frame_time", "s"),
                            ("sensor_thickness_m", "sensor_thickness", "m")):
        if getattr(info, key):
            put(detector, name, getattr(info, key), unit)
    if info.threshold_energy_ev:
        put(detector, "threshold_energy", info.threshold_energy_ev * electron_volt, "J")
    for key in ("description", "serial_number", "sensor_material"):
        if getattr(info, key):
            detector[key] = getattr(info, key)
    if header is not None:
        detector["detector_config"] = json.dumps(header.meta.config or {})
        names = header.names
        if "pixel_mask" in names:
            mask = cxi_mask(header.array("pixel_mask"))
            detector.create_dataset("mask", data=mask, **map_filters(mask))
        if "flatfield" in names:
            flatfield = header.array("flatfield")
            flat = detector.create_dataset("flatfield", data=flatfield, **map_filters(flatfield))
            flat.attrs["description"] = "multiplicative flatfield the detector applied or expects"
