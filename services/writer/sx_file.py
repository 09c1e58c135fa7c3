"""`<scan_id>.cxi` for serial crystallography, and the scan's aggregation: Cheetah's layout, which
CrystFEL's indexamajig reads with `peak_list_type = cxi` (INTERFACES.md; reference/peakfinder8.md 10).

- `/entry_1/data_1/data`: the hit frames, one chunk each, as the detector sent them (a
  bitshuffle/LZ4 blob is written as it came); `/entry_1/instrument_1/detector_1/mask` flags the
  pixels without data, CXI bits.
- `/entry_1/result_1`: one row per hit, same order: `nPeaks` and `peakXPosRaw`, `peakYPosRaw`
  (slab pixel index, the centre of pixel (0, 0) at (0, 0)), `peakTotalIntensity`,
  `peakMaximumValue`, `peakNPixels`, `peakSNR` (the signal-to-noise ratio; OM writes the local
  background sigma there, which is `peakBackgroundSigma` here), and `frame_number`.
- `/entry_1/result_2/{frame_number, n_peaks, hit}`: every frame searched, in arrival order.
- `/entry_1/image_1`: sum of the hits, `image_2`: sum of the other frames (both corrected, with
  `n_frames`), `image_3`: the virtual powder pattern of the hits' peaks. Written when the scan ends.

The writer is the one process that sees every frame's record, so it also keeps the aggregates
the front-ends watch: the class sums (merged from the peak processes' partial sums), the virtual
powder and the hit rate over the last `window` frames (`preview`).

A CrystFEL geometry file, `<scan_id>.geom`, goes next to the file: with it,
`indexamajig -i files.lst -g <scan_id>.geom --peaks=cxi` indexes the hits with our peaks.
The file is in SWMR mode from the start, like the raw file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from libs.common import codecs
from libs.common.frames import Frame
from libs.common.messages import VERSION, ScanDescription
from libs.crystallography.hits import CLASSES, ClassSums, HitRate, SumsDelta, add_to_powder
from services.writer.cxi import CXI_INVALID, TIME, Geometry, detector_metadata, now_iso

logger = logging.getLogger(__name__)

PEAK_COLUMNS = {"peakXPosRaw": "fs", "peakYPosRaw": "ss", "peakTotalIntensity": "intensity",
                "peakMaximumValue": "max_pixel_intensity", "peakNPixels": "num_pixels", "peakSNR": "snr",
                "peakBackgroundSigma": "sigma"}
"""Cheetah's names for the peak list's fields."""
PREVIEW_SIDE = 256
"""Largest side of the virtual powder sent as a preview (binned down to it)."""


class SxFile:
    def __init__(self, path: Path, *, scan: ScanDescription | None, header: Frame | None, record: Frame,
                 window: int) -> None:
        self.path = path
        self.written: set[int] = set()
        frame = record.header.meta["frame"]
        self.shape = tuple(frame["shape"])
        self.width = int(record.header.meta["max_num_peaks"])
        self.sums = ClassSums(self.shape)
        self.powder = np.zeros(self.shape, np.float64)
        self._factor = -(-max(self.shape) // PREVIEW_SIDE)
        self._powder_preview = np.zeros((self.shape[0] // self._factor, self.shape[1] // self._factor))
        """The virtual powder binned for display, kept up to date peak by peak."""
        self.hit_rate = HitRate(window)
        self._rows: list[tuple[int, int, bool]] = []
        self._peaks: list[tuple[int, int, dict[str, np.ndarray]]] = []
        """Rows of result_2 and result_1 not yet on disk."""
        self.hits = 0

        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = f = h5py.File(path, "w", libver="latest")
        f["cxi_version"] = 160
        entry = f.create_group("entry_1")
        entry["program_name"] = f"surveyor {VERSION}"
        entry["start_time"] = np.array(now_iso(), dtype=TIME)
        self._end_time = entry.create_dataset("end_time", shape=(), dtype=TIME)
        self._data = entry.create_dataset(
            "data_1/data", shape=(0, *self.shape), maxshape=(None, *self.shape), chunks=(1, *self.shape),
            dtype=np.dtype(frame["dtype"]), **codecs.hdf5_filter(frame["compression"]))
        self._data.attrs["axes"] = "experiment_identifier:y:x"
        entry.create_group("instrument_1/detector_1")["data"] = h5py.SoftLink("/entry_1/data_1/data")
        detector_metadata(entry, scan, header)

        result = entry.create_group("result_1")
        self._n_peaks = _growing(result, "nPeaks", "i4")
        self._columns = {name: _growing(result, name, "f4", self.width) for name in PEAK_COLUMNS}
        self._hit_frames = _growing(result, "frame_number", "i8")
        result["data"] = h5py.SoftLink("/entry_1/result_1/peakTotalIntensity")
        result["peakBackgroundSigma"].attrs["description"] = "local background sigma (OM's 'snr')"
        every = entry.create_group("result_2")
        self._every = {name: _growing(every, name, dtype) for name, dtype in
                       (("frame_number", "i8"), ("n_peaks", "i4"), ("hit", "u1"))}
        self._images = []
        for index, (what, count) in enumerate((("sum of the hits (corrected frames)", True),
                                               ("sum of the frames that are not hits (corrected)", True),
                                               ("virtual powder pattern: the hits' peak intensities", False)),
                                              start=1):
            image = entry.create_group(f"image_{index}")
            image["data"] = np.zeros(self.shape)
            image["data_type"] = "intensity"
            image["description"] = what
            if count:
                image.create_dataset("n_frames", shape=(), dtype="i8", data=0)
            self._images.append(image)
        f.swmr_mode = True
        self.geometry = path.with_suffix(".geom")
        self.geometry.write_text(crystfel_geometry(path, scan, header, self.shape))

    def write(self, record: Frame) -> bool:
        """Take one frame's record: its row, its peaks and frame if a hit, its class sums if any."""
        number, meta = record.header.frame, record.header.meta
        if number in self.written:
            return False
        self.written.add(number)
        hit, n_peaks = bool(meta["hit"]), int(meta["n_peaks"])
        self._rows.append((number, n_peaks, hit))
        self.hit_rate.add(hit)
        names = {spec.name for spec in record.header.arrays}
        sums = {cls: record.array(f"{name}_sum") for cls, name in enumerate(CLASSES) if f"{name}_sum" in names}
        if "sum_frames" in meta:
            delta = SumsDelta(np.asarray(meta["sum_frames"], np.int64), sums, meta["summed"])
            if not self.sums.merge(delta):
                logger.warning("scan %s: class sums of frames %s left out: some were summed already "
                               "(a peak process was declared dead and came back)", record.header.scan_id,
                               _span(delta.numbers))
        if hit:
            peaks = {field: record.array(field) for field in PEAK_COLUMNS.values()}
            add_to_powder(self.powder, peaks["fs"], peaks["ss"], peaks["intensity"])
            add_to_powder(self._powder_preview, peaks["fs"], peaks["ss"], peaks["intensity"], binning=self._factor)
            row = self.hits
            self.hits += 1
            self._data.resize(self.hits, axis=0)
            self._data.id.write_direct_chunk((row, 0, 0), record.raw("data"))
            self._peaks.append((number, n_peaks, peaks))
        return True

    def flush(self) -> None:
        """Rows go to disk in one write per dataset, then the file is flushed for live readers."""
        if self._rows:
            rows = np.array(self._rows)
            for column, dataset in zip(rows.T, self._every.values(), strict=True):
                _append(dataset, column)
            self._rows.clear()
        if self._peaks:
            n = min(self.width, max(count for _, count, _ in self._peaks))
            _append(self._hit_frames, np.array([number for number, _, _ in self._peaks]))
            _append(self._n_peaks, np.array([min(count, self.width) for _, count, _ in self._peaks]))
            for name, field in PEAK_COLUMNS.items():
                block = np.zeros((len(self._peaks), self.width), np.float32)
                for i, (_, count, peaks) in enumerate(self._peaks):
                    block[i, :min(count, n)] = peaks[field][:n]
                _append(self._columns[name], block)
            self._peaks.clear()
        self._file.flush()

    def preview(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What front-ends show: the virtual powder, the hit-rate history, the counts."""
        rate = self.hit_rate.sample()
        arrays = {"virtual_powder": self._powder_preview.astype(np.float32),
                  "hit_rate": np.array(self.hit_rate.history, np.float32)}
        return arrays, {"frames": len(self.written), "hits": self.hits, "hit_rate": round(rate, 4)}

    def close(self) -> None:
        if not self._file.id.valid:
            return
        self.flush()
        hits, misses, powder = self._images
        for cls, image in ((1, hits), (0, misses)):
            image["data"][...] = self.sums.sums[cls]
            image["n_frames"][()] = self.sums.frames[cls]
        missing = self.written - self.sums.numbers
        if missing:
            logger.warning("%s: the class sums hold %d of the %d frames; not in them: %s", self.path.name,
                           len(self.sums.numbers), len(self.written), _span(sorted(missing)))
        powder["data"][...] = self.powder
        self._end_time[()] = now_iso().encode()
        self._file.close()


def _span(numbers: list[int]) -> str:
    return f"{numbers[0]}..{numbers[-1]} ({len(numbers)})" if len(numbers) > 3 else str(numbers)


def _growing(group: h5py.Group, name: str, dtype: str, width: int | None = None) -> h5py.Dataset:
    shape = (0,) if width is None else (0, width)
    chunks = (1024,) if width is None else (max(1, 65536 // width), width)
    return group.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), chunks=chunks, dtype=dtype)


def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows


def crystfel_geometry(cxi: Path, scan: ScanDescription | None, header: Frame | None,
                      shape: tuple[int, int]) -> str:
    """A CrystFEL geometry for the file: one panel, the mask and the peak list in the file."""
    geometry = Geometry.of(scan, header)
    energy, distance = geometry.energy_ev, geometry.distance_m
    pixel = geometry.pixel_size_m[1] if geometry.pixel_size_m else None
    centre = geometry.beam_center_px or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    lines = [f"; CrystFEL geometry for {cxi.name}, written by Surveyor {VERSION}",
             f"photon_energy = {energy:g}" if energy else "; photon_energy: not known, give it to indexamajig",
             f"clen = {distance:g}" if distance else "; clen: not known",
             f"res = {1 / pixel:g}" if pixel else "; res: pixel size not known",
             "adu_per_photon = 1", "",
             "data = /entry_1/data_1/data", "dim0 = %", "dim1 = ss", "dim2 = fs",
             "peak_list = /entry_1/result_1", "peak_list_type = cxi"]
    if header is not None and "pixel_mask" in {spec.name for spec in header.header.arrays}:
        lines += ["mask = /entry_1/instrument_1/detector_1/mask", "mask_good = 0x0", f"mask_bad = {CXI_INVALID:#x}"]
    lines += ["", "p0/min_fs = 0", f"p0/max_fs = {shape[1] - 1}", "p0/min_ss = 0", f"p0/max_ss = {shape[0] - 1}",
              # CrystFEL puts pixel corners on integer coordinates, ours are on the pixel centres
              # (indexamajig adds the half pixel to the file's peaks itself).
              f"p0/corner_x = {-(centre[1] + 0.5):g}", f"p0/corner_y = {-(centre[0] + 0.5):g}",
              "p0/fs = +1.0x", "p0/ss = +1.0y", ""]
    return "\n".join(lines)
