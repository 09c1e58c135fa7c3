"""`replay`: a file of frames streamed as a detector would, for offline runs.

Reads our own `<scan>_raw.cxi` or another program's HDF5/CXI/NeXus file. Chunks stored with the
bitshuffle (32008) or LZ4 (32004) filter are read with `read_direct_chunk` and travel compressed,
exactly as written; anything else is read as pixels. Geometry found in the file (CXI names, SI
units) goes into the series header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import h5py
import hdf5plugin  # noqa: F401 - registers the filters read_direct_chunk's fallback may need
import msgspec
import numpy as np
from scipy.constants import electron_volt

from libs.common.codecs import BITSHUFFLE_FILTER, LZ4_FILTER
from libs.common.detector import DetectorInfo, Event, Image, SeriesEnd, SeriesStart, StreamError
from libs.common.frames import ArraySpec

CANDIDATES = ("entry_1/data_1/data", "entry_1/instrument_1/detector_1/data", "entry/data/data",
              "entry/instrument/detector/data", "data")


def _dataset(f: h5py.File, name: str) -> h5py.Dataset:
    for candidate in ([name] if name else CANDIDATES):
        item = f.get(candidate)
        if isinstance(item, h5py.Dataset) and item.ndim == 3:
            return item
    raise StreamError(f"{f.filename}: no 3-D frame stack at {name or ' or '.join(CANDIDATES)}")


def _compression(dset: h5py.Dataset) -> str | None:
    """How chunks are stored, if we can pass them on as they are; None: read pixels."""
    plist = dset.id.get_create_plist()
    filters = [plist.get_filter(i)[:3] for i in range(plist.get_nfilters())]
    if dset.chunks != (1, *dset.shape[1:]):
        return None
    if not filters:
        return "none"
    # Stored bitshuffle options: (major, minor, element size, block size, compression; 2 = LZ4).
    if len(filters) == 1 and filters[0][0] == BITSHUFFLE_FILTER and filters[0][2][4:5] == (2,):
        return "bslz4"
    if len(filters) == 1 and filters[0][0] == LZ4_FILTER:
        return "lz4"
    return None


def _number(f: h5py.File, path: str) -> float | None:
    item = f.get(path)
    return float(item[()]) if isinstance(item, h5py.Dataset) and item.shape == () else None


def replay_events(path: str | Path, dataset: str = "") -> Iterator[Event]:
    path = Path(path)
    with h5py.File(path, "r") as f:
        dset = _dataset(f, dataset)
        stored = _compression(dset)
        numbers_item = dset.parent.get("frame_number")
        numbers = numbers_item[()] if isinstance(numbers_item, h5py.Dataset) and numbers_item.shape == dset.shape[:1] \
            else np.arange(dset.shape[0])
        detector = "entry_1/instrument_1/detector_1"
        energy = _number(f, "entry_1/instrument_1/source_1/energy")
        pixel = _number(f, f"{detector}/x_pixel_size"), _number(f, f"{detector}/y_pixel_size")
        info = DetectorInfo(shape=dset.shape[1:], dtype=dset.dtype.str, n_images=int((numbers >= 0).sum()),
                            energy_ev=energy / electron_volt if energy else None,
                            distance_m=_number(f, f"{detector}/distance"),
                            pixel_size_m=(pixel[1], pixel[0]) if all(pixel) else None)
        series = path.name.split(".")[0].removesuffix("_raw")
        yield SeriesStart(series=series, info=info, config={"replayed_file": str(path.resolve())})
        spec = ArraySpec(name="data", dtype=dset.dtype.str, shape=dset.shape[1:], compression=stored or "none")
        for index, number in enumerate(numbers):
            if number < 0:
                continue
            if stored is not None:
                mask, chunk = dset.id.read_direct_chunk((index, 0, 0))
                if mask == 0:
                    yield Image(series=series, frame=int(number), blobs=[(spec, chunk)])
                    continue
            pixels = np.ascontiguousarray(dset[index])
            plain = msgspec.structs.replace(spec, compression="none")
            yield Image(series=series, frame=int(number), blobs=[(plain, pixels.tobytes())])
        yield SeriesEnd(series=series)
