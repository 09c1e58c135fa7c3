"""`surveyor process CLASS SOURCE`: OM's offline mode. One process, no sockets: the Processing
class runs as processing node 1 and collecting node 0 (libs/common/processing.py `run_offline`)
over a file, and its collected result is written as the collecting node writes it live
(`<out>/<scan_id>.<stage>.h5`).

SOURCE is an HDF5/CXI/NeXus file (our `<scan_id>_raw.cxi`, whose frames are read as they were
written, compressed chunks decompressed only when the class reads them) or a recorded detector
stream (`*.msgpack.gz`: msgpack arrays of the messages as the detector sent them, in the
`../shared/data/recorded/` format). What the class sees matches live: the raw file's scan
description is its `scan`, its geometry, configuration and mask are its `detector` and
`pixel_mask` (the CXI mask bits: non-zero = bad, as the detector's own mask), and the scan id is
the file's (`t_0001_raw.cxi` -> `t_0001`). The exit code is 1 when a frame failed in the class or
the run could not start (each with the reason).
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import h5py
import msgpack
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from libs.common import processing, processing_result
from libs.common.detector import PROTOCOLS, Event, Image, SeriesStart, StreamError
from libs.common.errors import PipelineError, ProcessingError
from libs.common.frames import Frame
from libs.common.messages import ScanDescription
from libs.common.pipeline import load as load_pipeline, set_dotted
from libs.common.detector.replay import replay_events

logger = logging.getLogger(__name__)
console = Console(stderr=True)

STREAMS = (".msgpack", ".msgpack.gz")


def run(*, spec: str, source: str, params: list[tuple[str, Any]], pipeline: str | None, out: str, stage: str,
        protocol: str | None, dataset: str) -> int:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", handlers=[RichHandler(console=console)])
    try:
        cls = processing.load(spec)
        parameters = _parameters(pipeline, params)
        scan, frames, total = _open(Path(source), protocol=protocol, dataset=dataset)
    except (ProcessingError, PipelineError, StreamError, OSError) as exc:
        raise SystemExit(f"surveyor process: {exc}") from None
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        task = progress.add_task(f"{cls.__name__} on {Path(source).name}", total=total)
        try:
            done = processing.run_offline(cls, parameters=parameters, frames=frames,
                                          on_frame=lambda n: progress.update(task, completed=n))
        except (ProcessingError, StreamError) as exc:
            raise SystemExit(f"surveyor process: {exc}") from None
        progress.update(task, total=done.frames)  # a series may end short of what its header announced
    failed = f", {done.failed} failed (the first one's traceback is above)" if done.failed else ""
    console.log(f"{done.frames} frames, {done.collected} collected{failed}")
    if done.result is None:
        console.log(f"{cls.__name__}.end_processing_on_collecting_node returned nothing: no result file")
    else:
        path = processing_result.result_path(out, scan.scan_id, stage)
        try:
            processing_result.write(path, done.result, scan_id=scan.scan_id, stage=stage, processing=spec,
                                    parameters=parameters, frames=done.collected)
        except OSError as exc:
            raise SystemExit(f"surveyor process: the result was not written to {path}: {exc}; free space or "
                             "choose another --out") from None
        console.log(f"result written to {path}")
    return 1 if done.failed else 0


def _parameters(pipeline: str | None, params: list[tuple[str, Any]]) -> dict[str, Any]:
    """The `parameters` of the pipeline's processing_node stage (if given), then each --param."""
    parameters: dict[str, Any] = {}
    if pipeline:
        loaded = load_pipeline(pipeline)
        stages = [name for name, s in loaded.stages.items() if s.service == "processing_node"]
        if len(stages) != 1:
            raise PipelineError(f"{pipeline}: --pipeline takes the parameters of its processing_node stage, and it "
                                f"has {len(stages)} ({stages}); give them with --param instead")
        parameters = dict(loaded.stages[stages[0]].params.get("parameters", {}))
    for key, value in params:
        set_dotted(parameters, key, value)
    return parameters


def _open(path: Path, *, protocol: str | None, dataset: str) -> tuple[ScanDescription, Iterator[processing.FrameData], int | None]:
    """The scan, its frames as `data` mappings, and how many frames there are (if known)."""
    if not path.is_file():
        raise OSError(f"no file {path.absolute()}; give an HDF5/CXI file or a recorded stream ({', '.join(STREAMS)})")
    scan_id = path.name.split(".")[0].removesuffix("_raw")
    if path.name.endswith(STREAMS):
        protocol = protocol or next((p for p in PROTOCOLS if p in path.name), "")
        described, events = None, _recorded(path, protocol)
    else:
        protocol = "replay"
        described, events = _hdf5(path, dataset)
    first = next(events, None)
    start = first if isinstance(first, SeriesStart) else SeriesStart(series=scan_id)
    if first is not None and not isinstance(first, SeriesStart):
        events = _chain(first, events)
    scan = described or ScanDescription(scan_id=scan_id, n_frames=start.info.n_images, **start.info.scan_fields())
    header, described_scan = _header(start, scan.scan_id, protocol), scan.model_dump(mode="json")
    frames = (processing.FrameData(Frame.from_blobs(scan_id=scan.scan_id, epoch=0, frame=e.frame, origin="offline",
                                                    blobs=e.blobs, meta=e.meta), scan=described_scan, detector=header)
              for e in events if isinstance(e, Image))
    return scan, frames, start.info.n_images


def _chain(first: Event, rest: Iterable[Event]) -> Iterator[Event]:
    yield first
    yield from rest


def _header(start: SeriesStart, scan_id: str, protocol: str) -> Frame:
    """The detector header as the receiver sends it to every stage (services/receiver/service.py)."""
    arrays = {}
    for kind, channels in (("flatfield", start.flatfield), ("pixel_mask", start.pixel_mask)):
        arrays.update({kind if name == "data" else f"{kind}_{name}": a for name, a in channels.items()})
    meta = {"series": start.series, "protocol": protocol,
            "detector": start.info.model_dump(mode="json", exclude_none=True), "config": start.config}
    return Frame.from_arrays(scan_id=scan_id, epoch=0, frame=0, origin="offline", arrays=arrays, meta=meta)


def _recorded(path: Path, protocol: str) -> Iterator[Event]:
    if protocol not in PROTOCOLS:
        raise StreamError(f"{path}: which detector protocol is this recording? name it with --protocol "
                          f"({', '.join(PROTOCOLS)})")
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        for message in msgpack.Unpacker(f, raw=False):
            yield PROTOCOLS[protocol].decode(list(message))


def _hdf5(path: Path, dataset: str) -> tuple[ScanDescription | None, Iterator[Event]]:
    """The file's frames (libs/common/detector/replay.py), with what our raw file adds to its header:
    the scan description, the beam centre, the detector's configuration, mask and flatfield."""
    events = replay_events(path, dataset)
    try:
        start = next(events)
    except OSError as exc:
        raise OSError(f"{path} cannot be read as HDF5 ({exc}); give an HDF5/CXI file or a recorded stream "
                      f"({', '.join(STREAMS)})") from None
    scan = None
    with h5py.File(path, "r") as f:
        if isinstance(described := f.get("entry_1/scan_description"), h5py.Dataset):
            scan = ScanDescription.model_validate_json(described[()])
        detector = f.get("entry_1/instrument_1/detector_1")
        if isinstance(detector, h5py.Group):
            if "beam_center_y" in detector and "beam_center_x" in detector:
                centre = (float(detector["beam_center_y"][()]), float(detector["beam_center_x"][()]))
                start.info = start.info.model_copy(update={"beam_center_px": centre})
            if "detector_config" in detector:
                start.config.update(json.loads(detector["detector_config"][()]))
            for name, channels in (("mask", start.pixel_mask), ("flatfield", start.flatfield)):
                if name in detector:
                    channels["data"] = detector[name][()]
    return scan, _chain(start, events)
