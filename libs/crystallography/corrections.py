"""Frame corrections before the peak search: dark, flatfield, and the pixels that carry no data.

A photon-counting detector (Eiger, Pilatus) needs no dark; an integrating one (Jungfrau, ePix)
needs its pedestal taken off. Module gaps and the pixels a detector's pixel mask flags (dead,
hot, noisy) become 0 in the corrected frame and are left out of the peak search and the sums,
and so is any pixel at the top of its integer range: DECTRIS detectors send masked pixels as
all ones, and a pixel there carries no count we can trust.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@dataclass(frozen=True)
class Corrections:
    good: np.ndarray
    """Pixels with data (bool)."""
    flatfield: np.ndarray | None = None
    """Multiplicative, per pixel (float32); None when the detector applied it already."""
    dark: np.ndarray | None = None
    """Subtracted before the flatfield (float32, ADU)."""

    @classmethod
    def build(cls, shape: tuple[int, int], *, pixel_mask: np.ndarray | None = None,
              flatfield: np.ndarray | None = None, dark: np.ndarray | None = None,
              gaps: np.ndarray | None = None) -> Corrections:
        """From what the detector and the scan say; every array must have the frame's shape."""
        for name, array in (("pixel mask", pixel_mask), ("flatfield", flatfield), ("dark", dark), ("gaps", gaps)):
            if array is not None and array.shape != shape:
                raise ValueError(f"{name} of shape {array.shape} does not fit frames of shape {shape}")
        good = np.ones(shape, bool)
        if pixel_mask is not None:
            good &= pixel_mask == 0
        if gaps is not None:
            good &= ~gaps
        if flatfield is not None:
            good &= np.isfinite(flatfield) & (flatfield > 0)
            flatfield = np.where(good, flatfield, 0).astype(np.float32)
        return cls(good=good, flatfield=flatfield, dark=None if dark is None else dark.astype(np.float32))

    def apply(self, raw: np.ndarray, missing: float = 0.0) -> np.ndarray:
        """The corrected frame, float32: (raw - dark) * flatfield, `missing` where there is no data
        (0 for sums and the peak finder; NaN tells an indexer such as CrystFEL which pixels are bad)."""
        if raw.shape != self.good.shape:
            raise ValueError(f"frame of shape {raw.shape}; the corrections are for {self.good.shape}")
        ceiling = np.iinfo(raw.dtype).max if raw.dtype.kind in "ui" else np.inf
        empty = np.empty((0, 0), np.float32)
        out = np.empty(raw.shape, np.float32)
        _apply(raw, self.good, self.dark if self.dark is not None else empty,
               self.flatfield if self.flatfield is not None else empty, ceiling, np.float32(missing), out)
        return out


@numba.njit(cache=True, nogil=True)
def _apply(raw, good, dark, flat, ceiling, missing, out):
    with_dark, with_flat = dark.size > 0, flat.size > 0
    for i in range(raw.shape[0]):
        for j in range(raw.shape[1]):
            v = raw[i, j]
            if not good[i, j] or v >= ceiling:
                out[i, j] = missing
                continue
            x = np.float32(v)
            if with_dark:
                x -= dark[i, j]
            if with_flat:
                x *= flat[i, j]
            out[i, j] = x
