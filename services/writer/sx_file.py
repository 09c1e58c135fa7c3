"""`<scan_id>.cxi` for serial crystallography, and the scan's aggregation: Cheetah's layout, which
CrystFEL's indexamajig reads with `peak_list_type = cxi` (INTERFACES.md; reference/peakfinder8.md 10).

- `/entry_1/data_1/data`: the hit frames, one chunk each, as the detector sent them (a
  bitshuffle/LZ4 blob is written as it came), and `experiment_identifier` (`<scan_id>//<frame>`,
  the axis CXI names first); `/entry_1/instrument_1/detector_1/mask` flags the pixels without
  data, CXI bits.
- `/entry_1/result_1`: one row per hit, same order: `nPeaks` and `peakXPosRaw`, `peakYPosRaw`
  (slab pixel index, the centre of pixel (0, 0) at (0, 0)), `peakTotalIntensity`,
  `peakMaximumValue`, `peakNPixels`, `peakSNR` (the signal-to-noise ratio; OM writes the local
  background sigma there, which is `peakBackgroundSigma` here), and `frame_number`.
- `/entry_1/result_2/{frame_number, n_peaks, hit}`: every frame searched, in arrival order.
- `/entry_1/image_1`: sum of the hits, `image_2`: sum of the other frames (both corrected, with
  `n_frames`), `image_3`: the virtual powder pattern of the hits' peaks.

The writer is the one process that sees every frame's record, so it also keeps the aggregates
the front-ends watch: the class sums (merged from the peak processes' partial sums), the virtual
powder and the hit rate over the last `window` frames, the peak counts of the last PEAKS_KEPT
frames, with the geometry a front-end needs to draw resolution rings on the powder (`preview`),
and the latest hit binned for display with its peaks (`latest_hit`).

The aggregates are in the file from the start and rewritten at every flush, so a writer killed
mid-scan leaves them as they were at its last flush, and its successor (`<scan_id>.partN.cxi`)
starts from them: every frame's contribution is in the last part exactly once. They are kept
twice, crash-safe: slot 0 is `image_1`..`image_3` (what readers look at), slot 1 is under
`/entry_1/aggregates/slot_1`; a flush rewrites the slot not in use, flushes, and only then
points `/entry_1/aggregates/state` (generation, slot, rows covered, ...) at it, so a kill at
any moment leaves one complete slot. `/entry_1/aggregates/summed_frames` lists the frames in the
class sums (a sum delta of frames already in is refused whole; the peak stage sends the sum of a
frame re-sent after a process was lost in a delta of its own, so that refusal is exact; a delta
riding on a record that came again is offered too), `hit_rate_history` the hit rate as the
previews showed it. When the scan ends both slots hold the final values. Records already
on disk in an earlier part are not written again; their contribution to the powder and the hit
rate comes from those parts' rows, their sums from the state restored.

A CrystFEL geometry file, `<scan_id>.geom`, goes next to the file: with it,
`indexamajig -i files.lst -g <scan_id>.geom --peaks=cxi` indexes the hits with our peaks.
`<scan_id>_live.geom` is the same detector for the hit server's msgpack maps (`data =
detector_data`, `peak_list = peak_list`, no `dimN`: CrystFEL's msgpack reader takes 2-D frames
only): `indexamajig --zmq-input=... --zmq-request=next --data-format=msgpack --peaks=msgpack`.
The file is in SWMR mode from the start, like the raw file (format bounds v110, disk.py).
"""

from __future__ import annotations

import logging
from collections import deque
from pathlib import Path
from typing import Any, ClassVar

import h5py
import numpy as np

from libs.common import codecs
from libs.common.contracts import DetectorHeader, Peaks, PixelFormat, ScanHeader
from libs.common.errors import FrameError
from libs.common.frames import Frame
from libs.common.messages import VERSION, ScanDescription
from libs.common.previews import downsampled
from libs.crystallography.hits import CLASSES, ClassSums, HitRate, SumsDelta, add_to_powder
from services.writer.cxi import CXI_INVALID, TIME, Geometry, detector_metadata, now_iso, wavelength_a
from services.writer.disk import LIBVER, Parts, ScanFile, close_all, mark, quiet_close

logger = logging.getLogger(__name__)

PEAK_COLUMNS = {"peakXPosRaw": "fs", "peakYPosRaw": "ss", "peakTotalIntensity": "intensity",
                "peakMaximumValue": "max_pixel_intensity", "peakNPixels": "num_pixels", "peakSNR": "snr",
                "peakBackgroundSigma": "sigma"}
"""Cheetah's names for the peak list's fields."""
PREVIEW_SIDE = 256
"""Largest side of the virtual powder and the latest hit sent as previews (binned down to it)."""
PEAKS_KEPT = 500
"""Frames whose peak counts the preview carries (`n_peaks`, the newest last)."""
HIT_PEAKS_SHOWN = 1000
"""Peaks of the latest hit its preview carries at most."""


STATE_FIELDS = ("generation", "slot", "rows", "summed", "history", "hit_rows")
"""`/entry_1/aggregates/state`: which slot holds the aggregates, and how many of this file's
result_2 rows, summed_frames entries, history samples and result_1 rows they cover."""
GENERATION, SLOT, ROWS, SUMMED, HISTORY, HIT_ROWS = range(len(STATE_FIELDS))
HISTORY_LENGTH = 600
IDENTIFIER = "S64"
"""`experiment_identifier`, fixed length: SWMR cannot grow a dataset of variable-length strings."""
ARRAYS = ("hits", "misses", "powder", "n_frames", "history")


class SxFile(ScanFile):
    takes: ClassVar[tuple[type, ...]] = (Peaks,)

    def __init__(self, path: Path, *, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None,
                 record: Frame, peaks: Peaks, window: int, epoch: int = 0, parts: Parts | None = None) -> None:
        """`record`, `peaks`: the first record and its meta, which say the frames' format and the
        peak list's width."""
        self.path = path
        self.scan_id = record.header.scan_id
        frame = peaks.frame
        self.shape = frame.shape
        self.width = peaks.max_num_peaks
        self.sums = ClassSums(self.shape)
        self.powder = np.zeros(self.shape, np.float64)
        self._factor = -(-max(self.shape) // PREVIEW_SIDE)
        self._powder_preview = np.zeros((self.shape[0] // self._factor, self.shape[1] // self._factor))
        """The virtual powder binned for display, kept up to date peak by peak."""
        self.hit_rate = HitRate(window, HISTORY_LENGTH)
        self._window = window
        self._recent: deque[tuple[int, int]] = deque(maxlen=PEAKS_KEPT)
        """(frame number, peaks) of the newest records written."""
        self._latest_hit: tuple[int, Frame, np.ndarray, np.ndarray] | None = None
        """The newest hit written, not yet previewed: its number, record, and peaks' ss and fs."""
        self._bad = _bad_pixels(header, self.shape)
        self.geometry = _display_geometry(scan, header, self.shape, self._factor)
        self.written: set[int] = set()
        """Records of the scan written: in earlier parts or in this file."""
        self.earlier: set[int] = set()
        self.committed: set[int] = set()
        """Records of this file on disk: written and flushed."""
        self.hits = 0
        """Rows of data_1 (hits) in this file."""
        self.earlier_hits = 0
        self.broken = False
        self._rows: list[tuple[int, int, bool]] = []
        self._peaks: list[tuple[int, int, dict[str, np.ndarray]]] = []
        """Rows of result_2 and result_1 not yet on disk."""
        self._chunks: list[tuple[int, Any]] = []
        """Hits written to data_1 since the last flush that succeeded: written again by `recover`."""
        self._summed_new: list[int] = []
        """Frames merged into the class sums since the last flush that succeeded."""
        self._done = {"rows": 0, "hit_rows": 0, "summed": 0, "hits": 0}
        """What of this file is on disk (as of the last flush that succeeded)."""
        self._stale: dict[str, set[int]] = {name: set() for name in ARRAYS}
        """Per aggregate, the slots that do not hold its current value."""
        self._generation, self._slot = 0, 0
        restored = self._restore(parts)

        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = h5py.File(path, "w", libver=LIBVER)
        try:
            self._create(scan, header, frame, epoch, parts, restored)
            self.geometries = (path.with_suffix(".geom"), path.with_name(f"{path.stem}_live.geom"))
            for geometry, live in zip(self.geometries, (False, True), strict=True):
                geometry.write_text(crystfel_geometry(path, scan, header, self.shape, live=live))
        except BaseException:
            self._file.close()
            raise

    def _create(self, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None, frame: PixelFormat,
                epoch: int, parts: Parts | None, summed: list[int]) -> None:
        f = self._file
        mark(f, scan.scan_id if scan else "", epoch)
        f["cxi_version"] = 160
        entry = f.create_group("entry_1")
        entry["program_name"] = f"surveyor {VERSION}"
        entry["start_time"] = np.array(now_iso(), dtype=TIME)
        entry.create_dataset("end_time", shape=(), dtype=TIME)
        if parts and parts.earlier:
            entry["previous_parts"] = [p.name for p in parts.earlier]
            entry["previous_parts"].attrs["description"] = (
                "earlier files of this scan, from a writer that stopped mid-scan (open them with swmr=True): "
                "the frames they hold are not in this file, the aggregates here include them")
        data = entry.create_dataset(
            "data_1/data", shape=(0, *self.shape), maxshape=(None, *self.shape), chunks=(1, *self.shape),
            dtype=np.dtype(frame.dtype), **codecs.hdf5_filter(frame.compression))
        data.attrs["axes"] = "experiment_identifier:y:x"
        identifiers = _growing(entry["data_1"], "experiment_identifier", IDENTIFIER)
        identifiers.attrs["description"] = "the hit's event: <scan_id>//<frame number>"
        detector = entry.create_group("instrument_1/detector_1")
        detector["data"] = h5py.SoftLink("/entry_1/data_1/data")
        detector["experiment_identifier"] = h5py.SoftLink("/entry_1/data_1/experiment_identifier")
        detector_metadata(entry, scan, header)

        result = entry.create_group("result_1")
        _growing(result, "nPeaks", "i4")
        for name in PEAK_COLUMNS:
            _growing(result, name, "f4", self.width)
        _growing(result, "frame_number", "i8")
        result["data"] = h5py.SoftLink("/entry_1/result_1/peakTotalIntensity")
        result["peakBackgroundSigma"].attrs["description"] = "local background sigma (OM's 'snr')"
        every = entry.create_group("result_2")
        for name, dtype in (("frame_number", "i8"), ("n_peaks", "i4"), ("hit", "u1")):
            _growing(every, name, dtype)

        for index, (what, count) in enumerate((("sum of the hits (corrected frames)", True),
                                               ("sum of the frames that are not hits (corrected)", True),
                                               ("virtual powder pattern: the hits' peak intensities", False)),
                                              start=1):
            image = entry.create_group(f"image_{index}")
            image.create_dataset("data", shape=self.shape, dtype="f8")
            image["data_type"] = "intensity"
            image["description"] = what
            if count:
                image.create_dataset("n_frames", shape=(), dtype="i8", data=0)
        aggregates = entry.create_group("aggregates")
        aggregates.attrs["description"] = (
            "the aggregates twice, crash-safe: slot 0 is image_1..image_3, slot 1 is slot_1; state names "
            "the slot that is complete and what of this file it covers (surveyor's writer, sx_file.py)")
        state = aggregates.create_dataset("state", data=np.zeros(len(STATE_FIELDS), "i8"))
        state.attrs["fields"] = ",".join(STATE_FIELDS)
        for index in (0, 1):
            group = aggregates.create_group(f"slot_{index}")
            if index:
                for name in ("hits", "misses", "powder"):
                    group.create_dataset(name, shape=self.shape, dtype="f8")
                group.create_dataset("n_frames", shape=(2,), dtype="i8")
            history = group.create_dataset("hit_rate_history", shape=(HISTORY_LENGTH,), dtype="f8",
                                           fillvalue=np.nan)
            history.attrs["description"] = "the hit rate as the previews showed it, oldest first"
        listed = _growing(aggregates, "summed_frames", "i8")
        listed.attrs["description"] = "the frames in the class sums (all parts of the scan)"
        self._bind()
        _append(self._summed_list, np.asarray(summed, np.int64))
        self._done["summed"] = len(summed)
        for index in (0, 1):
            for name in ARRAYS:
                self._put(index, name)
        self._state[...] = self._state_vector()
        f.swmr_mode = True

    def _bind(self) -> None:
        entry = self._file["entry_1"]
        self._end_time = entry["end_time"]
        self._data = entry["data_1/data"]
        result = entry["result_1"]
        self._n_peaks = result["nPeaks"]
        self._columns = {name: result[name] for name in PEAK_COLUMNS}
        self._hit_frames = result["frame_number"]
        self._identifiers = entry["data_1/experiment_identifier"]
        self._every = {name: entry[f"result_2/{name}"] for name in ("frame_number", "n_peaks", "hit")}
        aggregates = entry["aggregates"]
        self._state = aggregates["state"]
        self._summed_list = aggregates["summed_frames"]
        one = aggregates["slot_1"]
        self._slots = (
            {"hits": entry["image_1/data"], "misses": entry["image_2/data"], "powder": entry["image_3/data"],
             "n_misses": entry["image_2/n_frames"], "n_hits": entry["image_1/n_frames"],
             "history": aggregates["slot_0/hit_rate_history"]},
            {"hits": one["hits"], "misses": one["misses"], "powder": one["powder"], "n_frames": one["n_frames"],
             "history": one["hit_rate_history"]})

    def _put(self, index: int, name: str) -> None:
        """Write one aggregate's current value into a slot."""
        slot = self._slots[index]
        if name in ("hits", "misses"):
            slot[name][...] = self.sums.sums[int(name == "hits")]
        elif name == "powder":
            slot["powder"][...] = self.powder
        elif name == "n_frames":
            if index:
                slot["n_frames"][...] = self.sums.frames
            else:
                slot["n_misses"][()], slot["n_hits"][()] = (int(n) for n in self.sums.frames)
        else:
            history = np.full(HISTORY_LENGTH, np.nan)
            history[:len(self.hit_rate.history)] = list(self.hit_rate.history)
            slot["history"][...] = history
        self._stale[name].discard(index)

    def _state_vector(self) -> np.ndarray:
        state = np.zeros(len(STATE_FIELDS), "i8")
        state[[GENERATION, SLOT, ROWS, SUMMED, HISTORY, HIT_ROWS]] = (
            self._generation, self._slot, self._done["rows"], self._done["summed"], len(self.hit_rate.history),
            self._done["hit_rows"])
        return state

    def _restore(self, parts: Parts | None) -> list[int]:
        """The aggregates of the scan's earlier parts: from the last one's complete slot, plus the rows
        on disk it does not cover (powder and hit rate from the rows; their sums come again with the
        re-sent records). Returns the frames in the class sums."""
        opened = parts.read("the aggregates") if parts else []
        try:
            flags, uncovered, summed = [], [], []
            newest = max((i for i, (_, f) in enumerate(opened) if "entry_1/aggregates/state" in f), default=None)
            for i, (path, f) in enumerate(opened):
                entry = f["entry_1"]
                numbers = entry["result_2/frame_number"][()]
                hit = entry["result_2/hit"][()].astype(bool)
                rows = min(len(numbers), len(hit))
                numbers, hit = numbers[:rows], hit[:rows]
                self.earlier.update(numbers.tolist())
                flags.append(hit)
                self.earlier_hits += entry["result_1/frame_number"].shape[0]
                if newest is None or i > newest:
                    uncovered.append((f, numbers[hit]))
                elif i == newest:
                    state = entry["aggregates/state"][()]
                    summed = self._load_slot(f, state)
                    covered = min(int(state[ROWS]), rows)
                    uncovered.append((f, numbers[covered:][hit[covered:]]))
                    logger.info("%s: aggregates restored from %s (generation %d, slot %d)", self.path.name,
                                path.name, state[GENERATION], state[SLOT])
            for f, hit_numbers in uncovered:
                self._powder_from(f, set(hit_numbers.tolist()))
            for hit in np.concatenate(flags)[-self._window:] if flags else ():
                self.hit_rate.add(bool(hit))
        finally:
            close_all(opened)
        self.written = set(self.earlier)
        self._powder_preview[...] = _binned(self.powder, self._factor, self._powder_preview.shape)
        return summed

    def _load_slot(self, f: h5py.File, state: np.ndarray) -> list[int]:
        aggregates = f["entry_1/aggregates"]
        if int(state[SLOT]) == 0:
            entry = f["entry_1"]
            hits, misses, powder = (entry[f"image_{i}/data"][()] for i in (1, 2, 3))
            frames = np.array([entry["image_2/n_frames"][()], entry["image_1/n_frames"][()]], np.int64)
            history = aggregates["slot_0/hit_rate_history"][()]
        else:
            slot = aggregates["slot_1"]
            hits, misses, powder = (slot[name][()] for name in ("hits", "misses", "powder"))
            frames = slot["n_frames"][()].astype(np.int64)
            history = slot["hit_rate_history"][()]
        self.sums.sums[1], self.sums.sums[0], self.powder[...] = hits, misses, powder
        self.sums.frames[...] = frames
        for rate in history[:int(state[HISTORY])]:
            self.hit_rate.history.append(float(rate))
        summed = aggregates["summed_frames"][:int(state[SUMMED])].tolist()
        self.sums.numbers = set(summed)
        return summed

    def _powder_from(self, f: h5py.File, numbers: set[int]) -> None:
        """Add the peaks of the hits `numbers` from a part's result_1 to the powder."""
        if not numbers:
            return
        result = f["entry_1/result_1"]
        rows = result["frame_number"][()]
        counts = result["nPeaks"][()]
        for row in np.flatnonzero(np.isin(rows, list(numbers))):
            n = int(counts[row])
            fs, ss, intensity = (result[name][row, :n] for name in ("peakXPosRaw", "peakYPosRaw",
                                                                     "peakTotalIntensity"))
            add_to_powder(self.powder, fs, ss, intensity)

    @staticmethod
    def cost(record: Frame, peaks: Peaks) -> int:
        return (record.raw("data").nbytes if peaks.hit else 0) + 4096

    @staticmethod
    def creation_cost(record: Frame, peaks: Peaks) -> int:
        """The aggregates, twice, and the rest."""
        return 7 * int(np.prod(peaks.frame.shape)) * 8 + (1 << 20)

    def write(self, record: Frame, peaks: Peaks) -> bool:
        """Take one frame's record (`peaks` its meta): its row, its peaks and frame if a hit, its class
        sums if any. False for a record already written (here or in an earlier part): only its sums
        are offered."""
        number = record.header.frame
        delta = _delta(record, peaks)
        if number in self.written:
            if delta is not None:
                self._offer(delta, record.header.scan_id, again=True)
            return False
        hit, n_peaks = peaks.hit, peaks.n_peaks
        if hit:  # the disk first: a write that fails leaves nothing of the record here
            row = self.hits
            self._data.resize(row + 1, axis=0)
            self._data.id.write_direct_chunk((row, 0, 0), record.raw("data"))
            self.hits += 1
            self._chunks.append((row, record.raw("data")))
        self.written.add(number)
        self._rows.append((number, n_peaks, hit))
        self._recent.append((number, n_peaks))
        self.hit_rate.add(hit)
        if delta is not None:
            self._offer(delta, record.header.scan_id)
        if hit:
            peaks = {field: record.array(field) for field in PEAK_COLUMNS.values()}
            add_to_powder(self.powder, peaks["fs"], peaks["ss"], peaks["intensity"])
            add_to_powder(self._powder_preview, peaks["fs"], peaks["ss"], peaks["intensity"], binning=self._factor)
            self._stale["powder"] = {0, 1}
            self._peaks.append((number, n_peaks, peaks))
            self._latest_hit = (number, record, peaks["ss"], peaks["fs"])
        return True

    def _offer(self, delta: SumsDelta, scan_id: str, again: bool = False) -> None:
        overlap = self.sums.numbers.intersection(delta.numbers)
        if overlap:
            if not (again and len(overlap) == len(delta.numbers)):  # a re-sent record whose sums are in
                logger.warning("scan %s: class sums of frames %s left out: some were summed already "
                               "(a peak process was declared dead and came back)", scan_id, _span(delta.numbers))
            return
        self.sums.merge(delta)
        if again:
            logger.info("scan %s: class sums of frames %s merged from a record that came again", scan_id,
                        _span(delta.numbers))
        self._summed_new.extend(delta.numbers)
        for name in ("hits", "misses", "n_frames"):
            self._stale[name] = {0, 1}

    def flush(self) -> None:
        """Rows go to disk in one write per dataset, the aggregates to the slot not in use; the file
        is flushed, then the state points at that slot and the file is flushed again."""
        target = 1 - self._slot
        if not (self._rows or self._summed_new or self._chunks or any(target in s for s in self._stale.values())):
            self._file.flush()
            return
        if self._rows:
            rows = np.array(self._rows)
            for column, dataset in zip(rows.T, self._every.values(), strict=True):
                _append(dataset, column)
        if self._peaks:
            n = min(self.width, max(count for _, count, _ in self._peaks))
            _append(self._hit_frames, np.array([number for number, _, _ in self._peaks]))
            _append(self._identifiers, np.array([f"{self.scan_id}//{number}" for number, _, _ in self._peaks],
                                                IDENTIFIER))
            _append(self._n_peaks, np.array([min(count, self.width) for _, count, _ in self._peaks]))
            for name, field in PEAK_COLUMNS.items():
                block = np.zeros((len(self._peaks), self.width), np.float32)
                for i, (_, count, peaks) in enumerate(self._peaks):
                    block[i, :min(count, n)] = peaks[field][:n]
                _append(self._columns[name], block)
        if self._summed_new:
            _append(self._summed_list, np.asarray(self._summed_new, np.int64))
        for name in ARRAYS:
            if target in self._stale[name]:
                self._put(target, name)
        self._file.flush()
        self._commit(target)
        self._state[...] = self._state_vector()
        self._file.flush()

    def _commit(self, slot: int) -> None:
        """The last flush reached the disk: what it wrote is no longer pending, `slot` is the one in use."""
        self.committed.update(number for number, _, _ in self._rows)
        self._done["rows"] += len(self._rows)
        self._done["hit_rows"] += len(self._peaks)
        self._done["summed"] += len(self._summed_new)
        self._done["hits"] = self.hits
        self._rows.clear()
        self._peaks.clear()
        self._chunks.clear()
        self._summed_new.clear()
        self._generation += 1
        self._slot = slot

    def recover(self) -> None:
        """After a failed write or flush: open the file again, go back to what is on disk and write
        again what was not flushed. The slot the state on disk names is never written over."""
        quiet_close(self._file)
        self._file = h5py.File(self.path, "r+", libver=LIBVER)
        self._bind()
        # The flush that failed may have pointed the state at its slot, or not: the disk says.
        state = self._state[()]
        self._generation, self._slot = int(state[GENERATION]), int(state[SLOT])
        for dataset, size in ((self._every.values(), "rows"), ((self._n_peaks, self._hit_frames, self._identifiers,
                                                                  *self._columns.values()), "hit_rows"),
                              ((self._summed_list,), "summed")):
            for d in dataset:
                d.resize(self._done[size], axis=0)
        self._data.resize(self.hits, axis=0)
        self._file.swmr_mode = True
        for row, blob in self._chunks:
            self._data.id.write_direct_chunk((row, 0, 0), blob)
        for name in ARRAYS:  # the slot not in use may hold anything
            self._stale[name].add(1 - self._slot)
        self.flush()
        self.broken = False

    def redo_cost(self) -> int:
        return sum(memoryview(blob).nbytes for _, blob in self._chunks) + (1 << 20)

    def preview(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """What front-ends show: the virtual powder, the hit-rate history, the peak counts of the
        newest frames (`n_peaks`, their numbers in `n_peaks_frames`), the counts, and the geometry
        (`geometry`: beam centre and pixel size in raw pixels and metres, distance, energy and
        wavelength, the powder's binning) that places resolution rings on the powder."""
        rate = self.hit_rate.sample()
        self._stale["history"] = {0, 1}
        recent = np.array(self._recent, np.int64).reshape(-1, 2)
        arrays = {"virtual_powder": self._powder_preview.astype(np.float32),
                  "hit_rate": np.array(self.hit_rate.history, np.float32),
                  "n_peaks": recent[:, 1].astype(np.int32), "n_peaks_frames": recent[:, 0].astype(np.int32)}
        return arrays, {"frames": len(self.written), "hits": self.earlier_hits + self.hits,
                        "hit_rate": round(rate, 4),
                        "peaks_per_frame": round(float(recent[:, 1].mean()), 2) if len(recent) else None,
                        "geometry": self.geometry}

    def latest_hit(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """The newest hit since the last call, for display: `image`, its frame binned to at most
        PREVIEW_SIDE pixels a side (block means, float32; NaN where the detector's pixel mask flags
        a pixel), and `peaks`, its first HIT_PEAKS_SHOWN peaks as [ss, fs] rows in raw pixels (the
        centre of pixel (0, 0) at (0, 0)); meta: the frame's number and shape, the binning, the
        number of peaks. None without a new hit (or when its frame does not decode)."""
        if self._latest_hit is None:
            return None
        (number, record, ss, fs), self._latest_hit = self._latest_hit, None
        try:
            frame = record.array("data").astype(np.float32)
        except (FrameError, ValueError) as exc:  # a blob that does not decode: not shown, never fatal
            logger.debug("%s: hit %d not previewed: %s", self.path.name, number, exc)
            return None
        if self._bad is not None and self._bad.shape == frame.shape:
            frame[self._bad] = np.nan
        image, factor = downsampled(frame, PREVIEW_SIDE)
        peaks = np.stack([np.asarray(ss, np.float32), np.asarray(fs, np.float32)], axis=1)[:HIT_PEAKS_SHOWN]
        return ({"image": image, "peaks": np.ascontiguousarray(peaks)},
                {"frame": number, "shape": list(frame.shape), "binning": factor, "n_peaks": int(len(ss))})

    def close(self) -> None:
        if not self._file.id.valid:
            return
        for _ in range(2):  # both slots (image_1..image_3 are slot 0) hold the final values
            self.flush()
        missing = self.written - self.sums.numbers
        if missing:
            logger.warning("%s: the class sums hold %d of the %d frames; not in them: %s", self.path.name,
                           len(self.sums.numbers), len(self.written), _span(sorted(missing)))
        self._end_time[()] = now_iso().encode()
        self._file.close()

    def abandon(self) -> None:
        quiet_close(self._file)


def _delta(record: Frame, peaks: Peaks) -> SumsDelta | None:
    """The class sums a record carries (what a peak process added, and which frames), if any."""
    if peaks.sum_frames is None:
        return None
    names = {spec.name for spec in record.header.arrays}
    sums = {cls: record.array(f"{name}_sum") for cls, name in enumerate(CLASSES) if f"{name}_sum" in names}
    return SumsDelta(np.asarray(peaks.sum_frames, np.int64), sums, peaks.summed)


def _binned(image: np.ndarray, factor: int, shape: tuple[int, int]) -> np.ndarray:
    """Blocks of `factor` x `factor` pixels summed, the edge blocks taking any remainder (as
    `add_to_powder` bins)."""
    rows = np.minimum(np.arange(image.shape[0]) // factor, shape[0] - 1)
    cols = np.minimum(np.arange(image.shape[1]) // factor, shape[1] - 1)
    out = np.zeros(shape)
    np.add.at(out, (rows[:, None], cols[None, :]), image)
    return out


def _bad_pixels(header: ScanHeader[DetectorHeader] | None, shape: tuple[int, ...]) -> np.ndarray | None:
    """Pixels the detector's pixel mask flags (gaps, dead, hot), where the header carries one of the frames' shape."""
    if header is None or "pixel_mask" not in header.names:
        return None
    mask = header.array("pixel_mask")
    return mask != 0 if mask.shape == tuple(shape) else None


def _display_geometry(scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None,
                      shape: tuple[int, ...], binning: int) -> dict[str, Any]:
    """What a front-end needs to draw resolution rings on the powder preview: the beam centre
    [y, x] in raw pixels (the frame's centre when neither the scan nor the detector says, as in
    the geometry file), the pixel size [y, x] and the distance in metres, the energy (eV) and
    wavelength (Å), and the preview's binning (raw pixel i is in preview pixel i // binning).
    None for what is not known."""
    geometry = Geometry.of(scan, header)
    centre = geometry.beam_center_px or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    return {"beam_center_px": [float(v) for v in centre], "beam_center_known": geometry.beam_center_px is not None,
            "pixel_size_m": list(geometry.pixel_size_m) if geometry.pixel_size_m else None,
            "distance_m": geometry.distance_m, "energy_ev": geometry.energy_ev,
            "wavelength_a": wavelength_a(geometry.energy_ev) if geometry.energy_ev else None,
            "binning": binning, "shape": list(shape)}


def _span(numbers: list[int]) -> str:
    return f"{numbers[0]}..{numbers[-1]} ({len(numbers)})" if len(numbers) > 3 else str(numbers)


def _growing(group: h5py.Group, name: str, dtype: str, width: int | None = None) -> h5py.Dataset:
    shape = (0,) if width is None else (0, width)
    chunks = (1024,) if width is None else (max(1, 65536 // width), width)
    return group.create_dataset(name, shape=shape, maxshape=(None, *shape[1:]), chunks=chunks, dtype=dtype)


def _append(dataset: h5py.Dataset, rows: np.ndarray) -> None:
    if not len(rows):
        return
    start = dataset.shape[0]
    dataset.resize(start + len(rows), axis=0)
    dataset[start:] = rows


def crystfel_geometry(cxi: Path, scan: ScanDescription | None, header: ScanHeader[DetectorHeader] | None,
                      shape: tuple[int, int], live: bool = False) -> str:
    """A CrystFEL geometry for the file (one panel, the mask and the peak list in the file), or,
    `live`, for the hit server's maps (the facts the map carries where the scan did not say them)."""
    geometry = Geometry.of(scan, header)
    energy, distance = geometry.energy_ev, geometry.distance_m
    pixel = geometry.pixel_size_m[1] if geometry.pixel_size_m else None
    centre = geometry.beam_center_px or ((shape[0] - 1) / 2, (shape[1] - 1) / 2)
    source = f"the hit server's msgpack maps of {cxi.stem}" if live else cxi.name
    lines = [f"; CrystFEL geometry for {source}, written by Surveyor {VERSION}",
             f"photon_energy = {energy:g}" if energy else
             ("photon_energy = beam_energy eV" if live else "; photon_energy: not known, give it to indexamajig"),
             f"clen = {distance:g}" if distance else ("clen = detector_distance m" if live else "; clen: not known"),
             f"res = {1 / pixel:g}" if pixel else "; res: pixel size not known",
             "adu_per_photon = 1", ""]
    if live:
        lines += ["data = detector_data", "peak_list = peak_list"]
    else:
        lines += ["data = /entry_1/data_1/data", "dim0 = %", "dim1 = ss", "dim2 = fs",
                  "peak_list = /entry_1/result_1", "peak_list_type = cxi"]
        if header is not None and "pixel_mask" in header.names:
            lines += ["mask = /entry_1/instrument_1/detector_1/mask", "mask_good = 0x0",
                      f"mask_bad = {CXI_INVALID:#x}"]
    lines += ["", "p0/min_fs = 0", f"p0/max_fs = {shape[1] - 1}", "p0/min_ss = 0", f"p0/max_ss = {shape[0] - 1}",
              # CrystFEL puts pixel corners on integer coordinates, ours are on the pixel centres
              # (indexamajig adds the half pixel to the file's peaks itself).
              f"p0/corner_x = {-(centre[1] + 0.5):g}", f"p0/corner_y = {-(centre[0] + 0.5):g}",
              "p0/fs = +1.0x", "p0/ss = +1.0y", ""]
    return "\n".join(lines)
