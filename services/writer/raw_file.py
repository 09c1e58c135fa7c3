"""`<scan_id>_raw.cxi`: the frames as received, placed by frame number (INTERFACES.md).

Each frame is one HDF5 chunk written directly (`write_direct_chunk`): the bytes that arrived are
the bytes on disk, with no conversion on the way. Slots of frames that never came keep
frame_number -1, so gaps are visible; a frame that comes twice is written once.
"""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np

GROW = 256
"""Frames added to the datasets at a time; the file is trimmed to the last frame on close."""


class RawFile:
    def __init__(self, path: Path, *, shape: tuple[int, ...], dtype: str) -> None:
        self.path = path
        self.shape = tuple(shape)
        self.dtype = np.dtype(dtype)
        self.written: set[int] = set()
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(path, "w", libver="latest")
        self._file["cxi_version"] = 160
        data_group = self._file.create_group("entry_1/data_1")
        self._data = data_group.create_dataset("data", shape=(0, *self.shape), maxshape=(None, *self.shape),
                                               chunks=(1, *self.shape), dtype=self.dtype)
        self._data.attrs["axes"] = "experiment_identifier:y:x"
        self._numbers = data_group.create_dataset("frame_number", shape=(0,), maxshape=(None,),
                                                  chunks=(GROW,), dtype="i8", fillvalue=-1)

    def write(self, number: int, chunk: memoryview | bytes) -> bool:
        """Put one frame's bytes in its slot; False if that frame is already in the file."""
        if number in self.written:
            return False
        if number >= self._data.shape[0]:
            size = max(number + 1, self._data.shape[0] + GROW)
            self._data.resize(size, axis=0)
            self._numbers.resize(size, axis=0)
        self._data.id.write_direct_chunk((number, *([0] * len(self.shape))), chunk)
        self._numbers[number] = number
        self.written.add(number)
        return True

    def close(self) -> None:
        if not self._file.id.valid:
            return
        size = max(self.written) + 1 if self.written else 0
        self._data.resize(size, axis=0)
        self._numbers.resize(size, axis=0)
        self._file.close()
