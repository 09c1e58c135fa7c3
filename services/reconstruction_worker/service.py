"""The reconstruction stage: one process running streaming RAAR (raar.py) on the clean frames.

The solver runs in a thread of its own, so the event loop keeps taking frames, commands and
heartbeats while an iteration (about a second for 1600 frames of 128 x 128) is under way. Frames
are handed over as they come and join between iterations. Once every frame of the scan is in
(or none has come for `idle_s`: frames rejected upstream never will), the solver restarts from
its estimate and `iterations` more are run, with probe refinement (fewer if the exit-wave change
falls below `tolerance`), then the object and probe go to the writer as one result frame.

The process keeps the scan from ending until then: it holds the last frame it received
unacknowledged and sends the result as that frame's child, so the handler's end-of-scan (which
waits until every frame is acknowledged everywhere) follows the result onto disk.
"""

from __future__ import annotations

import logging
import queue
import threading
import time

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime, Token
from libs.ptychography import optics
from services.frame_worker.service import FRAMES_HEADER
from services.reconstruction_worker.raar import StreamingRaar

logger = logging.getLogger(__name__)

RESULT = "reconstruction"
POLL_S = 0.2


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    beta: float = Field(0.8, gt=0, le=1, description="RAAR relaxation (1 = difference map)")
    iterations: int = Field(40, ge=0, le=10000, description="iterations after the last frame")
    tolerance: float = Field(1e-5, ge=0, description="stop early when the exit-wave change is below this")
    min_frames: int = Field(8, ge=1, description="frames needed before the first iteration")
    probe_fraction: float = Field(1.0, ge=0, le=1, description="refine the probe once this part of the scan is in")
    preview_interval_s: float = Field(3.0, gt=0)
    idle_s: float = Field(30.0, gt=0, description="finish with the frames received after this long without one")
    threads: int = Field(1, ge=1, le=64, description="FFT threads")


class Engine(threading.Thread):
    """The solver's thread: adds arrived frames between iterations, iterates, stops when done."""

    def __init__(self, solver: StreamingRaar, params: Params, total: int) -> None:
        super().__init__(name="raar", daemon=True)
        self.solver, self.params, self.total = solver, params, total
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.stopping = False
        self.after_last = 0
        self.completed_at: float | None = None
        """When the last frame joined (monotonic); the post-scan iterations are timed from here."""
        self.failure: BaseException | None = None

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the service, never silent
            logger.exception("the reconstruction failed")
            self.failure = exc
        self.finished.set()

    def _run(self) -> None:
        solver, params = self.solver, self.params
        scaled = False
        while not self.stopping:
            self._take(block=solver.frames < params.min_frames)
            if solver.frames < params.min_frames:
                continue
            complete = solver.frames >= self.total
            if complete and self.completed_at is None:
                self.completed_at = time.monotonic()
                with self.lock:
                    solver.restart()
            if complete and (self.after_last >= params.iterations or solver.error < params.tolerance):
                return
            with self.lock:
                if not scaled:
                    solver.scale_probe()
                    scaled = True
                solver.refine_probe = solver.frames >= params.probe_fraction * self.total
                solver.iterate(1, beta=params.beta)
            if complete:
                self.after_last += 1

    def _take(self, block: bool) -> None:
        try:
            item = self.inbox.get(timeout=POLL_S) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        with self.lock:
            while item is not None:
                self.solver.add(*item)
                try:
                    item = self.inbox.get_nowait()
                except queue.Empty:
                    item = None

    def snapshot(self) -> tuple[np.ndarray, np.ndarray, int, float]:
        with self.lock:
            s = self.solver
            return s.object.copy(), s.probe.copy(), s.iterations, s.error


class Service(Runtime):
    Params = Params
    _engine: Engine | None = None

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._stop_engine()
        self._total = len(scan.positions_m or ())
        self._received = 0
        self._last_frame_at = time.monotonic()
        self._held: Token | None = None
        self._started = time.monotonic()
        self._next_preview = self._started + self.params.preview_interval_s
        self._initial_probe: np.ndarray | None = None
        self._finished = False
        if not self._total:
            self.report("scan_incomplete", f"scan {scan.scan_id}: no positions_m, nothing to reconstruct")

    def on_frame(self, frame: Frame) -> None:
        index = frame.header.meta["index"]
        if not 0 <= index < self._total:
            raise ValueError(f"frame {frame.header.frame}: index {index} outside the scan's {self._total} positions")
        if self._finished:
            logger.warning("scan %s: frame %d came after the reconstruction was sent; not used",
                           self.scan.scan_id, frame.header.frame)
            return
        if self._engine is None:
            self._start_engine(frame)
        self._engine.inbox.put((index, frame.array("data").copy(), frame.array("mask").copy()))
        self._received += 1
        self._last_frame_at = time.monotonic()
        # Keep the newest frame unacknowledged: the scan cannot end before the result is written.
        if self._held is not None:
            self.release(self._held)
        self._held = self.hold()
        self.wake(POLL_S)

    def _start_engine(self, first: Frame) -> None:
        geometry = self.headers.get(FRAMES_HEADER)
        meta = geometry.header.meta if geometry else {}
        if not (meta.get("pixel_size_m") and meta.get("distance_m") and meta.get("energy_ev")):
            raise ValueError("the clean frames carry no geometry (energy, distance, pixel size): "
                             "cannot place them on the object")
        size = meta["size"]
        pixel = optics.object_pixel_m(energy_ev=meta["energy_ev"], distance_m=meta["distance_m"],
                                      detector_pixel_m=meta["pixel_size_m"], size=size)
        support = optics.soft_support(size, size / 4)
        if self.scan.probe_model is not None:
            probe = optics.zone_plate_probe(self.scan.probe_model, energy_ev=meta["energy_ev"], size=size,
                                            pixel_m=pixel)
        else:
            probe = optics.probe_from_patterns(first.array("data"))
        self._initial_probe = probe * support
        self._pixel_m = pixel
        solver = StreamingRaar(centres_px=np.asarray(self.scan.positions_m) / pixel, probe=probe, support=support,
                               workers=self.params.threads)
        self._engine = Engine(solver, self.params, self._total)
        self._engine.start()
        logger.info("scan %s: reconstructing %d positions on a %s object of %.2f nm pixels", self.scan.scan_id,
                    self._total, solver.object.shape, pixel * 1e9)

    def produce(self) -> float | None:
        engine = self._engine
        if engine is None:
            return None
        if time.monotonic() >= self._next_preview:
            self._publish_preview()
        if engine.total > self._received and time.monotonic() - self._last_frame_at > self.params.idle_s:
            self.report("reconstruction_incomplete", f"scan {self.scan.scan_id}: no frame for {self.params.idle_s} s; "
                        f"finishing with the {self._received} of {engine.total} that came")
            engine.total = self._received
        if not engine.finished.is_set():
            return POLL_S
        self._finish()
        return None

    def _publish_preview(self) -> None:
        self._next_preview = time.monotonic() + self.params.preview_interval_s
        obj, probe, iterations, error = self._engine.snapshot()
        step = max(1, int(np.ceil(max(obj.shape) / 256)))
        self.preview("reconstruction", {"object_amplitude": np.abs(obj[::step, ::step]).astype(np.float32),
                                        "object_phase": np.angle(obj[::step, ::step]).astype(np.float32),
                                        "probe_amplitude": np.abs(probe).astype(np.float32)},
                     iterations=iterations, error=error, frames=self._engine.solver.frames)

    def _finish(self) -> None:
        engine, self._engine = self._engine, None
        self._finished = True
        if engine.failure is not None:
            self.report("reconstruction_failed", f"scan {self.scan.scan_id}: {engine.failure}")
        else:
            obj, probe, iterations, error = engine.snapshot()
            solver = engine.solver
            after_last_s = time.monotonic() - (engine.completed_at or time.monotonic())
            logger.info("scan %s: reconstruction done: %d frames, %d iterations (%d after the last frame), "
                        "change %.2e, %.1f s after the scan start", self.scan.scan_id, solver.frames, iterations,
                        engine.after_last, error, time.monotonic() - self._started)
            self.emit(Frame.from_arrays(
                scan_id=self.scan.scan_id, epoch=self.epoch, frame=self.scan.n_dark + self._total, origin=self.name,
                arrays={"object": obj, "probe": probe, "initial_probe": self._initial_probe,
                        "weights": solver.received.astype(np.uint8)},
                meta={"kind": RESULT, "pixel_size_m": self._pixel_m, "iterations": iterations,
                      "iterations_after_last_frame": engine.after_last, "error": error,
                      "frames_used": solver.frames, "beta": self.params.beta,
                      "seconds_after_last_frame": round(after_last_s, 3),
                      "seconds_per_iteration_after_last_frame": round(after_last_s / max(engine.after_last, 1), 4)}),
                parent=self._held)
        if self._held is not None:
            self.release(self._held)
        self._held = None

    def on_scan_end(self) -> None:
        self._stop_engine()

    def on_abort(self) -> int:
        self._stop_engine()
        self._held = None
        return 0

    def close(self) -> None:
        self._stop_engine()

    def _stop_engine(self) -> None:
        if self._engine is not None:
            self._engine.stopping = True
            self._engine.join(timeout=10)
            self._engine = None
