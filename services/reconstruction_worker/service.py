"""The reconstruction stage: one process running streaming RAAR (raar.py) on the clean frames.

The solver runs in a thread of its own, so the event loop keeps taking frames, commands and
heartbeats while an iteration (about a second for 1600 frames of 128 x 128) is under way. Frames
are handed over as they come and join between iterations. Once every frame of the scan is in
(or none has come for `idle_s`: frames rejected upstream never will), the solver restarts from
free space (the image streamed so far was the live preview) and `iterations` more are run, with
probe refinement (fewer if the exit-wave change falls below `tolerance`), then `ml_iterations` of
maximum-likelihood refinement (ml.py), then the object and probe go to the writer as one result
frame. The solver runs where `device` says (device.py): a GPU when there is one.

The process keeps the scan from ending until then: it holds the last frame it received
unacknowledged and sends the result as that frame's child, so the handler's end-of-scan (which
waits until every frame is acknowledged everywhere) follows the result onto disk.

A frame is acknowledged only once a successor could restore it: frames are appended to batch files
in the stage's checkpoint folder (`batch-<instance>-<n>.npz`: index, data, mask; written atomically
every `checkpoint_interval_s` or `checkpoint_frames` frames), and their tokens released once their
batch is on disk. The solver's state (object, probe, the initial probe, iterations) goes to
`solver.npz` every `state_interval_s`. A process that starts mid-scan (its predecessor was killed)
finds the checkpoint, loads every batch (each index once), puts the saved object and probe back and
iterates on from there; the frames its predecessor had not saved are re-sent to it and join as new
ones, those it had saved but not yet acknowledged are acknowledged on arrival. The folder is removed
when the scan ends.
"""

from __future__ import annotations

import logging
import os
import queue
import shutil
import threading
import time
from pathlib import Path

import numpy as np

from libs.common import checkpoint
from libs.common.contracts import FRAMES_HEADER, CleanFrame, FramesHeader, Reconstruction, header_name
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.runtime import Service as Runtime, Token
from libs.ptychography import optics
from services.reconstruction_worker import device
from services.reconstruction_worker.ml import MaximumLikelihood
from services.reconstruction_worker.params import Params
from services.reconstruction_worker.raar import StreamingRaar

logger = logging.getLogger(__name__)

POLL_S = 0.2
STATE = "solver.npz"
BATCHES = "batch-*.npz"


class Engine(threading.Thread):
    """The solver's thread: adds arrived frames between iterations, iterates, stops when done."""

    def __init__(self, solver: StreamingRaar, params: Params, total: int, *, scaled: bool = False,
                 after_last: int = 0) -> None:
        super().__init__(name="raar", daemon=True)
        self.solver, self.params, self.total = solver, params, total
        self.scaled = scaled
        """The probe has been given the frames' photon count (a restored solver's has)."""
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.lock = threading.Lock()
        self.finished = threading.Event()
        self.stopping = False
        self.after_last = after_last
        self.completed_at: float | None = None
        """When the last frame joined (monotonic); the post-scan iterations are timed from here."""
        self.failure: BaseException | None = None
        self.ml_done = 0

    def run(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # noqa: BLE001 - reported by the service, never silent
            logger.exception("the reconstruction failed")
            self.failure = exc
        self.finished.set()

    def _run(self) -> None:
        solver, params = self.solver, self.params
        while not self.stopping:
            self._take(block=solver.frames < params.min_frames)
            if solver.frames < params.min_frames:
                continue
            complete = solver.frames >= self.total
            if complete and self.completed_at is None:
                self.completed_at = time.monotonic()
                with self.lock:
                    # From free space, not from the streamed image: that was fitted to part of the
                    # scan with the model probe held fixed, and is a worse start (the demo scan's
                    # frames, replayed: 40 RAAR + 42 ML steps reach NRMSE 0.034 from free space,
                    # 0.055 from the image of 22 iterations while they came). A successor that
                    # resumes after the last frame keeps its predecessor's image.
                    solver.restart(free_space=self.after_last == 0)
                    if not params.threads:  # nothing else is left to do on this host's cores
                        solver.workers = os.cpu_count() or 1
            if complete and (self.after_last >= params.iterations or solver.error < params.tolerance):
                self._refine()
                return
            with self.lock:
                if not self.scaled:
                    solver.scale_probe()
                    self.scaled = True
                solver.refine_probe = solver.frames >= params.probe_fraction * self.total
                solver.iterate(1, beta=params.beta)
            if complete:
                self.after_last += 1

    def _refine(self) -> None:
        """The maximum-likelihood steps after RAAR, if asked for, within their time budget."""
        if not self.params.ml_iterations:
            return
        started = time.monotonic()
        with self.lock:
            refinement = MaximumLikelihood(self.solver, smoothness=self.params.smoothness)
        for _ in range(self.params.ml_iterations):
            if self.stopping or time.monotonic() - started >= self.params.ml_budget_s:
                return
            with self.lock:
                refinement.iterate(1)
            self.after_last += 1
            self.ml_done += 1

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
            return *s.host(), s.iterations, s.error

    def state(self) -> tuple[dict[str, np.ndarray], dict]:
        """What a successor needs to iterate on from here: the object, the probe and the counts."""
        with self.lock:
            s = self.solver
            obj, probe = s.host()
            return ({"object": obj, "probe": probe},
                    {"iterations": s.iterations, "after_last": self.after_last, "scaled": self.scaled,
                     "frames": s.frames})


class Service(Runtime):
    Params = Params
    _engine: Engine | None = None
    _folder: Path | None = None
    _geometry: FramesHeader | None = None
    """The frames header's meta (the geometry of the clean frames), parsed as it came."""

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._early: list[tuple[Token, Frame]] = []
        try:
            self._device = device.select(self.params.device)
        except device.NoGpu as exc:
            raise SystemExit(f"reconstruction: device = \"gpu\" but {exc}; or set "
                             "stages.<stage>.params.device = \"auto\" to run on the CPU where there is no GPU") from None
        logger.info("the solver runs on the %s", self._device.name)

    def on_scan_start(self, scan: ScanDescription) -> None:
        self._stop_engine()
        self._total = len(scan.positions_m or ())
        self._indices: set[int] = set()
        """The scan positions whose frame is in the solver (restored or received)."""
        self._last_frame_at = time.monotonic()
        self._newest: Token | None = None
        """The newest frame, held until the result is sent (as its parent)."""
        self._newest_saved = False
        self._unsaved: list[tuple[Token, int, np.ndarray, np.ndarray]] = []
        """Frames in the solver and not yet in a batch file: held until they are."""
        self._batch_due = 0.0
        self._batches = 0
        self._state_due = 0.0
        self._save_failed = False
        self._started = time.monotonic()
        self._next_preview = self._started + self.params.preview_interval_s
        self._initial_probe: np.ndarray | None = None
        self._finished = False
        self._folder: Path | None = None
        self._resume = False
        try:
            self._folder = self.checkpoint_dir()
            self._resume = bool(checkpoint.files(self._folder, BATCHES)) or (self._folder / STATE).exists()
        except OSError as exc:
            self.report("checkpoint_failed", f"scan {scan.scan_id}: no checkpoint folder ({exc}); frames are "
                        "acknowledged only once the result is sent", error=str(exc))
        if self._resume:
            logger.info("scan %s: a checkpoint is in %s: resuming the reconstruction from it", scan.scan_id,
                        self._folder)
        if not self._total:
            self.report("scan_incomplete", f"scan {scan.scan_id}: no positions_m, nothing to reconstruct")
        # What came before the scan start (a process joining a running scan can be sent its
        # headers and frames before it hears of it).
        self._resume_from_checkpoint()
        early, self._early = self._early, []
        for token, frame in early:
            if frame.header.epoch == self.epoch:
                self._take(token, frame)

    def on_header(self, header: Frame) -> None:
        super().on_header(header)
        if header_name(header) == FRAMES_HEADER:
            self._geometry = FramesHeader.of(header)
            if self.scan is not None:
                self._resume_from_checkpoint()

    def _resume_from_checkpoint(self) -> None:
        """A successor: the solver from the checkpoint as soon as the frames' geometry is known."""
        if not self._resume or self._engine is not None or self._finished or self._geometry is None:
            return
        try:
            self._start_engine(None)
        except Exception:  # noqa: BLE001 - tried again with the first frame
            logger.exception("scan %s: resuming from the checkpoint failed", self.scan.scan_id)
        self.after(0, self._tick)

    def on_frame(self, frame: Frame) -> None:
        token = self.hold()
        if self.scan is None:
            self._early.append((token, frame))
            return
        self._take(token, frame)

    def _take(self, token: Token, frame: Frame) -> None:
        """One frame, held: into the solver, released once it is in a batch file (the newest one
        once the result is sent)."""
        try:
            index = CleanFrame.of(frame).index
            if not 0 <= index < self._total:
                raise ValueError(f"frame {frame.header.frame}: index {index} outside the scan's {self._total} "
                                 "positions")
            if self._engine is None and not self._finished:
                self._start_engine(frame)
        except Exception as exc:  # noqa: BLE001 - rejected, and never left held
            self.count("rejected")
            logger.error("scan %s: frame %d rejected: %s", self.scan.scan_id, frame.header.frame, exc)
            self.release(token)
            return
        if self._finished:
            if index not in self._indices:
                self.count("lost")
                logger.warning("scan %s: frame %d came after the reconstruction was sent; not in it",
                               self.scan.scan_id, frame.header.frame)
            self.release(token)
            return
        if index in self._indices:
            # Saved by a predecessor (it is in the solver from its batch file): safe already.
            self._make_newest(token, saved=True)
        else:
            data, mask = frame.array("data").copy(), frame.array("mask").copy()
            self._engine.inbox.put((index, data, mask))
            self._indices.add(index)
            if not self._unsaved:
                self._batch_due = time.monotonic() + self.params.checkpoint_interval_s
            self._unsaved.append((token, index, data, mask))
            self._make_newest(token, saved=False)
            if len(self._unsaved) >= self.params.checkpoint_frames:
                self._save_batch()
        self._last_frame_at = time.monotonic()
        self.after(min(POLL_S, self.params.checkpoint_interval_s), self._tick)

    def _make_newest(self, token: Token, *, saved: bool) -> None:
        """Keep the newest frame unacknowledged (the scan cannot end before the result is written);
        the one before it is released once it is saved."""
        old, old_saved = self._newest, self._newest_saved
        self._newest, self._newest_saved = token, saved
        if old is not None and old != token and old_saved:
            self.release(old)

    def _save_batch(self) -> None:
        """The frames not yet on disk go to a batch file; then they are acknowledged."""
        if not self._unsaved or self._folder is None:
            return
        batch = self._unsaved
        path = self._folder / f"batch-{self.instance}-{self._batches:06d}.npz"
        try:
            checkpoint.save(path, {"index": np.array([index for _, index, _, _ in batch], np.int64),
                                   "data": np.stack([data for _, _, data, _ in batch]),
                                   "mask": np.stack([mask for _, _, _, mask in batch])})
        except OSError as exc:
            if not self._save_failed:
                self.report("checkpoint_failed", f"scan {self.scan.scan_id}: frames could not be saved to {path}: "
                            f"{exc}; they stay unacknowledged (tried again every "
                            f"{self.params.checkpoint_interval_s:g} s)", path=str(path), errno=exc.errno)
            self._save_failed = True
            self._batch_due = time.monotonic() + self.params.checkpoint_interval_s
            return
        if self._save_failed:
            logger.info("scan %s: frames saved again (%s)", self.scan.scan_id, path.name)
        self._save_failed = False
        self._batches += 1
        self._unsaved = []
        for token, _, _, _ in batch:
            if token == self._newest:
                self._newest_saved = True
            else:
                self.release(token)

    def _save_state(self) -> None:
        self._state_due = time.monotonic() + self.params.state_interval_s
        if self._folder is None or self._engine is None or not self._engine.scaled:
            return
        arrays, meta = self._engine.state()
        arrays["initial_probe"] = self._start_probe
        try:
            checkpoint.save(self._folder / STATE, arrays, meta)
        except OSError as exc:
            logger.warning("scan %s: the solver state could not be saved: %s", self.scan.scan_id, exc)

    def _start_engine(self, first: Frame | None) -> None:
        """Start the solver; from the checkpoint when there is one (`first` None: only from it)."""
        geometry = self._geometry
        if geometry is None or not geometry.placed:
            raise ValueError("the clean frames carry no geometry (energy, distance, pixel size): "
                             "cannot place them on the object")
        state, batches = self._load_checkpoint() if self._resume else (None, [])
        if first is None and not batches and state is None:
            return
        size = geometry.size
        pixel = optics.object_pixel_m(energy_ev=geometry.energy_ev, distance_m=geometry.distance_m,
                                      detector_pixel_m=geometry.pixel_size_m, size=size)
        radius = geometry.support_radius_px or size / 4
        support = optics.soft_support(size, radius)
        if state is not None and "initial_probe" in state[0]:
            probe = state[0]["initial_probe"]
        elif self.scan.probe_model is not None:
            probe = optics.zone_plate_probe(self.scan.probe_model, energy_ev=geometry.energy_ev, size=size,
                                            pixel_m=pixel)
        else:
            probe = optics.probe_from_patterns(batches[0][1] if batches else first.array("data"), radius_px=radius)
        self._start_probe = probe
        self._initial_probe = probe * support
        self._pixel_m = pixel
        solver = StreamingRaar(centres_px=np.asarray(self.scan.positions_m) / pixel, probe=probe, support=support,
                               workers=self.params.threads or 1, device=self._device)
        scaled, after_last = False, 0
        if state is not None and state[0]["object"].shape == solver.object.shape:
            arrays, saved = state
            solver.restore(arrays["object"], arrays["probe"], int(saved["iterations"]))
            scaled, after_last = bool(saved["scaled"]), int(saved["after_last"])
        for index, data, mask in batches:
            solver.add(index, data, mask)  # its exit wave from the restored object and probe
            self._indices.add(index)
        self._engine = Engine(solver, self.params, self._total, scaled=scaled, after_last=after_last)
        self._engine.start()
        self._state_due = time.monotonic() + self.params.state_interval_s
        if self._resume:
            logger.info("scan %s: resumed from the checkpoint: %d frames, %s", self.scan.scan_id, len(batches),
                        f"{solver.iterations} iterations of object and probe" if state else "no solver state")
        logger.info("scan %s: reconstructing %d positions on a %s object of %.2f nm pixels, probe support radius "
                    "%.1f px", self.scan.scan_id, self._total, solver.object.shape, pixel * 1e9, radius)

    def _load_checkpoint(self) -> tuple[tuple[dict, dict] | None, list[tuple[int, np.ndarray, np.ndarray]]]:
        """The solver state and every saved frame, each index once (oldest file first)."""
        state = checkpoint.load(self._folder / STATE)
        frames: dict[int, tuple[int, np.ndarray, np.ndarray]] = {}
        for path in checkpoint.files(self._folder, BATCHES):
            found = checkpoint.load(path)
            if found is None:
                continue
            arrays, _ = found
            for index, data, mask in zip(arrays["index"].tolist(), arrays["data"], arrays["mask"], strict=True):
                if 0 <= index < self._total:
                    frames.setdefault(index, (index, data, mask))
        # A successor writes batches of its own: numbered on from what is there.
        self._batches = len(checkpoint.files(self._folder, f"batch-{self.instance}-*.npz"))
        return state, list(frames.values())

    def _tick(self) -> None:
        """The solver's clock: batch files and state checkpoints, previews, the end of the solve."""
        now = time.monotonic()
        if self._unsaved and now >= self._batch_due:
            self._save_batch()
        engine = self._engine
        if engine is None:
            if self._unsaved:
                self.after(self.params.checkpoint_interval_s, self._tick)
            return
        if now >= self._state_due:
            self._save_state()
        if now >= self._next_preview:
            self._publish_preview()
        received = len(self._indices)
        if engine.total > received and now - self._last_frame_at > self.params.idle_s:
            self.report("reconstruction_incomplete", f"scan {self.scan.scan_id}: no frame for {self.params.idle_s} s; "
                        f"finishing with the {received} of {engine.total} that came")
            engine.total = received
        if not engine.finished.is_set():
            self.after(min(POLL_S, self.params.checkpoint_interval_s), self._tick)
            return
        self._finish()

    def _publish_preview(self) -> None:
        self._next_preview = time.monotonic() + self.params.preview_interval_s
        obj, probe, iterations, error = self._engine.snapshot()
        step = max(1, int(np.ceil(max(obj.shape) / 256)))
        self.preview("reconstruction", {"object_amplitude": np.abs(obj[::step, ::step]).astype(np.float32),
                                        "object_phase": np.angle(obj[::step, ::step]).astype(np.float32),
                                        "probe_amplitude": np.abs(probe).astype(np.float32)},
                     iterations=iterations, error=error, frames=self._engine.solver.frames)

    def _finish(self) -> None:
        self._save_batch()
        engine, self._engine = self._engine, None
        self._finished = True
        obj, probe, iterations, error = engine.snapshot()
        if engine.failure is None and not (np.isfinite(obj).all() and np.isfinite(probe).all()):
            engine.failure = RuntimeError(f"the solver diverged after {iterations} iterations (values that are not "
                                          "finite); the clean frames are written all the same")
        if engine.failure is not None:
            self.report("reconstruction_failed", f"scan {self.scan.scan_id}: {engine.failure}")
        else:
            solver = engine.solver
            after_last_s = time.monotonic() - (engine.completed_at or time.monotonic())
            logger.info("scan %s: reconstruction done: %d frames, %d iterations (%d after the last frame), "
                        "change %.2e, %.1f s after the scan start", self.scan.scan_id, solver.frames, iterations,
                        engine.after_last, error, time.monotonic() - self._started)
            result = Reconstruction(
                pixel_size_m=self._pixel_m, iterations=iterations, iterations_after_last_frame=engine.after_last,
                ml_iterations=engine.ml_done,
                error=error, frames_used=solver.frames, beta=self.params.beta,
                seconds_after_last_frame=round(after_last_s, 3),
                seconds_per_iteration_after_last_frame=round(after_last_s / max(engine.after_last, 1), 4),
                device=self._device.name)
            self.emit(Frame.from_arrays(
                scan_id=self.scan.scan_id, epoch=self.epoch, frame=self.scan.n_dark + self._total, origin=self.name,
                arrays={"object": obj, "probe": probe, "initial_probe": self._initial_probe,
                        "weights": solver.received.astype(np.uint8)}, meta=result.to_meta()),
                parent=self._newest, parents=[token for token, _, _, _ in self._unsaved])
        # Frames still unsaved (a failing disk) went with the result: acknowledged once it is written.
        unsaved, self._unsaved = self._unsaved, []
        for token, _, _, _ in unsaved:
            if token != self._newest:
                self.release(token)
        if self._newest is not None:
            self.release(self._newest)
        self._newest = None

    def on_scan_end(self) -> None:
        self._stop_engine()
        self._remove_checkpoint()

    def on_abort(self) -> int:
        self._geometry = None
        self._stop_engine()
        self._remove_checkpoint()
        self._newest = None
        self._unsaved = []
        dropped, self._early = len(self._early), []
        return dropped

    def close(self) -> None:
        self._stop_engine()

    def _remove_checkpoint(self) -> None:
        if self._folder is not None and self.scan is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def _stop_engine(self) -> None:
        if self._engine is not None:
            self._engine.stopping = True
            self._engine.join(timeout=10)
            self._engine = None
