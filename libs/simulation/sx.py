"""`surveyor simulate sx`: serial-crystallography frames from a photon-counting detector, with truth.

A fraction of the frames are hits: each holds a random number of Bragg spots, pixel-integrated 2-D
Gaussians at sub-pixel centres, on a flat background and a water ring around the beam centre.
Pixel values are Poisson draws of that mean (never noise added to a noiseless image and rounded),
one ADU per photon as on an Eiger. Gap pixels read the dtype's maximum, as an Eiger sends masked
pixels; hot and dead pixels sit at fixed places; all three are flagged in the header's pixel mask.

Spots stay where a peak finder can see them whole (reference/peakfinder8.md 3): a few pixels away
from gaps, masked pixels and ASIC edges, never closer to each other than `min_separation_px`, and
inside a disc around the beam centre. Each frame is drawn from its own random stream, so frame i
and its truth can be made alone, in any order, and the truth costs no pixels at all.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import scipy.ndimage
import scipy.special

from libs.common.detector import DetectorInfo, SeriesStart
from libs.common.messages import ScanDescription
from libs.crystallography.layouts import LAYOUTS, Layout, radius_map

GAP, DEAD, HOT = 1, 2, 8
"""DECTRIS pixel-mask bits: 0 gap, 1 dead, 3 hot."""
DTYPES = {"<u2": "<u2", "uint16": "<u2", "<u4": "<u4", "uint32": "<u4"}
MARGIN_PX = 4
"""Spot centres keep at least this far (and at least 4 sigma) from gaps, masked pixels and ASIC edges."""
INNER_RADIUS_PX = 40.0
_STATIC, _SPOTS, _NOISE = 0, 1, 2
"""Random streams: `[seed, stream, frame]` keeps the spots of a frame apart from its noise, so the
truth is drawn without drawing pixels."""


@dataclass
class SxScan:
    """`surveyor simulate sx`: a serial-crystallography series and its truth, frame by frame."""

    series: str = "1"
    count: int = 200
    """Frames in the series."""
    scan_id: str = "sx"
    layout: str = "1m"
    """A key of libs.crystallography.layouts.LAYOUTS."""
    dtype: str = "<u2"
    hit_fraction: float = 0.3
    peaks_per_hit: tuple[int, int] = (5, 300)
    """Spots of a hit, an inclusive range drawn uniformly."""
    peak_photons: tuple[float, float] = (300.0, 5000.0)
    """Total photons of a spot, drawn log-uniformly."""
    peak_sigma_px: tuple[float, float] = (0.4, 0.9)
    """Gaussian width of a spot, drawn uniformly."""
    min_separation_px: float = 8.0
    beam_offset_px: tuple[float, float] = (12.3, -17.6)
    """Beam centre [y, x] relative to the slab's centre."""
    energy_ev: float = 12000.0
    distance_m: float = 0.1
    pixel_m: float = 75e-6
    flat_background: float = 1.0
    """Photons per pixel."""
    water_ring: float = 4.0
    """Photons per pixel at the ring's peak."""
    water_ring_radius: float = 0.35
    """Ring radius as a fraction of the slab's smaller side."""
    water_ring_width: float = 0.06
    """Gaussian sigma of the ring, same unit."""
    hot_pixels: int = 10
    dead_pixels: int = 10
    pool: int = 0
    """0: every frame distinct; N: frame i is frame i % N of N distinct ones (cheap fast streams)."""
    seed: int = 11

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout {self.layout!r}: use one of {sorted(LAYOUTS)}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: use one of {sorted(DTYPES)}")
        self.dtype = DTYPES[self.dtype]
        self.peaks_per_hit = _range("peaks_per_hit", self.peaks_per_hit, int, low=0)
        self.peak_photons = _range("peak_photons", self.peak_photons, float, low=0, strict=True)
        self.peak_sigma_px = _range("peak_sigma_px", self.peak_sigma_px, float, low=0, strict=True)
        self.beam_offset_px = tuple(float(v) for v in self.beam_offset_px)
        if not 0 <= self.hit_fraction <= 1:
            raise ValueError(f"hit_fraction {self.hit_fraction}: use a fraction in [0, 1]")
        for name in ("count", "hot_pixels", "dead_pixels", "pool", "min_separation_px", "flat_background",
                     "water_ring"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} {getattr(self, name)}: must not be negative")
        for name in ("energy_ev", "distance_m", "pixel_m", "water_ring_width"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} {getattr(self, name)}: must be positive")
        if self.outer_radius_px <= INNER_RADIUS_PX + self.margin_px:
            raise ValueError(f"beam_offset_px {self.beam_offset_px} puts the beam centre at {self.beam_center_px}, "
                             f"too near the edge of the {self.geometry.shape} slab for any spot; move it inwards")

    # --- geometry -----------------------------------------------------------------------------

    @property
    def geometry(self) -> Layout:
        return LAYOUTS[self.layout]

    @property
    def beam_center_px(self) -> tuple[float, float]:
        """[y, x] in slab pixels, the centre of pixel (0, 0) at (0, 0)."""
        shape = self.geometry.shape
        return ((shape[0] - 1) / 2 + self.beam_offset_px[0], (shape[1] - 1) / 2 + self.beam_offset_px[1])

    @property
    def outer_radius_px(self) -> float:
        """Spots lie within 0.95 of the distance from the beam centre to the nearest slab edge."""
        (cy, cx), (ny, nx) = self.beam_center_px, self.geometry.shape
        return 0.95 * min(cy, cx, ny - 1 - cy, nx - 1 - cx)

    @property
    def margin_px(self) -> int:
        """Wide enough that a spot's drawing window (4 sigma) never reaches a gap or the slab edge."""
        return max(MARGIN_PX, math.ceil(4 * self.peak_sigma_px[1]))

    @cached_property
    def _bad_pixels(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices of the hot and of the dead pixels, distinct and outside the gaps."""
        rng = np.random.default_rng([self.seed, _STATIC])
        chosen = rng.choice(np.flatnonzero(~self.geometry.gaps()), self.hot_pixels + self.dead_pixels,
                            replace=False)
        return np.sort(chosen[:self.hot_pixels]), np.sort(chosen[self.hot_pixels:])

    @cached_property
    def pixel_mask(self) -> np.ndarray:
        """The detector's pixel mask as a DECTRIS header sends it (bits GAP, DEAD, HOT), uint32."""
        mask = self.geometry.gaps().astype(np.uint32) * GAP
        hot, dead = self._bad_pixels
        mask.flat[hot] |= HOT
        mask.flat[dead] |= DEAD
        return mask

    @cached_property
    def _gap_index(self) -> np.ndarray:
        return np.flatnonzero(self.geometry.gaps())

    @cached_property
    def background(self) -> np.ndarray:
        """Mean photons per pixel without spots: flat plus water ring, 0 in the gaps (float64)."""
        side = min(self.geometry.shape)
        radius = radius_map(self.geometry.shape, self.beam_center_px).astype(np.float64)
        ring = np.exp(-0.5 * ((radius - self.water_ring_radius * side) / (self.water_ring_width * side)) ** 2)
        mean = self.flat_background + self.water_ring * ring
        mean[self.geometry.gaps()] = 0.0
        return mean

    @cached_property
    def _allowed(self) -> np.ndarray:
        """Flat indices of the pixels a spot centre may fall in."""
        shape, asic = self.geometry.shape, self.geometry.asic_shape
        rows, cols = np.arange(shape[0]) % asic[0], np.arange(shape[1]) % asic[1]
        edge = ((rows == 0) | (rows == asic[0] - 1))[:, None] | ((cols == 0) | (cols == asic[1] - 1))[None, :]
        bad = (edge | (self.pixel_mask != 0)).astype(np.uint8)
        near_bad = scipy.ndimage.maximum_filter(bad, size=2 * self.margin_px + 1, mode="nearest")
        radius = radius_map(shape, self.beam_center_px)
        allowed = (near_bad == 0) & (radius >= INNER_RADIUS_PX) & (radius <= self.outer_radius_px)
        if not allowed.any():
            raise ValueError(f"layout {self.layout}: no pixel can hold a spot with these parameters")
        return np.flatnonzero(allowed)

    # --- one frame ----------------------------------------------------------------------------

    def _source(self, i: int) -> int:
        return i % self.pool if self.pool else i

    def _spots(self, i: int) -> tuple[bool, np.ndarray]:
        """Hit flag and spots (n, 4): fs, ss, photons, sigma. Crowded frames may get fewer spots than
        drawn: rejection sampling gives up rather than loop forever."""
        rng = np.random.default_rng([self.seed, _SPOTS, self._source(i)])
        if rng.random() >= self.hit_fraction:
            return False, np.empty((0, 4))
        wanted = int(rng.integers(self.peaks_per_hit[0], self.peaks_per_hit[1] + 1))
        width, limit = self.geometry.shape[1], self.min_separation_px ** 2
        centres = np.empty((wanted, 2))
        placed = 0
        for _ in range(20):
            if placed == wanted:
                break
            ss, fs = np.divmod(rng.choice(self._allowed, 2 * wanted), width)
            candidates = np.stack([fs, ss], axis=1) + rng.uniform(-0.5, 0.5, (2 * wanted, 2))
            for centre in candidates:
                if placed == wanted:
                    break
                if placed and np.min(np.sum((centres[:placed] - centre) ** 2, axis=1)) < limit:
                    continue
                centres[placed] = centre
                placed += 1
        low, high = np.log(self.peak_photons)
        photons = np.exp(rng.uniform(low, high, placed))
        sigma = rng.uniform(*self.peak_sigma_px, placed)
        return True, np.column_stack([centres[:placed], photons, sigma])

    def truth(self, i: int) -> tuple[bool, np.ndarray]:
        """Whether frame i is a hit, and its spots (n, 3): fs (column), ss (row), total photons."""
        hit, spots = self._spots(i)
        return hit, spots[:, :3].copy()

    def frame(self, i: int) -> np.ndarray:
        """The pixels of frame i."""
        rng = np.random.default_rng([self.seed, _NOISE, self._source(i)])
        counts = rng.poisson(self.background)
        _, spots = self._spots(i)
        if len(spots):
            rows, cols, mean = _spot_windows(spots, self.margin_px)
            # A sum of independent Poisson draws is a Poisson draw of the summed mean.
            np.add.at(counts, (rows, cols), rng.poisson(mean))
        top = np.iinfo(self.dtype).max
        hot, dead = self._bad_pixels
        counts.flat[hot] = rng.integers(20000, 60001, hot.size)
        counts.flat[dead] = 0
        np.minimum(counts, top - 1, out=counts)
        pixels = counts.astype(self.dtype)
        pixels.flat[self._gap_index] = top
        return pixels

    # --- Generator ----------------------------------------------------------------------------

    def header(self) -> SeriesStart:
        shape = self.geometry.shape
        info = DetectorInfo(shape=shape, dtype=self.dtype, n_images=self.count, energy_ev=self.energy_ev,
                            distance_m=self.distance_m, pixel_size_m=(self.pixel_m, self.pixel_m),
                            beam_center_px=self.beam_center_px, count_time_s=0.01,
                            description=f"Surveyor simulated SX detector ({self.layout})")
        return SeriesStart(series=self.series, info=info, config={"generator": "sx", "layout": self.layout},
                           flatfield={"data": np.ones(shape, np.float32)}, pixel_mask={"data": self.pixel_mask})

    def scan(self) -> ScanDescription:
        return ScanDescription(
            scan_id=self.scan_id, technique="crystallography", n_frames=self.count, energy_ev=self.energy_ev,
            distance_m=self.distance_m, pixel_size_m=self.pixel_m, beam_center_px=self.beam_center_px,
            adu_per_photon=1.0,
            metadata={"simulation": "sx", "layout": self.layout, "hit_fraction": self.hit_fraction,
                      "asic_shape": list(self.geometry.asic_shape)})

    def images(self) -> Iterator[np.ndarray]:
        """Frames in order; with a pool, each distinct frame is made once and sent again (read-only)."""
        made: dict[int, np.ndarray] = {}
        for i in range(self.count):
            if not self.pool:
                yield self.frame(i)
                continue
            k = self._source(i)
            if k not in made:
                made[k] = self.frame(k)
                made[k].flags.writeable = False
            yield made[k]

    def write_truth(self, path: Path) -> None:
        truths = [self.truth(i) for i in range(self.count)]
        peaks = np.concatenate([p for _, p in truths] + [np.empty((0, 3))])
        n_peaks = np.array([len(p) for _, p in truths], np.int32)
        with h5py.File(path, "w") as f:
            f["hit"] = np.array([hit for hit, _ in truths], bool)
            f["n_peaks"] = n_peaks
            f["peaks/frame"] = np.repeat(np.arange(self.count, dtype=np.int64), n_peaks)
            f["peaks/fs"], f["peaks/ss"], f["peaks/intensity"] = peaks[:, 0], peaks[:, 1], peaks[:, 2]
            f["pixel_mask"] = self.pixel_mask
            f["beam_center_px"] = np.array(self.beam_center_px)
            f.attrs["parameters"] = repr(asdict(self))
            f.attrs["layout"] = self.layout


def _range(name: str, value: tuple, kind: type, *, low: float, strict: bool = False) -> tuple:
    """A (low, high) parameter pair as `kind`, checked to be ordered and above `low`."""
    numbers = isinstance(value, (tuple, list)) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    if not numbers or len(value) != 2:
        raise ValueError(f"{name} {value!r}: expected two numbers (low, high)")
    if kind is int and any(v != int(v) for v in value):
        raise ValueError(f"{name} {value!r}: expected two whole numbers")
    pair = (kind(value[0]), kind(value[1]))
    if pair[0] > pair[1]:
        raise ValueError(f"{name} {value!r}: the range is inverted; give (low, high)")
    if pair[0] < low or (strict and pair[0] == low):
        raise ValueError(f"{name} {value!r}: values must be {'above' if strict else 'at least'} {low}")
    return pair


def _spot_windows(spots: np.ndarray, half: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows (n, w, 1), columns (n, 1, w) and mean photons (n, w, w) of each spot in a window of
    +-`half` pixels: the Gaussian integrated over each pixel, a difference of erfs along each axis."""
    offsets = np.arange(-half, half + 1)
    fs, ss, photons, sigma = spots.T
    scale = (sigma * math.sqrt(2))[:, None]

    def along(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pixels = np.rint(centre).astype(np.int64)[:, None] + offsets
        edges = (pixels - centre[:, None]) / scale
        return pixels, 0.5 * (scipy.special.erf(edges + 0.5 / scale) - scipy.special.erf(edges - 0.5 / scale))

    rows, fy = along(ss)
    cols, fx = along(fs)
    return rows[:, :, None], cols[:, None, :], photons[:, None, None] * fy[:, :, None] * fx[:, None, :]
