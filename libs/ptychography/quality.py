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
import scipy.optimize

RAMP_SCALE = 100.0
"""Ramps (cycles per pixel) are searched in units of 1/100, so one simplex step suits both them
and the shifts (pixels)."""


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
    # Register on the complex values and on the amplitudes (blind to a phase ramp, which can
    # pull the complex correlation off its peak); keep whichever fits better.
    amplitude = np.abs(r) - np.abs(r).mean(), np.abs(t) - np.abs(t[m]).mean()
    candidates = [_aligned(r, t, m, *_register(r, t, m)), _aligned(r, t, m, *_register(*amplitude, m))]
    return min(candidates, key=lambda s: s.nrmse)


def _aligned(r: np.ndarray, t: np.ndarray, m: np.ndarray, oy: int, ox: int) -> Score:
    """The score with `t` placed near (oy, ox) in `r`: the sub-pixel shift and the phase ramp that
    minimise the error are searched from their first estimates (Nelder-Mead), gamma is exact."""
    h, w = t.shape
    patch = scipy.fft.fft2(_crop_wrapped(r, oy - 2, ox - 2, h + 4, w + 4))
    y, x = np.indices((h, w))
    tm, norm = t[m], np.vdot(t[m], t[m]).real

    def aligned(p: np.ndarray) -> np.ndarray:
        dy, dx, fy, fx = p[0], p[1], p[2] / RAMP_SCALE, p[3] / RAMP_SCALE
        shifted = scipy.fft.ifft2(scipy.ndimage.fourier_shift(patch, (-dy, -dx)))[2:2 + h, 2:2 + w]
        return (shifted * np.exp(2j * np.pi * (fy * y + fx * x)))[m]

    def error(p: np.ndarray) -> float:
        rv = aligned(p)
        gamma = np.vdot(rv, tm) / max(np.vdot(rv, rv).real, 1e-30)
        return float(np.sum(np.abs(tm - gamma * rv) ** 2) / norm)

    rm = scipy.fft.ifft2(patch)[2:2 + h, 2:2 + w]
    fy, fx = _phase_ramp(t, rm, m)
    start = np.array([0.0, 0.0, fy * RAMP_SCALE, fx * RAMP_SCALE])
    best = scipy.optimize.minimize(error, start, method="Nelder-Mead",
                                   options={"xatol": 1e-3, "fatol": 1e-8, "maxiter": 600}).x
    rv = aligned(best)
    gamma = np.vdot(rv, tm) / max(np.vdot(rv, rv).real, 1e-30)
    nrmse = float(np.sqrt(error(best)))
    baseline = float(np.sqrt(max(0.0, 1 - abs(tm.sum()) ** 2 / (tm.size * norm))))
    phase = np.angle(tm * np.conj(gamma * rv))
    return Score(nrmse=nrmse, baseline=baseline, phase_rms_rad=float(np.sqrt(np.mean(phase**2))),
                 shift_px=(oy + best[0], ox + best[1]))


def _register(r: np.ndarray, t: np.ndarray, m: np.ndarray) -> tuple[int, int]:
    """Integer offset of `t` inside `r` maximising the normalised correlation (circular)."""
    shape = r.shape
    tp = np.zeros(shape, complex)
    mp = np.zeros(shape)
    tp[:t.shape[0], :t.shape[1]] = t * m
    mp[:t.shape[0], :t.shape[1]] = m
    corr = scipy.fft.ifft2(scipy.fft.fft2(r) * np.conj(scipy.fft.fft2(tp)))
    energy = scipy.fft.ifft2(scipy.fft.fft2(np.abs(r) ** 2) * np.conj(scipy.fft.fft2(mp))).real
    quality = np.abs(corr) / np.sqrt(np.clip(energy, 1e-12 * max(energy.max(), 1e-30), None))
    oy, ox = np.unravel_index(np.argmax(quality), shape)
    return int(oy), int(ox)


def _crop_wrapped(a: np.ndarray, y: int, x: int, h: int, w: int) -> np.ndarray:
    rows = np.arange(y, y + h) % a.shape[0]
    cols = np.arange(x, x + w) % a.shape[1]
    return a[np.ix_(rows, cols)]


def _phase_ramp(t: np.ndarray, r: np.ndarray, m: np.ndarray, upsample: int = 8) -> tuple[float, float]:
    """The linear phase ramp (cycles per pixel, y and x) that best aligns r's phase with t's:
    the peak of the upsampled spectrum of t r*."""
    h, w = t.shape
    product = np.where(m, t * np.conj(r), 0)
    spectrum = np.abs(scipy.fft.fft2(product, s=(h * upsample, w * upsample)))
    ky, kx = np.unravel_index(np.argmax(spectrum), spectrum.shape)
    fy = (ky if ky < h * upsample / 2 else ky - h * upsample) / (h * upsample)
    fx = (kx if kx < w * upsample / 2 else kx - w * upsample) / (w * upsample)
    return fy, fx
