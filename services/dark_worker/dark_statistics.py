"""Per-pixel dark statistics and the diffraction centre: the calibration the frame workers need.

Nanosurveyor's dark worker: mean and variance per pixel over the dark frames, bad pixels where the
variance is zero (stuck or dead, on a detector with read noise) or far above the typical one (hot,
noisy). Welford's update keeps
the statistics exact in float64 whatever the number of frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DarkModel:
    mean: np.ndarray
    """ADU, float32."""
    variance: np.ndarray
    bad: np.ndarray
    """True for pixels to ignore."""
    count: int


class DarkStatistics:
    """Running mean and variance of dark frames, one frame at a time."""

    def __init__(self, shape: tuple[int, ...]) -> None:
        self.count = 0
        self._mean = np.zeros(shape)
        self._m2 = np.zeros(shape)

    def update(self, frame: np.ndarray) -> None:
        self.count += 1
        delta = frame - self._mean
        self._mean += delta / self.count
        self._m2 += delta * (frame - self._mean)

    def result(self, *, hot_factor: float = 10.0) -> DarkModel:
        """The model so far. Hot: variance above `hot_factor` times the median variance. Stuck: no
        variance where the typical pixel has some; a detector without read noise (a photon-counting
        one, whose darks are zeros) has none anywhere, and there only a varying pixel is bad."""
        variance = self._m2 / max(self.count - 1, 1)
        if self.count < 2:
            bad = np.zeros(variance.shape, bool)
        elif (typical := np.median(variance)) > 0:
            bad = (variance == 0) | (variance > hot_factor * typical)
        else:
            bad = variance > 0
        return DarkModel(mean=self._mean.astype(np.float32), variance=variance.astype(np.float32),
                         bad=bad, count=self.count)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    """Intensity-weighted centre (y, x) in pixels; negative values count as zero."""
    weights = np.clip(image, 0, None)
    total = weights.sum()
    if total <= 0:
        raise ValueError("no signal to find a centre in (all pixels at or below zero)")
    y, x = np.indices(image.shape, sparse=True)
    return float((weights * y).sum() / total), float((weights * x).sum() / total)
