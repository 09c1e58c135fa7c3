"""The writer stage: a scan's frames into one CXI file in `output_dir`.

What file depends on what comes: detector frames go to `<scan_id>_raw.cxi` as they arrived
(raw_file.py); a ptychography scan's clean frames and its reconstruction go to `<scan_id>.cxi`
(ptycho_file.py); the peak stage's records go to `<scan_id>.cxi` in Cheetah's layout
(sx_file.py), and the writer publishes their aggregates (virtual powder, hit rate) as previews
every `preview_interval_s`. The file opens with the first frame (its arrays' shapes, types
and compression come with it, the geometry with the scan header and the scan description) and
closes when the scan ends or is aborted. It is flushed at least every `flush_interval_s` while
frames come, so a live SWMR reader follows it and a crash loses at most that much. A writer
restarted mid-scan continues in `<scan_id>_raw.part2.cxi` (which names the earlier part) rather
than overwrite what is on disk; both files are in the summary. The file of a killed writer still
carries HDF5's "open for writing" flag: h5py opens it with `swmr=True` (as any live reader does),
or after `h5clear -s`.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

from libs.common.errors import FrameError
from libs.common.frames import ArraySpec, Frame
from libs.common.runtime import Service as Runtime, Token
from services.peak_worker.service import PEAKS
from services.writer.ptycho_file import PtychoFile
from services.writer.raw_file import RawFile
from services.writer.sx_file import SxFile

logger = logging.getLogger(__name__)


FLUSH_FRAMES = 1000
"""Flush at least this often too: unflushed frames stay in the producer's ledger until then."""


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    output_dir: str = "out"
    flush_interval_s: float = Field(0.25, gt=0, le=60, description="longest time written frames stay unflushed")
    preview_interval_s: float = Field(1.0, gt=0, description="crystallography: aggregates to front-ends this often")
    hit_rate_window: int = Field(100, ge=1, description="crystallography: the hit rate is over this many frames")


def free_path(directory: Path, stem: str) -> Path:
    """`stem.cxi`, or `stem.partN.cxi` when a writer restarted mid-scan: never overwrite a file."""
    path = directory / f"{stem}.cxi"
    part = 1
    while path.exists():
        part += 1
        path = directory / f"{stem}.part{part}.cxi"
    return path


class Service(Runtime):
    Params = Params
    _file: RawFile | PtychoFile | SxFile | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._unflushed: list[Token] = []
        self._next_preview = 0.0

    def on_frame(self, frame: Frame) -> None:
        if self._file is None:
            self._file = self._open(frame)
            logger.info("scan %s: writing %s", frame.header.scan_id, self._file.path)
            self.counters.outputs.append(str(self._file.path))
            if isinstance(self._file, SxFile):
                self.counters.outputs.append(str(self._file.geometry))
        elif isinstance(self._file, RawFile) and frame.header.arrays != self._file.specs:
            raise FrameError(f"frame {frame.header.frame} ({_describe(frame.header.arrays)}) does not fit "
                             f"{self._file.path} ({_describe(self._file.specs)})")
        if self._file.write(frame):
            self.count("written")
        if isinstance(self._file, SxFile) and time.monotonic() >= self._next_preview:
            self._preview()
        # Acknowledged once flushed: a frame this process dies holding is re-sent, never lost.
        self._unflushed.append(self.hold())
        if len(self._unflushed) == 1:
            self.wake(self.params.flush_interval_s)
        elif len(self._unflushed) >= FLUSH_FRAMES:
            self._flush()

    def produce(self) -> float | None:
        """The flush timer."""
        self._flush()
        return None

    def _open(self, frame: Frame) -> RawFile | PtychoFile | SxFile:
        scan_id, directory = frame.header.scan_id, Path(self.params.output_dir)
        if frame.header.meta.get("kind") == PEAKS:
            return SxFile(free_path(directory, scan_id), scan=self.scan, header=self.header, record=frame,
                          window=self.params.hit_rate_window)
        if "index" in frame.header.meta and self.scan is not None and self.scan.technique == "ptychography":
            size = frame.header.arrays[0].shape[-1]
            return PtychoFile(free_path(directory, scan_id), scan=self.scan, headers=self.headers, size=size)
        path = free_path(directory, f"{scan_id}_raw")
        earlier = tuple(sorted(p.name for p in path.parent.glob(f"{scan_id}_raw*.cxi")))
        return RawFile(path, specs=frame.header.arrays, scan=self.scan, header=self.header, previous_parts=earlier)

    def _flush(self) -> None:
        if self._file is not None:
            self._file.flush()
        self._release_flushed()

    def _release_flushed(self) -> None:
        for token in self._unflushed:
            self.release(token)
        self._unflushed.clear()

    def _preview(self) -> None:
        self._next_preview = time.monotonic() + self.params.preview_interval_s
        arrays, meta = self._file.preview()
        self.preview("crystallography", arrays, **meta)

    def on_scan_end(self) -> None:
        if isinstance(self._file, SxFile):
            self._preview()
        self._close()

    def on_abort(self) -> int:
        self._close()
        return 0

    def close(self) -> None:
        self._close()

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            logger.info("closed %s with %d frames", self._file.path, len(self._file.written))
            self._file = None
        self._release_flushed()


def _describe(specs: tuple[ArraySpec, ...]) -> str:
    return ", ".join(f"{s.name} {s.dtype}{list(s.shape)} {s.compression}" for s in specs)
