"""`surveyor simulate`: a virtual detector.

It binds PUSH as a real detector does, waits for a receiver to connect, optionally announces the
scan to the handler (`start_scan`, for generators that describe one), then streams one series in
the chosen protocol: header, images (optionally bitshuffle/LZ4 or LZ4 with the HDF5 framing a
DECTRIS detector uses), end. It stays up until ZeroMQ has handed every message over, since a
sender that exits right after the end message can lose it (reference/detector_streams.md 10).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from rich.progress import Progress

from libs.common import client, codecs
from libs.common.detector import PROTOCOLS, Image, SeriesEnd
from libs.common.detector.stins import Numbering
from libs.common.frames import ArraySpec
from libs.simulation import generator


def run(*, kind: str, protocol: str, bind: str, frames: int | None, rate: float, truth: str | None,
        compression: str, series: str, scan_id: str | None, params: dict[str, Any], handler: str | None,
        wait_peer_s: float, linger_s: float) -> int:
    try:
        scan = generator(kind, frames=frames, series=series, scan_id=scan_id, params=params)
    except ValueError as exc:
        raise SystemExit(f"surveyor simulate: {exc}") from None
    if truth:
        scan.write_truth(Path(truth))
    # A pooled simulation repeats its frames: each is made and compressed once, before the stream
    # starts, so that sending costs next to nothing (a source for benchmarks).
    pool = getattr(scan, "pool", 0)
    pictures = scan.images()
    made = [image(series, number, pixels, compression) for number, pixels in zip(range(pool), pictures, strict=False)]
    encode = Numbering().encode if protocol == "stins" else PROTOCOLS[protocol].encode
    context = zmq.Context()
    push = context.socket(zmq.PUSH)
    # Paced, a detector keeps sending while the receiver lags; unpaced ("as fast as taken") it
    # is held back by the pipeline, not by how many frames fit in the queues.
    push.setsockopt(zmq.SNDHWM, 1000 if rate > 0 else 4)
    monitor = push.get_monitor_socket(zmq.EVENT_ACCEPTED)
    try:
        push.bind(bind)
    except zmq.ZMQError as exc:
        raise SystemExit(f"surveyor simulate: cannot bind {bind}: {exc}") from None
    try:
        if not monitor.poll(int(wait_peer_s * 1000)):
            raise SystemExit(f"surveyor simulate: no receiver connected to {bind} within {wait_peer_s} s")
        description = scan.scan()
        if handler and description is not None:
            reply = client.call(handler, "start_scan", description.model_dump(mode="json"), timeout_s=30)
            if not reply.ok:
                raise SystemExit(f"surveyor simulate: the handler refused the scan: {reply.error}")
        header = scan.header()
        push.send_multipart(encode(header))
        period = 1.0 / rate if rate > 0 else 0.0
        started = time.monotonic()
        total = header.info.n_images
        with Progress(transient=True) as progress:
            task = progress.add_task(f"{kind} series {series} ({protocol}, {compression})", total=total)
            for number in range(total):
                if period:
                    time.sleep(max(0.0, started + number * period - time.monotonic()))
                if pool:
                    message = dataclasses.replace(made[number % pool], frame=number)
                else:
                    message = image(series, number, next(pictures), compression)
                push.send_multipart(encode(message), copy=False)
                progress.advance(task)
        push.send_multipart(encode(SeriesEnd(series=series)))
        elapsed = time.monotonic() - started
        print(f"sent series {series}: {total} frames in {elapsed:.2f} s ({total / max(elapsed, 1e-9):.0f} Hz)")
    finally:
        push.disable_monitor()
        monitor.close(linger=0)
        push.close(linger=int(linger_s * 1000))
        context.term()
    return 0


def image(series: str, number: int, pixels: np.ndarray, compression: str) -> Image:
    spec = ArraySpec(name="data", dtype=pixels.dtype.str, shape=pixels.shape, compression=compression)
    blob = pixels.tobytes() if compression == "none" else codecs.compress(pixels, compression)
    return Image(series=series, frame=number, blobs=[(spec, blob)])
