"""What a peak list makes of a frame: hit or not, and the running sums a beamline watches.

A frame is a hit when its number of peaks lies between `min_peaks` and `max_peaks`, both
**inclusive** (Cheetah's rule; OM's is strict on both sides, so OM's `min_num_peaks_for_hit`
of 10 is `min_peaks = 11` here). Sums are kept per class (0 = not a hit, 1 = hit) with their
frame counts, in float64; the virtual powder pattern adds every hit's peak intensities at the
peaks' nearest pixels.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import numpy as np

CLASSES = ("misses", "hits")
"""Class 0 and class 1, by the names their sums travel and are written under."""
PEAK_FIELDS = ("fs", "ss", "intensity", "num_pixels", "max_pixel_intensity", "sigma", "snr")
"""A peak list's arrays, by the names a peak record carries them under (peakfinder8.py's `Peaks`)."""


def is_hit(n_peaks: int, min_peaks: int, max_peaks: int) -> bool:
    return min_peaks <= n_peaks <= max_peaks


@dataclass
class SumsDelta:
    """What one accumulator added since it was last taken: per class the frame count and the sum
    (only classes with frames), and which frames they are."""

    frames: np.ndarray
    sums: dict[int, np.ndarray]
    numbers: list[int]

    @classmethod
    def of_frame(cls, frame: np.ndarray, hit: bool, number: int) -> SumsDelta:
        """One frame's contribution alone: its class's count and sum, nothing for the other class."""
        frames = np.zeros(2, np.int64)
        frames[int(hit)] = 1
        return cls(frames, {int(hit): np.asarray(frame, np.float64)}, [number])


class ClassSums:
    """Per class: frames counted and the sum of their corrected pixels, and which frames are in."""

    def __init__(self, shape: tuple[int, int]) -> None:
        self.shape = shape
        self.frames = np.zeros(2, np.int64)
        self.sums = np.zeros((2, *shape), np.float64)
        self.numbers: set[int] = set()

    def add(self, frame: np.ndarray, hit: bool, number: int) -> None:
        self.frames[int(hit)] += 1
        self.sums[int(hit)] += frame
        self.numbers.add(number)

    def merge(self, delta: SumsDelta) -> bool:
        """Add another accumulator's delta, unless it holds a frame already in (a frame processed
        twice after a peak process was declared dead): then nothing is added and False returned,
        so that the sums never count a frame twice and `frames` always says what they hold."""
        if self.numbers.intersection(delta.numbers):
            return False
        self.frames += delta.frames
        for cls, total in delta.sums.items():
            self.sums[cls] += total
        self.numbers.update(delta.numbers)
        return True

    def take(self) -> SumsDelta:
        """What was added since the last `take`, handed over rather than copied: the accumulator
        starts again on fresh memory."""
        delta = SumsDelta(self.frames, {cls: self.sums[cls] for cls in (0, 1) if self.frames[cls]},
                          sorted(self.numbers))
        self.frames = np.zeros(2, np.int64)
        self.sums = np.zeros((2, *self.shape), np.float64)
        self.numbers = set()
        return delta


def add_to_powder(powder: np.ndarray, fs: np.ndarray, ss: np.ndarray, intensity: np.ndarray,
                  binning: int = 1) -> None:
    """Each peak's intensity onto its nearest pixel (half to even, as OM rounds), or onto the
    block of `binning` x `binning` pixels holding it (the edge blocks take any remainder)."""
    rows = np.clip(np.rint(ss).astype(np.int64) // binning, 0, powder.shape[0] - 1)
    cols = np.clip(np.rint(fs).astype(np.int64) // binning, 0, powder.shape[1] - 1)
    np.add.at(powder, (rows, cols), intensity)


class HitRate:
    """The fraction of hits among the last `window` frames, and its history for display."""

    def __init__(self, window: int, history: int = 600) -> None:
        self._recent: deque[bool] = deque(maxlen=window)
        self.history: deque[float] = deque(maxlen=history)

    def add(self, hit: bool) -> None:
        self._recent.append(hit)

    @property
    def rate(self) -> float:
        return sum(self._recent) / len(self._recent) if self._recent else 0.0

    def sample(self) -> float:
        """Record the current rate in the history (once per display update) and return it."""
        self.history.append(self.rate)
        return self.rate
