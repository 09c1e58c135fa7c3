"""Detector stream formats: what real detectors and beamline receivers put on the wire.

Each protocol module turns one ZeroMQ multipart message into one event (`decode`) and one event
into a message (`encode`), so the receiver and the virtual detector (`surveyor simulate`) share a
single definition of every format:

    stream1   DECTRIS Stream V1 (JSON multipart: dheader-1.0, dimage-1.0, dseries_end-1.0)
    stream2   DECTRIS Stream V2 (one CBOR map per message: start, image, end)
    stins     MAX IV streaming-receiver secondary port (header, image, series_end)

and `replay` streams an HDF5 file's frames as a detector would (offline runs, `surveyor process`).

`decode` validates everything before a C decoder sees a byte (JSON/CBOR well-formedness, part
counts, sizes, the bitshuffle framing) and raises `StreamError` saying what is wrong. A header
part that cannot be used (an empty or misfitting flatfield, pixel mask or count-rate blob, an
unknown htype) does not cost the header: it is left out and named in `SeriesStart.left_out`.
"""

from __future__ import annotations

from types import ModuleType

from libs.common.detector import stins, stream1, stream2
from libs.common.detector.events import (DetectorInfo, Event, Image, SeriesEnd, SeriesStart, StreamError,
                                         header_from_image)

PROTOCOLS: dict[str, ModuleType] = {"stream1": stream1, "stream2": stream2, "stins": stins}

__all__ = ["PROTOCOLS", "DetectorInfo", "Event", "Image", "SeriesEnd", "SeriesStart", "StreamError",
           "header_from_image"]
