"""Scoring a reconstructed object against the truth (reference/ptychography.md 4).

A reconstruction is only defined up to a global complex scale, a global shift (probe and object
moving together) and a linear phase ramp (an off-centre diffraction pattern), so those are removed
before comparing, and only the well-illuminated region counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft
import scipy.ndimage


@dataclass(frozen=True)
class Score:
    nrmse: float
    """min over gamma of ||T - gamma R|| / ||T|| on the mask, after registration and ramp removal."""
    baseline: float
    """The same figure for the best constant object: what a reconstruction showing nothing scores."""
    phase_rms_rad: float
    shift_px: tuple[float, float]


def illuminated(probe: np.ndarray, positions_px: np.ndarray, shape: tuple[int, int],
                fraction: float = 0.1) -> np.ndarray:
    """Where the summed probe intensity over all positions exceeds `fraction` of its maximum.

    `positions_px` are the top-left corners of the probe frames on the object grid (integers)."""
    total = np.zeros(shape)
    intensity = np.abs(probe) ** 2
    n = probe.shape[0]
    for y, x in positions_px:
        total[y:y + n, x:x + n] += intensity
    return total > fraction * total.max()


def score(reconstruction: np.ndarray, truth: np.ndarray, mask: np.ndarray) -> Score:
    """Score `reconstruction` (any size) against `truth` on `mask` (same shape as `truth`)."""
    rows, cols = np.nonzero(mask)
    box = np.s_[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    t, m = truth[box].astype(np.complex128), mask[box]
    h, w = t.shape
    r = reconstruction.astype(np.complex128)
    r = np.pad(r, ((0, max(0, h - r.shape[0])), (0, max(0, w - r.shape[1]))))
    oy, ox = _register(r, t, m)
    # Sub-pixel: shift the reconstruction by the parabolic refinement of the correlation peak.
    r_patch = _crop_wrapped(r, oy - 2, ox - 2, h + 4, w + 4)
    dy, dx = _subpixel(r_patch, t, m)
    r_patch = scipy.ndimage.fourier_shift(scipy.fft.fft2(r_patch), (-dy, -dx))
    rm = scipy.fft.ifft2(r_patch)[2:2 + h, 2:2 + w]
    rm = rm * _phase_ramp(t, rm, m)
    tm, rv = t[m], rm[m]
    gamma = np.vdot(rv, tm) / max(np.vdot(rv, rv).real, 1e-30)
    norm = np.vdot(tm, tm).real
    nrmse = float(np.sqrt(np.sum(np.abs(tm - gamma * rv) ** 2) / norm))
    baseline = float(np.sqrt(max(0.0, 1 - abs(tm.sum()) ** 2 / (tm.size * norm))))
    phase = np.angle(tm * np.conj(gamma * rv))
    return Score(nrmse=nrmse, baseline=baseline, phase_rms_rad=float(np.sqrt(np.mean(phase**2))),
                 shift_px=(oy + dy, ox + dx))


def _register(r: np.ndarray, t: np.ndarray, m: np.ndarray) -> tuple[int, int]:
    """Integer offset of `t` inside `r` maximising the normalised correlation (circular)."""
    shape = r.shape
    tp = np.zeros(shape, complex)
    mp = np.zeros(shape)
    tp[:t.shape[0], :t.shape[1]] = t * m
    mp[:t.shape[0], :t.shape[1]] = m
    corr = scipy.fft.ifft2(scipy.fft.fft2(r) * np.conj(scipy.fft.fft2(tp)))
    energy = scipy.fft.ifft2(scipy.fft.fft2(np.abs(r) ** 2) * np.conj(scipy.fft.fft2(mp))).real
    quality = np.abs(corr) / np.sqrt(np.maximum(energy, 1e-12 * energy.max()))
    oy, ox = np.unravel_index(np.argmax(quality), shape)
    return int(oy), int(ox)


def _crop_wrapped(a: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    rows = np.arange(y, y + h) % a.shape[0]
    cols = np.arange(x, x + w) % a.shape[1]
    return a[np.ix_(rows, cols)]


def _subpixel(patch: np.ndarray, t: np.ndarray, m: np.ndarray) -> tuple[float, float]:
    """Parabolic fit of |correlation| around the integer peak (patch has a 2-pixel margin)."""
    h, w = t.shape
    values = np.empty((3, 3))
    for i in range(3):
        for j in range(3):
            values[i, j] = abs(np.vdot(t[m], patch[1 + i:1 + i + h, 1 + j:1 + j + w][m]))

    def vertex(a: float, b: float, c: float) -> float:
        curvature = a - 2 * b + c
        return 0.0 if curvature >= 0 else float(np.clip(0.5 * (a - c) / curvature, -0.5, 0.5))

    return vertex(*values[:, 1]), vertex(*values[1, :])


def _phase_ramp(t: np.ndarray, r: np.ndarray, m: np.ndarray, upsample: int = 8) -> np.ndarray:
    """The linear phase ramp that best aligns r's phase with t's (peak of the upsampled
    spectrum of t r*), as a factor to multiply r by."""
    h, w = t.shape
    product = np.where(m, t * np.conj(r), 0)
    spectrum = np.abs(scipy.fft.fft2(product, s=(h * upsample, w * upsample)))
    ky, kx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy = (ky if ky < h * upsample / 2 else ky - h * upsample) / (h * upsample)
    fx = (kx if kx < w * upsample / 2 else kx - w * upsample) / (w * upsample)
    y, x = np.indices((h, w))
    return np.exp(2j * np.pi * (fy * y + fx * x))
