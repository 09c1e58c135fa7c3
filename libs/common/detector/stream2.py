"""DECTRIS Stream V2: one CBOR map per message, `start` / `image` / `end`
(reference/detector_streams.md section 2).

Decoded with plain `cbor2.loads`, no tag hook: tags come back as `CBORTag` objects in both cbor2 5
and 6, whose hook signatures differ. Multi-dimensional arrays are tag 40 `[[rows, cols], typed
array]`; the typed array's bytes may be wrapped in the DECTRIS compression tag 56500
`[algorithm, element size, bytes]`. Every threshold channel of an image becomes one array.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import cbor2
import numpy as np

from libs.common.detector.events import (Event, Image, SeriesEnd, SeriesStart, StreamError,
                                         checked_blob, info_from_keys, info_to_keys, json_safe, misfit)
from libs.common.frames import view

MULTI_DIM, MULTI_DIM_COLUMN_MAJOR, COMPRESSED = 40, 1040, 56500
TYPED = {64: "u1", 68: "u1", 65: ">u2", 66: ">u4", 67: ">u8", 69: "<u2", 70: "<u4", 71: "<u8",
         72: "i1", 73: ">i2", 74: ">i4", 75: ">i8", 77: "<i2", 78: "<i4", 79: "<i8",
         80: ">f2", 81: ">f4", 82: ">f8", 84: "<f2", 85: "<f4", 86: "<f8"}
TAG_OF = {np.dtype(dtype).str: tag for tag, dtype in TYPED.items() if tag != 68}
MAX_BYTES = 1 << 30


def decode(parts: list[Any]) -> Event:
    if len(parts) != 1:
        raise StreamError(f"Stream V2 message of {len(parts)} parts; it is always one CBOR map")
    data = view(parts[0])
    if len(data) > MAX_BYTES:
        raise StreamError(f"Stream V2 message of {len(data)} bytes")
    try:
        message = cbor2.loads(data)
    except Exception as exc:  # noqa: BLE001 - cbor2 raises many kinds of error on garbage
        raise StreamError(f"not CBOR: {type(exc).__name__}: {exc}") from None
    if not isinstance(message, Mapping):
        raise StreamError("CBOR message is not a map")
    kind = message.get("type")
    series = message.get("series_id")
    series = str(series) if isinstance(series, (int, str)) and not isinstance(series, bool) else None
    if kind == "image":
        return _image(message, series)
    if kind == "start":
        return _start(message, series)
    if kind == "end":
        return SeriesEnd(series=series)
    raise StreamError(f"CBOR message type {kind!r} is not start, image or end")


def _unwrap(value: Any, what: str) -> tuple[tuple[int, int], str, str, bytes]:
    """(shape, dtype, compression, bytes) of a tag-40 array."""
    if not isinstance(value, cbor2.CBORTag) or value.tag not in (MULTI_DIM, MULTI_DIM_COLUMN_MAJOR):
        raise StreamError(f"{what} is not a multi-dimensional array (tag 40)")
    if value.tag == MULTI_DIM_COLUMN_MAJOR:
        raise StreamError(f"{what} is column-major (tag 1040), which detectors do not send")
    if not isinstance(value.value, (list, tuple)) or len(value.value) != 2:
        raise StreamError(f"{what}: tag 40 holds [shape, typed array]")
    shape, typed = value.value
    if not isinstance(typed, cbor2.CBORTag) or typed.tag not in TYPED:
        raise StreamError(f"{what} is not a typed array (RFC 8746)")
    payload, compression = typed.value, "none"
    if isinstance(payload, cbor2.CBORTag) and payload.tag == COMPRESSED:
        if not isinstance(payload.value, (list, tuple)) or len(payload.value) != 3:
            raise StreamError(f"{what}: compression tag holds [algorithm, element size, bytes]")
        algorithm, element, payload = payload.value
        if algorithm not in ("bslz4", "lz4"):
            raise StreamError(f"{what}: compression {algorithm!r} is not bslz4 or lz4")
        if algorithm == "bslz4" and element != np.dtype(TYPED[typed.tag]).itemsize:
            raise StreamError(f"{what}: bslz4 element size {element!r} does not fit {TYPED[typed.tag]}")
        compression = algorithm
    if not isinstance(payload, (bytes, bytearray)):
        raise StreamError(f"{what}: typed array payload is not a byte string")
    return tuple(shape) if isinstance(shape, (list, tuple)) else shape, TYPED[typed.tag], compression, payload


def _image(message: Mapping[str, Any], series: str | None) -> Image:
    frame = message.get("image_id")
    if not isinstance(frame, int) or isinstance(frame, bool) or frame < 0:
        raise StreamError(f"image_id {frame!r} is not a frame number")
    data = message.get("data")
    if not isinstance(data, Mapping) or not data:
        raise StreamError("image has no data map of channels")
    blobs = []
    for index, (channel, value) in enumerate(data.items()):
        shape, dtype, compression, payload = _unwrap(value, f"image channel {channel!r}")
        if dtype.startswith(">"):
            raise StreamError(f"image channel {channel!r} is big-endian ({dtype}); detectors send little-endian")
        blobs.append(checked_blob("data" if index == 0 else str(channel), payload, list(shape), dtype, compression))
    meta = {"channels": [str(c) for c in data]}
    for key in ("real_time", "start_time", "stop_time"):
        value = message.get(key)
        if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value) \
                and value[1]:
            meta[f"{key}_s"] = value[0] / value[1]
    return Image(series=series, frame=frame, blobs=blobs, meta=meta)


START_KEYS = {"shape": ("image_size_y", "image_size_x"), "n_images": "number_of_images",
              "energy_ev": "incident_energy", "distance_m": "detector_distance",
              "pixel_size_m": ("pixel_size_y", "pixel_size_x"), "beam_center_px": ("beam_center_y", "beam_center_x"),
              "count_time_s": "count_time", "frame_time_s": "frame_time", "sensor_material": "sensor_material",
              "sensor_thickness_m": "sensor_thickness", "description": "detector_description",
              "serial_number": "detector_serial_number"}
"""DetectorInfo fields as a Stream V2 `start` message names them (eV, m, pixels)."""


def _start(message: Mapping[str, Any], series: str | None) -> SeriesStart:
    """A flatfield or pixel-mask channel that cannot be used (empty, not its shape, not the
    detector's) is left out and named in `left_out`: the series is received without it."""
    thresholds = message.get("threshold_energy")
    first = next(iter(thresholds.values()), None) if isinstance(thresholds, Mapping) else None
    dtype = message.get("image_dtype")
    info = info_from_keys(
        message, START_KEYS,
        dtype=np.dtype(dtype).newbyteorder("<").str if dtype in ("uint8", "uint16", "uint32") else None,
        threshold_energy_ev=float(first) if isinstance(first, (int, float)) and not isinstance(first, bool) else None)
    start = SeriesStart(series=series or "0", info=info)
    for key, target in (("flatfield", start.flatfield), ("pixel_mask", start.pixel_mask)):
        channels = message.get(key)
        if channels is not None and not isinstance(channels, Mapping):
            start.left_out.append((key, f"is a {type(channels).__name__}, not a map of channels"))
            continue
        for index, (channel, value) in enumerate((channels or {}).items()):
            name = f"{key}[{channel}]"
            try:
                array = _plain_array(value, "the array")
            except StreamError as exc:
                start.left_out.append((name, str(exc)))
                continue
            if why := misfit(array, info):
                start.left_out.append((name, why))
            else:
                target["data" if index == 0 else str(channel)] = array
    skip = {"flatfield", "pixel_mask", "countrate_correction_lookup_table", "type"}
    start.config = json_safe({k: v for k, v in message.items() if k not in skip})
    return start


def _plain_array(value: Any, what: str) -> np.ndarray:
    shape, dtype, compression, payload = _unwrap(value, what)
    if compression != "none":
        raise StreamError(f"{what} is compressed; header arrays are expected plain")
    if not isinstance(shape, tuple) or len(shape) != 2 or not all(isinstance(n, int) and n > 0 for n in shape) \
            or math.prod(shape) * np.dtype(dtype).itemsize != len(payload):
        raise StreamError(f"{what}: shape {shape!r} does not fit {len(payload)} bytes of {dtype}")
    return np.frombuffer(payload, dtype).reshape(shape).astype(np.dtype(dtype).newbyteorder("="))


# --- encoding (the virtual detector) -----------------------------------------------------------


def _array(spec_dtype: str, shape: tuple[int, ...], payload: bytes, compression: str) -> cbor2.CBORTag:
    dtype = np.dtype(spec_dtype)
    body: Any = bytes(payload)
    if compression != "none":
        body = cbor2.CBORTag(COMPRESSED, [compression, dtype.itemsize if compression == "bslz4" else 0, body])
    return cbor2.CBORTag(MULTI_DIM, [list(shape), cbor2.CBORTag(TAG_OF[dtype.str], body)])


def encode(event: Event) -> list[bytes]:
    if isinstance(event, SeriesStart):
        return [cbor2.dumps(_encode_start(event))]
    if isinstance(event, Image):
        data = {("threshold_1" if spec.name == "data" else spec.name):
                _array(spec.dtype, spec.shape, bytes(view(blob)), spec.compression) for spec, blob in event.blobs}
        message = {"type": "image", "series_id": _wire(event.series), "series_unique_id": str(event.series),
                   "image_id": event.frame, "data": data}
        return [cbor2.dumps(message)]
    return [cbor2.dumps({"type": "end", "series_id": _wire(event.series), "series_unique_id": str(event.series)})]


def _wire(series: str | None) -> int:
    return int(series) if series is not None and series.isdigit() else 0


def _encode_start(event: SeriesStart) -> dict[str, Any]:
    message: dict[str, Any] = {k: v for k, v in event.config.items() if isinstance(v, (str, int, float, bool))}
    message.update(type="start", series_id=_wire(event.series), series_unique_id=str(event.series),
                   channels=["threshold_1"], **info_to_keys(event.info, START_KEYS))
    if event.info.dtype:
        message["image_dtype"] = np.dtype(event.info.dtype).name
    for key, arrays in (("flatfield", event.flatfield), ("pixel_mask", event.pixel_mask)):
        if arrays:
            message[key] = {("threshold_1" if name == "data" else name):
                            _array(a.dtype.newbyteorder("<").str, a.shape,
                                   a.astype(a.dtype.newbyteorder("<")).tobytes(), "none")
                            for name, a in arrays.items()}
    return message
