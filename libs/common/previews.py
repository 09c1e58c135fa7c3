"""Arrays that stages publish for front-ends (`Service.preview`), made the same way by any stage:
an image binned down for display, and a histogram of how long frames took from their arrival.

The latency of a frame is the time from the receiver's stamp (`FrameHeader.received`, time.time()
where the receiver runs) to the moment its result is safe in the output stage (the writer, at the
flush that covers it), on that stage's clock. On one host that is exact to well under a
millisecond; across hosts it relies on their clocks being synchronized (NTP, PTP): a skew adds to
every value, or makes some fall below zero (counted in `negative`, and in the first bin).
"""

from __future__ import annotations

from typing import Any

import numpy as np

BINS_PER_DECADE = 10
LATENCY_EDGES_S = 10.0 ** (np.arange(-4 * BINS_PER_DECADE, 3 * BINS_PER_DECADE + 1) / BINS_PER_DECADE)
"""The latency histogram's bin edges: 0.1 ms to 1000 s, ten bins a decade (each 1.26 times the last).
A value below the first edge is counted in the first bin, one above the last in the last."""


def downsampled(image: np.ndarray, max_side: int = 256) -> tuple[np.ndarray, int]:
    """`image` (its first 2-D plane) binned by one whole factor to at most `max_side` pixels per
    side, as float32 block means, and that factor. Rows and columns past the last whole block are
    left out (fewer than the factor): a preview, not a measurement. Binned pixel (i, j) covers raw
    pixels [i * factor, (i + 1) * factor) of each axis."""
    plane = np.atleast_2d(image)
    while plane.ndim > 2:
        plane = plane[0]
    factor = max(1, -(-max(plane.shape) // max_side))
    rows, columns = (max(1, n // factor) for n in plane.shape)
    if factor == 1 or min(plane.shape) < factor:
        return np.ascontiguousarray(plane[::factor, ::factor][:max_side, :max_side], dtype=np.float32), factor
    blocks = plane[:rows * factor, :columns * factor].reshape(rows, factor, columns, factor)
    return blocks.mean(axis=(1, 3), dtype=np.float32), factor


class Latency:
    """A scan's histogram of frame latencies (seconds, on LATENCY_EDGES_S), the slowest, and how
    many were below zero. p50 and p95 are read from the histogram: the geometric middle of the bin
    the quantile falls in (never above the slowest), so within 12 % of the exact value (half a bin)."""

    def __init__(self) -> None:
        self.counts = np.zeros(len(LATENCY_EDGES_S) - 1, np.int64)
        self.max_s = 0.0
        self.negative = 0
        self.changed = False
        """Counts came since the last `preview`."""

    @property
    def frames(self) -> int:
        return int(self.counts.sum())

    def add(self, received: np.ndarray | list[float], now: float) -> None:
        """Frames received at `received` (time.time() stamps) and safe at `now`."""
        latencies = now - np.asarray(received, np.float64)
        if not latencies.size:
            return
        self.negative += int((latencies < 0).sum())
        bins = np.clip(np.searchsorted(LATENCY_EDGES_S, latencies, side="right") - 1, 0, len(self.counts) - 1)
        self.counts += np.bincount(bins, minlength=len(self.counts))
        self.max_s = max(self.max_s, float(latencies.max()))
        self.changed = True

    def quantile(self, q: float) -> float | None:
        n = self.frames
        if not n:
            return None
        index = int(np.searchsorted(np.cumsum(self.counts), q * n, side="left"))
        index = min(index, len(self.counts) - 1)
        return min(float(np.sqrt(LATENCY_EDGES_S[index] * LATENCY_EDGES_S[index + 1])), self.max_s)

    def preview(self) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
        """`counts` (int32, one per bin) and `edges_s` (float64, one more), and in meta the frames
        counted, p50_s, p95_s, max_s, negative."""
        self.changed = False
        rounded = (lambda v: None if v is None else round(v, 6))
        return ({"counts": self.counts.astype(np.int32), "edges_s": LATENCY_EDGES_S.astype(np.float64)},
                {"frames": self.frames, "p50_s": rounded(self.quantile(0.5)), "p95_s": rounded(self.quantile(0.95)),
                 "max_s": round(self.max_s, 6), "negative": self.negative,
                 "what": "time from the receiver's stamp to the result on disk (synchronized clocks across hosts)"})
