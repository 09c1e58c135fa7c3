"""`<scan_id>_raw.cxi`: the frames as received, placed by frame number (INTERFACES.md).

Each frame is one HDF5 chunk written directly (`write_direct_chunk`): the bytes that arrived are
the bytes on disk. A bitshuffle/LZ4 blob is a valid chunk of a dataset with filter 32008 options
(0, 2), an LZ4 blob of one with filter 32004, so compressed frames are never decompressed to be
written. Slots of frames that never came keep frame_number -1, so gaps are visible; a frame that
comes twice is written once, and a continuation (`<scan_id>_raw.partN.cxi`, after a writer that
stopped mid-scan) leaves out the frames the earlier parts already hold.

The file is in SWMR mode from its first frame: every object exists before that (HDF5 cannot add
any afterwards), and `flush` makes what was written visible to live readers and safe from a crash
of this process. Metadata is CXI 1.6 and SI (energy in J, lengths in m).

After a failed write or flush (a full disk, a read-only file system) the HDF5 handle is not
trusted again: a chunk written again through it after ENOSPC reads back as fill value. `recover`
closes it, opens the file anew and writes again every frame since the last flush that succeeded.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np

from libs.common import codecs
from libs.common.contracts import DetectorHeader, FrameMeta, ScanHeader
from libs.common.frames import ArraySpec, Frame
from libs.common.messages import VERSION, ScanDescription
from services.writer import nxmx
from services.writer.cxi import TIME, detector_metadata, now_iso
from services.writer.disk import LIBVER, Parts, ScanFile, close_all, frames_in, mark, quiet_close

GROW = 256
"""Frames added to the datasets at a time; the file is trimmed to the last frame on close."""



class RawFile(ScanFile):
    takes: ClassVar[tuple[type, ...]] = (object,)
    """Any frame of the arrays it was opened for: a record is written as it came too."""

    def __init__(self, path: Path, *, specs: tuple[ArraySpec, ...], scan: ScanDescription | None,
                 header: ScanHeader[DetectorHeader] | None, epoch: int = 0, parts: Parts | None = None) -> None:
        self.path = path
        self.specs = specs
        self.master = nxmx.master_path(path)
        """The scan's NXmx master (nxmx.py), written with this part and again when it closes."""
        self._described = (scan, header, now_iso())
        self.earlier: set[int] = set()
        """Frames the scan's earlier parts hold: not written again."""
        self._earlier_parts: list[nxmx.Part] = []
        for earlier, f in (opened := parts.read("frame numbers") if parts else []):
            held = frames_in(f)
            self.earlier |= held
            self._earlier_parts.append((earlier.name, held))
        close_all(opened)
        self.written: set[int] = set()
        self.committed: set[int] = set()
        """Frames of this file on disk: written and flushed."""
        self._pending: dict[int, Frame] = {}
        """Frames written since the last flush that succeeded: written again by `recover`."""
        self.broken = False
        self._capacity = 0
        self._slots = np.empty(0, "i8")
        """Frame number per slot (-1: not received), written to `frame_number` at each flush."""
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(path, "w", libver=LIBVER)
        try:
            self._create(scan, header, epoch, [p.name for p in parts.earlier] if parts else [])
        except BaseException:
            self._file.close()
            raise

    def _create(self, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None, epoch: int,
                previous: list[str]) -> None:
        f = self._file
        mark(f, scan.scan_id if scan else "", epoch)
        f["cxi_version"] = 160
        entry = f.create_group("entry_1")
        entry["program_name"] = f"surveyor {VERSION}"
        entry["start_time"] = np.array(self._described[2], dtype=TIME)
        entry.create_dataset("end_time", shape=(), dtype=TIME)
        if previous:
            entry["previous_parts"] = previous
            entry["previous_parts"].attrs["description"] = (
                "earlier files of this scan, from a writer that stopped mid-scan (open them with swmr=True); "
                "the frames they hold are not in this file")
        for index, spec in enumerate(self.specs, start=1):
            group = entry.create_group(f"data_{index}")
            data = group.create_dataset("data", shape=(0, *spec.shape), maxshape=(None, *spec.shape),
                                        chunks=(1, *spec.shape), dtype=np.dtype(spec.dtype),
                                        **codecs.hdf5_filter(spec.compression))
            data.attrs["axes"] = "frame_number:y:x"
            if spec.name != "data":
                data.attrs["channel"] = spec.name
            group.create_dataset("frame_number", shape=(0,), maxshape=(None,), chunks=(GROW,), dtype="i8",
                                 fillvalue=-1)
        detector = entry.create_group("instrument_1/detector_1")
        detector["data"] = h5py.SoftLink("/entry_1/data_1/data")
        detector["frame_number"] = h5py.SoftLink("/entry_1/data_1/frame_number")
        detector_metadata(entry, scan, header)
        f.swmr_mode = True
        self._bind()
        self._write_master()

    def _write_master(self, end_time: str | None = None) -> None:
        """The master as the scan's files stand: this part with the frames it has flushed."""
        scan, header, start_time = self._described
        nxmx.write(self.master, scan=scan, header=header, spec=self.specs[0], start_time=start_time,
                   end_time=end_time, parts=[*self._earlier_parts, (self.path.name, self.committed)])

    def _bind(self) -> None:
        entry = self._file["entry_1"]
        self._end_time = entry["end_time"]
        self._datasets = [entry[f"data_{i}/data"] for i in range(1, len(self.specs) + 1)]
        self._numbers = [entry[f"data_{i}/frame_number"] for i in range(1, len(self.specs) + 1)]

    def cost(self, frame: Frame, meta: FrameMeta = None) -> int:
        """Bytes a frame takes on disk, about."""
        return sum(frame.raw(spec.name).nbytes for spec in self.specs) + 64

    def write(self, frame: Frame, meta: FrameMeta = None) -> bool:
        """Put one frame's blobs in their slots; False if that frame is already in the scan's files.
        Its meta (None for a detector frame) is not written."""
        number = frame.header.frame
        if number in self.written or number in self.earlier:
            return False
        self._store(frame)
        self._slots[number] = number
        self.written.add(number)
        self._pending[number] = frame
        return True

    def _store(self, frame: Frame) -> None:
        number = frame.header.frame
        if number >= self._capacity:
            capacity = max(number + 1, self._capacity + GROW)
            for data in self._datasets:
                data.resize(capacity, axis=0)
            self._slots = np.concatenate([self._slots, np.full(capacity - len(self._slots), -1, "i8")])
            self._capacity = capacity
        for data, spec in zip(self._datasets, self.specs, strict=True):
            data.id.write_direct_chunk((number, *([0] * len(spec.shape))), frame.raw(spec.name))

    def flush(self) -> None:
        """Frame numbers go to disk here, in one write: per frame they would cost more than the pixels."""
        for numbers in self._numbers:
            if numbers.shape[0] != self._capacity:
                numbers.resize(self._capacity, axis=0)
            numbers[:] = self._slots
        self._file.flush()
        self.committed.update(self._pending)
        self._pending.clear()

    def recover(self) -> None:
        """After a failed write or flush: open the file again and write what was not flushed."""
        quiet_close(self._file)
        self._file = h5py.File(self.path, "r+", libver=LIBVER)
        self._bind()
        for data in self._datasets:
            if data.shape[0] != self._capacity:
                data.resize(self._capacity, axis=0)
        self._file.swmr_mode = True
        for frame in self._pending.values():
            self._store(frame)
        self.flush()
        self.broken = False

    def redo_cost(self) -> int:
        return sum(self.cost(frame) for frame in self._pending.values())

    def close(self) -> None:
        if not self._file.id.valid:
            return
        self.flush()
        size = max(self.written) + 1 if self.written else 0
        for data, numbers in zip(self._datasets, self._numbers, strict=True):
            data.resize(size, axis=0)
            numbers.resize(size, axis=0)
        end_time = now_iso()
        self._end_time[()] = end_time.encode()
        self._file.close()
        self._write_master(end_time)

    def abandon(self) -> None:
        quiet_close(self._file)

