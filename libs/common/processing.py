"""OM's Processing Protocol in Surveyor: one class of science, run live or offline, that never
learns how data moves. This module is the contract; `services/processing_node`,
`services/collecting_node` and `surveyor process` are the shells that call it.

A Processing class (the Processing Layer of OM, OnDA's successor: Mariani et al. 2016, J. Appl.
Cryst. 49, 1073) has the methods of `Processing`, every argument keyword-only. Surveyor calls
them; the class never calls them itself:

    processing node (rank N: the process `<stage>.N`)   collecting node (rank 0)
    __init__(parameters=...)                            __init__(parameters=...)
    initialize_processing_node(...)                     initialize_collecting_node(...)
    process_data(data=...) -> (dict, rank)   -- record ->   collect_data(processed_data=(dict, rank))
      <- feedback merged into the next `data` --------------  -> None | {rank: dict}  (0 = every node)
                                                        wait_for_data(...)  when no record came for a while
    end_processing_on_processing_node() -> dict -- record ->   collect_data (once more)
                                                        end_processing_on_collecting_node() -> dict
                                                          = the result file <output_dir>/<scan_id>.<stage>.h5

`node_pool_size` is the processing processes + 1. Lifecycle: one instance per scan on every
node, built (and initialized) when the scan starts, also in a process restarted during the scan;
`end_processing_*` run when the scan ends (not for an aborted scan: its instances are dropped).
`parameters` is the stage's `parameters` table (give both stages the same), deep-copied. A
processing node's end dict reaches `collect_data` like a frame's (as in OM): tell them apart by a
key of your own. Feedback goes through the handler, a message per rank it names and per node: send it when
something changed (a new background, a threshold), not with every frame.

`data` (a read-only mapping; arrays decoded on first access, read-only views, copy to change):
    detector_data   the frame's pixels (decompressed once, when first read)
    <name>          any other array of the frame (e.g. `mask` on clean frames), and the detector
                    header's arrays (`pixel_mask`, `flatfield`) when it sent them
    detector        the detector header's meta: series, protocol, detector (shape, energy_ev,
                    distance_m, pixel_size_m, beam_center_px...), config ({} without a header)
    scan            the scan description (ScanDescription as a dict: energy_ev, distance_m, ...)
    frame_meta      what the detector said of this frame (start_time, ... in its own units)
    scan_id, frame_number, epoch
    event_id        "<scan_id>//<frame_number>": the same live and offline
    timestamp       Unix time the frame reached the processing node (offline: when it was read)
  plus the feedback sent to this node since its last `process_data` (feedback keys win, as in OM).

What travels (process_data's and end_processing_on_processing_node's dicts, feedback): dicts with
string keys, lists, numbers, strings, booleans, None, and numeric numpy arrays at any depth
(libs/common/processing_wire.py: msgpack and raw buffers, never pickle).

Optional methods, called when the class has them:
    configure(*, parameters)   live `configure` of the stage's `parameters`: takes effect now (raise
                               to refuse: the old parameters stay); without it, at the next scan
    preview(*, node_rank, node_pool_size) -> {name: array}   on the collector every
                               `preview_interval_s`, published to front-ends as `preview.<stage>`
    wait_for_data, end_processing_on_processing_node, end_processing_on_collecting_node
                               (as OM: not abstract; missing = nothing to do, nothing to send)

A processing process killed mid-scan loses nothing of `process_data`'s records (its frames go to
another node, each collected exactly once), but its instance's own state and its end record are
gone: keep what the collector needs in the per-frame dicts. A frame whose `process_data` raises
is counted lost and reported, and the scan goes on. Each node calls the class from one thread,
one call at a time, beside the loop that keeps answering the handler: a slow call costs no
heartbeat, but the frames behind it wait; never block waiting for something.

This module opens no sockets and no files but the class's own: the offline driver (`run_offline`)
runs both nodes in one process, records and feedback through the same encoding as live.

Example (a complete class; `surveyor process examples/radial_monitor.py:RadialMonitor FILE` for
a longer one):

    import numpy as np

    class HitCounter:
        def __init__(self, *, parameters):
            self.threshold = parameters.get("threshold", 100)

        def initialize_processing_node(self, *, node_rank, node_pool_size):
            pass

        def initialize_collecting_node(self, *, node_rank, node_pool_size):
            self.frames, self.hits = 0, 0

        def process_data(self, *, node_rank, node_pool_size, data):
            bright = int((data["detector_data"] > self.threshold).sum())
            return {"bright": bright, "hit": bright > 50}, node_rank

        def collect_data(self, *, node_rank, node_pool_size, processed_data):
            result, rank = processed_data
            self.frames += 1
            self.hits += result["hit"]

        def end_processing_on_collecting_node(self, *, node_rank, node_pool_size):
            return {"frames": self.frames, "hits": self.hits, "hit_rate": self.hits / max(1, self.frames)}
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import logging
import re
import sys
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np

from libs.common.contracts import END_RECORD, RECORD
from libs.common.errors import ProcessingError
from libs.common.frames import Frame
from libs.common.processing_wire import END_FRAME, from_feedback, from_record, to_feedback, to_record, travel

logger = logging.getLogger(__name__)

REQUIRED = ("initialize_processing_node", "initialize_collecting_node", "process_data", "collect_data")
SPEC = re.compile(r"^(?P<where>.+):(?P<name>[A-Za-z_][A-Za-z0-9_]*)$")


class Processing(Protocol):
    """What a Processing class has (see the module docstring for when each is called)."""

    def __init__(self, *, parameters: dict[str, Any]) -> None: ...

    def initialize_processing_node(self, *, node_rank: int, node_pool_size: int) -> None: ...

    def initialize_collecting_node(self, *, node_rank: int, node_pool_size: int) -> None: ...

    def process_data(self, *, node_rank: int, node_pool_size: int,
                     data: Mapping[str, Any]) -> tuple[dict[str, Any], int]:
        """One frame: the dict for the collector, and this node's rank."""
        ...

    def wait_for_data(self, *, node_rank: int, node_pool_size: int) -> None:
        """The collector is idle (no record for a while): serve a GUI, expire old data."""

    def collect_data(self, *, node_rank: int, node_pool_size: int,
                     processed_data: tuple[dict[str, Any], int]) -> dict[int, dict[str, Any]] | None:
        """One record; optionally feedback for processing nodes by rank (0 = every one)."""
        ...

    def end_processing_on_processing_node(self, *, node_rank: int, node_pool_size: int) -> dict[str, Any] | None:
        """The scan ended: optionally a last dict for the collector."""
        return None

    def end_processing_on_collecting_node(self, *, node_rank: int, node_pool_size: int) -> dict[str, Any] | None:
        """The scan ended: optionally the result, written as the scan's result file."""
        return None


# --- loading ----------------------------------------------------------------------------------


def check_spec(spec: str) -> str:
    """The form of a class spec, without importing anything (pipelines are validated everywhere)."""
    if not SPEC.match(spec):
        raise ValueError(f"{spec!r} names no class: write 'package.module:Class' or 'path/to/file.py:Class'")
    return spec


def load(spec: str, base: Path | None = None) -> type:
    """The class named by `package.module:Class` (imported once per process) or
    `path/to/file.py:Class` (a relative path taken from `base`, a pipeline file's folder, else from
    the working directory; read anew at every call, so an edited file takes effect at the next scan)."""
    match = SPEC.match(spec)
    if match is None:
        raise ProcessingError(f"processing = {spec!r} names no class: write 'package.module:Class' "
                              "or 'path/to/file.py:Class'")
    where, name = match["where"], match["name"]
    if where.endswith(".py") or "/" in where:
        module = _from_file(spec, Path(where).expanduser(), base)
    else:
        module = _import(spec, where)
    cls = getattr(module, name, None)
    if not inspect.isclass(cls):
        found = sorted(n for n, v in vars(module).items() if inspect.isclass(v) and v.__module__ == module.__name__)
        raise ProcessingError(f"processing = {spec!r}: {where} defines no class {name}; it defines "
                              f"{found or 'no class'}")
    missing = [method for method in REQUIRED if not callable(getattr(cls, method, None))]
    if missing:
        raise ProcessingError(f"processing = {spec!r}: class {name} lacks {', '.join(missing)}; a Processing "
                              "class has the methods listed in libs/common/processing.py (OM's Processing Protocol)")
    return cls


def _import(spec: str, module: str) -> Any:
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            raise ProcessingError(f"processing = {spec!r}: no module {exc.name!r} on the Python path of this "
                                  "process; install its package, or name the file ('path/to/file.py:Class')") from None
        raise ProcessingError(f"processing = {spec!r}: {module} imports {exc.name!r}, which is not installed "
                              "here; install it") from exc
    except Exception as exc:  # noqa: BLE001 - any error in the user's module is reported, with its cause
        raise ProcessingError(f"processing = {spec!r}: importing {module} failed: {type(exc).__name__}: {exc}") from exc


def _from_file(spec: str, path: Path, base: Path | None) -> Any:
    path = path if path.is_absolute() or base is None else base / path
    if not path.is_file():
        origin = f"the pipeline file's folder, {base}" if base is not None else f"the working directory, {Path.cwd()}"
        raise ProcessingError(f"processing = {spec!r}: no file {path.absolute()} (a relative path is taken from "
                              f"{origin}); give the file's path")
    name = f"surveyor_processing_{re.sub(r'[^A-Za-z0-9_]', '_', path.stem)}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and typing look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 - any error in the user's file is reported, with its cause
        sys.modules.pop(name, None)
        line = f" (line {exc.lineno})" if isinstance(exc, SyntaxError) else ""
        raise ProcessingError(f"processing = {spec!r}: running {path.absolute()}{line} failed: "
                              f"{type(exc).__name__}: {exc}; fix the file") from exc
    return module


def rank_of(name: str, stage: str) -> int:
    """A processing process's rank: the N of its name `<stage>.N`, as `surveyor run`, supervisord
    (--name STAGE.%(process_num)d, from 1) and honcho name processes."""
    prefix, _, number = name.rpartition(".")
    if prefix != stage or not number.isdigit() or int(number) < 1:
        raise ProcessingError(f"process {name!r} of stage {stage!r} has no rank: processing nodes are named "
                              f"{stage}.N with N = 1, 2, ...; start it with --name {stage}.N")
    return int(number)


# --- data -------------------------------------------------------------------------------------


class FrameData(Mapping[str, Any]):
    """The `data` of one `process_data` call (keys: module docstring); arrays decoded when read."""

    def __init__(self, frame: Frame, *, scan: dict[str, Any], detector: Frame | None = None,
                 received: float | None = None) -> None:
        h = frame.header
        self._values: dict[str, Any] = {
            "scan_id": h.scan_id, "frame_number": h.frame, "epoch": h.epoch, "event_id": f"{h.scan_id}//{h.frame}",
            "timestamp": time.time() if received is None else received, "frame_meta": h.meta, "scan": scan,
            "detector": detector.header.meta if detector is not None else {}}
        self._lazy: dict[str, tuple[Frame, str]] = {}
        for source in (frame, detector):
            for spec in source.header.arrays if source is not None else ():
                key = "detector_data" if source is frame and spec.name == "data" else spec.name
                self._lazy.setdefault(key, (source, spec.name))

    def with_feedback(self, feedback: Mapping[str, Any]) -> FrameData:
        """The same data with feedback merged in (feedback keys win, as OM's `data.update`)."""
        merged = copy.copy(self)
        merged._values = {**self._values, **feedback}
        merged._lazy = {k: v for k, v in self._lazy.items() if k not in feedback}
        return merged

    def __getitem__(self, key: str) -> Any:
        if key in self._values:
            return self._values[key]
        if key not in self._lazy:
            raise KeyError(f"{key!r}: this frame's data has {sorted(self)}")
        source, name = self._lazy[key]
        value = self._values[key] = source.array(name)
        return value

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys([*self._values, *self._lazy]))

    def __len__(self) -> int:
        return len(dict.fromkeys([*self._values, *self._lazy]))


# --- nodes ------------------------------------------------------------------------------------


class _Node:
    """One node's instance of the class for one scan, with the parameters it was given."""

    def __init__(self, cls: type, parameters: dict[str, Any], init: str, rank: int, pool_size: int) -> None:
        self.name, self.rank, self.pool_size, self.parameters = cls.__name__, rank, pool_size, parameters
        try:
            self.instance = cls(parameters=copy.deepcopy(parameters))
            getattr(self.instance, init)(node_rank=rank, node_pool_size=pool_size)
        except Exception as exc:  # noqa: BLE001 - the class's failure is the operator's to read
            raise ProcessingError(f"{self.name}: __init__ or {init} failed: {type(exc).__name__}: {exc}") from exc

    def configure(self, parameters: dict[str, Any]) -> bool:
        """Hand new parameters to the running instance (its `configure` raises to refuse them);
        False when the class has no `configure`: they take effect with the next scan's instance."""
        call = getattr(self.instance, "configure", None)
        if call is None:
            return False
        call(parameters=copy.deepcopy(parameters))
        self.parameters = parameters
        return True

    def _optional(self, method: str) -> Any:
        call = getattr(self.instance, method, None)
        if call is None:
            return None
        result = call(node_rank=self.rank, node_pool_size=self.pool_size)
        if method.startswith("end_") and result is not None and not isinstance(result, dict):
            raise ProcessingError(f"{self.name}.{method} returned {_short(result)}; it returns None or a dict")
        return result


class ProcessingNode(_Node):
    """A processing node's instance for one scan, and the feedback waiting for its next frame."""

    def __init__(self, cls: type, *, parameters: dict[str, Any], rank: int, pool_size: int) -> None:
        super().__init__(cls, parameters, "initialize_processing_node", rank, pool_size)
        self._feedback: dict[str, Any] = {}

    def feedback(self, values: Mapping[str, Any]) -> None:
        self._feedback.update(values)

    def process(self, data: FrameData) -> tuple[dict[str, Any], int]:
        if self._feedback:
            data, self._feedback = data.with_feedback(self._feedback), {}
        result = self.instance.process_data(node_rank=self.rank, node_pool_size=self.pool_size, data=data)
        if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], dict)
                and isinstance(result[1], int)):
            raise ProcessingError(f"{self.name}.process_data returned {_short(result)}; it returns "
                                  "(dict, node_rank), e.g. ({'hit': True}, node_rank)")
        return result

    def end(self) -> dict[str, Any] | None:
        return self._optional("end_processing_on_processing_node")


class CollectingNode(_Node):
    """The collecting node's instance for one scan (rank 0)."""

    def __init__(self, cls: type, *, parameters: dict[str, Any], pool_size: int) -> None:
        super().__init__(cls, parameters, "initialize_collecting_node", 0, pool_size)

    def collect(self, processed: dict[str, Any], rank: int) -> dict[int, dict[str, Any]]:
        """collect_data on one record; the feedback it returned, by rank (0 = every node)."""
        feedback = self.instance.collect_data(node_rank=0, node_pool_size=self.pool_size,
                                              processed_data=(processed, rank))
        if feedback is None:
            return {}
        if not isinstance(feedback, dict) or not all(isinstance(r, int) and r >= 0 for r in feedback):
            raise ProcessingError(f"{self.name}.collect_data returned {_short(feedback)}; it returns None or "
                                  "feedback {rank: dict} (rank 0 = every processing node)")
        return feedback

    def wait(self) -> None:
        self._optional("wait_for_data")

    def preview(self) -> dict[str, np.ndarray]:
        """What the class's optional `preview` shows ({} without one)."""
        arrays = self._optional("preview") or {}
        if not isinstance(arrays, dict) or not all(isinstance(a, np.ndarray) for a in arrays.values()):
            raise ProcessingError(f"{self.name}.preview returned {_short(arrays)}; it returns {{name: numpy array}}")
        return arrays

    def end(self) -> dict[str, Any] | None:
        return self._optional("end_processing_on_collecting_node")


def _short(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text[:80]}{'...' if len(text) > 80 else ''}"


# --- offline ----------------------------------------------------------------------------------


@dataclass
class Offline:
    """What `run_offline` did: the collector's result, and how many frames went which way."""

    result: dict[str, Any] | None
    frames: int = 0
    collected: int = 0
    failed: int = 0


def run_offline(cls: type, *, parameters: dict[str, Any], frames: Iterable[FrameData],
                on_frame: Callable[[int], None] | None = None) -> Offline:
    """OM's offline mode in one process: rank 1 processes every frame, rank 0 collects (pool of
    2); records and feedback go through the bytes they take live, feedback for rank 0 or 1 reaches
    the processing node (for other ranks there is no node here: dropped). A frame whose
    processing or collection raises is logged, counted and skipped, as live."""
    worker = ProcessingNode(cls, parameters=parameters, rank=1, pool_size=2)
    collector = CollectingNode(cls, parameters=parameters, pool_size=2)
    done = Offline(result=None)
    for data in frames:
        done.frames += 1
        try:
            values, rank = worker.process(data)
            record = to_record(values, kind=RECORD, rank=rank, frame=data["frame_number"], scan_id=data["scan_id"],
                               epoch=data["epoch"], origin="offline", where=f"{cls.__name__}.process_data")
            feedback = collector.collect(*from_record(travel(record)))
            for target, body in feedback.items():
                if target in (0, 1):
                    worker.feedback(from_feedback(to_feedback(body, f"{cls.__name__}.collect_data")))
            done.collected += 1
        except Exception:  # noqa: BLE001 - as live: the frame is counted, the run goes on
            done.failed += 1
            if done.failed == 1:
                logger.exception("frame %s failed; later failures are counted only", data["frame_number"])
        if on_frame is not None:
            on_frame(done.frames)
    try:
        end = worker.end()
        if end is not None:
            record = to_record(end, kind=END_RECORD, rank=1, frame=END_FRAME + 1, scan_id="offline", epoch=0,
                               origin="offline", where=f"{cls.__name__}.end_processing_on_processing_node")
            collector.collect(*from_record(travel(record)))
    except Exception:  # noqa: BLE001 - as live: reported, the collector still ends
        done.failed += 1
        logger.exception("the processing node's end record failed")
    done.result = collector.end()
    return done
