"""Arrays as browsers take them: a PNG (auto-scaled, a perceptual colormap, NaN transparent) and
the `.npy` bytes of `np.save`. Pure functions, no sockets: the web process calls them per request.

The colormap is viridis (perceptually uniform, readable in grey and by the colour-blind), from
Matt Zucker's degree-6 polynomial fit of matplotlib's table (shadertoy.com/view/WlfXRN, within a few
8-bit steps of it), so that no plotting library is needed; `gray` is the other choice.
"""

from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image

Colormap = Literal["viridis", "gray"]
Part = Literal["abs", "phase", "real", "imag"]
Scale = Literal["minmax", "robust"]

ROBUST_PERCENTILES = (0.5, 99.5)
"""`scale=robust`: the range that hot, dead and masked detector pixels do not stretch."""

_VIRIDIS = np.array([
    [0.2777273272234177, 0.005407344544966578, 0.3340998053353061],
    [0.1050930431085774, 1.404613529898575, 1.384590162594685],
    [-0.3308618287255563, 0.214847559468213, 0.09509516302823659],
    [-4.634230498983486, -5.799100973351585, -19.33244095627987],
    [6.228269936347081, 14.17993336680509, 56.69055260068105],
    [4.776384997670288, -13.74514537774601, -65.35303263337234],
    [-5.435455855934631, 4.645852612178535, 26.3124352495832],
])


def _lut(name: Colormap) -> np.ndarray:
    """256 RGB entries, uint8."""
    t = np.linspace(0.0, 1.0, 256)[:, None]
    if name == "gray":
        rgb = np.repeat(t, 3, axis=1)
    else:
        rgb = np.zeros((256, 3))
        for coefficients in _VIRIDIS[::-1]:  # Horner: c0 + t (c1 + t (c2 + ...))
            rgb = rgb * t + coefficients
    return np.round(np.clip(rgb, 0.0, 1.0) * 255).astype(np.uint8)


LUTS: dict[str, np.ndarray] = {name: _lut(name) for name in ("viridis", "gray")}


class NotAnImage(ValueError):
    """An array that has no picture: not 2-D (a series: take its `.npy` or `.json`)."""


def real_part(array: np.ndarray, part: Part = "abs") -> np.ndarray:
    """A complex array's amplitude, phase, real or imaginary part as float64; a real one as it is."""
    if np.iscomplexobj(array):
        return {"abs": np.abs, "phase": np.angle, "real": np.real, "imag": np.imag}[part](array).astype(np.float64)
    return array.astype(np.float64)


def value_range(values: np.ndarray, scale: Scale = "minmax") -> tuple[float, float]:
    """The finite values' range (min to max, or the ROBUST_PERCENTILES); (0, 1) when none is finite."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return 0.0, 1.0
    if scale == "robust":
        low, high = np.percentile(finite, ROBUST_PERCENTILES)
    else:
        low, high = finite.min(), finite.max()
    return float(low), float(high)


def to_png(array: np.ndarray, *, vmin: float | None = None, vmax: float | None = None, scale: Scale = "minmax",
           log: bool = False, cmap: Colormap = "viridis", part: Part = "abs") -> bytes:
    """`array` (2-D) as an RGBA PNG, one pixel per element, row 0 at the top. Values are mapped
    linearly (or by log10 with `log`, where values <= 0 become transparent) from vmin to vmax,
    each defaulting to the `scale` range of the finite values; NaN and infinities are transparent."""
    if array.ndim != 2:
        raise NotAnImage(f"a {array.ndim}-D array of shape {list(array.shape)} has no picture: "
                         f"take its .npy or .json")
    values = real_part(array, part)
    if log:
        with np.errstate(divide="ignore", invalid="ignore"):
            values = np.where(values > 0, np.log10(values), np.nan)
        vmin = np.log10(vmin) if vmin is not None and vmin > 0 else None
        vmax = np.log10(vmax) if vmax is not None and vmax > 0 else None
    low, high = value_range(values, scale)
    low = low if vmin is None else float(vmin)
    high = high if vmax is None else float(vmax)
    finite = np.isfinite(values)
    span = high - low if high > low else 1.0
    with np.errstate(invalid="ignore"):
        index = np.clip((np.where(finite, values, low) - low) / span * 255.0, 0, 255).astype(np.uint8)
    rgba = np.empty((*values.shape, 4), dtype=np.uint8)
    rgba[..., :3] = LUTS[cmap][index]
    rgba[..., 3] = np.where(finite, 255, 0)
    buffer = io.BytesIO()
    Image.fromarray(rgba).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_npy(array: np.ndarray) -> bytes:
    """The bytes `np.save` writes (what `np.load(io.BytesIO(body))` reads back)."""
    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
    return buffer.getvalue()


def to_json(array: np.ndarray, part: Part | None = None) -> dict:
    """A small array as JSON for plotting: dtype, shape and nested lists; NaN and infinities as
    null. Complex values as [real, imag] pairs unless `part` picks one."""
    if np.iscomplexobj(array) and part is None:
        values = np.stack([array.real, array.imag], axis=-1).astype(np.float64)
    else:
        values = real_part(array, part or "abs")
    data = values.astype(object)
    data[~np.isfinite(values)] = None
    return {"dtype": array.dtype.str, "shape": list(array.shape), "data": data.tolist()}
