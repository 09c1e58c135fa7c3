"""Scanning-transmission images from the diffraction frames (reference/ptychography.md 7).

Each frame gives its total (bright-field transmission) and its centre of mass (the beam's
deflection, proportional to the phase gradient: differential phase contrast). Placed at the scan
positions they make a STXM image and two gradient maps, which integrate into a phase image.
"""

from __future__ import annotations

import numpy as np
import scipy.fft
from scipy.interpolate import griddata


def frame_moments(frame: np.ndarray, mask: np.ndarray | None = None) -> tuple[float, float, float]:
    """(total, centre-of-mass y, x) of a centred pattern; the centre of mass is relative to the
    frame's centre pixel N/2, in pixels."""
    weights = np.clip(frame, 0, None) if mask is None else np.clip(frame, 0, None) * mask
    total = float(weights.sum())
    if total <= 0:
        return 0.0, 0.0, 0.0
    y, x = np.indices(frame.shape, sparse=True)
    com_y = float((weights * y).sum() / total) - frame.shape[0] // 2
    com_x = float((weights * x).sum() / total) - frame.shape[1] // 2
    return total, com_y, com_x


def on_grid(positions_m: np.ndarray, values: np.ndarray, step_m: float) -> np.ndarray:
    """Scattered values at [y, x] positions, interpolated on a regular grid of `step_m`; points
    outside the scanned area get the mean."""
    lo, hi = positions_m.min(axis=0), positions_m.max(axis=0)
    shape = np.maximum(np.rint((hi - lo) / step_m).astype(int) + 1, 2)
    gy, gx = np.meshgrid(np.linspace(lo[0], hi[0], shape[0]), np.linspace(lo[1], hi[1], shape[1]), indexing="ij")
    if len(values) < 4:
        return np.full(shape, float(np.mean(values)) if len(values) else 0.0)
    grid = griddata(positions_m, values, (gy, gx), method="linear")
    return np.where(np.isnan(grid), np.nanmean(grid) if np.isfinite(grid).any() else 0.0, grid)


def scan_step_m(positions_m: np.ndarray) -> float:
    """The typical distance between neighbouring scan points (median nearest-neighbour distance)."""
    from scipy.spatial import cKDTree

    distances, _ = cKDTree(positions_m).query(positions_m, k=2)
    return float(np.median(distances[:, 1]))


def phase_gradient(com_px: np.ndarray, *, detector_pixel_m: float, distance_m: float,
                   wavelength_m: float) -> np.ndarray:
    """Beam deflection (pixels on the detector) to phase gradient (rad/m): 2 pi c p / (lambda z)."""
    return 2 * np.pi * com_px * detector_pixel_m / (wavelength_m * distance_m)


def integrate_gradients(grad_y: np.ndarray, grad_x: np.ndarray, pixel_m: float) -> np.ndarray:
    """The phase whose gradients are (grad_y, grad_x) in rad/m on a grid of `pixel_m`, by Fourier
    integration (Frankot-Chellappa). The maps are mirrored to twice their size first, so that
    the periodic FFT sees no jump at the edges. Zero mean."""
    ny, nx = grad_y.shape
    gy = np.block([[grad_y, grad_y[:, ::-1]], [-grad_y[::-1, :], -grad_y[::-1, ::-1]]])
    gx = np.block([[grad_x, -grad_x[:, ::-1]], [grad_x[::-1, :], -grad_x[::-1, ::-1]]])
    ky = scipy.fft.fftfreq(2 * ny, d=pixel_m)[:, None]
    kx = scipy.fft.fftfreq(2 * nx, d=pixel_m)[None, :]
    denominator = 2j * np.pi * (ky**2 + kx**2)
    denominator[0, 0] = 1
    spectrum = (scipy.fft.fft2(gy) * ky + scipy.fft.fft2(gx) * kx) / denominator
    spectrum[0, 0] = 0
    return scipy.fft.ifft2(spectrum).real[:ny, :nx]
