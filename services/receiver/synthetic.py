"""Synthetic detector frames whose content says which frame they are.

Used to test the framework before any science: pixel 0 and 1 hold the frame number (low and high
16 bits), every other pixel `number % 251`. A sink can prove exactly-once delivery from the pixels.
"""

from __future__ import annotations

import numpy as np


def synthetic_frame(number: int, shape: tuple[int, int], dtype: str) -> np.ndarray:
    frame = np.full(shape, number % 251, dtype=dtype)
    frame.flat[0] = number & 0xFFFF
    frame.flat[1] = number >> 16
    return frame


def frame_number_of(frame: np.ndarray) -> int:
    return int(frame.flat[0]) + (int(frame.flat[1]) << 16)
