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

from pathlib import Path

import h5py
import numpy as np

from libs.common import codecs
from libs.common.frames import ArraySpec, Frame
from libs.common.messages import VERSION, ScanDescription
from services.writer.cxi import TIME, detector_metadata, now_iso

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
        detector_metadata(entry, scan, header)
        f.swmr_mode = True

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
