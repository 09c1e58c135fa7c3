"""The peak stage (run several): frames in, peak lists out, and the frame itself only for hits.

Per frame: decompress, correct (detector.py), peakfinder8, classify; the record sent on carries
the peak list, the hit flag and, for a hit, the detector's bytes as they came (a compressed blob
stays compressed), so the writer stores hits without decoding them. Each process also sums the
corrected frames of each class and sends what it added since last time with a record every
`sums_interval_s`: the one place that sees every frame's pixels adds them, and the aggregation
downstream receives one image per interval instead of every frame.

The record of the newest frame is kept back (unacknowledged) until the next frame or the sums
timer, so the sums of a scan's last frames always leave before the scan can end.

Parameters are OM's peakfinder8 ones plus the hit limits; `configure` changes them for the
next frame, and a bad value is refused with the reason.
"""

from __future__ import annotations

import logging
import time

import numpy as np
from pydantic import Field, model_validator

from libs.common.frames import ArraySpec, Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime, Token
from libs.crystallography.corrections import Corrections
from libs.crystallography.hits import CLASSES, ClassSums, is_hit
from libs.crystallography.layouts import Layout, radius_map
from libs.crystallography.peakfinder8 import PeakFinder8, Peakfinder8Params
from services.peak_worker import detector

logger = logging.getLogger(__name__)

PEAKS = "peaks"
"""`meta.kind` of a record."""


class Params(Peakfinder8Params):
    min_peaks: int = Field(10, ge=0, description="a hit has at least this many peaks")
    max_peaks: int = Field(100_000, ge=0, description="and at most this many")
    asic_shape: tuple[int, int] | None = Field(None, description="ASIC (rows, columns); default from the scan")
    flatfield: bool = Field(True, description="apply the detector's flatfield unless it did")
    sums_interval_s: float = Field(2.0, gt=0, le=60, description="how often the class sums go downstream")

    @model_validator(mode="after")
    def _hit_range(self) -> Params:
        if self.min_peaks > self.max_peaks:
            raise ValueError(f"min_peaks {self.min_peaks} > max_peaks {self.max_peaks}: nothing would be a hit")
        return self


class Service(Runtime):
    Params = Params

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._reset()
        _compile()

    def _reset(self) -> None:
        self._finder: PeakFinder8 | None = None
        self._corrections: Corrections | None = None
        self._sums: ClassSums | None = None
        self._pending: tuple[Token, Frame] | None = None
        self._sums_due = time.monotonic()
        self._tally = np.zeros(3, np.int64)
        """Frames, hits and peaks of this process in the current scan."""

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._reset()

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        self._finder = self._corrections = None

    def on_configure(self, params: Params) -> None:
        self._finder = None

    def on_abort(self) -> int:
        dropped = 1 if self._pending else 0
        self._reset()
        return dropped

    def on_frame(self, frame: Frame) -> None:
        raw = frame.array("data")
        finder, corrections = self._prepare(raw.shape)
        corrected = corrections.apply(raw)
        peaks = finder.find(corrected)
        hit = is_hit(len(peaks), self.params.min_peaks, self.params.max_peaks)
        self._sums.add(corrected, hit, frame.header.frame)
        self._tally += (1, hit, len(peaks))
        spec = frame.spec("data")
        blobs = [(ArraySpec(name=name, dtype="<f4", shape=a.shape), a) for name, a in peaks.as_arrays().items()]
        if hit:
            blobs.append((spec, frame.raw("data")))
        meta = {"kind": PEAKS, "n_peaks": len(peaks), "found": peaks.found, "hit": hit,
                "frame": {"shape": list(spec.shape), "dtype": spec.dtype, "compression": spec.compression},
                "max_num_peaks": self.params.max_num_peaks}
        record = Frame.from_blobs(scan_id=frame.header.scan_id, epoch=self.epoch, frame=frame.header.frame,
                                  origin=self.name, blobs=blobs, meta=meta)
        self._send_pending()
        if time.monotonic() >= self._sums_due:
            self.emit(self._with_sums(record))
        else:
            self._pending = (self.hold(), record)
            self.wake(self._sums_due - time.monotonic())

    def produce(self) -> float | None:
        """The sums timer: the kept-back record leaves with the sums."""
        if self._pending is not None:
            token, record = self._pending
            self._pending = None
            self.emit(self._with_sums(record), parent=token)
            self.release(token)
        return None

    def on_scan_end(self) -> None:
        frames, hits, peaks = self._tally.tolist()
        logger.info("scan %s: %d frames, %d hits, %d peaks in this process",
                    self.scan.scan_id, frames, hits, peaks)

    def _send_pending(self) -> None:
        if self._pending is not None:
            token, record = self._pending
            self._pending = None
            self.emit(record, parent=token)
            self.release(token)

    def _with_sums(self, record: Frame) -> Frame:
        self._sums_due = time.monotonic() + self.params.sums_interval_s
        delta = self._sums.take()
        blobs = list(zip(record.header.arrays, record.buffers, strict=True))
        blobs += [(ArraySpec(name=f"{CLASSES[cls]}_sum", dtype="<f8", shape=s.shape), s)
                  for cls, s in delta.sums.items()]
        meta = {**record.header.meta, "sum_frames": delta.frames.tolist(), "summed": delta.numbers}
        return Frame.from_blobs(scan_id=record.header.scan_id, epoch=record.header.epoch, frame=record.header.frame,
                                origin=record.header.origin, blobs=blobs, meta=meta)

    def _prepare(self, shape: tuple[int, int]) -> tuple[PeakFinder8, Corrections]:
        """The corrections and the peak finder for this scan's frames and the parameters in force."""
        if self._corrections is None or self._corrections.good.shape != shape:
            self._corrections = detector.corrections(self.headers, shape, flatfield=self.params.flatfield)
            self._finder = None
        if self._finder is None:
            layout = detector.layout(self.scan, shape, self.params.asic_shape)
            centre = detector.beam_center(self.scan, self.headers, shape)
            self._finder = PeakFinder8(layout, radius_map(shape, centre), self._corrections.good,
                                       self.params)
            logger.info("scan %s: peakfinder8 on %s (ASICs %s), beam centre %s, %d pixels searched",
                        self.scan.scan_id if self.scan else "-", shape, layout.asic_shape, centre,
                        self._finder.pixels)
        if self._sums is None or self._sums.shape != shape:
            self._sums = ClassSums(shape)
        return self._finder, self._corrections


def _compile() -> None:
    """Compile (or load from numba's cache) the kernels before registering: compiling them on
    the first frame would block the event loop for seconds, long enough to miss heartbeats."""
    shape = (8, 8)
    finder = PeakFinder8(Layout("warm-up", shape, shape), np.ones(shape, np.float32), np.ones(shape, bool),
                         Peakfinder8Params())
    corrections = Corrections.build(shape, flatfield=np.ones(shape, np.float32))
    for dtype in (np.uint16, np.uint32, np.float32):
        finder.find(corrections.apply(np.zeros(shape, dtype)))
