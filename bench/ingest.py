"""Ingest benchmark: detector stream -> receiver -> writer -> `<scan>_raw.cxi`, next to the floor.

The pipeline is the one of pipelines/raw.toml (its writer's credit and flush interval).

1. The recorded EIGER1 1M Stream V1 images (../shared/data/recorded), renumbered and replayed
   `--frames` times as fast as the pipeline takes them, through `surveyor run` (receiver and
   writer processes). Baseline in the same run: one process that parses the same messages
   (JSON parts, the bitshuffle framing check) and writes them with direct chunk writes, with
   no sockets at all: the best a Python receiver-writer could do. And the transport's floor: the
   same messages through a bare pyzmq relay process (PULL tcp -> PUSH ipc) to a sink process
   that only receives, with the CPU each spends per frame (user and system time, its ZeroMQ
   I/O thread included): what two processes cost before they do any work.
2. Simulated 4 Mpx uint16 frames, bitshuffle/LZ4-compressed, through the same pipeline.

Time runs from the first message sent to the `scan_finished` event (every frame flushed and
acknowledged), so the pipeline's figure includes its shutdown of the scan. Each process's CPU per
frame comes with its split by thread (event loop, ZeroMQ I/O, the rest: the writer's hooks):
where a frame's cost lies.

    python bench/ingest.py [--frames 5000] [--frames-4m 500] [--dir /dev/shm]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import gzip
import json
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

import h5py
import msgpack
import numpy as np
import zmq

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import harness  # noqa: E402
from libs.common import codecs  # noqa: E402
from libs.common.detector import DetectorInfo, SeriesEnd, SeriesStart  # noqa: E402
from libs.common.detector import stream1  # noqa: E402
from libs.common.frames import ArraySpec  # noqa: E402
from libs.common.pipeline import load  # noqa: E402
from libs.common.detector.events import Image  # noqa: E402
from services.writer.disk import LIBVER  # noqa: E402
from tests.conftest import SHARED, cpu_seconds, free_port, ingest_pipeline, wait_for  # noqa: E402

RECORDING = SHARED / "data" / "recorded" / "eiger1m_stream1.msgpack.gz"


def recorded_messages(frames: int) -> tuple[list[bytes], list[list[bytes]], bytes]:
    """Header, `frames` image messages renumbered 0..frames-1 (the 9 recorded ones in turn), end."""
    with gzip.open(RECORDING) as f:
        messages = [list(m) for m in msgpack.Unpacker(f, raw=False)]
    header, images = messages[0], messages[1:]
    renumbered = []
    for number in range(frames):
        parts = images[number % len(images)]
        first = json.loads(parts[0])
        first["frame"] = number
        renumbered.append([json.dumps(first).encode(), *parts[1:]])
    series = json.loads(header[0])["series"]
    return header, renumbered, json.dumps({"htype": "dseries_end-1.0", "series": series}).encode()


def simulated_messages(frames: int) -> tuple[list[bytes], list[list[bytes]], bytes]:
    """4 Mpx uint16 frames of Poisson(1) counts, compressed: 16 distinct frames in turn."""
    rng = np.random.default_rng(0)
    shape = (2048, 2048)
    blobs = [codecs.compress(rng.poisson(1.0, shape).astype("<u2")) for _ in range(16)]
    spec = ArraySpec(name="data", dtype="<u2", shape=shape, compression="bslz4")
    header = stream1.encode(SeriesStart(series="4", info=DetectorInfo(shape=shape, dtype="<u2", n_images=frames)))
    images = [stream1.encode(Image(series="4", frame=n, blobs=[(spec, blobs[n % 16])])) for n in range(frames)]
    return header, images, stream1.encode(SeriesEnd(series="4"))[0]


def _relay(source: str, sink: str, frames: int, report: mp.Queue) -> None:
    context = zmq.Context()
    pull, push = context.socket(zmq.PULL), context.socket(zmq.PUSH)
    pull.connect(source)
    push.bind(sink)
    push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    started = cpu_seconds()  # from the first frame: the process's start-up is not counted
    for _ in range(frames - 1):
        push.send_multipart(pull.recv_multipart(copy=False), copy=False)
    report.put(("relay", cpu_seconds() - started))
    pull.close()
    push.close(linger=-1)
    context.term()


def _sink(sink: str, frames: int, report: mp.Queue) -> None:
    context = zmq.Context()
    pull = context.socket(zmq.PULL)
    pull.connect(sink)
    pull.recv_multipart(copy=False)
    started = cpu_seconds()
    for _ in range(frames - 1):
        pull.recv_multipart(copy=False)
    report.put(("sink", cpu_seconds() - started))
    pull.close()
    context.term()


def transport_floor(images: list[list[bytes]], directory: Path) -> dict[str, float]:
    """The same messages through a relay process to a sink process doing nothing else."""
    source, sink = f"tcp://127.0.0.1:{free_port()}", f"ipc://{directory}/floor.ipc"
    report: mp.Queue = mp.Queue()
    processes = [mp.Process(target=_relay, args=(source, sink, len(images), report)),
                 mp.Process(target=_sink, args=(sink, len(images), report))]
    for process in processes:
        process.start()
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100)
    push.bind(source)
    try:
        started = time.perf_counter()
        for parts in images:
            push.send_multipart(parts, copy=False)
        spent = dict(report.get(timeout=600) for _ in processes)
        elapsed = time.perf_counter() - started
    finally:
        push.close(linger=0)
        context.term()
        for process in processes:
            process.join(10)
    return {**figures(images, elapsed),
            **{f"{name}_cpu_us_per_frame": round(seconds / len(images) * 1e6, 1) for name, seconds in spent.items()}}


def single_process(images: list[list[bytes]], directory: Path) -> dict[str, float]:
    """Parse and write in one loop: the floor any receiver-writer pays."""
    path = directory / "baseline.h5"
    started = time.perf_counter()
    with h5py.File(path, "w", libver=LIBVER) as f:
        dataset = None
        for parts in images:
            first, described = json.loads(parts[0]), json.loads(parts[1])
            shape = tuple(described["shape"][::-1])
            dtype = np.dtype(described["type"]).newbyteorder("<")
            codecs.check(parts[2], "bslz4", shape, dtype.str)
            if dataset is None:
                dataset = f.create_dataset("data", shape=(len(images), *shape), chunks=(1, *shape), dtype=dtype,
                                           **codecs.hdf5_filter("bslz4"))
            dataset.id.write_direct_chunk((first["frame"], 0, 0), parts[2])
    elapsed = time.perf_counter() - started
    path.unlink()  # the pipeline's file then finds the same free memory and disk this one did
    return figures(images, elapsed)


def figures(images: list[list[bytes]], elapsed: float) -> dict[str, float]:
    payload = sum(len(parts[2]) for parts in images)
    return {"frames_per_s": round(len(images) / elapsed, 1), "MB_per_s": round(payload / elapsed / 1e6, 1),
            "seconds": round(elapsed, 3)}


def pipeline(header: list[bytes], images: list[list[bytes]], end: bytes, directory: Path) -> dict[str, object]:
    source = f"tcp://127.0.0.1:{free_port()}"
    writer = load(REPO / "pipelines" / "raw.toml").stages["writer"]
    path = ingest_pipeline(directory, protocol="stream1", source=source, credit=writer.credit,
                           writer=f"flush_interval_s = {writer.params['flush_interval_s']}")
    run, handler, feed = harness.start(path, directory)
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 100)
    push.bind(source)
    try:
        pids = {s["stage"]: s["pid"] for s in harness.wait_up(handler, 2)}
        cpu = {stage: cpu_seconds(pid) for stage, pid in pids.items()}
        threads = {stage: harness.cpu_by_thread(pid) for stage, pid in pids.items()}
        started = time.perf_counter()
        push.send_multipart(header)
        for parts in images:
            push.send_multipart(parts, copy=False)
        push.send(end)
        finished = wait_for(lambda: feed.find("scan_finished"), 600, "the scan to finish")
        elapsed = time.perf_counter() - started
        cpu = {f"{stage}_cpu_us_per_frame": round((cpu_seconds(pid) - cpu[stage]) / len(images) * 1e6, 1)
               for stage, pid in pids.items()}
        threads = {f"{stage}_cpu_us_per_frame_by_thread": {
            kind: round(seconds / len(images) * 1e6, 1)
            for kind, seconds in (harness.cpu_by_thread(pid) - threads[stage]).items()} for stage, pid in pids.items()}
    finally:
        feed.close()
        push.close(linger=0)
        context.term()
        run.wait(60)
    summary = finished["summary"]
    return {**figures(images, elapsed), **cpu, **threads, "frames_written": summary["frames_written"],
            "frames_lost": summary["frames_lost"], "frames_rejected": summary["frames_rejected"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=5000)
    parser.add_argument("--frames-4m", type=int, default=500)
    parser.add_argument("--dir", help="where the files go (default: a temporary folder in TMPDIR); on a tmpfs "
                                      "such as /dev/shm the disk's part drops out of every figure")
    args = parser.parse_args()
    results = {}
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        cases = {"eiger1m_stream1_recorded": recorded_messages(args.frames),
                 "simulated_4mpx_uint16_bslz4": simulated_messages(args.frames_4m)}
        for name, (header, images, end) in cases.items():
            directory = Path(tmp) / name
            directory.mkdir()
            baseline = single_process(images, directory)
            floor = transport_floor(images, directory)
            measured = pipeline(header, images, end, directory)
            results[name] = {"frames": len(images), "mean_blob_bytes": round(np.mean([len(p[2]) for p in images])),
                             "single_process_parse_and_write": baseline, "bare_pyzmq_relay_and_sink": floor,
                             "surveyor_receiver_writer": measured,
                             "ratio": round(measured["frames_per_s"] / baseline["frames_per_s"], 3)}
    print(json.dumps({"benchmark": "ingest", "path": "PUSH (tcp) -> receiver -> writer -> raw CXI",
                      "cpus": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
