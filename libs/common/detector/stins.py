"""MAX IV streaming-receiver secondary-port format, "STINS" (reference/detector_streams.md 5.5).

    header      [{"htype": "header", "msg_number": n, "filename": ...}, optional JSON meta]
    image       [{"htype": "image", "msg_number": n, "frame": i, "shape": [rows, cols],
                  "type": "uint16", "compression": "bslz4" | "none"}, blob, ...]
    series_end  [{"htype": "series_end", "msg_number": n}]

`msg_number` increases across series and is not reset; the receiver names a series after its
header's number. `lz4` (HDF5 LZ4-filter framing) is accepted beside the two compressions
streaming-receiver knows, since Surveyor re-publishes what it received. Images with several
blobs (modules, thresholds) keep them as separate arrays.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
from pydantic import ValidationError

from libs.common.detector.events import (DetectorInfo, Event, Image, SeriesEnd, SeriesStart, StreamError,
                                         checked_blob, parse_json)
from libs.common.detector.stream1 import info_from_config
from libs.common.frames import view
from libs.common.messages import describe

MAX_PARTS = 65


def decode(parts: list[Any]) -> Event:
    if not 1 <= len(parts) <= MAX_PARTS:
        raise StreamError(f"STINS message of {len(parts)} parts")
    first = parse_json(view(parts[0]), "part 0")
    htype = first.get("htype")
    number = first.get("msg_number")
    if htype in ("header", "image", "series_end") and (not isinstance(number, int) or isinstance(number, bool)):
        raise StreamError(f"{htype} message without an integer msg_number")
    if htype == "image":
        return _image(first, parts)
    if htype == "header":
        return _header(first, parts, str(number))
    if htype == "series_end":
        return SeriesEnd(series=None)
    raise StreamError(f"part 0 has htype {htype!r}, not header, image or series_end")


def _image(first: dict[str, Any], parts: list[Any]) -> Image:
    if len(parts) < 2:
        raise StreamError("image message without a pixel blob")
    frame = first.get("frame")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise StreamError(f"image frame {frame!r} is not a frame number")
    compression = first.get("compression", "none")
    if compression not in ("bslz4", "lz4", "none"):
        raise StreamError(f"compression {compression!r} is not bslz4, lz4 (HDF5 framing) or none")
    dtype = first.get("type")
    if dtype not in ("uint8", "uint16", "uint32", "int16", "int32", "float32"):
        raise StreamError(f"pixel type {dtype!r} is not supported")
    blobs = [checked_blob("data" if i == 0 else f"data_{i}", view(part), first.get("shape"), dtype, compression)
             for i, part in enumerate(parts[1:])]
    meta = {k: v for k, v in first.items()
            if k not in ("htype", "msg_number", "frame", "shape", "type", "compression")}
    return Image(series=None, frame=frame, blobs=blobs, meta=meta)


def _header(first: dict[str, Any], parts: list[Any], series: str) -> SeriesStart:
    """A meta part, or a value in it, that cannot be used is left out and named in `left_out`:
    the series is received without it."""
    start = SeriesStart(series=series, config={k: v for k, v in first.items() if k not in ("htype", "msg_number")})
    if len(parts) > 1:
        try:
            start.config.update(parse_json(view(parts[1]), "it"))
        except StreamError as exc:
            start.left_out.append(("header part 1 (meta)", str(exc)))
    # Our own re-published headers carry DetectorInfo fields; others SIMPLON keys, if any.
    ours = {k: tuple(v) if isinstance(v, list) else v
            for k, v in start.config.items() if k in DetectorInfo.model_fields}
    if not ours:
        start.info = info_from_config(start.config)
        return start
    kept = {}
    for key, value in ours.items():
        try:
            DetectorInfo.model_validate({key: value})
        except ValidationError as exc:
            start.left_out.append((f"header meta {key}", describe(exc)))
        else:
            kept[key] = value
    start.info = DetectorInfo.model_validate(kept)
    return start


# --- encoding: re-publication and the virtual detector -------------------------------------------


class Numbering:
    """`msg_number`: one counter across every series, as streaming-receiver keeps it."""

    def __init__(self) -> None:
        self.next = 0

    def encode(self, event: Event, filename: str = "") -> list[Any]:
        number, self.next = self.next, self.next + 1
        if isinstance(event, SeriesStart):
            return [_json({"htype": "header", "msg_number": number, "filename": filename}),
                    _json({"series": event.series, **event.info.model_dump(mode="json", exclude_none=True)})]
        if isinstance(event, Image):
            spec = event.blobs[0][0]
            head = {"htype": "image", "msg_number": number, "frame": event.frame, "shape": list(spec.shape),
                    "type": np.dtype(spec.dtype).name, "compression": spec.compression}
            return [_json(head), *(blob for _, blob in event.blobs)]
        return [_json({"htype": "series_end", "msg_number": number})]


def encode(event: Event) -> list[Any]:
    """One message on its own (msg_number 0); streams keep a `Numbering`."""
    return Numbering().encode(event)


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()
