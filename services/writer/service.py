"""The writer stage: a scan's frames into one CXI file in `output_dir`.

What file depends on what comes: detector frames go to `<scan_id>_raw.cxi` as they arrived
(raw_file.py); a ptychography scan's clean frames and its reconstruction go to `<scan_id>.cxi`
(ptycho_file.py); the peak stage's records go to `<scan_id>.cxi` in Cheetah's layout
(sx_file.py), and the writer publishes their aggregates (virtual powder, hit rate, peaks per
frame, the geometry for resolution rings) and the latest hit with its peaks as previews every
`preview_interval_s`. The file opens with the first frame (its arrays' shapes, types
and compression come with it, the geometry with the scan header and the scan description) and
closes when the scan ends or is aborted. It is flushed at least every `flush_interval_s` while
frames come, so a live SWMR reader follows it and a crash loses at most that much. A writer
restarted mid-scan continues in `<scan_id>_raw.part2.cxi` (which names the earlier part) rather
than overwrite what is on disk; it leaves out the frames the earlier parts hold and counts them,
and a crystallography writer starts from the aggregates its predecessor left. The file of a
killed writer still carries HDF5's "open for writing" flag: h5py opens it with `swmr=True` (as
any live reader does), or after `h5clear -s`.

Nothing is acknowledged before it is on disk. A frame is held from its arrival until a flush
that succeeded covers it. A write that fails (disk full, read-only, permissions, I/O error; or
less than `reserve_mb` free, checked before the bytes go to HDF5) leaves every frame not yet on
disk held: the writer publishes `write_failed` (path, errno, what to do) once per cause, stops
granting credit (back-pressure holds the pipeline), tries again every `retry_s`, and once it
works writes what it holds, resumes its input and publishes `write_resumed`. The HDF5 handle
that saw the failure is not used again (after ENOSPC a chunk written again through it reads
back as fill value): the file is opened anew and the frames since its last good flush written
again. One file per scan per writer process, whatever fails. `start_scan` is refused when the
output directory cannot be created or written, or has not room for the announced scan.

A peak record that comes again (its frame re-sent to another peak process after one was lost) is
not written again, but the class sums riding on it may be what its first copy lacked: they are
merged unless one of their frames is summed already (sx_file.py), and the record is held until a
flush covers it, like any frame.

Every writer tells front-ends how long its frames took: at each flush that succeeds, the frames it
makes safe (each once, not a record that came again) add the time from their receiver's stamp
(`FrameHeader.received`) to now into the scan's histogram (libs/common/previews.py `Latency`),
published as the preview `latency` (`counts`, `edges_s`; meta p50_s, p95_s, max_s) every
`preview_interval_s` and once more at the end of the scan. time.time() on both sides: exact on one
host, and across hosts only as good as the clocks' synchronization.
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from libs.common.contracts import (DETECTOR_HEADER, CleanFrame, FrameMeta, Peaks, ScanHeader, header_name, parse_record,
                                   raw_path)
from libs.common.errors import FrameError, SurveyorError
from libs.common.frames import ArraySpec, Frame
from libs.common.messages import ScanDescription, ServiceStats
from libs.common.previews import Latency
from libs.common.runtime import Service as Runtime, Token
from libs.common.timers import Timer
from services.writer.disk import (EPOCH_ATTR, IO_ERRORS, MB, RETRYABLE, SCAN_ATTR, Parts, Space, advice,
                                  error_number, free_bytes, open_part)
from services.writer.params import Params
from services.writer.ptycho_file import PtychoFile
from services.writer.raw_file import RawFile
from services.writer.sx_file import SxFile

logger = logging.getLogger(__name__)


FLUSH_FRAMES = 1000
"""Flush at least this often too: unflushed frames stay in the producer's ledger until then."""


class OutputError(SurveyorError):
    """The output directory cannot take the scan (not writable, not enough room)."""


class _Held(Exception):
    """A write failed and was taken note of (`Service._fail`): the frame stays held, first in the queue."""


@dataclass
class Failure:
    code: int | None
    path: str
    what: str


File = RawFile | PtychoFile | SxFile


class Service(Runtime):
    Params = Params
    _file: File | None = None

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._queue: deque[tuple[Frame, FrameMeta, Token | None]] = deque()
        """Frames held and not yet written (a write failed): written in order once it works, each
        with its meta as parsed when it came."""
        self._unflushed: list[tuple[Frame, FrameMeta, Token | None]] = []
        """Frames written since the last flush that succeeded, with their holds."""
        self._headers: dict[str, ScanHeader] = {}
        """The scan headers of the scan by name, their meta parsed as they came."""
        self._next_preview = 0.0
        self._flush_timer: Timer | None = None
        """Armed by the first frame written since a flush (once, not per frame)."""
        self._parts: Parts | None = None
        """This process's file for the current scan and the scan's earlier parts: chosen once."""
        self._failure: Failure | None = None
        """What failed last, while writing fails."""
        self._failing_since: float | None = None
        self._reported: tuple[int | None, str] | None = None
        """The cause of the last `write_failed` event, until writing resumes."""
        self._space = Space(Path(self.params.output_dir), self._reserve)
        self._created_size = 0
        self._estimate: tuple[int, float] | None = None
        """(fixed bytes, bytes per frame) of the last scan's file: the next scan's room."""
        self._latency = Latency()
        """The scan's frames' times from arrival to disk."""
        self._stamps: list[float] = []
        """The arrival stamps of the frames written since the last flush that succeeded (each
        frame once: not a record that came again), added to `_latency` when a flush covers them."""

    @property
    def _reserve(self) -> int:
        return int(self.params.reserve_mb * MB)

    # --- scans ------------------------------------------------------------------------------

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._parts, self._failure, self._reported, self._failing_since = None, None, None, None
        self.counters.written = self.counters.delivered = 0  # an output stage
        self._latency, self._stamps, self._next_preview = Latency(), [], 0.0
        directory = Path(self.params.output_dir)
        self._space = Space(directory, self._reserve)
        try:
            try:
                self._check_room(scan, directory)
            except OSError as exc:  # statvfs of a directory that fails (EIO)
                raise OutputError(f"output directory {directory} cannot be checked: {exc}") from None
        except OutputError as exc:
            if not self._continuing(scan, directory):
                logger.warning("scan %s refused: %s", scan.scan_id, exc)
                raise
            # Joining a scan under way (a restarted writer): frames stay held until writing works.
            logger.warning("scan %s goes on although %s", scan.scan_id, exc)
            self.report("write_failed", f"the writer joins scan {scan.scan_id} although {exc}",
                        path=str(directory), errno=None, strerror=str(exc), action="see the message")

    def _check_room(self, scan: ScanDescription, directory: Path) -> None:
        try:
            directory.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise OutputError(f"output directory {directory} cannot be created: {os.strerror(exc.errno or 0)}"
                              f"; {advice(exc.errno, directory.parent, self._reserve)}") from None
        if os.statvfs(directory).f_flag & os.ST_RDONLY:
            raise OutputError(f"output directory {directory} is on a read-only file system; "
                              f"{advice(errno.EROFS, directory, self._reserve)}")
        if not os.access(directory, os.W_OK | os.X_OK):
            raise OutputError(f"output directory {directory} is not writable by this process "
                              f"(uid {os.getuid()}); {advice(errno.EACCES, directory, self._reserve)}")
        try:
            with tempfile.NamedTemporaryFile(dir=directory, prefix=".surveyor-probe-") as probe:
                probe.write(b"surveyor")
                probe.flush()
        except OSError as exc:
            raise OutputError(f"output directory {directory} cannot be written: {os.strerror(exc.errno or 0)}"
                              f"; {advice(exc.errno, directory, self._reserve)}") from None
        free = free_bytes(directory)
        need, how = self._reserve, f"the {self._reserve / MB:.0f} MB the writer keeps free"
        per_frame = scan.metadata.get("frame_bytes")
        fixed = 0
        if per_frame is None and self._estimate is not None:
            fixed, per_frame = self._estimate
        if per_frame and scan.n_frames:
            extra = fixed + scan.n_frames * float(per_frame)
            need += int(extra)
            how = (f"{scan.n_frames} frames x {float(per_frame) / MB:.3g} MB (estimated from "
                   f"{'the scan metadata' if 'frame_bytes' in scan.metadata else 'the last scan'}) plus {how}")
        if free < need:
            raise OutputError(f"output directory {directory} has {free / MB:.1f} MB free; scan {scan.scan_id} needs "
                              f"{need / MB:.1f} MB: {how}; free space there or choose another output_dir")

    def _continuing(self, scan: ScanDescription, directory: Path) -> bool:
        """Files of this scan and epoch are there already: a writer of the scan stopped mid-scan."""
        for path in directory.glob(f"{scan.scan_id}*.cxi"):
            try:
                with open_part(path) as f:
                    if f.attrs.get(SCAN_ATTR) == scan.scan_id and int(f.attrs.get(EPOCH_ATTR, -1)) == self.epoch:
                        return True
            except (*IO_ERRORS, ValueError):
                continue
        return False

    def on_scan_end(self) -> None:
        if isinstance(self._file, SxFile):
            self._preview()
        self._close()
        self._preview_latency()  # with the last flush's frames

    def on_abort(self) -> int:
        dropped = len(self._queue)
        self._queue.clear()
        self._unflushed.clear()
        self._stamps.clear()
        self._headers = {}
        if self._file is not None:
            file, self._file = self._file, None
            try:
                if self._failure is not None or file.broken:
                    file.abandon()
                else:
                    file.close()
            except IO_ERRORS as exc:
                file.abandon()
                logger.warning("closing %s of the aborted scan failed: %s", file.path, exc)
        self._parts, self._failure, self._reported, self._failing_since = None, None, None, None
        self.pause_input(False)
        return dropped

    def close(self) -> None:
        self._close()

    # --- frames -----------------------------------------------------------------------------

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        self._headers[header_name(header)] = ScanHeader.of(header)

    def on_frame(self, frame: Frame) -> None:
        try:
            meta = self._meta(frame)
        except FrameError as exc:
            self._reject(exc)
            return
        self._take(frame, meta)

    def on_duplicate(self, frame: Frame) -> None:
        """A record already taken, come again: only the class sums riding on it are new (SxFile.write
        offers them and writes nothing else); it goes the way of any frame, held until flushed."""
        try:
            meta = self._meta(frame)
        except FrameError as exc:
            self._reject(exc)
            return
        if isinstance(meta, Peaks) and meta.sum_frames is not None:
            self._take(frame, meta)

    def _meta(self, frame: Frame) -> FrameMeta:
        """A frame's meta, parsed once as it comes: a record's by its kind, a clean frame's in a
        ptychography scan; None for a detector frame, whose meta is the detector's own and is not
        looked at (thousands come a second). FrameError if it does not parse."""
        meta = frame.header.meta
        if "kind" in meta:
            return parse_record(frame)
        if "index" in meta and self.scan is not None and self.scan.technique == "ptychography":
            return CleanFrame.of(frame)
        return None

    def _reject(self, error: FrameError) -> None:
        self.count("rejected")
        logger.warning("rejected the %s", error)

    def _take(self, frame: Frame, meta: FrameMeta) -> None:
        # Acknowledged once flushed: a frame this process dies holding is re-sent, never lost.
        self._queue.append((frame, meta, self.hold()))
        if self._failure is None:
            self._drain()

    def _drain(self) -> None:
        """Write the frames held, in order, until one fails."""
        while self._queue and self._failure is None:
            frame, meta, token = self._queue[0]
            try:
                fresh = self._write(frame, meta)
            except _Held:
                return
            except Exception as exc:  # noqa: BLE001 - a frame that cannot be written is rejected, as before
                self._queue.popleft()
                self.count("rejected")
                if isinstance(exc, FrameError):
                    logger.warning("rejected frame %d of scan %s: %s", frame.header.frame, frame.header.scan_id, exc)
                else:
                    logger.exception("frame %d of scan %s failed in the writer", frame.header.frame,
                                     frame.header.scan_id)
                self._release([token])
                continue
            self._queue.popleft()
            self._unflushed.append((frame, meta, token))
            if fresh and frame.header.received is not None:
                self._stamps.append(frame.header.received)
        if self._failure is not None:
            return
        if time.monotonic() >= self._next_preview:
            self._preview()
        if len(self._unflushed) >= FLUSH_FRAMES:
            self._flush()
        elif self._unflushed and (self._flush_timer is None or self._flush_timer.cancelled):
            self._flush_timer = self.after(self.params.flush_interval_s, self._on_timer)

    def _write(self, frame: Frame, meta: FrameMeta) -> bool:
        """Write one frame (_Held when it cannot be now); False for a record already written."""
        if self._file is None:
            self._open(frame, meta)
        elif isinstance(self._file, RawFile) and frame.header.arrays != self._file.specs:
            raise FrameError(f"frame {frame.header.frame} ({_describe(frame.header.arrays)}) does not fit "
                             f"{self._file.path} ({_describe(self._file.specs)})")
        elif not isinstance(meta, self._file.takes):
            raise FrameError(f"frame {frame.header.frame} from {frame.header.origin} (a {_kind(meta)}) does not go "
                             f"in {self._file.path}, which takes {'s and '.join(map(_kind, self._file.takes))}s")
        try:
            self._space.take(self._file.cost(frame, meta))
        except OSError as exc:
            self._fail(exc, f"frame {frame.header.frame}", self._space.directory)
            if self._unflushed and not self._file.broken:
                self._flush()  # what is written goes to disk, in the reserve: those frames are safe
            raise _Held from exc
        try:
            return self._file.write(frame, meta) is not False
        except IO_ERRORS as exc:
            self._file.broken = True
            self._fail(exc, f"frame {frame.header.frame}", self._file.path)
            raise _Held from exc

    def _open(self, frame: Frame, meta: FrameMeta) -> None:
        scan_id, directory = frame.header.scan_id, Path(self.params.output_dir)
        if isinstance(meta, Peaks):
            kind, stem = SxFile, scan_id
        elif isinstance(meta, CleanFrame):
            kind, stem = PtychoFile, scan_id
        else:
            kind, stem = RawFile, Path(raw_path(self.params.output_dir, scan_id)).stem
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if self._parts is None:
                self._parts = Parts.find(directory, stem, scan_id, self.epoch)
            self._space.take(kind.creation_cost(frame, meta))
        except IO_ERRORS as exc:
            self._fail(exc, "the output directory", directory)
            raise _Held from exc
        path = self._parts.path
        try:
            detector = self._headers.get(DETECTOR_HEADER)
            if kind is SxFile:
                file = SxFile(path, scan=self.scan, header=detector, record=frame, peaks=meta,
                              window=self.params.hit_rate_window, epoch=self.epoch, parts=self._parts)
            elif kind is PtychoFile:
                file = PtychoFile(path, scan=self.scan, headers=self._headers, size=frame.header.arrays[0].shape[-1],
                                  epoch=self.epoch, parts=self._parts)
            else:
                file = RawFile(path, specs=frame.header.arrays, scan=self.scan, header=detector,
                               epoch=self.epoch, parts=self._parts)
        except IO_ERRORS as exc:
            self._fail(exc, "a new file", path)
            raise _Held from exc
        self._file = file
        self._created_size = _size(path)
        earlier = f" after {len(self._parts.earlier)} earlier part(s) holding {len(file.earlier)} frames" \
            if self._parts.earlier else ""
        logger.info("scan %s: writing %s%s", scan_id, path, earlier)
        outputs = [*map(str, self._parts.earlier), str(path)]
        if isinstance(file, SxFile):
            outputs.extend(map(str, file.geometries))
        elif isinstance(file, RawFile):
            outputs.append(str(file.master))
        self.counters.outputs.extend(p for p in outputs if p not in self.counters.outputs)
        self._count_on_disk()

    def _on_timer(self) -> None:
        """The flush timer, and the retry timer while writing fails."""
        if self._failure is not None:
            self._retry()
        elif self._unflushed:
            self._flush()
        if self._failure is not None:
            self.after(self.params.retry_s, self._on_timer)

    def _flush(self) -> None:
        if self._file is not None:
            self._space.refresh()
            try:
                self._file.flush()
            except IO_ERRORS as exc:
                self._file.broken = True
                self._fail(exc, "a flush", self._file.path)
                return
            self._count_on_disk()
        flushed, self._unflushed = self._unflushed, []
        stamps, self._stamps = self._stamps, []
        self._latency.add(stamps, time.time())
        self._release(token for _, _, token in flushed)

    def _release(self, tokens: Iterable[Token | None]) -> None:
        """Release holds, except one that a frame still waiting to be written has too (a record and
        its duplicate share the token): it is acknowledged once that frame is flushed as well."""
        waiting = {token for _, _, token in self._queue} | {token for _, _, token in self._unflushed}
        for token in tokens:
            if token is not None and token not in waiting:
                self.release(token)

    def _count_on_disk(self) -> None:
        """`written` and `delivered`: the distinct frames of the scan on disk, every part of it."""
        n = self._file.frames_on_disk
        for name in ("written", "delivered"):
            before = getattr(self.counters, name) or 0
            setattr(self.counters, name, n)
            setattr(self.totals, name, (getattr(self.totals, name) or 0) + n - before)

    # --- failures ---------------------------------------------------------------------------

    def _fail(self, exc: Exception, what: str, path: Path) -> None:
        code = error_number(exc)
        self._failure = Failure(code, str(path), what)
        if self._failing_since is None:
            self._failing_since = time.monotonic()
        self.pause_input(True)
        self.after(self.params.retry_s, self._on_timer)
        held = len(self._queue) + len(self._unflushed)
        cause = (code, str(path))
        if cause == self._reported:
            logger.debug("writing %s still fails: %s", what, exc)
            return
        self._reported = cause
        strerror = os.strerror(code) if code else str(exc)
        action = advice(code, Path(self.params.output_dir), self._reserve)
        message = f"cannot write {what} to {path}: {strerror}; {held} frames held, input paused; {action}"
        logger.warning("%s (%s)", message, exc)
        self.report("write_failed", message, path=str(path), errno=code,
                    errno_name=errno.errorcode.get(code, "") if code else "", strerror=strerror,
                    action=action, frames_held=held, scan_id=self.scan.scan_id if self.scan else None)

    def _retry(self) -> None:
        failure, self._failure = self._failure, None
        self._space.refresh()
        if self._file is not None and self._file.broken:
            path = self._file.path
            try:
                self._space.take(self._file.redo_cost())
                self._file.recover()
            except IO_ERRORS as exc:
                if error_number(exc) in RETRYABLE:
                    self._fail(exc, f"{path.name} again", path)
                    return
                self._abandon(exc)
        self._drain()
        if self._failure is None and self._unflushed:
            self._flush()
        if self._failure is None:
            self.pause_input(False)
            paused = time.monotonic() - self._failing_since
            self._failing_since = None
            path = self._file.path if self._file is not None else failure.path
            logger.info("writing to %s works again after %.1f s", path, paused)
            self.report("write_resumed", f"writing to {path} works again after {paused:.1f} s; input resumed",
                        path=str(path), paused_s=round(paused, 1), scan_id=self.scan.scan_id if self.scan else None)
            self._reported = None

    def _abandon(self, exc: Exception) -> None:
        """The file cannot be opened again (not for want of space or permission): the frames since
        its last good flush go to a new part, as a successor's would."""
        logger.error("%s cannot be opened again (%s); its frames since the last flush go to a new part",
                     self._file.path, exc)
        self.report("write_failed", f"{self._file.path} cannot be opened again after a failed write ({exc}); "
                    "the scan continues in a new part", path=str(self._file.path), errno=error_number(exc),
                    strerror=str(exc), action="none: the writer continues in a new file")
        self._file.abandon()
        self._file, self._parts = None, None
        self._queue.extendleft(reversed(self._unflushed))
        self._unflushed.clear()
        self._stamps.clear()  # stamped again as they are written again

    def stats(self) -> ServiceStats:
        stats = super().stats()
        return stats.model_copy(update={"state": "paused"}) if self._failure is not None else stats

    # --- the end ----------------------------------------------------------------------------

    def _preview(self) -> None:
        """The previews due: a crystallography file's aggregates and its latest hit (when a new one
        came), and the latency histogram (when frames were added to it)."""
        self._next_preview = time.monotonic() + self.params.preview_interval_s
        if isinstance(self._file, SxFile):
            arrays, meta = self._file.preview()
            self.preview("crystallography", arrays, **meta, preview_interval_s=self.params.preview_interval_s)
            hit = self._file.latest_hit()
            if hit is not None:
                self.preview("latest_hit", hit[0], **hit[1])
        self._preview_latency()

    def _preview_latency(self) -> None:
        if self._latency.changed:
            arrays, meta = self._latency.preview()
            self.preview("latency", arrays, **meta)

    def _close(self) -> None:
        if self._file is not None and self._failure is None and not self._queue:
            self._flush()
        if self._file is not None:
            file, self._file = self._file, None
            if self._failure is not None or self._queue:
                logger.error("closing %s while %d frames are not on disk (writing fails); they stay held",
                             file.path, len(self._queue) + len(self._unflushed))
                file.abandon()
                return
            try:
                file.close()
            except IO_ERRORS as exc:
                file.abandon()
                logger.error("closing %s failed: %s; the file is as of its last flush", file.path, exc)
                self.report("write_failed", f"closing {file.path} failed: {exc}; every frame is on disk, the "
                            "file is as of its last flush (open it with swmr=True)", path=str(file.path),
                            errno=error_number(exc), strerror=str(exc), action="none")
                return
            frames = len(file.committed)
            logger.info("closed %s with %d frames", file.path, frames)
            if frames:
                size = _size(file.path)
                self._estimate = (self._created_size, max(0, size - self._created_size) / frames)
        self._parts = None


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _describe(specs: tuple[ArraySpec, ...]) -> str:
    return ", ".join(f"{s.name} {s.dtype}{list(s.shape)} {s.compression}" for s in specs)


def _kind(meta: FrameMeta | type) -> str:
    """What a frame is, by its parsed meta (or the model of one), in messages."""
    model = meta if isinstance(meta, type) else type(meta)
    return getattr(model, "label", "detector frame")
