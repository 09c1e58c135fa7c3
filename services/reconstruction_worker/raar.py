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

import numpy as np
import scipy.fft
from numpy.lib.stride_tricks import sliding_window_view


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
        taken = self.received
        photons = float(np.mean(np.sum(self.amplitudes[taken] ** 2, axis=(1, 2))))
        self.probe *= np.float32(np.sqrt(photons / np.sum(np.abs(self.probe) ** 2)))
        for index in np.flatnonzero(taken):
            y, x = self.corners[index]
            self.exit_waves[index] = self.probe * self.object[y:y + self.size, x:x + self.size]

    def iterate(self, count: int = 1, *, beta: float = 0.8) -> float:
        """Run `count` iterations on the frames received so far; returns the exit-wave change
        of the last one relative to the measured photons (0 at a fixed point)."""
        taken = np.flatnonzero(self.received)
        if taken.size == 0:
            return self.error
        corners = self.corners[taken]
        amplitudes, valid = self.amplitudes[taken], self.valid[taken]
        photons = max(float(np.sum(amplitudes[valid] ** 2)), 1e-30)
        for _ in range(count):
            psi = self.exit_waves[taken]
            spectrum = scipy.fft.fft2(psi, norm="ortho", workers=self.workers)
            modulus = np.abs(spectrum)
            spectrum *= np.where(valid, amplitudes / np.maximum(modulus, 1e-12), 1).astype(np.float32)
            data = scipy.fft.ifft2(spectrum, norm="ortho", workers=self.workers, overwrite_x=True)
            reflected = 2 * data - psi
            for _ in range(2 if self.refine_probe else 1):
                self._update_object(reflected, corners)
                if self.refine_probe:
                    self._update_probe(reflected, corners)
            overlap = self._views(corners)
            overlap *= self.probe
            new = beta * (psi + overlap) + (1 - 2 * beta) * data
            change = new - psi
            self.exit_waves[taken] = new
            self.error = float(np.vdot(change, change).real / photons)
            self.iterations += 1
        return self.error

    def _views(self, corners: np.ndarray) -> np.ndarray:
        windows = sliding_window_view(self.object, (self.size, self.size))
        return windows[corners[:, 0], corners[:, 1]]

    def _update_object(self, psi: np.ndarray, corners: np.ndarray) -> None:
        n = self.size
        numerator = np.zeros_like(self.object)
        weight = np.zeros(self.object.shape, np.float32)
        contribution = np.conj(self.probe) * psi
        power = np.abs(self.probe) ** 2
        for (y, x), part in zip(corners, contribution, strict=True):
            numerator[y:y + n, x:x + n] += part
            weight[y:y + n, x:x + n] += power
        regulariser = np.float32(1e-3) * weight.max()
        covered = weight > 0
        self.object[covered] = numerator[covered] / (weight[covered] + regulariser)

    def _update_probe(self, psi: np.ndarray, corners: np.ndarray) -> None:
        views = self._views(corners)
        numerator = np.einsum("kij,kij->ij", np.conj(views), psi)
        weight = np.einsum("kij,kij->ij", views.real, views.real) + np.einsum("kij,kij->ij", views.imag, views.imag)
        probe = numerator / (weight + 1e-3 * weight.max())
        self.probe = (probe if self.support is None else probe * self.support).astype(np.complex64)
