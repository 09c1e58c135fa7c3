"""`<scan_id>.cxi` for ptychography: clean frames, positions, geometry and the reconstruction, in
the CXI layout that SHARP, COSMIC and PtyPy's HDF5 loader read (INTERFACES.md; reference/
ptychography.md 6). SI units, energy in J.

Every slot is allocated when the file opens (the scan says how many positions) and a clean frame
goes to its index, whatever the order it comes in; `frame_number` marks the slots filled (-1 for
none). The reconstruction is added when it comes, at the end of the scan, so this file is not in
SWMR mode (HDF5 cannot add datasets to a file in SWMR mode); it is flushed as frames come. Its
format bounds are (earliest, v110) (disk.py): readable by HDF5 1.10, and, without the v3
superblock's "open for writing" flag, the file of a killed writer opens as it was at its last
flush. A continuation (`<scan_id>.partN.cxi`) leaves out the clean frames earlier parts hold.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import h5py
import numpy as np
from scipy.constants import electron_volt

from libs.common.contracts import CALIBRATION, FRAMES_HEADER, CleanFrame, Reconstruction, ScanHeader
from libs.common.frames import Frame
from libs.common.messages import VERSION, ScanDescription
from services.writer.cxi import CXI_INVALID, TIME, now_iso, put
from services.writer.disk import LIBVER_PLAIN, Parts, ScanFile, close_all, frames_in, mark, quiet_close


class PtychoFile(ScanFile):
    takes: ClassVar[tuple[type, ...]] = (CleanFrame, Reconstruction)

    def __init__(self, path: Path, *, scan: ScanDescription, headers: dict[str, ScanHeader], size: int,
                 epoch: int = 0, parts: Parts | None = None) -> None:
        """`headers`: the scan headers by name, as the writer parsed them (the frames header's
        geometry and mask, the calibration's dark go in the file)."""
        self.path = path
        self.earlier: set[int] = set()
        """Clean frames (frame numbers) the scan's earlier parts hold: not written again."""
        for _, f in (opened := parts.read("frame numbers") if parts else []):
            self.earlier |= frames_in(f)
        close_all(opened)
        self.written: set[int] = set()
        """Slots (position indices) filled in this file."""
        self.committed: set[int] = set()
        """Clean frames (frame numbers) of this file on disk: written and flushed."""
        self._pending: list[tuple[Frame, CleanFrame | Reconstruction]] = []
        """Frames written since the last flush that succeeded: written again by `recover`."""
        self.broken = False
        count = len(scan.positions_m or ())
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file = f = h5py.File(path, "w", libver=LIBVER_PLAIN)
        try:
            mark(f, scan.scan_id, epoch)
            f["cxi_version"] = 160
            entry = f.create_group("entry_1")
            entry["program_name"] = f"surveyor {VERSION}"
            entry["start_time"] = np.array(now_iso(), dtype=TIME)
            entry["experiment_identifier"] = scan.scan_id
            entry["scan_description"] = scan.model_dump_json()
            if parts and parts.earlier:
                entry["previous_parts"] = [p.name for p in parts.earlier]
                entry["previous_parts"].attrs["description"] = (
                    "earlier files of this scan, from a writer that stopped mid-scan; "
                    "the clean frames they hold are not in this file")
            detector = entry.create_group("instrument_1/detector_1")
            data = detector.create_dataset("data", shape=(count, size, size), dtype=np.float32,
                                           chunks=(1, size, size), fillvalue=0)
            data.attrs["axes"] = "translation:y:x"
            entry.create_dataset("data_1/frame_number", shape=(count,), dtype="i8", fillvalue=-1)
            translation = np.zeros((count, 3))
            if count:
                translation[:, :2] = np.asarray(scan.positions_m)[:, ::-1]  # [y, x] -> columns (x, y, z)
            entry.create_dataset("sample_1/geometry_1/translation", data=translation).attrs["units"] = "m"
            # Each axis on its own, for readers that take one dataset per axis (PtyPy's Hdf5Loader).
            for axis, column in (("y", 1), ("x", 0)):
                entry.create_dataset(f"sample_1/geometry_1/position_{axis}", data=translation[:, column]) \
                    .attrs["units"] = "m"
            entry["data_1/data"] = h5py.SoftLink("/entry_1/instrument_1/detector_1/data")
            entry["data_1/translation"] = h5py.SoftLink("/entry_1/sample_1/geometry_1/translation")
            detector["translation"] = h5py.SoftLink("/entry_1/sample_1/geometry_1/translation")
            self._geometry(entry, scan, headers)
            f.flush()
        except BaseException:
            f.close()
            raise
        self._bind()

    def _bind(self) -> None:
        self._data = self._file["entry_1/instrument_1/detector_1/data"]
        self._numbers = self._file["entry_1/data_1/frame_number"]

    @staticmethod
    def cost(frame: Frame, meta: CleanFrame | Reconstruction) -> int:
        return sum(spec.nbytes for spec in frame.header.arrays) + 64

    def _geometry(self, entry: h5py.Group, scan: ScanDescription, headers: dict[str, ScanHeader]) -> None:
        detector = entry["instrument_1/detector_1"]
        if scan.energy_ev:
            put(entry, "instrument_1/source_1/energy", scan.energy_ev * electron_volt, "J")
        frames = headers.get(FRAMES_HEADER)
        if frames is not None:
            geometry = frames.meta
            if geometry.distance_m:
                put(detector, "distance", geometry.distance_m, "m")
            if geometry.pixel_size_m:
                pixel = geometry.pixel_size_m
                put(detector, "x_pixel_size", pixel, "m")
                put(detector, "y_pixel_size", pixel, "m")
                if geometry.distance_m:
                    half = geometry.size / 2 * pixel
                    put(detector, "corner_position", np.array([half, half, geometry.distance_m]), "m")
            mask = np.where(frames.array("mask") != 0, 0, CXI_INVALID).astype(np.uint32)
            detector.create_dataset("mask", data=mask)
            # How the clean frames were made from the raw ones (chosen from the scan, or pinned).
            attrs = detector["data"].attrs
            attrs["crop_px"], attrs["binning"], attrs["downsample"] = geometry.crop, geometry.crop // geometry.size, \
                geometry.downsample
            attrs["centre_px"] = np.asarray(geometry.centre_px)
            for key in ("support_radius_px", "probe_diameter_m", "probe_from", "geometry"):
                if getattr(geometry, key) is not None:
                    attrs[key] = getattr(geometry, key)
        calibration = headers.get(CALIBRATION)
        if calibration is not None and "dark" in calibration.names:
            dark = detector.create_dataset("data_dark", data=calibration.array("dark"), compression="gzip")
            dark.attrs["description"] = f"mean of {calibration.meta.darks} dark frames, ADU"

    def write(self, frame: Frame, meta: CleanFrame | Reconstruction) -> bool:
        """A clean frame into its slot, or the reconstruction; False for a frame already written."""
        if isinstance(meta, Reconstruction):
            self._reconstruction(frame, meta)
            self._pending.append((frame, meta))
            return True
        if meta.index in self.written or frame.header.frame in self.earlier:
            return False
        self._store(frame, meta)
        self.written.add(meta.index)
        self._pending.append((frame, meta))
        return True

    def _store(self, frame: Frame, meta: CleanFrame) -> None:
        self._data[meta.index] = frame.array("data")
        self._numbers[meta.index] = frame.header.frame

    def _reconstruction(self, frame: Frame, meta: Reconstruction) -> None:
        entry = self._file["entry_1"]
        if "image_1" in entry:  # a second result of the same scan replaces the first
            del entry["image_1"]
        image = entry.create_group("image_1")
        obj = frame.array("object")
        image.create_dataset("data", data=obj)
        image["data_type"] = "amplitude"  # CXI: the complex transmission of the sample
        image["data_space"] = "real"
        pixel = meta.pixel_size_m
        put(image, "image_size", np.array(obj.shape) * pixel, "m")
        put(image, "x_pixel_size", pixel, "m")
        put(image, "y_pixel_size", pixel, "m")
        process = image.create_group("process_1")
        process["final_illumination"] = frame.array("probe")
        process["weights"] = frame.array("weights")
        process["algorithm"] = f"RAAR (beta {meta.beta}) with probe refinement, streaming, sub-pixel positions" + (
            f", then {meta.ml_iterations} steps of regularised maximum likelihood" if meta.ml_iterations else "")
        for key in ("iterations", "iterations_after_last_frame", "ml_iterations", "error", "frames_used",
                    "seconds_after_last_frame",
                    "seconds_per_iteration_after_last_frame", "device"):
            process[key] = getattr(meta, key)
        source = entry["instrument_1"].require_group("source_1")
        if "probe" in source:
            del source["probe"]
        source["probe"] = frame.array("initial_probe")

    def flush(self) -> None:
        self._file.flush()
        self.committed.update(frame.header.frame for frame, meta in self._pending if isinstance(meta, CleanFrame))
        self._pending.clear()

    def recover(self) -> None:
        """After a failed write or flush: open the file again and write what was not flushed."""
        quiet_close(self._file)
        self._file = h5py.File(self.path, "r+", libver=LIBVER_PLAIN)
        self._bind()
        for frame, meta in self._pending:
            if isinstance(meta, Reconstruction):
                self._reconstruction(frame, meta)
            else:
                self._store(frame, meta)
        self.flush()
        self.broken = False

    def redo_cost(self) -> int:
        return sum(self.cost(frame, meta) for frame, meta in self._pending)

    def close(self) -> None:
        if not self._file.id.valid:
            return
        self.flush()
        entry = self._file["entry_1"]
        if "end_time" in entry:  # from a close that failed
            del entry["end_time"]
        entry["end_time"] = np.array(now_iso(), dtype=TIME)
        self._file.close()

    def abandon(self) -> None:
        quiet_close(self._file)
