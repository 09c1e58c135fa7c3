"""Synthetic detector frames whose content says which frame they are.

Used to test the framework before any science: pixel 0 and 1 hold the frame number (low and high
16 bits), every other pixel `number % 251`. A sink can prove exactly-once delivery from the pixels.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np

from libs.common.detector import DetectorInfo, SeriesStart
from libs.common.messages import ScanDescription


def synthetic_frame(number: int, shape: tuple[int, int], dtype: str) -> np.ndarray:
    frame = np.full(shape, number % 251, dtype=dtype)
    frame.flat[0] = number & 0xFFFF
    frame.flat[1] = number >> 16
    return frame


def frame_number_of(frame: np.ndarray) -> int:
    return int(frame.flat[0]) + (int(frame.flat[1]) << 16)


@dataclass
class SyntheticScan:
    """`surveyor simulate synthetic`: numbered frames, a header with plausible geometry."""

    series: str = "1"
    count: int = 100
    shape: tuple[int, int] = (256, 256)
    dtype: str = "<u2"

    def header(self) -> SeriesStart:
        info = DetectorInfo(shape=self.shape, dtype=self.dtype, n_images=self.count, energy_ev=8000.0,
                            distance_m=0.2, pixel_size_m=(75e-6, 75e-6),
                            beam_center_px=(self.shape[0] / 2, self.shape[1] / 2), count_time_s=0.001)
        return SeriesStart(series=self.series, info=info, config={"generator": "synthetic"},
                           pixel_mask={"data": np.zeros(self.shape, np.uint32)})

    def images(self) -> Iterator[np.ndarray]:
        for number in range(self.count):
            yield synthetic_frame(number, self.shape, self.dtype)

    def scan(self) -> ScanDescription | None:
        return None

    def write_truth(self, path: Path) -> None:
        with h5py.File(path, "w") as f:
            f["frame_number"] = np.arange(self.count)
            f.attrs["rule"] = "pixel 0 + 65536 * pixel 1 = frame number; others frame % 251"
