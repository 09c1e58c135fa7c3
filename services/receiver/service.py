"""The receiver stage: where frames enter the pipeline.

Protocols (`params.protocol`):
- `stream1`, `stream2`, `stins`: a detector (or streaming-receiver) binds PUSH at `params.source`
  and this process connects PULL, as real receivers do (libs/common/detector has the formats);
- `replay`: the frames of an HDF5/CXI file at `params.source`, as a detector would send them;
- `synthetic`: frames generated here, paced by the pipeline's `[simulation]` table.

A series header opens a scan: it joins a `start_scan` that came before it, or else the receiver
asks the handler for a `raw` scan named after the series and holds the detector's messages until
it has started. The header goes to every downstream process as the scan header. The end message,
or `series_timeout_s` without any message, ends the series. Compressed blobs are checked, never
decompressed, and travel as they came. A bad message is rejected, counted, logged, and reported as
a `frame_rejected` event (at most one a second, with the count); the receiver keeps going.

Nothing is lost for want of metadata. A header part that cannot be used (an empty or misfitting
flatfield, pixel mask or count-rate blob, an unknown htype) is left out, named in a
`header_incomplete` event, and the series is received without it. The first image of a series
whose header never came (sent before this receiver connected, lost, or rejected) opens the series
as a header would, with one made from the image's own shape, type and encoding (a
`header_missing` event says so): its frames are written as a raw scan. Only images of a series
already closed are rejected.

Re-publication (STINS) follows the series as the pipeline takes it: the header when the series
opens, with `filename` the raw file the writer fed by this stage keeps (`<output_dir>/<scan_id>_raw.cxi`,
its output_dir as the pipeline gives it), then the images taken, then the end.

Memory from the detector is bounded twice. A message part over `max_message_bytes` (ZeroMQ's
MAXMSGSIZE) never gets in: ZeroMQ closes the link and drops it, and does not reconnect after
such a protocol error, so the receiver notices a disconnect with no retry, counts and reports the
loss as a rejected message, and connects again. And ZeroMQ's queue (RCVHWM) counts messages, not
bytes: it is `buffer_frames`, or fewer, so that even messages of `max_message_bytes` fill no more
than `buffer_mb` MiB. It is set once, before the link is made: libzmq wedges a link whose HWM
changes while messages queue (zeromq/libzmq#2509; a receiver that lowered it at a series header
took 243 of 500 frames and heard nothing more).

Front-ends see the last frame received: a preview named `last_frame` (`preview.<stage>`), the newest
frame binned to at most LAST_FRAME_PX pixels per side, at most once every LAST_FRAME_PERIOD_S (the
frame that is newest when one is due), and the last frame of each series when it ends. It costs a
reference per frame and one decode and binning a period, on the loop: never a copy per frame.

Each frame is stamped when it is taken in (`received`, time.time() on this host; libs/common/frames.py):
the stages carry the stamp on to their results, and the writer tells front-ends how long a frame
took from here to disk (its `latency` preview).
"""

from __future__ import annotations

import logging
import re
import time
from typing import Iterator

import numpy as np
import zmq
from pydantic import BaseModel
from zmq.utils.monitor import recv_monitor_message

from libs.common import codecs, messages
from libs.common.contracts import WRITER_OUTPUT_DIR, DetectorHeader, raw_path
from libs.common.errors import FrameError
from libs.common.detector import PROTOCOLS, Event, Image, SeriesEnd, SeriesStart, StreamError, header_from_image
from libs.common.frames import Frame
from libs.common.loop import receive
from libs.common.messages import ScanDescription
from libs.common.previews import downsampled
from libs.common.runtime import Service as Runtime
from libs.common.timers import Timer
from libs.simulation.synthetic import synthetic_frame
from services.receiver.params import MIB, Params
from libs.common.detector.replay import replay_events
from services.receiver.republish import Republisher

logger = logging.getLogger(__name__)

BATCH = 64
"""Messages taken per loop turn at most, so commands are never kept waiting."""
REPORT_PERIOD_S = 1.0
RETRY_S = 0.5
LINK_RETRY_S = 0.5
"""A detector link that went down and was not retried within this long was closed for good."""
LAST_FRAME_PX = 256
LAST_FRAME_PERIOD_S = 1.0


def queue_length(params: Params) -> int:
    """Detector messages ZeroMQ queues: `buffer_frames`, fewer if that many of the largest allowed
    message would fill more than `buffer_mb`."""
    return max(1, min(params.buffer_frames, int(params.buffer_mb * MIB) // params.max_message_bytes))


def scan_id_for(series: str, protocol: str) -> str:
    """A file-name-safe scan id for a series that came without a start_scan."""
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", series)[:100] or "0"
    return name if protocol == "replay" and name[0].isalnum() else f"series_{name}"


class Service(Runtime):
    Params = Params
    offload = False  # a source: reading the detector as fast as it sends is the loop's work

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._series: str | None = None
        self._series_info: SeriesStart | None = None
        self._scan_used = False
        self._held: SeriesStart | None = None
        self._held_image: Image | None = None
        """The first image of a series whose header never came, held with the header made from it."""
        self._asked = False
        self._frames: set[int] = set()
        self._aborted_series: str | None = None
        self._ended_series: str | None = None
        """The series closed last: images of it that come later are rejected."""
        self._last_input = time.monotonic()
        self._rejects = 0
        self._reject_reason = ""
        self._next_report = 0.0
        self._detector: zmq.Socket | None = None
        self._detector_monitor: zmq.Socket | None = None
        """Monitor of the detector socket: its disconnects and reconnection attempts."""
        self._unlinked: float | None = None
        """When the detector link went down with no reconnection attempt since."""
        self._replay: Iterator[Event] | None = None
        self._paced_from = 0.0
        self._replayed = 0
        self._synthetic_total = 0
        self._republisher: Republisher | None = None
        self._last_frame: Frame | None = None
        """The newest frame not shown yet as the `last_frame` preview."""
        self._next_frame_preview = 0.0
        self._preview_timer: Timer | None = None
        self._connect()

    def _endpoints(self) -> tuple[str, ...]:
        p = self.params
        return (p.protocol, p.source, p.republish, p.dataset)

    def on_configure(self, params: BaseModel) -> None:
        """A new source, protocol or re-publication endpoint takes effect at once (what a closed
        PULL socket still held is lost, as when a detector is re-cabled); other values just apply."""
        if self._endpoints() != self._connected:
            self._disconnect()
            self._connect()

    def _disconnect(self) -> None:
        if self._detector is not None:
            self.unwatch(self._detector)
            self.unwatch(self._detector_monitor)
            self._detector.disable_monitor()
            self._detector_monitor.close(linger=0)
            self._detector.close(linger=0)
            self._detector = self._detector_monitor = self._unlinked = None
        if self._republisher is not None:
            self._republisher.close()
            self._republisher = None
        if self._replay is not None:
            self._replay.close()
            self._replay = None

    def _connect(self) -> None:
        params = self.params
        self._connected = self._endpoints()
        if params.republish:
            self._republisher = Republisher(self.context, params.republish)
        if params.protocol in PROTOCOLS:
            self._decode = PROTOCOLS[params.protocol].decode
            codecs.warm()
            self._detector = self.context.socket(zmq.PULL)
            self._detector.setsockopt(zmq.LINGER, 0)
            self._detector.setsockopt(zmq.MAXMSGSIZE, params.max_message_bytes)
            self._detector.setsockopt(zmq.RCVHWM, queue_length(params))
            self._detector_monitor = self._detector.get_monitor_socket(
                zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED)
            self._detector.connect(params.source)
            self.watch(self._detector, self._on_detector)
            self.watch(self._detector_monitor, self._on_detector_event)
            logger.info("receiving %s from %s (queue of %d messages)", params.protocol, params.source,
                        queue_length(params))
        elif params.protocol == "replay":
            self._replay = replay_events(params.source, params.dataset)
            self._paced_from = time.monotonic()
            self.wake(0)
            logger.info("replaying %s", params.source)

    # --- input ------------------------------------------------------------------------------------

    def wants_input(self) -> bool:
        return super().wants_input() and self._held is None

    def _on_detector(self) -> None:
        for _ in range(BATCH):
            if not self.wants_input():
                return
            try:
                parts = receive(self._detector, copy=False)
            except zmq.Again:
                return
            self._last_input = time.monotonic()
            try:
                event = self._decode(parts)
            except StreamError as exc:
                self._reject(str(exc))
                continue
            self._handle(event)

    def _on_detector_event(self) -> None:
        self._read_detector_events()
        if self._unlinked is not None:
            self.wake(LINK_RETRY_S)

    def _read_detector_events(self) -> None:
        """ZeroMQ retries a detector link that broke, but not one it closed for a protocol error
        (a message part over max_message_bytes): that one shows as a disconnect with no retry."""
        while self._detector_monitor.poll(0):
            event = recv_monitor_message(self._detector_monitor)["event"]
            self._unlinked = time.monotonic() if event == zmq.EVENT_DISCONNECTED else None

    def _check_detector_link(self, now: float) -> float | None:
        """Connect again to a detector whose link ZeroMQ gave up; seconds until that is known."""
        if self._unlinked is None:
            return None
        self._read_detector_events()  # a full pipeline leaves watched sockets unread: a retry may be waiting
        if self._unlinked is None:
            return None
        waited = now - self._unlinked
        if waited < LINK_RETRY_S:
            return LINK_RETRY_S - waited
        self._unlinked = None
        self._reject(f"ZeroMQ closed the link to the detector at {self.params.source} and did not retry: a message "
                     f"part over max_message_bytes ({self.params.max_message_bytes} bytes) does that, and the "
                     f"message is lost; connected again (raise stages.{self.stage}.params.max_message_bytes if "
                     f"the detector's frames are that large)")
        self._detector.connect(self.params.source)
        return None

    def _handle(self, event: Event) -> None:
        if isinstance(event, SeriesStart):
            self._on_series_start(event)
        elif isinstance(event, Image):
            self._on_image(event)
        else:
            self._on_series_end(event)

    def _on_series_start(self, event: SeriesStart) -> None:
        if event.left_out:
            self._report_left_out(event)
        if self._series is not None:
            self._end_series(f"series {self._series} ended without its end message: series "
                             f"{event.series} started")
        if self.scan is not None and not self._scan_used:
            self._open(event)
        else:
            self._held = event
            self._ask_for_scan()

    def _report_left_out(self, event: SeriesStart) -> None:
        parts = [name for name, _ in event.left_out]
        why = "; ".join(f"{name}: {reason}" for name, reason in event.left_out)
        message = (f"series {event.series}: header part(s) left out ({why}); the series is received without "
                   f"them, and stages that need them (a pixel mask, a flatfield) go without; check the "
                   f"detector's flatfield and pixel-mask settings (Stream V1: header_detail \"all\")")
        logger.warning("%s", message)
        self.report("header_incomplete", message, series=event.series, parts=parts)

    def _on_image(self, event: Image) -> None:
        if self._series is None or (event.series is not None and event.series != self._series):
            if event.series is not None and event.series == self._aborted_series:
                self.count("dropped")
                return
            if event.series is not None and event.series == self._ended_series:
                self._reject(f"image {event.frame} of series {event.series} came after that series was closed "
                             f"(its end message, a newer series, or silence for series_timeout_s: raise "
                             f"stages.{self.stage}.params.series_timeout_s if the detector pauses that long)")
                return
            self._without_header(event)
            return
        if event.frame in self._frames:
            self.count("duplicates")
            logger.warning("scan %s: the detector sent frame %d twice; the second is dropped",
                           self.scan.scan_id, event.frame)
            return
        self._frames.add(event.frame)
        self._republish(event)
        frame = Frame.from_blobs(scan_id=self.scan.scan_id, epoch=self.epoch, frame=event.frame,
                                 origin=self.stage, blobs=event.blobs, meta=event.meta, received=time.time())
        self.emit(frame)
        self._keep_last_frame(frame)

    def _keep_last_frame(self, frame: Frame) -> None:
        """Show `frame` now if a `last_frame` preview is due, else when it is (unless a newer comes)."""
        self._last_frame = frame
        now = time.monotonic()
        if now >= self._next_frame_preview:
            self._publish_last_frame()
        elif self._preview_timer is None or self._preview_timer.cancelled:
            self._preview_timer = self.after(self._next_frame_preview - now, self._publish_last_frame)

    def _publish_last_frame(self) -> None:
        frame, self._last_frame = self._last_frame, None
        if frame is None:
            return
        self._next_frame_preview = time.monotonic() + LAST_FRAME_PERIOD_S
        spec = frame.spec()
        try:
            image, factor = downsampled(frame.array(), LAST_FRAME_PX)
        except (FrameError, ValueError) as exc:
            logger.debug("scan %s: frame %d not shown as last_frame: %s", frame.header.scan_id, frame.header.frame, exc)
            return
        self.preview("last_frame", {"data": image}, frame=frame.header.frame, shape=list(spec.shape),
                     dtype=spec.dtype, binning=factor)

    def _without_header(self, image: Image) -> None:
        """The first image of a series whose header never came opens it, as that header would have."""
        series = image.series if image.series is not None else time.strftime("headerless_%Y%m%d-%H%M%S")
        if self._series is not None:
            self._end_series(f"series {self._series} ended without its end message: images of series {series} came")
        spec = image.blobs[0][0]
        scan_id = self.scan.scan_id if self.scan is not None and not self._scan_used \
            else scan_id_for(series, self.params.protocol)
        message = (f"images of series {series} came without its header (sent before the receiver connected, "
                   f"lost, or rejected): scan {scan_id} takes them as they are ({spec.dtype}{list(spec.shape)}, "
                   f"{spec.compression}), without the header's geometry, flatfield or pixel mask; start the "
                   f"receiver before arming the detector, and see frame_rejected events for a header refused")
        logger.warning("%s", message)
        self.report("header_missing", message, series=series, scan_id=scan_id, shape=list(spec.shape),
                    dtype=spec.dtype, compression=spec.compression)
        header = header_from_image(image, series)
        self._on_series_start(header)
        if self._held is header:
            self._held_image = image
        else:
            self._on_image(image)

    def _on_series_end(self, event: SeriesEnd) -> None:
        if self._series is None or (event.series is not None and event.series != self._series):
            logger.info("end of series %s, which is not open; ignored", event.series)
            return
        self._end_series()

    def _reject(self, reason: str) -> None:
        self.count("rejected")
        self._rejects += 1
        self._reject_reason = reason
        logger.warning("rejected a %s message: %s", self.params.protocol, reason)
        self.wake(max(0.0, self._next_report - time.monotonic()))

    # --- series and scans -------------------------------------------------------------------------

    def _ask_for_scan(self) -> None:
        held = self._held
        if held is None or self._asked:
            return
        scan = ScanDescription(scan_id=scan_id_for(held.series, self.params.protocol), technique="raw",
                               n_frames=held.info.n_images, **held.info.scan_fields(),
                               metadata={"series": held.series, "protocol": self.params.protocol})
        self._asked = True
        logger.info("series %s started without start_scan: asking for raw scan %s", held.series, scan.scan_id)
        self.ask_handler("start_scan", scan.model_dump(mode="json"), self._on_scan_reply)

    def _on_scan_reply(self, reply: messages.Reply) -> None:
        self._asked = False
        if not reply.ok and self._held is not None:
            logger.info("raw scan for series %s not started yet (%s); retrying",
                        self._held.series, reply.error.get("message") if reply.error else "")
            self.wake(RETRY_S)

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._scan_used = False
        self._frames = set()
        if self.params.protocol == "synthetic":
            self._synthetic_total = scan.n_frames if scan.n_frames is not None else self.pipeline.simulation.frames
            self._paced_from = time.monotonic()
            self._open(None)
            if self._synthetic_total == 0:
                self._end_series()
        elif self._held is not None:
            held, self._held = self._held, None
            self._open(held)
            if self._held_image is not None:
                image, self._held_image = self._held_image, None
                self._on_image(image)

    def _open(self, event: SeriesStart | None) -> None:
        """Open the series of `event` (None: the synthetic source's own) in the current scan."""
        self._series = event.series if event is not None else self.scan.scan_id
        self._series_info = event
        self._scan_used = True
        self._last_input = time.monotonic()
        arrays: dict[str, np.ndarray] = {}
        if event is not None:
            for kind, channels in (("flatfield", event.flatfield), ("pixel_mask", event.pixel_mask)):
                arrays.update({kind if name == "data" else f"{kind}_{name}": a for name, a in channels.items()})
        meta = DetectorHeader(series=self._series, protocol=self.params.protocol,
                              detector=event.info if event is not None else None,
                              config=event.config if event is not None else None)
        self.send_header(Frame.from_arrays(scan_id=self.scan.scan_id, epoch=self.epoch, frame=0,
                                           origin=self.stage, arrays=arrays, meta=meta.to_meta()))
        if event is not None:
            self._republish(event, filename=self._raw_path())
        logger.info("scan %s: series %s open", self.scan.scan_id, self._series)
        self.wake(0)

    def _republish(self, event: Event, filename: str = "") -> None:
        if self._republisher is not None:
            self._republisher.publish(event, filename)

    def _raw_path(self) -> str:
        """The raw file of the scan, as kept by the writer this stage feeds ("" if it feeds none)."""
        for stage in self.pipeline.downstream(self.stage).values():
            if stage.service == "writer":
                return raw_path(stage.params.get("output_dir", WRITER_OUTPUT_DIR), self.scan.scan_id)
        return ""

    def _end_series(self, problem: str | None = None, kind: str = "series_incomplete") -> None:
        received = len(self._frames)
        expected = self._series_info.info.n_images if self._series_info else None
        if problem:
            logger.warning("scan %s: %s; closing it with %d frames", self.scan.scan_id, problem, received)
            self.report(kind, f"{problem}; closed with {received} frames", scan_id=self.scan.scan_id,
                        frames=received)
        elif expected is not None and received < expected:
            logger.warning("scan %s: series %s ended with %d of the %d frames its header announced",
                           self.scan.scan_id, self._series, received, expected)
        self._close_series()
        self._publish_last_frame()  # the series' last frame, even within LAST_FRAME_PERIOD_S of the one before
        # The series' length as far as seen (its highest frame number + 1): what a receiver that
        # took over mid-series reports too, so the handler knows how many frames the scan had.
        self.finish_source(max(self._frames) + 1 if self._frames else 0)

    def on_scan_end(self) -> None:
        if self._held is not None:
            self.wake(0)

    def on_abort(self) -> int:
        """The open series is dropped; a held header belongs to the next scan and stays."""
        if self._series is not None:
            self._aborted_series = self._series
            self._close_series()
        self._synthetic_total = 0
        return 0

    def _close_series(self) -> None:
        if self._series_info is not None:
            self._republish(SeriesEnd(series=self._series))
        self._ended_series, self._series = self._series, None

    # --- timers and generated input ---------------------------------------------------------------

    def produce(self) -> float | None:
        """The receiver's timer: rejection reports, raw-scan retries, silent series, generated input."""
        now = time.monotonic()
        if self._rejects and now >= self._next_report:
            self.report("frame_rejected", f"{self._rejects} {self.params.protocol} message(s) rejected; "
                        f"last: {self._reject_reason}", count=self._rejects, reason=self._reject_reason)
            self._rejects, self._next_report = 0, now + REPORT_PERIOD_S
        waiting_for_scan = self._held is not None and self.scan is None
        if waiting_for_scan:
            self._ask_for_scan()
        timers = [self._generate(now), self._check_silence(now), self._check_detector_link(now),
                  self._next_report - now if self._rejects else None, RETRY_S if waiting_for_scan else None]
        timers = [t for t in timers if t is not None]
        return max(0.0, min(timers)) if timers else None

    def _check_silence(self, now: float) -> float | None:
        """End a detector series that went silent; seconds until it would count as silent."""
        if self._series is None or self._detector is None:
            return None
        silent = now - self._last_input
        if silent < self.params.series_timeout_s:
            return self.params.series_timeout_s - silent
        self._end_series(f"series {self._series} silent for {silent:.0f} s", kind="series_timeout")
        return None

    def _generate(self, now: float) -> float | None:
        """Synthetic frames or replayed events, paced; seconds until more are due."""
        protocol = self.params.protocol
        if protocol == "synthetic":
            if self._series is None or len(self._frames) >= self._synthetic_total:
                return None
            rate, sent = self.pipeline.simulation.rate_hz, len(self._frames)
        elif protocol == "replay" and self._replay is not None:
            rate, sent = self.params.rate_hz, self._replayed
        else:
            return None
        for _ in range(BATCH):
            if not self.can_produce() or self._held is not None:
                return 0.0 if self._held is None else None
            if rate > 0:
                due = self._paced_from + sent / rate
                if now < due:
                    return due - now
            if protocol == "synthetic":
                self._emit_synthetic()
                sent = len(self._frames)
                if sent == self._synthetic_total:
                    self._end_series()
                    return None
            else:
                event = next(self._replay, None)
                if event is None:
                    self._replay = None
                    return None
                self._handle(event)
                sent = self._replayed = self._replayed + isinstance(event, Image)
        return 0.0

    def _emit_synthetic(self) -> None:
        number = len(self._frames)
        simulation = self.pipeline.simulation
        self._frames.add(number)
        frame = Frame.from_arrays(scan_id=self.scan.scan_id, epoch=self.epoch, frame=number, origin=self.stage,
                                  arrays={"data": synthetic_frame(number, simulation.shape, simulation.dtype)},
                                  received=time.time())
        self.emit(frame)
        self._keep_last_frame(frame)

    def close(self) -> None:
        self._disconnect()
