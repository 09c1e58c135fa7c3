"""The peak stage (run several): frames in, peak lists out, and the frame itself only for hits.

Per frame: decompress, correct (libs/crystallography/detector.py), peakfinder8, classify; the record sent on carries
the peak list, the hit flag and, for a hit, the detector's bytes as they came (a compressed blob
stays compressed), so the writer stores hits without decoding them. Each process also sums the
corrected frames of each class and sends what it added since last time with a record every
`sums_interval_s`: the one place that sees every frame's pixels adds them, and the aggregation
downstream receives one image per interval instead of every frame.

The record of the newest frame is kept back until the next frame or the sums timer, so the sums of
a scan's last frames always leave before the scan can end. Every summed frame stays unacknowledged
until the record carrying the delta with its sum has been sent (that record is a child of every
frame in the delta), so a process killed between two deltas loses no frame's contribution: the
frames are re-sent to another process, which sums them again.

A frame re-sent after its process was lost (`redelivered`) may already be in a delta the writer
merged (the process died after the writer had the delta, before the acknowledgement went
upstream). Its sum goes in a delta of its own, on its own record (only its class), never into the
shared one: the writer, which refuses a delta holding a frame it has summed, then refuses exactly
that frame, and the fresh frames' shared deltas are never refused for it.

Parameters are OM's peakfinder8 ones plus the hit limits; `configure` changes them for the
next frame, and a bad value is refused with the reason.
"""

from __future__ import annotations

import logging
import time

import numpy as np

from libs.common.contracts import Peaks, PixelFormat
from libs.common.frames import ArraySpec, Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime, Token
from libs.crystallography import detector
from libs.crystallography.corrections import Corrections
from libs.crystallography.hits import CLASSES, ClassSums, SumsDelta, is_hit
from libs.crystallography.layouts import Layout, radius_map
from libs.crystallography.params import Peakfinder8Params
from libs.crystallography.peakfinder8 import PeakFinder8
from services.peak_worker.params import Params

logger = logging.getLogger(__name__)


class Service(Runtime):
    Params = Params

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._reset()
        self._early: list[tuple[Token, Frame, bool]] = []
        """Frames that came before the scan start (a process that joins a running scan can be sent
        frames before it hears of it): held, and taken once it starts."""
        _compile()

    def _reset(self) -> None:
        self._finder: PeakFinder8 | None = None
        self._corrections: Corrections | None = None
        self._sums: ClassSums | None = None
        self._pending: tuple[Token, Frame, Peaks] | None = None
        """The newest record, kept back: the next delta leaves with it."""
        self._summed: list[Token] = []
        """The frames in the sums not yet sent: held until the delta with them is."""
        self._sums_due = time.monotonic()
        self._tally = np.zeros(3, np.int64)
        """Frames, hits and peaks of this process in the current scan."""

    def on_rejoin(self) -> None:
        """The frames summed and not yet sent were re-sent to the other processes, which sum them
        as frames of their own: a delta of them from here would be refused, fresh frames with it."""
        if self._sums is not None and self._summed:
            logger.warning("scan %s: dropped the unsent sums of %d frames, re-sent to other processes",
                           self.scan.scan_id if self.scan else "?", len(self._summed))
            self._sums.take()
        self._summed = []

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._reset()
        early, self._early = self._early, []
        for token, frame, redelivered in early:
            if frame.header.epoch == self.epoch:
                self._take_held(token, frame, redelivered)

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        self._finder = self._corrections = None

    def on_configure(self, params: Params, changed: set[str]) -> None:
        """Thresholds apply from the next frame; the finder's tables are rebuilt only for what
        they are built from, the corrections only for the flatfield."""
        if "flatfield" in changed:
            self._corrections = None
        if self._finder is not None and changed & (PeakFinder8.TABLES | {"asic_shape", "flatfield"}):
            self._finder = None
        elif self._finder is not None:
            self._finder.retune(params)

    def on_abort(self) -> int:
        dropped = len(self._summed) + len(self._early)
        self._reset()
        self._early = []
        return dropped

    def on_frame(self, frame: Frame) -> None:
        token = self.hold()
        if self.scan is None:
            self._early.append((token, frame, self.redelivered))
            return
        self._take_held(token, frame, self.redelivered)

    def _take_held(self, token: Token, frame: Frame, redelivered: bool) -> None:
        try:
            self._take(token, frame, redelivered)
        except Exception:  # noqa: BLE001 - one bad frame must not end the service, nor stay held
            self.count("rejected")
            logger.exception("frame %d of scan %s failed in %s", frame.header.frame, frame.header.scan_id, self.stage)
            if token not in self._summed:
                self.release(token)

    def _take(self, token: Token, frame: Frame, redelivered: bool) -> None:
        """One frame, held: its record (kept back until the next), its sum, held until the delta; a
        frame sent before to a lost process: its record at once, with a delta of its own."""
        raw = frame.array("data")
        if self._sums is not None and self._sums.shape != raw.shape:
            self._send_sums()  # what is summed so far leaves before the accumulator is replaced
        finder, corrections = self._prepare(raw.shape)
        corrected = corrections.apply(raw)
        peaks = finder.find(corrected)
        hit = is_hit(len(peaks), self.params.min_peaks, self.params.max_peaks)
        spec = frame.spec("data")
        blobs = [(ArraySpec(name=name, dtype="<f4", shape=a.shape), a) for name, a in peaks.as_arrays().items()]
        if hit:
            blobs.append((spec, frame.raw("data")))
        meta = Peaks(n_peaks=len(peaks), found=peaks.found, hit=hit, max_num_peaks=self.params.max_num_peaks,
                     frame=PixelFormat(shape=spec.shape, dtype=spec.dtype, compression=spec.compression))
        record = Frame.from_blobs(scan_id=frame.header.scan_id, epoch=self.epoch, frame=frame.header.frame,
                                  origin=self.name, blobs=blobs, meta=meta.to_meta(), received=frame.header.received)
        self._tally += (1, hit, len(peaks))
        if redelivered:
            # Its sum may be in the writer already: alone in its delta, refused or taken exactly.
            self.emit(_with_delta(record, meta, SumsDelta.of_frame(corrected, hit, frame.header.frame)),
                      parent=token)
            self.release(token)
            return
        self._sums.add(corrected, hit, frame.header.frame)
        self._summed.append(token)
        if self._pending is not None:
            # The previous record goes now, without the sums; its frame stays held for the delta.
            previous, kept, _ = self._pending
            self._pending = None
            self.emit(kept, parent=previous)
        self._pending = (token, record, meta)
        if time.monotonic() >= self._sums_due:
            self._send_sums()
        else:
            self.after(self._sums_due - time.monotonic(), self._send_sums)

    def on_scan_end(self) -> None:
        frames, hits, peaks = self._tally.tolist()
        logger.info("scan %s: %d frames, %d hits, %d peaks in this process",
                    self.scan.scan_id, frames, hits, peaks)

    def _send_sums(self) -> None:
        """The kept-back record leaves with the delta of the sums, as a child of every frame in it;
        then those frames are released (acknowledged once their records and the delta are)."""
        if self._pending is None:
            return
        token, record, meta = self._pending
        self._pending = None
        summed, self._summed = self._summed, []
        self._sums_due = time.monotonic() + self.params.sums_interval_s
        self.emit(_with_delta(record, meta, self._sums.take()), parent=token, parents=summed)
        for held in summed:
            self.release(held)

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


def _with_delta(record: Frame, meta: Peaks, delta: SumsDelta) -> Frame:
    """The record (its meta `meta`) with the class sums of `delta` riding on it (`sum_frames`: the
    count per class, `summed`: which frames; an array per class that has frames)."""
    blobs = list(zip(record.header.arrays, record.buffers, strict=True))
    blobs += [(ArraySpec(name=f"{CLASSES[cls]}_sum", dtype="<f8", shape=s.shape), s) for cls, s in delta.sums.items()]
    meta = meta.model_copy(update={"sum_frames": tuple(delta.frames.tolist()), "summed": delta.numbers})
    return Frame.from_blobs(scan_id=record.header.scan_id, epoch=record.header.epoch, frame=record.header.frame,
                            origin=record.header.origin, blobs=blobs, meta=meta.to_meta(),
                            received=record.header.received)


def _compile() -> None:
    """Compile (or load from numba's cache) the kernels before registering: compiling them on
    the first frame would block the event loop for seconds, long enough to miss heartbeats."""
    shape = (8, 8)
    finder = PeakFinder8(Layout("warm-up", shape, shape), np.ones(shape, np.float32), np.ones(shape, bool),
                         Peakfinder8Params())
    corrections = Corrections.build(shape, flatfield=np.ones(shape, np.float32))
    for dtype in (np.uint16, np.uint32, np.float32):
        finder.find(corrections.apply(np.zeros(shape, dtype)))
