"""`<scan_id>_raw.cxi`: the frames as received, placed by frame number (INTERFACES.md).

Each frame is one HDF5 chunk written directly (`write_direct_chunk`): the bytes that arrived are
the bytes on disk. A bitshuffle/LZ4 blob is a valid chunk of a dataset with filter 32008 options
(0, 2), an LZ4 blob of one with filter 32004, so compressed frames are never decompressed to be
written. Slots of frames that never came keep frame_number -1, so gaps are visible; a frame that
comes twice is written once.

The file is in SWMR mode from its first frame: every object exists before that (HDF5 cannot add
any afterwards), and `flush` makes what was written visible to live readers and safe from a crash
of this process. Metadata is CXI 1.6 and SI (energy in J, lengths in m).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import h5py
import numpy as np
from scipy.constants import electron_volt

from libs.common import codecs
from libs.common.frames import ArraySpec, Frame
from libs.common.messages import VERSION, ScanDescription
from services.writer.cxi import TIME, cxi_mask, now_iso, put

GROW = 256
"""Frames added to the datasets at a time; the file is trimmed to the last frame on close."""
class RawFile:
    def __init__(self, path: Path, *, specs: tuple[ArraySpec, ...], scan: ScanDescription | None,
                 header: Frame | None, previous_parts: tuple[str, ...] = ()) -> None:
        self.path = path
        self.specs = specs
        self.written: set[int] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(path, "w", libver="latest")
        f = self._file
        f["cxi_version"] = 160
        entry = f.create_group("entry_1")
        entry["program_name"] = f"surveyor {VERSION}"
        entry["start_time"] = np.array(now_iso(), dtype=TIME)
        self._end_time = entry.create_dataset("end_time", shape=(), dtype=TIME)
        if previous_parts:
            entry["previous_parts"] = list(previous_parts)
            entry["previous_parts"].attrs["description"] = (
                "earlier files of this scan, from a writer that stopped mid-scan (open them with swmr=True)")
        self._datasets: list[h5py.Dataset] = []
        self._numbers: list[h5py.Dataset] = []
        self._capacity = 0
        self._slots = np.empty(0, "i8")
        """Frame number per slot (-1: not received), written to `frame_number` at each flush."""
        for index, spec in enumerate(specs, start=1):
            group = entry.create_group(f"data_{index}")
            data = group.create_dataset("data", shape=(0, *spec.shape), maxshape=(None, *spec.shape),
                                        chunks=(1, *spec.shape), dtype=np.dtype(spec.dtype),
                                        **codecs.hdf5_filter(spec.compression))
            data.attrs["axes"] = "frame_number:y:x"
            if spec.name != "data":
                data.attrs["channel"] = spec.name
            self._datasets.append(data)
            self._numbers.append(group.create_dataset("frame_number", shape=(0,), maxshape=(None,),
                                                      chunks=(GROW,), dtype="i8", fillvalue=-1))
        detector = entry.create_group("instrument_1/detector_1")
        detector["data"] = h5py.SoftLink("/entry_1/data_1/data")
        self._metadata(entry, scan, header)
        f.swmr_mode = True

    def _metadata(self, entry: h5py.Group, scan: ScanDescription | None, header: Frame | None) -> None:
        detector = entry["instrument_1/detector_1"]
        info: dict[str, Any] = header.header.meta.get("detector", {}) if header else {}
        if scan is not None:
            entry["experiment_identifier"] = scan.scan_id
            entry["scan_description"] = scan.model_dump_json()
        energy = (scan.energy_ev if scan else None) or info.get("energy_ev")
        if energy:
            put(entry, "instrument_1/source_1/energy", energy * electron_volt, "J")
        distance = (scan.distance_m if scan else None) or info.get("distance_m")
        if distance:
            put(detector, "distance", distance, "m")
        pixel = info.get("pixel_size_m") or ([scan.pixel_size_m] * 2 if scan and scan.pixel_size_m else None)
        if pixel:
            put(detector, "y_pixel_size", pixel[0], "m")
            put(detector, "x_pixel_size", pixel[1], "m")
        center = (scan.beam_center_px if scan else None) or info.get("beam_center_px")
        if center:
            put(detector, "beam_center_y", center[0], "pixel")
            put(detector, "beam_center_x", center[1], "pixel")
        for key, name, unit in (("count_time_s", "count_time", "s"), ("frame_time_s", "frame_time", "s"),
                                ("sensor_thickness_m", "sensor_thickness", "m")):
            if info.get(key):
                put(detector, name, info[key], unit)
        if info.get("threshold_energy_ev"):
            put(detector, "threshold_energy", info["threshold_energy_ev"] * electron_volt, "J")
        for key in ("description", "serial_number", "sensor_material"):
            if info.get(key):
                detector[key] = info[key]
        if header is not None:
            detector["detector_config"] = json.dumps(header.header.meta.get("config", {}))
            names = {spec.name for spec in header.header.arrays}
            if "pixel_mask" in names:
                detector.create_dataset("mask", data=cxi_mask(header.array("pixel_mask")), compression="gzip")
            if "flatfield" in names:
                flat = detector.create_dataset("flatfield", data=header.array("flatfield"), compression="gzip")
                flat.attrs["description"] = "multiplicative flatfield the detector applied or expects"

    def write(self, frame: Frame) -> bool:
        """Put one frame's blobs in their slots; False if that frame is already in the file."""
        number = frame.header.frame
        if number in self.written:
            return False
        if number >= self._capacity:
            self._capacity = max(number + 1, self._capacity + GROW)
            for data in self._datasets:
                data.resize(self._capacity, axis=0)
            self._slots = np.concatenate([self._slots, np.full(self._capacity - len(self._slots), -1, "i8")])
        for data, spec in zip(self._datasets, self.specs, strict=True):
            data.id.write_direct_chunk((number, *([0] * len(spec.shape))), frame.raw(spec.name))
        self._slots[number] = number
        self.written.add(number)
        return True

    def flush(self) -> None:
        """Frame numbers go to disk here, in one write: per frame they would cost more than the pixels."""
        for numbers in self._numbers:
            if numbers.shape[0] != self._capacity:
                numbers.resize(self._capacity, axis=0)
            numbers[:] = self._slots
        self._file.flush()

    def close(self) -> None:
        if not self._file.id.valid:
            return
        self.flush()
        size = max(self.written) + 1 if self.written else 0
        for data, numbers in zip(self._datasets, self._numbers, strict=True):
            data.resize(size, axis=0)
            numbers.resize(size, axis=0)
        self._end_time[()] = now_iso().encode()
        self._file.close()
