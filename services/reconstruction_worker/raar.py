"""Streaming ptychographic reconstruction: RAAR with probe refinement.

Relaxed averaged alternating reflections (Luke 2005; SHARP's engine), vectorised over frames and
streamed as SHARP does: every scan position is allocated up front, a frame not yet received has
weight zero (it takes no part in any update), and iterations run on whatever has arrived, so the
image sharpens while the scan goes on and needs few iterations once the last frame is in.
One iteration, for the exit waves Psi of the frames received:

    D      <- Fourier projection of Psi (measured modulus on valid pixels, phase kept)
    O, P   <- overlap projection of 2 D - Psi (alternating object and probe updates)
    Psi    <- beta (Psi + P O_j) + (1 - 2 beta) D          (O_j: the object under frame j)

beta = 1 is the difference map; beta about 0.8 damps the difference map's drift on noisy data
(measured on the simulator: NRMSE 0.09 and steady instead of 0.08 rising to 0.11 in 40 iterations).
Units are photons with a unitary FFT, so the probe's power is a frame's photon count. Positions
are rounded to whole object pixels.
"""

from __future__ import annotations

import numba
import numpy as np
import scipy.fft


class StreamingRaar:
    def __init__(self, *, centres_px: np.ndarray, probe: np.ndarray, support: np.ndarray | None = None,
                 workers: int = 1) -> None:
        """`centres_px`: [y, x] of each frame's centre on the object grid, any origin; `probe`:
        the starting probe (N x N, centred), scaled later by `scale_probe` unless already;
        `support`: real-space weights the probe is multiplied by after each update. The probe is
        refined while `refine_probe` is set (a probe fitted to the first few frames of a scan is
        poorly constrained: the caller decides when there are enough)."""
        n = probe.shape[0]
        self.size = n
        corners = np.rint(np.asarray(centres_px, float) - n / 2).astype(int)
        margin = n // 8
        self.corners = corners - corners.min(axis=0) + margin
        shape = tuple(self.corners.max(axis=0) + n + margin)
        self.object = np.ones(shape, np.complex64)
        self.support = None if support is None else support.astype(np.float32)
        self.probe = np.ascontiguousarray(probe if support is None else probe * support, np.complex64)
        count = len(self.corners)
        self.amplitudes = np.zeros((count, n, n), np.float32)
        self.valid = np.zeros((count, n, n), bool)
        self.exit_waves = np.zeros((count, n, n), np.complex64)
        self.received = np.zeros(count, bool)
        self.iterations = 0
        self.error = float("nan")
        self.refine_probe = True
        self.workers = workers

    @property
    def frames(self) -> int:
        return int(self.received.sum())

    def add(self, index: int, intensity: np.ndarray, mask: np.ndarray | None = None) -> None:
        """Frame `index` (centred pattern, photons) arrives: its weight goes from 0 to 1."""
        if self.received[index]:
            raise ValueError(f"frame {index} was already added")
        self.amplitudes[index] = scipy.fft.ifftshift(np.sqrt(np.clip(intensity, 0, None)))
        self.valid[index] = True if mask is None else scipy.fft.ifftshift(mask.astype(bool))
        y, x = self.corners[index]
        self.exit_waves[index] = self.probe * self.object[y:y + self.size, x:x + self.size]
        self.received[index] = True

    def scale_probe(self) -> None:
        """Give the probe the mean photon count of the frames received (Parseval)."""
        photons = float(np.mean(np.sum(self.amplitudes[self.received] ** 2, axis=(1, 2))))
        self.probe *= np.float32(np.sqrt(photons / np.sum(np.abs(self.probe) ** 2)))
        self.restart()

    def restart(self) -> None:
        """Exit waves from the current object and probe: RAAR starts afresh from its estimate,
        dropping what its exit waves accumulated while only part of the scan was in."""
        for index in np.flatnonzero(self.received):
            y, x = self.corners[index]
            self.exit_waves[index] = self.probe * self.object[y:y + self.size, x:x + self.size]

    def iterate(self, count: int = 1, *, beta: float = 0.8) -> float:
        """Run `count` iterations on the frames received so far; returns the exit-wave change
        of the last one relative to the measured photons (0 at a fixed point)."""
        taken = np.flatnonzero(self.received)
        if taken.size == 0:
            return self.error
        corners = np.ascontiguousarray(self.corners[taken])
        amplitudes, valid = self.amplitudes[taken], self.valid[taken]
        photons = max(float(np.sum(amplitudes[valid] ** 2)), 1e-30)
        psi = self.exit_waves[taken]
        for _ in range(count):
            spectrum = scipy.fft.fft2(psi, norm="ortho", workers=self.workers)
            _fourier_constraint(spectrum, amplitudes, valid)
            data = scipy.fft.ifft2(spectrum, norm="ortho", workers=self.workers, overwrite_x=True)
            reflected = _reflect(data, psi)
            for _ in range(2 if self.refine_probe else 1):
                self._update_object(reflected, corners)
                if self.refine_probe:
                    self._update_probe(reflected, corners)
            change = _mix(psi, data, self.object, self.probe, corners, np.float32(beta))
            self.error = change / photons
            self.iterations += 1
        self.exit_waves[taken] = psi
        return self.error

    def _update_object(self, psi: np.ndarray, corners: np.ndarray) -> None:
        numerator = np.zeros_like(self.object)
        weight = np.zeros(self.object.shape, np.float32)
        _scatter(numerator, weight, self.probe, psi, corners)
        # Regularised towards the current object, not towards zero: where the probes that reached
        # a pixel so far are faint, it keeps its value for the frames still to come.
        regulariser = np.float32(1e-3) * weight.max()
        self.object = (numerator + regulariser * self.object) / (weight + regulariser)

    def _update_probe(self, psi: np.ndarray, corners: np.ndarray) -> None:
        numerator = np.zeros_like(self.probe)
        weight = np.zeros(self.probe.shape, np.float32)
        _gather(numerator, weight, self.object, psi, corners)
        probe = numerator / (weight + np.float32(1e-3) * weight.max())
        self.probe = (probe if self.support is None else probe * self.support).astype(np.complex64)


# --- fused loops: one pass over the exit waves each, instead of numpy's several -------------------


@numba.njit(cache=True, fastmath=True)
def _fourier_constraint(spectrum, amplitudes, valid):
    """In place: the measured modulus on valid pixels, the phase kept."""
    frames, rows, cols = spectrum.shape
    for k in range(frames):
        for i in range(rows):
            for j in range(cols):
                if valid[k, i, j]:
                    value = spectrum[k, i, j]
                    modulus = abs(value)
                    spectrum[k, i, j] = value * (amplitudes[k, i, j] / modulus) if modulus > 1e-12 else 0


@numba.njit(cache=True, fastmath=True)
def _reflect(data, psi):
    return np.float32(2) * data - psi


@numba.njit(cache=True, fastmath=True)
def _scatter(numerator, weight, probe, psi, corners):
    """Object update sums: conj(P) psi_j and |P|^2 added under each frame's window."""
    n = probe.shape[0]
    for k in range(psi.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        for i in range(n):
            for j in range(n):
                p = probe[i, j]
                numerator[y + i, x + j] += p.conjugate() * psi[k, i, j]
                weight[y + i, x + j] += p.real * p.real + p.imag * p.imag


@numba.njit(cache=True, fastmath=True)
def _gather(numerator, weight, obj, psi, corners):
    """Probe update sums: conj(O_j) psi_j and |O_j|^2 over the frames."""
    n = numerator.shape[0]
    for k in range(psi.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        for i in range(n):
            for j in range(n):
                o = obj[y + i, x + j]
                numerator[i, j] += o.conjugate() * psi[k, i, j]
                weight[i, j] += o.real * o.real + o.imag * o.imag


@numba.njit(cache=True, fastmath=True)
def _mix(psi, data, obj, probe, corners, beta):
    """In place: psi <- beta (psi + P O_j) + (1 - 2 beta) D; returns |change|^2."""
    n = probe.shape[0]
    rest = np.float32(1) - np.float32(2) * beta
    change = 0.0
    for k in range(psi.shape[0]):
        y, x = corners[k, 0], corners[k, 1]
        for i in range(n):
            for j in range(n):
                old = psi[k, i, j]
                new = beta * (old + probe[i, j] * obj[y + i, x + j]) + rest * data[k, i, j]
                psi[k, i, j] = new
                d = new - old
                change += d.real * d.real + d.imag * d.imag
    return change
