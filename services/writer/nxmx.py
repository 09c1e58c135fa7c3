"""`<scan_id>_master.h5`: a NeXus NXmx master beside a raw scan, so that DIALS, XDS and fabio
read the raw frames as they read a DECTRIS FileWriter series.

The layout is DECTRIS's: the NXmx 2022 fields that dxtbx and PyPI `nxmx` read (NXentry with
`definition = "NXmx"`, NXdetector with its `depends_on` chain, one NXdetector_module, NXbeam
`incident_wavelength` in angstrom, NXsample `depends_on`), and the legacy names XDS's Durin and
Neggia plugins read (`/entry/data/data_000001`, `detectorSpecific/{nimages, ntrigger,
x_pixels_in_detector, y_pixels_in_detector, pixel_mask}`, `detector_distance`, ...). McStas axes:
the beam along +z, y up; pixels run fast along -x, slow along -y, and the pixel directions' offset
puts the beam centre on the beam.

One copy of the pixels: `data_000001` is an external link into `<scan_id>_raw.cxi`, whose chunks
(bitshuffle/LZ4 as the detector sent them) readers decode themselves. The raw file places frames
by frame number, so the master's images are slots: `nimages` counts slots (the highest frame
number + 1, `ntrigger` 1), a slot no frame came for reads as zeros, and `/entry/data/frame_number`
says which slots hold frames (-1: none). A scan in several parts (a writer restarted mid-scan:
`<scan_id>_raw.part2.cxi`, ...) places frames by number in each part, so its `data_000001` is
a virtual dataset that takes each slot from the part that holds that frame; every slot it maps
is on disk. Only the first channel (`data_1`) is described.

`build` is a function of the scan description, the detector's header, the files and the frames
they hold; `write` puts it on disk whole or not at all (temporary file, then `os.replace`), so a
reader never meets half a master. The writer writes it when a raw part is created and again when
it closes: the master of an aborted scan, or of a killed writer, opens and points at what is on
disk (a killed writer's raw file opens with `swmr=True`, or after `h5clear -s`).
"""

from __future__ import annotations

import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy.constants import angstrom, electron_volt, h, speed_of_light

from libs.common.contracts import DetectorHeader, ScanHeader
from libs.common.frames import ArraySpec
from libs.common.messages import VERSION, ScanDescription
from services.writer.cxi import Geometry, detector_info, map_filters
from services.writer.disk import LIBVER_PLAIN

RAW_DATA = "/entry_1/data_1/data"
DETECTOR = "/entry/instrument/detector"
TRANSLATION = f"{DETECTOR}/transformations/translation"
FAST, SLOW = (-1.0, 0.0, 0.0), (0.0, -1.0, 0.0)
"""McStas directions of the detector's fast and slow pixel axes, seen from the sample."""

Part = tuple[str, Collection[int]]
"""A raw file of the scan (its name, beside the master) and the frame numbers it holds."""


def master_path(raw: Path) -> Path:
    """`<scan_id>_master.h5` beside `<scan_id>_raw.cxi` or `<scan_id>_raw.partN.cxi`."""
    return raw.with_name(re.sub(r"_raw(\.part\d+)?\.cxi$", "", raw.name) + "_master.h5")


def write(path: Path, *, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None, spec: ArraySpec,
          parts: list[Part], start_time: str, end_time: str | None = None) -> None:
    """Write the master whole, replacing the one there; HDF5 1.10 formats, not SWMR (no
    "open for writing" flag is left behind)."""
    temporary = path.with_name(f".{path.name}.tmp")
    try:
        with h5py.File(temporary, "w", libver=LIBVER_PLAIN) as f:
            build(f, scan=scan, header=header, spec=spec, parts=parts, start_time=start_time, end_time=end_time)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def _text(value: str) -> np.bytes_:
    """Fixed-length ASCII, as DECTRIS writes: every HDF5 reader, old or minimal, decodes it."""
    return np.bytes_(value.encode("ascii", "replace"))


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = _text(nx_class)
    return group


def _put(group: h5py.Group, name: str, value: Any, units: str | None = None, **attrs: Any) -> h5py.Dataset:
    if isinstance(value, np.ndarray) and value.ndim == 2:
        group.create_dataset(name, data=value, **map_filters(value))
    else:
        group[name] = _text(value) if isinstance(value, str) else value
    if units is not None:
        group[name].attrs["units"] = _text(units)
    for key, attr in attrs.items():
        group[name].attrs[key] = _text(attr) if isinstance(attr, str) else attr
    return group[name]


def _axis(group: h5py.Group, name: str, value: float | np.ndarray, units: str, kind: str,
          vector: tuple[float, ...], depends_on: str, offset: tuple[float, ...] | None = None) -> None:
    attrs: dict[str, Any] = {"transformation_type": kind, "vector": np.array(vector), "depends_on": depends_on}
    if offset is not None:
        attrs.update(offset=np.array(offset), offset_units=units)
    _put(group, name, value if isinstance(value, np.ndarray) else float(value), units, **attrs)


def frame_numbers(parts: list[Part]) -> np.ndarray:
    """Per slot, the frame number if some part holds that frame, else -1."""
    held = set().union(*(frames for _, frames in parts))
    slots = np.full(max(held) + 1 if held else 0, -1, "i8")
    slots[sorted(held)] = sorted(held)
    return slots


def _data(group: h5py.Group, spec: ArraySpec, parts: list[Part], slots: int) -> None:
    """`data_000001`: a link into the one raw file, or a virtual dataset over the parts."""
    if len(parts) == 1:
        group["data_000001"] = h5py.ExternalLink(parts[0][0], RAW_DATA)
        return
    layout = h5py.VirtualLayout(shape=(slots, *spec.shape), dtype=np.dtype(spec.dtype))
    for name, frames in parts:
        if not frames:
            continue
        source = h5py.VirtualSource(name, RAW_DATA, shape=(max(frames) + 1, *spec.shape), dtype=np.dtype(spec.dtype))
        for start, stop in _runs(sorted(frames)):
            layout[start:stop] = source[start:stop]
    group.create_virtual_dataset("data_000001", layout, fillvalue=0)


def _runs(numbers: list[int]) -> list[tuple[int, int]]:
    """Consecutive runs of sorted numbers as [start, stop) ranges: one mapping per run."""
    runs: list[tuple[int, int]] = []
    for n in numbers:
        if runs and runs[-1][1] == n:
            runs[-1] = (runs[-1][0], n + 1)
        else:
            runs.append((n, n + 1))
    return runs


def build(f: h5py.File, *, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None, spec: ArraySpec,
          parts: list[Part], start_time: str, end_time: str | None = None) -> None:
    """The NXmx tree of a raw scan in `f`: geometry from the scan description, else the header
    (cxi.Geometry), the other detector facts and the mask and flatfield from the header."""
    info = detector_info(header)
    config: dict[str, Any] = (header.meta.config if header else None) or {}
    """What else the header said, in the detector's own names."""
    arrays = header.names if header else set()
    geometry = Geometry.of(scan, header)
    numbers = frame_numbers(parts)
    rows, columns = spec.shape

    f.attrs["NX_class"] = _text("NXroot")
    f.attrs["default"] = _text("entry")
    entry = _group(f, "entry", "NXentry")
    entry.attrs["default"] = _text("data")
    _put(entry, "definition", "NXmx", version="1.0")
    _put(entry, "program_name", "surveyor", version=VERSION)
    if scan is not None:
        _put(entry, "experiment_identifier", scan.scan_id)
    _put(entry, "start_time", start_time)
    if end_time is not None:
        _put(entry, "end_time", end_time)

    data = _group(entry, "data", "NXdata")
    data.attrs["signal"] = _text("data_000001")
    _data(data, spec, parts, len(numbers))
    _put(data, "frame_number", numbers, description="frame number of each image; -1: no frame came for this "
         "slot (it reads as zeros)")

    instrument = _group(entry, "instrument", "NXinstrument")
    _put(instrument, "name", str(scan.metadata.get("beamline", "unknown")) if scan else "unknown")
    beam = _group(instrument, "beam", "NXbeam")
    if geometry.energy_ev:
        _put(beam, "incident_wavelength", h * speed_of_light / (geometry.energy_ev * electron_volt) / angstrom,
             "angstrom")
        _put(beam, "incident_energy", float(geometry.energy_ev), "eV")

    detector = _group(instrument, "detector", "NXdetector")
    _put(detector, "depends_on", TRANSLATION)
    distance = geometry.distance_m or 0.0
    pixel_y, pixel_x = geometry.pixel_size_m or (0.0, 0.0)
    centre_y, centre_x = geometry.beam_center_px or (0.0, 0.0)
    if geometry.distance_m:
        _put(detector, "distance", distance, "m")
        _put(detector, "detector_distance", distance, "m")
    if geometry.pixel_size_m:
        _put(detector, "x_pixel_size", pixel_x, "m")
        _put(detector, "y_pixel_size", pixel_y, "m")
    if geometry.beam_center_px:
        _put(detector, "beam_center_x", float(centre_x), "pixel")
        _put(detector, "beam_center_y", float(centre_y), "pixel")
    for key, name, unit in (("count_time_s", "count_time", "s"), ("frame_time_s", "frame_time", "s"),
                            ("sensor_thickness_m", "sensor_thickness", "m"),
                            ("threshold_energy_ev", "threshold_energy", "eV")):
        if getattr(info, key):
            _put(detector, name, float(getattr(info, key)), unit)
    for key, name in (("description", "description"), ("serial_number", "detector_number"),
                      ("sensor_material", "sensor_material")):
        if getattr(info, key):
            _put(detector, name, str(getattr(info, key)))
    _put(detector, "bit_depth_image", np.int32(np.dtype(spec.dtype).itemsize * 8))
    for key in ("bit_depth_readout", "saturation_value"):
        if isinstance(config.get(key), int) and not isinstance(config.get(key), bool):
            _put(detector, key, np.int64(config[key]))
    if isinstance(config.get("countrate_correction_count_cutoff"), int) and "saturation_value" not in detector:
        _put(detector, "saturation_value", np.int64(config["countrate_correction_count_cutoff"]))

    transformations = _group(detector, "transformations", "NXtransformations")
    _axis(transformations, "translation", distance, "m", "translation", (0.0, 0.0, 1.0), ".")
    module = _group(detector, "module", "NXdetector_module")
    _put(module, "data_origin", np.array([0, 0], "i4"))
    _put(module, "data_size", np.array([rows, columns], "i4"))
    _put(module, "data_stride", np.array([1, 1], "i4"))
    origin = (centre_x * pixel_x, centre_y * pixel_y, 0.0)
    _axis(module, "fast_pixel_direction", pixel_x, "m", "translation", FAST, TRANSLATION, origin)
    _axis(module, "slow_pixel_direction", pixel_y, "m", "translation", SLOW, TRANSLATION, origin)

    specific = _group(detector, "detectorSpecific", "NXcollection")
    _put(specific, "nimages", np.int64(len(numbers)), description="images (frame-number slots) in data_000001")
    _put(specific, "ntrigger", np.int64(1))
    _put(specific, "x_pixels_in_detector", np.int32(columns))
    _put(specific, "y_pixels_in_detector", np.int32(rows))
    if geometry.energy_ev:
        _put(specific, "photon_energy", float(geometry.energy_ev), "eV")
    for key in ("eiger_fw_version", "software_version"):  # an Eiger's: DIALS reads its data_NNNNNN then
        if isinstance(config.get(key), str):
            _put(specific, key, config[key])
    mask = header.array("pixel_mask").astype(np.uint32) if "pixel_mask" in arrays else np.zeros(spec.shape, np.uint32)
    masked = _put(specific, "pixel_mask", mask, description="DECTRIS bits (0 gap, 1 dead, 2 cold, 3 hot, 4 noisy)"
                  if "pixel_mask" in arrays else "the detector sent no pixel mask")
    detector["pixel_mask"] = h5py.SoftLink(masked.name)
    _put(detector, "pixel_mask_applied", np.bool_(config.get("pixel_mask_applied") is True))
    if "flatfield" in arrays:
        flat = _put(specific, "flatfield", header.array("flatfield").astype(np.float32))
        detector["flatfield"] = h5py.SoftLink(flat.name)

    sample = _group(entry, "sample", "NXsample")
    _put(sample, "name", scan.scan_id if scan else "unknown")
    _put(sample, "depends_on", "/entry/sample/transformations/omega")
    # Still shots: omega is 0 for every image (dxtbx counts the images along the sample's axis).
    _axis(_group(sample, "transformations", "NXtransformations"), "omega", np.zeros(max(len(numbers), 1)),
          "degree", "rotation", (-1.0, 0.0, 0.0), ".")
    source = _group(entry, "source", "NXsource")
    _put(source, "name", str(scan.metadata.get("source", "unknown")) if scan else "unknown")
