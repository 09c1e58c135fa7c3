"""The walk over a compressed blob's size-prefixed blocks, compiled: a Python loop over the ~500
blocks of a 4 MB frame would cost more than the rest of receiving it. Its own module so that only
the processes that check blobs (codecs.check) import numba."""

from __future__ import annotations

import numba
import numpy as np


@numba.njit(cache=True, nogil=True)
def walk(blob: np.ndarray, start: int, blocks: int, last: int, tail: int) -> int:
    """End of `blocks` size-prefixed blocks of at most `last` bytes, plus `tail`; -1 if they overrun."""
    pos = start
    end = blob.size
    for _ in range(blocks):
        if pos + 4 > end:
            return -1
        size = (blob[pos] << 24) | (blob[pos + 1] << 16) | (blob[pos + 2] << 8) | blob[pos + 3]
        pos += 4
        if size > last or pos + size > end:
            return -1
        pos += size
    return pos + tail
