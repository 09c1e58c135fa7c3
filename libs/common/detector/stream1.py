"""DECTRIS Stream V1 ("legacy"): JSON multipart messages (reference/detector_streams.md section 1).

Header parts are located by their `htype`, never by index, so `header_detail` all, basic and none,
with or without an appendix, all decode. Shapes on the wire are [x, y]; numpy's are (y, x).
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

import numpy as np

from libs.common.codecs import HEADER, frame_lz4
from libs.common.detector.events import (DetectorInfo, Event, Image, SeriesEnd, SeriesStart, StreamError,
                                         checked_blob, info_from_keys, info_to_keys, json_safe, misfit, parse_json)
from libs.common.frames import view

ENCODINGS = {"bs32-lz4<": ("bslz4", 4), "bs16-lz4<": ("bslz4", 2), "bs8-lz4<": ("bslz4", 1),
             "lz4<": ("lz4", None), "<": ("none", None)}
TYPES = {"uint8", "uint16", "uint32", "int8", "int16", "int32", "float32"}
MAX_PARTS = 16


def decode(parts: list[Any]) -> Event:
    if not 1 <= len(parts) <= MAX_PARTS:
        raise StreamError(f"Stream V1 message of {len(parts)} parts")
    first = parse_json(view(parts[0]), "part 0")
    htype = first.get("htype")
    if htype == "dimage-1.0":
        return _image(first, parts)
    if htype == "dheader-1.0":
        return _header(first, parts)
    if htype == "dseries_end-1.0":
        return SeriesEnd(series=_series(first))
    raise StreamError(f"part 0 has htype {htype!r}, not dheader-1.0, dimage-1.0 or dseries_end-1.0")


def _series(part: dict[str, Any]) -> str:
    series = part.get("series")
    if not isinstance(series, (int, str)) or isinstance(series, bool):
        raise StreamError(f"series {series!r} is not a number")
    return str(series)


def _image(first: dict[str, Any], parts: list[Any]) -> Image:
    if len(parts) < 3:
        raise StreamError(f"dimage-1.0 message of {len(parts)} parts; needs dimage_d-1.0 and the pixels")
    frame = first.get("frame")
    if type(frame) is not int or frame < 0:
        raise StreamError(f"dimage-1.0 frame {frame!r} is not a frame number")
    described = parse_json(view(parts[1]), "part 1 (dimage_d-1.0)")
    if described.get("htype") != "dimage_d-1.0":
        raise StreamError(f"part 1 has htype {described.get('htype')!r}, not dimage_d-1.0")
    dtype = described.get("type")
    compression = _compression(described.get("encoding"), dtype)
    blob = view(parts[2])
    if described.get("size", len(blob)) != len(blob):
        raise StreamError(f"dimage_d-1.0 says {described.get('size')} bytes, part 2 has {len(blob)}")
    shape = described.get("shape")
    yx = shape[::-1] if isinstance(shape, list) else shape
    if compression == "lz4":
        if not isinstance(yx, list) or not all(isinstance(n, int) and n > 0 for n in yx) or len(yx) != 2:
            raise StreamError(f"image shape {shape!r} is not two sizes")
        blob = frame_lz4(blob, yx[0] * yx[1] * np.dtype(dtype).itemsize)
    spec = checked_blob("data", blob, yx, dtype, compression)
    meta: dict[str, Any] = {}
    for part in parts[3:]:
        extra = parse_json(view(part), "image part")
        if extra.get("htype") == "dconfig-1.0":
            meta.update({k: extra[k] for k in ("start_time", "stop_time", "real_time") if k in extra})
        else:
            meta["appendix"] = json_safe(extra)
    return Image(series=_series(first), frame=frame, blobs=[spec], meta=meta)


def _compression(encoding: Any, dtype: Any) -> str:
    """The compression of an image's `encoding` of `dtype` pixels (StreamError if they do not fit)."""
    if not isinstance(encoding, str) or not isinstance(dtype, str):
        raise StreamError(f"encoding {encoding!r} of pixel type {dtype!r}: both must be strings")
    return _known_compression(encoding, dtype)


@functools.lru_cache(maxsize=32)
def _known_compression(encoding: str, dtype: str) -> str:
    """Checked once per kind of image, not per image."""
    if encoding not in ENCODINGS:
        raise StreamError(f"encoding {encoding!r} is not one of {sorted(ENCODINGS)}")
    compression, element = ENCODINGS[encoding]
    if dtype not in TYPES:
        raise StreamError(f"pixel type {dtype!r} is not one of {sorted(TYPES)}")
    if element is not None and element != np.dtype(dtype).itemsize:
        raise StreamError(f"encoding {encoding} does not fit {dtype} pixels")
    return compression


ARRAYS = {"dflatfield-1.0": "flatfield", "dpixelmask-1.0": "pixel_mask", "dcountrate_table-1.0": None}
"""Header parts that announce a blob, and the SeriesStart field each fills (the count-rate table
is checked, not kept)."""


def _header(first: dict[str, Any], parts: list[Any]) -> SeriesStart:
    """A part that cannot be used (not JSON, an unknown htype, a blob that does not fit its shape or
    the detector) is left out and named in `left_out`: the series is received without it."""
    start = SeriesStart(series=_series(first))
    config: dict[str, Any] = {}
    detailed = first.get("header_detail") in ("basic", "all")
    index = 1
    while index < len(parts):
        what = "detector configuration (header part 1)" if index == 1 and detailed else f"header part {index}"
        try:
            part = parse_json(view(parts[index]), "it")
        except StreamError as exc:
            start.left_out.append((what, str(exc)))
            index += 1
            continue
        htype = part.get("htype")
        if isinstance(htype, str) and htype in ARRAYS:
            if index + 1 >= len(parts):
                start.left_out.append((htype, "the blob it announces is missing (the message ends)"))
            else:
                try:
                    array = _header_array(part, view(parts[index + 1]))
                except StreamError as exc:
                    start.left_out.append((htype, str(exc)))
                else:
                    if ARRAYS[htype]:
                        getattr(start, ARRAYS[htype])["data"] = array
            index += 2
            continue
        if htype is None and index == 1 and detailed:
            config = part
        elif htype is None:
            start.config["appendix"] = json_safe(part)
        else:
            blob = index + 1 < len(parts) and not _is_json(parts[index + 1])
            after = " and the blob after it" if blob else ""
            known = ", ".join(sorted(ARRAYS))
            start.left_out.append((str(htype), f"htype not known (header part {index}{after}); known: {known}"))
            index += 2 if blob else 1
            continue
        index += 1
    start.config.update(json_safe(config))
    start.info = info_from_config(config)
    for htype, kind in ARRAYS.items():
        array = getattr(start, kind).get("data") if kind else None
        if array is not None and (why := misfit(array, start.info)):
            del getattr(start, kind)["data"]
            start.left_out.append((htype, why))
    return start


def _is_json(part: Any) -> bool:
    try:
        parse_json(view(part), "")
    except StreamError:
        return False
    return True


def _header_array(part: dict[str, Any], blob: memoryview) -> np.ndarray:
    shape, dtype = part.get("shape"), part.get("type")
    if dtype not in TYPES or not isinstance(shape, list) or len(shape) != 2 \
            or not all(isinstance(n, int) and n > 0 for n in shape):
        raise StreamError(f"declares shape {shape!r} of type {dtype!r}")
    expected = shape[0] * shape[1] * np.dtype(dtype).itemsize
    if len(blob) != expected:
        raise StreamError(f"blob has {len(blob)} bytes; shape {shape} of {dtype} needs {expected}")
    return np.frombuffer(blob, np.dtype(dtype).newbyteorder("<")).reshape(shape[::-1]).copy()


SIMPLON = {"shape": ("y_pixels_in_detector", "x_pixels_in_detector"), "n_images": "nimages",
           "energy_ev": "photon_energy", "distance_m": "detector_distance",
           "pixel_size_m": ("y_pixel_size", "x_pixel_size"), "beam_center_px": ("beam_center_y", "beam_center_x"),
           "count_time_s": "count_time", "frame_time_s": "frame_time", "threshold_energy_ev": "threshold_energy",
           "sensor_material": "sensor_material", "sensor_thickness_m": "sensor_thickness",
           "description": "description", "serial_number": "detector_number"}
"""DetectorInfo fields as the SIMPLON detector configuration names them (eV, m, pixels)."""
DEPTHS = {8: "<u1", 16: "<u2", 32: "<u4"}


def info_from_config(config: dict[str, Any]) -> DetectorInfo:
    """A SIMPLON detector configuration as DetectorInfo; a series has nimages x ntrigger images."""
    depth = config.get("bit_depth_image")
    info = info_from_keys(config, SIMPLON, dtype=DEPTHS.get(depth) if isinstance(depth, int) else None)
    triggers = config.get("ntrigger")
    if info.n_images is not None and isinstance(triggers, int) and triggers > 0:
        info = info.model_copy(update={"n_images": info.n_images * triggers})
    return info


# --- encoding (the virtual detector) -----------------------------------------------------------


def encode(event: Event) -> list[bytes]:
    if isinstance(event, SeriesStart):
        return _encode_header(event)
    if isinstance(event, Image):
        return _encode_image(event)
    return [_json({"htype": "dseries_end-1.0", "series": _wire_series(event.series)})]


def _json(value: dict[str, Any]) -> bytes:
    return json.dumps(value, separators=(",", ":")).encode()


def _wire_series(series: str | None) -> int | str:
    return int(series) if series is not None and series.isdigit() else (series or 0)


def _encode_header(event: SeriesStart) -> list[bytes]:
    config = {**event.config, **info_to_keys(event.info, SIMPLON)}
    if event.info.dtype:
        config["bit_depth_image"] = np.dtype(event.info.dtype).itemsize * 8
    config.setdefault("ntrigger", 1)
    detail = "all" if event.flatfield or event.pixel_mask else "basic"
    parts = [_json({"htype": "dheader-1.0", "series": _wire_series(event.series), "header_detail": detail}),
             _json(config)]
    for htype, arrays in (("dflatfield-1.0", event.flatfield), ("dpixelmask-1.0", event.pixel_mask)):
        for array in arrays.values():
            parts += [_json({"htype": htype, "shape": list(array.shape[::-1]), "type": array.dtype.name}),
                      np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<")).tobytes()]
    return parts


def _encode_image(event: Image) -> list[bytes]:
    spec, blob = event.blobs[0]
    dtype = np.dtype(spec.dtype)
    if spec.compression == "bslz4":
        encoding = f"bs{dtype.itemsize * 8}-lz4<"
    elif spec.compression == "lz4":
        # Stream V1 sends one bare LZ4 block: drop the HDF5 framing of our single-block blob.
        blob = bytes(view(blob))[HEADER.size + 4:]
        encoding = "lz4<"
    else:
        encoding = "<"
    described = _json({"htype": "dimage_d-1.0", "shape": list(spec.shape[::-1]), "type": dtype.name,
                       "encoding": encoding, "size": len(blob)})
    first = _json({"htype": "dimage-1.0", "series": _wire_series(event.series), "frame": event.frame,
                   "hash": hashlib.md5(described).hexdigest()})
    times = {k: event.meta[k] for k in ("start_time", "stop_time", "real_time") if k in event.meta}
    return [first, described, blob, _json({"htype": "dconfig-1.0", **times})]

