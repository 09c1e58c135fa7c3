"""The hit server: hits for a live indexer, the way OM serves CrystFEL (reference/peakfinder8.md 9).

A ROUTER socket at `endpoint` answers each `next` request (the single frame b"next" from a REQ
client, e.g. `indexamajig --zmq-input=tcp://host:12322 --zmq-request=next --data-format=msgpack`)
with one hit, newest first: a msgpack map with `detector_data` (the corrected frame, float32, in
msgpack-numpy's form; NaN where the detector has no data, which CrystFEL takes as bad pixels, as
the file's mask tells it), `peak_list` (`num_peaks`, `fs`, `ss`, `intensity`, `num_pixels`,
`max_pixel_intensity`, `snr`, `sigma`), `beam_energy` (eV), `detector_distance` (m), `event_id`,
`timestamp`, `source`. Unlike OM, `snr` is the signal-to-noise ratio; the local background sigma
OM sends under that name is `sigma`. Anything else is answered b"What?".

The newest `buffer` hits are kept (the edge from the peak stage delivers the latest), each served
once; newest means the latest frame of the latest scan, whichever peak process finished first. A
request that finds none waits for the next hit; the most recent requests are answered first. The
pipeline never waits for an indexer: a slow one sees fewer hits, not a slower beamline.
Frames are decoded and corrected only when served.

The endpoint is loopback by default (two pipelines on one host each choose a port; nobody off the
host reads the beamline's hits unasked); an indexer on another host needs an explicit
`endpoint = "tcp://*:12322"`, which is logged as a warning naming the port.
"""

from __future__ import annotations

import bisect
import logging
import time
from collections import deque

import msgpack
import numpy as np
import zmq

from libs.common import security
from libs.common.contracts import Peaks
from libs.common.exposure import beyond_loopback
from libs.common.frames import Frame
from libs.common.runtime import Service as Runtime
from libs.crystallography import detector
from libs.crystallography.hits import PEAK_FIELDS
from services.hit_server.params import Params

logger = logging.getLogger(__name__)


def packed_array(array: np.ndarray) -> dict[bytes, object]:
    """An array as msgpack-numpy encodes it, which CrystFEL's msgpack reader expects."""
    array = np.ascontiguousarray(array)
    return {b"nd": True, b"type": array.dtype.str, b"kind": b"", b"shape": list(array.shape),
            b"data": array.tobytes()}


class Service(Runtime):
    Params = Params
    offload = False  # its hooks answer indexers on a socket of their own, which only the loop thread may touch

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._hits: list[tuple[tuple[int, int], Frame, dict[str, object]]] = []
        """Sorted by (epoch, frame): the newest last."""
        self._requests: deque[list[bytes]] = deque(maxlen=self.params.buffer)
        self._socket = self.context.socket(zmq.ROUTER)
        self._socket.setsockopt(zmq.LINGER, 0)
        security.serve(self._socket, self.keys if self.params.curve else None)
        try:
            self._socket.bind(self.params.endpoint)
        except zmq.ZMQError as exc:
            raise SystemExit(f"hit server: cannot bind {self.params.endpoint}: {exc}; "
                             "set stages.<stage>.params.endpoint to a free port") from None
        self.watch(self._socket, self._on_request)
        logger.info("serving hits to indexers at %s", self.params.endpoint)
        if beyond_loopback(self.params.endpoint) and not (self.keys and self.params.curve):
            port = self.params.endpoint.rpartition(":")[2]
            logger.warning("the hit server listens beyond loopback on port %s (%s): anyone who reaches this host "
                           "can take the hits; bind tcp://127.0.0.1:%s unless indexers run on other hosts",
                           port, self.params.endpoint, port)

    def on_frame(self, frame: Frame) -> None:
        if not Peaks.of(frame).hit:  # a record that is not a peak record raises: counted rejected
            return
        scan = self.scan
        about = {"beam_energy": scan.energy_ev if scan else None,
                 "detector_distance": scan.distance_m if scan else None,
                 "event_id": f"{frame.header.scan_id}//{frame.header.frame}", "timestamp": time.time(),
                 "source": frame.header.scan_id}
        # Hits outlive the scan (an indexer may catch up after it); the detector facts go with them.
        bisect.insort(self._hits, (frame.key, frame, {**about, "headers": dict(self.headers)}), key=lambda h: h[0])
        del self._hits[:-self.params.buffer]
        self._answer()

    def _on_request(self) -> None:
        while True:
            try:
                parts = self._socket.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            if len(parts) == 3 and parts[1] == b"" and parts[2] == b"next":
                self._requests.append(parts[:2])
            else:
                self._socket.send_multipart([*parts[:-1], b"What?"])
        self._answer()

    def _answer(self) -> None:
        """The newest waiting request gets the newest hit, until one of them runs out."""
        while self._requests and self._hits:
            envelope = self._requests.pop()
            _, frame, about = self._hits.pop()
            try:
                payload = self._payload(frame, about)
            except Exception:  # noqa: BLE001 - a bad hit must not stop the serving
                logger.exception("hit %s could not be served", about["event_id"])
                self._requests.append(envelope)
                continue
            self._socket.send_multipart([*envelope, payload])
            logger.debug("served %s", about["event_id"])

    def _payload(self, record: Frame, about: dict[str, object]) -> bytes:
        raw = record.array("data")
        headers = about.pop("headers")
        corrections = detector.corrections(headers, raw.shape, flatfield=self.params.flatfield)
        peaks = {name: record.array(name).astype(float).tolist() for name in PEAK_FIELDS}
        peak_list = {"num_peaks": len(peaks["fs"]), **peaks}
        image = corrections.apply(raw, missing=np.nan)
        return msgpack.packb({"detector_data": packed_array(image), "peak_list": peak_list,
                              **about}, use_bin_type=True)

    def close(self) -> None:
        self._socket.close(linger=0)
