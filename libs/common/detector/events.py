"""The three things a detector stream says, whatever its format: a series starts, an image, it ends."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

import numpy as np
import orjson
from pydantic import Field

from libs.common import codecs
from libs.common.errors import FrameError
from libs.common.frames import ArraySpec
from libs.common.messages import Strict


class StreamError(FrameError):
    """A detector message that cannot be used; the reason goes to status and the event stream."""


class DetectorInfo(Strict):
    """What the series header says about the detector and the beam, in SI units and numpy order."""

    shape: tuple[int, int] | None = None
    dtype: str | None = None
    n_images: int | None = Field(None, ge=0)
    energy_ev: float | None = None
    distance_m: float | None = None
    pixel_size_m: tuple[float, float] | None = None
    beam_center_px: tuple[float, float] | None = None
    count_time_s: float | None = None
    frame_time_s: float | None = None
    threshold_energy_ev: float | None = None
    sensor_material: str | None = None
    sensor_thickness_m: float | None = None
    description: str | None = None
    serial_number: str | None = None

    def scan_fields(self) -> dict[str, Any]:
        """The ScanDescription fields this header can fill."""
        fields = {"energy_ev": self.energy_ev, "distance_m": self.distance_m,
                  "pixel_size_m": self.pixel_size_m[1] if self.pixel_size_m else None,
                  "beam_center_px": self.beam_center_px}
        return {k: v for k, v in fields.items() if v not in (None, 0, 0.0, (0.0, 0.0))}


HeaderKeys = dict[str, Union[str, tuple[str, str]]]
"""How a format names DetectorInfo fields: field -> key, or (y key, x key) for pairs."""
_TEXT = {"sensor_material", "description", "serial_number"}


def info_from_keys(header: Mapping[str, Any], keys: HeaderKeys, **known: Any) -> DetectorInfo:
    """DetectorInfo from a header; values of the wrong type are left out, not guessed."""
    def number(key: str) -> float | None:
        value = header.get(key)
        return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None

    values: dict[str, Any] = {}
    for name, key in keys.items():
        if name == "shape":
            y, x = (header.get(k) for k in key)
            ok = all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in (y, x))
            values[name] = (y, x) if ok else None
        elif isinstance(key, tuple):
            y, x = (number(k) for k in key)
            values[name] = (y, x) if y is not None and x is not None else None
        elif name == "n_images":
            n = header.get(key)
            values[name] = n if isinstance(n, int) and not isinstance(n, bool) and n >= 0 else None
        elif name in _TEXT:
            values[name] = header.get(key) if isinstance(header.get(key), str) else None
        else:
            values[name] = number(key)
    return DetectorInfo(**{**values, **known})


def info_to_keys(info: DetectorInfo, keys: HeaderKeys) -> dict[str, Any]:
    """The header entries a format uses for what `info` knows."""
    out: dict[str, Any] = {}
    for name, key in keys.items():
        value = getattr(info, name)
        if value is None:
            continue
        if isinstance(key, tuple):
            out.update(zip(key, value, strict=True))
        else:
            out[key] = value
    return out


@dataclass
class SeriesStart:
    series: str
    info: DetectorInfo = field(default_factory=DetectorInfo)
    config: dict[str, Any] = field(default_factory=dict)
    """Everything else the header said, JSON-safe, as the detector named it."""
    flatfield: dict[str, np.ndarray] = field(default_factory=dict)
    pixel_mask: dict[str, np.ndarray] = field(default_factory=dict)
    left_out: list[tuple[str, str]] = field(default_factory=list)
    """Header parts that could not be used, (part, why): a series is received without them
    rather than lost for want of them."""


@dataclass
class Image:
    series: str | None
    frame: int
    blobs: list[tuple[ArraySpec, Any]]
    """(spec, bytes) per channel; the first is named `data`, further thresholds by channel name."""
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class SeriesEnd:
    series: str | None


Event = Union[SeriesStart, Image, SeriesEnd]


def header_from_image(image: Image, series: str) -> SeriesStart:
    """The header of a series whose own never came (or came unusable): what its first image says."""
    spec = image.blobs[0][0]
    return SeriesStart(series=series, info=DetectorInfo(shape=spec.shape, dtype=spec.dtype))


def misfit(array: np.ndarray, info: DetectorInfo) -> str | None:
    """Why a header array cannot apply to the detector's images (None: it can)."""
    if info.shape is not None and array.shape != info.shape:
        return f"shape {array.shape} is not the detector's {info.shape}"
    return None


def parse_json(part: Any, what: str) -> dict[str, Any]:
    """orjson first (a fifth of the time, per image); what it refuses (NaN, integers over 64 bits)
    the standard library may still read, and its message names the fault."""
    try:
        value = orjson.loads(part)
    except orjson.JSONDecodeError:
        try:
            value = json.loads(bytes(part))
        except (ValueError, UnicodeDecodeError) as exc:
            raise StreamError(f"{what} is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise StreamError(f"{what} is JSON but not an object")
    return value


@functools.lru_cache(maxsize=64)
def _spec(name: str, shape: tuple, dtype: str, compression: str) -> ArraySpec:
    """The spec of a kind of image, checked once: a detector sends thousands of the same kind."""
    if len(shape) != 2 or not all(isinstance(n, int) and not isinstance(n, bool) and 0 < n <= 1 << 16
                                  for n in shape):
        raise StreamError(f"image shape {list(shape)!r} is not two sizes between 1 and 65536")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise StreamError(f"image type {dtype!r} is not a pixel type") from None
    if dt.kind not in "uif" or dt.itemsize > 8:
        raise StreamError(f"image type {dtype!r} is not a pixel type")
    return ArraySpec(name=name, dtype=dt.newbyteorder("<").str, shape=shape, compression=compression)


def checked_blob(name: str, blob: Any, shape: Any, dtype: Any, compression: str) -> tuple[ArraySpec, Any]:
    """Validate a pixel blob against what its message declares and give it a spec."""
    if not isinstance(shape, (list, tuple)) or not all(type(n) is int for n in shape):
        raise StreamError(f"image shape {shape!r} is not two sizes between 1 and 65536")
    if not isinstance(dtype, str):
        raise StreamError(f"image type {dtype!r} is not a pixel type")
    spec = _spec(name, tuple(shape), dtype, compression)
    if compression == "none":
        if len(blob) != spec.nbytes:
            raise StreamError(f"image of {spec.dtype}{list(spec.shape)} needs {spec.nbytes} bytes, got {len(blob)}")
    else:
        try:
            codecs.check(blob, compression, spec.shape, spec.dtype)
        except FrameError as exc:
            raise StreamError(f"image blob: {exc}") from None
    return spec, blob


def json_safe(value: Any) -> Any:
    """Header values as JSON can hold them (arrays and byte strings summarised)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, np.ndarray):
        return f"<array {value.dtype}{list(value.shape)}>"
    if isinstance(value, (bytes, bytearray, memoryview)):
        return f"<{len(value)} bytes>"
    return str(value)
