"""Geometry and probe models of far-field ptychography (reference/ptychography.md 5 and 7).

Conventions, kept by the simulator and the reconstruction alike: diffraction patterns are centred
(zero frequency at pixel N/2, N/2), far-field propagation is the unitary FFT (so a probe's power
equals its pattern's photon count), and a positive defocus means the sample is downstream of the
focus, propagated with the Fresnel transfer function exp(-i pi lambda dz k^2).
"""

from __future__ import annotations

import numpy as np
import scipy.constants as sc
import scipy.fft

from libs.common.messages import ProbeModel


def wavelength_m(energy_ev: float) -> float:
    return sc.h * sc.c / (energy_ev * sc.electron_volt)


def object_pixel_m(*, energy_ev: float, distance_m: float, detector_pixel_m: float, size: int) -> float:
    """Sample-plane pixel of an N x N far-field frame: lambda z / (N p)."""
    return wavelength_m(energy_ev) * distance_m / (size * detector_pixel_m)


def frequencies(size: int, pixel_m: float) -> tuple[np.ndarray, np.ndarray]:
    """Spatial frequencies (cycles per metre) of a centred N x N frame, as (ky, kx) grids."""
    k = (np.arange(size) - size // 2) / (size * pixel_m)
    return k[:, None], k[None, :]


def zone_plate_probe(model: ProbeModel, *, energy_ev: float, size: int, pixel_m: float) -> np.ndarray:
    """The probe of a Fresnel zone plate with central stop at `model.defocus_m` from its focus.

    The pupil is an annulus in the far field (outer radius set by the numerical aperture
    lambda / (2 dr), inner by the central stop), with the defocus as a Fresnel phase; the probe is
    its inverse FFT, centred in an N x N array of sample-plane pixels `pixel_m`. Unit power.
    """
    wavelength = wavelength_m(energy_ev)
    aperture = wavelength / (2 * model.outer_zone_width_m)
    ky, kx = frequencies(size, pixel_m)
    k2 = ky**2 + kx**2
    k_outer = aperture / wavelength
    pupil = (k2 <= k_outer**2).astype(np.complex128)
    pupil[k2 < (k_outer * model.central_stop_diameter_m / model.diameter_m) ** 2] = 0
    pupil *= np.exp(-1j * np.pi * wavelength * model.defocus_m * k2)
    probe = scipy.fft.fftshift(scipy.fft.ifft2(scipy.fft.ifftshift(pupil), norm="ortho"))
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)


def soft_support(size: int, radius_px: float) -> np.ndarray:
    """A super-Gaussian disk, exp(-(r / radius)^8): 1 inside, falling to 0 within a few pixels
    outside. It keeps a probe inside half the frame, where the frames sample it twice over."""
    y, x = np.indices((size, size)) - size // 2
    return np.exp(-((np.hypot(y, x) / radius_px) ** 8)).astype(np.float32)


def probe_from_patterns(mean_pattern: np.ndarray, *, threshold: float = 0.1, defocus_m: float = 0.0,
                        energy_ev: float = 1.0, pixel_m: float = 1.0, radius_px: float | None = None) -> np.ndarray:
    """A probe from the data alone (COSMIC's start): the mean diffraction amplitude inside the
    bright-field disk (where the mean exceeds `threshold` of its maximum), flat phase, propagated
    by the known defocus, cut to a support of `radius_px` (N/4 unless given). Unit power."""
    size = mean_pattern.shape[0]
    mean = np.clip(mean_pattern, 0, None)
    pupil = np.sqrt(mean) * (mean > threshold * mean.max())
    if defocus_m:
        ky, kx = frequencies(size, pixel_m)
        pupil = pupil * np.exp(-1j * np.pi * wavelength_m(energy_ev) * defocus_m * (ky**2 + kx**2))
    probe = scipy.fft.fftshift(scipy.fft.ifft2(scipy.fft.ifftshift(pupil), norm="ortho"))
    y, x = np.indices(probe.shape) - size // 2
    probe = probe * (y**2 + x**2 <= (radius_px or size / 4) ** 2)
    return (probe / np.sqrt(np.sum(np.abs(probe) ** 2))).astype(np.complex64)
