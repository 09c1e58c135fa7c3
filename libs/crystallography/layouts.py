"""Detector layouts as peakfinder8 sees them: a slab of equal ASICs on a regular grid.

peakfinder8 grows peaks only inside one ASIC and never seeds on an ASIC's outermost pixels, so
the layout is part of the algorithm's input. A detector whose modules are separated by gaps (an
Eiger 4M) is one slab with the gap pixels masked, as OM treats it. Coordinates are slab pixel
indices: `ss` along rows (y), `fs` along columns (x), the centre of pixel (0, 0) at (0, 0).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Layout:
    name: str
    shape: tuple[int, int]
    """Slab (rows, columns)."""
    asic_shape: tuple[int, int]
    """One ASIC (rows, columns); the slab is a whole number of them along each axis."""
    module_shape: tuple[int, int] | None = None
    """Modules separated by gaps (Eiger): module (rows, columns)."""
    gap: tuple[int, int] = (0, 0)
    """Gap between modules (rows, columns)."""

    def __post_init__(self) -> None:
        if self.shape[0] % self.asic_shape[0] or self.shape[1] % self.asic_shape[1]:
            raise ValueError(f"layout {self.name}: {self.shape} is not a grid of {self.asic_shape} ASICs")

    @property
    def asics(self) -> tuple[int, int]:
        """ASICs along (rows, columns)."""
        return self.shape[0] // self.asic_shape[0], self.shape[1] // self.asic_shape[1]

    def gaps(self) -> np.ndarray:
        """True on pixels between modules (they see no photons)."""
        gaps = np.zeros(self.shape, bool)
        if self.module_shape is None:
            return gaps
        for axis in (0, 1):
            period = self.module_shape[axis] + self.gap[axis]
            index = np.arange(self.shape[axis]) % period >= self.module_shape[axis]
            gaps |= index[:, None] if axis == 0 else index[None, :]
        return gaps


def radius_map(shape: tuple[int, int], beam_center_px: tuple[float, float]) -> np.ndarray:
    """Distance of every pixel from the beam centre ([y, x], pixels), float32 as peakfinder8 wants it."""
    ss = np.arange(shape[0]) - beam_center_px[0]
    fs = np.arange(shape[1]) - beam_center_px[1]
    return np.hypot(ss[:, None], fs[None, :]).astype(np.float32)


LAYOUTS = {
    "1m": Layout("1m", (1024, 1024), (1024, 1024)),
    "asics": Layout("asics", (1024, 1024), (256, 256)),
    # Eiger 4M: 2 x 4 modules of 514 x 1030 pixels, 37-row and 10-column gaps between them.
    "4m": Layout("4m", (2167, 2070), (2167, 2070), module_shape=(514, 1030), gap=(37, 10)),
}
"""`1m`: one 1 Mpx panel; `asics`: 1 Mpx as 4 x 4 ASICs (peakfinder8's per-ASIC rules);
`4m`: an Eiger-4M-like slab with module gaps."""
