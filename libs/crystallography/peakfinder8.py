"""peakfinder8 (Cheetah, OM), written from its published behaviour (reference/peakfinder8.md 3).

Per frame: a radial background and a per-radius detection threshold by five rounds of sigma
clipping; seeds above the threshold grown into 8-connected peaks inside one ASIC; each peak kept
if its size, local signal-to-noise and position pass. The parameters and their meaning are OM's
(`peakfinder8_peak_detection`), and so is the arithmetic: float32 throughout, sums in OM's order,
half-to-even rounding, the same strict and non-strict comparisons, the asymmetric local-background
box. So on a single-ASIC layout the peaks are OM's.

Where OM has a known defect this module does the correct thing instead:
- Growth is a plain breadth-first flood fill. OM also expands a stale slot of its scratch list
  after the last pixel (reference 5.1), which on multi-ASIC layouts merges separate peaks.
- `snr` is the peak's signal-to-noise ratio; OM's field of that name carries the local
  background sigma (reference 5.2), which is here `sigma`.

Per layout the radius bins, the resolution-window mask and the scratch buffers are made once
(`PeakFinder8`); per frame the work is the five radial passes over the unmasked pixels and one
seed pass, about 10 ns per pixel on one core.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np

from libs.crystallography.hits import PEAK_FIELDS
from libs.crystallography.layouts import Layout
from libs.crystallography.params import Peakfinder8Params

F32 = np.float32
FLT_MAX = F32(np.finfo(np.float32).max)
FLT_MIN = F32(np.finfo(np.float32).tiny)
"""What an emptied radial bin's limits become (C's FLT_MAX, FLT_MIN: the smallest positive float)."""
RADIAL_ROUNDS = 5


@dataclass(frozen=True)
class Peaks:
    """One frame's peaks in scan order (ASIC by ASIC, then by seed), at most `max_num_peaks`."""

    fs: np.ndarray
    """Centroid along the columns, weighted by the raw values (slab pixel index, float32)."""
    ss: np.ndarray
    intensity: np.ndarray
    """Sum over the peak's pixels of value minus local background."""
    num_pixels: np.ndarray
    max_pixel_intensity: np.ndarray
    """Largest value minus local background, at least 0."""
    sigma: np.ndarray
    """Local background sigma (what OM calls `snr`)."""
    snr: np.ndarray
    """intensity / sigma."""
    found: int
    """Peaks that passed, including any beyond `max_num_peaks`."""

    def __len__(self) -> int:
        return len(self.fs)

    def as_arrays(self) -> dict[str, np.ndarray]:
        return {name: getattr(self, name) for name in PEAK_FIELDS}


class PeakFinder8:
    """peakfinder8 for one layout, radius map and mask; `find` per frame."""

    TABLES = frozenset({"min_res", "max_res", "max_num_peaks"})
    """The parameters its per-layout tables are built from; the others can change between frames
    (`retune`) at no cost."""

    def __init__(self, layout: Layout, radius: np.ndarray, good: np.ndarray, params: Peakfinder8Params) -> None:
        if radius.shape != layout.shape or good.shape != layout.shape:
            raise ValueError(f"radius map {radius.shape} and mask {good.shape} must have the layout's shape "
                             f"{layout.shape}")
        self.layout = layout
        self.params = params
        radius = np.ascontiguousarray(radius, dtype=np.float32)
        self.bins = np.rint(radius).astype(np.int32)
        self.nbins = int(np.ceil(radius.max())) + 1
        self.mask = (good & (radius >= params.min_res) & (radius <= params.max_res)).astype(np.int8)
        counts = np.bincount(self.bins[self.mask != 0], minlength=self.nbins)
        self._starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.pixels = int(self._starts[-1])
        """Pixels searched (unmasked, inside the resolution window)."""
        self._destination = _group_by_bin(self.bins.ravel(), self.mask.ravel(), self._starts)
        """Where each slab pixel goes when the values are grouped by radius bin, row-major inside
        a bin (-1: masked): the radial statistics' population, in OM's order of summation per bin.
        Scattering the frame there costs a third of gathering it, whose reads jump all over it."""
        self._values = np.empty(self.pixels, np.float32)
        self._inpeak = np.zeros(layout.shape, np.int8)
        self._queue = np.empty(layout.asic_shape[0] * layout.asic_shape[1], np.int32)
        self._out = np.empty((7, params.max_num_peaks), np.float32)

    def retune(self, params: Peakfinder8Params) -> None:
        """New thresholds for the next frame; the tables stay (`TABLES` must be unchanged)."""
        if any(getattr(params, name) != getattr(self.params, name) for name in self.TABLES):
            raise ValueError(f"{sorted(self.TABLES)} are built into the tables: build a new PeakFinder8")
        self.params = params

    def radial_statistics(self, data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Per radius bin: background (sigma-clipped mean) and detection threshold."""
        data = np.ascontiguousarray(data, dtype=np.float32)
        return _radial(data.ravel(), self._destination, self._starts, self._values, F32(self.params.minimum_snr),
                       F32(self.params.adc_threshold))

    def find(self, data: np.ndarray) -> Peaks:
        if data.shape != self.layout.shape:
            raise ValueError(f"frame of shape {data.shape} given to a peak finder for {self.layout.shape}")
        data = np.ascontiguousarray(data, dtype=np.float32)
        offset, threshold = self.radial_statistics(data)
        p, (any_, anx), (nay, nax) = self.params, self.layout.asic_shape, self.layout.asics
        self._inpeak.fill(0)
        stored, found = _search(data, self.mask, self.bins, offset, threshold, self._inpeak, self._queue, self._out,
                                any_, anx, nay, nax, F32(p.minimum_snr), p.min_pixel_count, p.max_pixel_count,
                                p.local_bg_radius)
        columns = self._out[:, :stored].copy()
        return Peaks(*columns, found=found)


@numba.njit(cache=True, nogil=True)
def _radial(data, destination, starts, values, min_snr, adc):
    """Step A: five rounds of two-sided sigma clipping per radius bin, float32 as OM does it.

    `values` are grouped by bin (`starts[b]:starts[b + 1]`), row-major inside a bin, so every
    bin's float32 sums see its values in OM's order. Two things make it fast without changing a
    bit of the result: bins are summed four side by side (independent chains of additions), and
    a bin whose limits came out of a round unchanged is left alone, since every later round would
    select the same pixels and compute the same numbers."""
    for k in range(data.size):
        if destination[k] >= 0:
            values[destination[k]] = data[k]
    nbins = starts.size - 1
    offset = np.zeros(nbins, np.float32)
    sigma = np.zeros(nbins, np.float32)
    count = np.zeros(nbins, np.int64)
    hi = np.full(nbins, np.float32(1e9), np.float32)
    lo = np.full(nbins, np.float32(-1e9), np.float32)
    active = np.arange(nbins)
    n_active = nbins
    for _ in range(RADIAL_ROUNDS):
        for g in range(0, n_active, 4):
            lanes = min(4, n_active - g)
            _sum_bins(values, starts, active[g:g + lanes], lo, hi, offset, sigma, count)
        still = 0
        for j in range(n_active):
            b = active[j]
            if count[b] == 0:
                new_hi, new_lo = FLT_MAX, FLT_MIN
                offset[b] = 0
                sigma[b] = 0
            else:
                mean = offset[b] / np.float32(count[b])
                var = sigma[b] / np.float32(count[b]) - mean * mean
                sd = np.sqrt(var) if var >= 0 else var
                offset[b] = mean
                sigma[b] = sd
                new_hi, new_lo = max(mean + min_snr * sd, adc), mean - min_snr * sd
            if new_hi != hi[b] or new_lo != lo[b]:
                hi[b], lo[b] = new_hi, new_lo
                active[still] = b
                still += 1
        n_active = still
    return offset, hi


@numba.njit(cache=True, nogil=True, inline="always")
def _sum_bins(values, starts, bins, lo, hi, offset, sigma, count):
    """Sum, sum of squares and count of each bin's values strictly inside (lo, hi); up to four bins."""
    zero = np.float32(0)
    common = values.size
    for b in bins:
        common = min(common, starts[b + 1] - starts[b])
    s1 = np.zeros(4, np.float32)
    s2 = np.zeros(4, np.float32)
    c = np.zeros(4, np.int64)
    if bins.size == 4:
        b0, b1, b2, b3 = bins[0], bins[1], bins[2], bins[3]
        o0, o1, o2, o3 = starts[b0], starts[b1], starts[b2], starts[b3]
        l0, l1, l2, l3 = lo[b0], lo[b1], lo[b2], lo[b3]
        h0, h1, h2, h3 = hi[b0], hi[b1], hi[b2], hi[b3]
        a0, a1, a2, a3 = zero, zero, zero, zero
        q0, q1, q2, q3 = zero, zero, zero, zero
        n0, n1, n2, n3 = 0, 0, 0, 0
        for i in range(common):
            v0, v1, v2, v3 = values[o0 + i], values[o1 + i], values[o2 + i], values[o3 + i]
            i0, i1, i2, i3 = l0 < v0 < h0, l1 < v1 < h1, l2 < v2 < h2, l3 < v3 < h3
            # Adding 0 leaves a float32 sum unchanged, so selected values need no branch.
            a0 += v0 if i0 else zero
            a1 += v1 if i1 else zero
            a2 += v2 if i2 else zero
            a3 += v3 if i3 else zero
            q0 += v0 * v0 if i0 else zero
            q1 += v1 * v1 if i1 else zero
            q2 += v2 * v2 if i2 else zero
            q3 += v3 * v3 if i3 else zero
            n0 += i0
            n1 += i1
            n2 += i2
            n3 += i3
        s1[0], s1[1], s1[2], s1[3] = a0, a1, a2, a3
        s2[0], s2[1], s2[2], s2[3] = q0, q1, q2, q3
        c[0], c[1], c[2], c[3] = n0, n1, n2, n3
    else:
        common = 0
    for j in range(bins.size):
        b = bins[j]
        low, high = lo[b], hi[b]
        t1, t2, tc = s1[j], s2[j], c[j]
        for k in range(starts[b] + common, starts[b + 1]):
            v = values[k]
            if low < v < high:
                t1 += v
                t2 += v * v
                tc += 1
        offset[b], sigma[b], count[b] = t1, t2, tc


@numba.njit(cache=True, nogil=True)
def _group_by_bin(bins, mask, starts):
    """A counting sort of the unmasked pixels by bin, stable: each pixel's place."""
    place = starts[:-1].copy()
    destination = np.full(bins.size, -1, np.int32)
    for k in range(bins.size):
        if mask[k] != 0:
            destination[k] = place[bins[k]]
            place[bins[k]] += 1
    return destination


# Neighbour order of the growth, as (dfs, dss).
_NEIGHBOURS = np.array([(-1, -1), (0, -1), (1, -1), (-1, 0), (1, 0), (-1, 1), (0, 1), (1, 1)], np.int64)


@numba.njit(cache=True, nogil=True)
def _search(data, mask, bins, offset, hi, inpeak, queue, out, asic_ny, asic_nx, nasics_y, nasics_x,
            min_snr, min_pix, max_pix, bg_radius):
    """Steps B-D for every ASIC; peaks go to the columns of `out`. Returns (stored, found)."""
    floor = hi.min()
    width = data.shape[1]
    height = data.shape[0]
    capacity = out.shape[1]
    stored = 0
    found = 0
    w_box = 2 * bg_radius
    for aiss in range(nasics_y):
        for aifs in range(nasics_x):
            ss0 = aiss * asic_ny
            fs0 = aifs * asic_nx
            for lss in range(1, asic_ny - 1):
                for lfs in range(1, asic_nx - 1):
                    ss = ss0 + lss
                    fs = fs0 + lfs
                    # No threshold is below `floor`: most pixels are turned away without a bin lookup.
                    if data[ss, fs] <= floor:
                        continue
                    if not (data[ss, fs] > hi[bins[ss, fs]] and mask[ss, fs] != 0 and inpeak[ss, fs] == 0):
                        continue
                    # Step B: breadth-first growth inside this ASIC.
                    inpeak[ss, fs] = 1
                    queue[0] = ss * width + fs
                    n = 1
                    head = 0
                    s = np.float32(0)
                    s_fs = np.float32(0)
                    s_ss = np.float32(0)
                    while head < n:
                        qss, qfs = divmod(queue[head], width)
                        head += 1
                        w = data[qss, qfs] - offset[bins[qss, qfs]]
                        s += w
                        s_fs += w * np.float32(qfs)
                        s_ss += w * np.float32(qss)
                        for j in range(8):
                            nfs = qfs + _NEIGHBOURS[j, 0]
                            nss = qss + _NEIGHBOURS[j, 1]
                            if nfs < fs0 or nfs >= fs0 + asic_nx or nss < ss0 or nss >= ss0 + asic_ny:
                                continue
                            if data[nss, nfs] > hi[bins[nss, nfs]] and mask[nss, nfs] != 0 \
                                    and inpeak[nss, nfs] == 0:
                                inpeak[nss, nfs] = 1
                                queue[n] = nss * width + nfs
                                n += 1
                    # Step C: size, first centroid, local background.
                    if n < min_pix or n > max_pix:
                        continue
                    if abs(s) < 1e-10:
                        continue
                    cfs = np.rint(s_fs / abs(s))
                    css = np.rint(s_ss / abs(s))
                    com_fs = min(max(int(cfs), 0), width - 1)
                    com_ss = min(max(int(css), 0), height - 1)
                    n_bg = 0
                    b1 = np.float32(0)
                    b2 = np.float32(0)
                    bg_max = np.float32(0)
                    for dss in range(-w_box, w_box):
                        for dfs in range(-w_box, w_box):
                            pss = int(css) + dss
                            pfs = int(cfs) + dfs
                            if pfs < fs0 or pfs >= fs0 + asic_nx or pss < ss0 or pss >= ss0 + asic_ny:
                                continue
                            if dfs * dfs + dss * dss > w_box * w_box:
                                continue
                            v = data[pss, pfs]
                            if v < hi[bins[pss, pfs]] and inpeak[pss, pfs] == 0 and mask[pss, pfs] != 0:
                                n_bg += 1
                                b1 += v
                                b2 += v * v
                                if v > bg_max:
                                    bg_max = v
                    if n_bg > 0:
                        loff = b1 / np.float32(n_bg)
                        lvar = b2 / np.float32(n_bg) - loff * loff
                        lsig = np.sqrt(lvar) if lvar >= 0 else np.float32(0.01)
                    else:
                        loff = offset[bins[com_ss, com_fs]]
                        lsig = np.float32(0.01)
                    # Step D: re-integration over the peak's pixels, raw-weighted centroid.
                    total = np.float32(0)
                    raw = np.float32(0)
                    r_fs = np.float32(0)
                    r_ss = np.float32(0)
                    max_i = np.float32(0)
                    for k in range(n):
                        qss, qfs = divmod(queue[k], width)
                        v = data[qss, qfs]
                        total += v - loff
                        raw += v
                        r_fs += v * np.float32(qfs)
                        r_ss += v * np.float32(qss)
                        if v - loff > max_i:
                            max_i = v - loff
                    if abs(raw) < 1e-10:
                        continue
                    pfs_c = r_fs / abs(raw)
                    pss_c = r_ss / abs(raw)
                    snr = total / lsig if abs(lsig) > 1e-10 else np.float32(0)
                    if snr < min_snr:
                        continue
                    if max_i < bg_max - loff:
                        continue
                    if pfs_c < fs0 or pfs_c > fs0 + asic_nx - 1 or pss_c < ss0 or pss_c > ss0 + asic_ny - 1:
                        continue
                    for k in range(n):
                        qss, qfs = divmod(queue[k], width)
                        inpeak[qss, qfs] = 2
                    if stored < capacity:
                        out[0, stored] = pfs_c
                        out[1, stored] = pss_c
                        out[2, stored] = total
                        out[3, stored] = n
                        out[4, stored] = max_i
                        out[5, stored] = lsig
                        out[6, stored] = snr
                        stored += 1
                    found += 1
    return stored, found
