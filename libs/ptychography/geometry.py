"""The reconstruction's geometry from the scan, not from constants (reference/ptychography.md 5).

Far-field sampling fixes everything from four numbers and two choices. With wavelength lambda,
distance z and detector pixel p, a crop of C raw pixels around the diffraction centre gives an
object pixel dx = lambda z / (C p); downsampling it to N clean pixels (C = f N) makes a real-space
window of N dx = lambda z / (f p). The frames oversample the exit wave only if the probe fills at
most half of that window, so the probe's diameter D sets the largest factor f, and the crop sets
the resolution:

    f = min(floor(lambda z / (WINDOW_PER_PROBE D p)), MAX_BINNING),   C = f N <= the detector,
    dx = lambda z / (C p)

D comes from the probe model (the zone plate's probe computed at the sample and measured: the
diameter holding ENERGY_HELD of its power, so focus, defocus of either sign and the central stop's
rings all count), else from the scan (a ptychographic scan steps a fraction of the probe: D is
taken as STEPS_PER_PROBE steps). The probe support reaches to where SUPPORT_HELD of the power is
inside (the tails a support cuts are an error in every frame), at most SUPPORT_MAX of the window.
f is capped too: a clean pixel sums f^2 raw ones, and with them f^2 times their stray light and
read noise, while the weak high-angle signal it carries does not grow (on the quality matrix's
2048 px detector, f = 8 scored NRMSE 0.056, f = 4 with twice the window and half the resolution
0.031). N is capped (`max_size`: the solver's cost grows as N^2 per frame); when the cap binds, the crop
shrinks and the resolution with it, never the window. The pipeline may pin `crop`, `size` or both.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import scipy.spatial

from libs.common.messages import ProbeModel
from libs.ptychography import optics

WINDOW_PER_PROBE = 2.0
"""The window holds the probe this many times over along each axis (2: the oversampling limit)."""
ENERGY_HELD = 0.95
SUPPORT_HELD = 0.99
SUPPORT_MAX = 0.4
STEPS_PER_PROBE = 3.0
MAX_BINNING = 4
"""The most raw pixels, along each axis, that one clean pixel sums."""
MIN_SIZE = 32


@dataclass(frozen=True)
class Geometry:
    crop: int
    size: int
    object_pixel_m: float
    window_m: float
    probe_diameter_m: float | None
    probe_from: str
    """What the probe's size was taken from: "probe model", "scan step" or "nothing known"."""
    support_radius_px: float
    note: str = ""
    """Why the choice is less than asked for (a detector too small, the size cap), else empty."""

    def describe(self) -> str:
        probe = "an unknown probe" if self.probe_diameter_m is None else \
            f"a probe {self.probe_diameter_m * 1e6:.3g} um across (from the {self.probe_from})"
        text = (f"crop {self.crop} px -> {self.size} px clean frames: object pixel {self.object_pixel_m * 1e9:.3g} nm, "
                f"window {self.window_m * 1e6:.3g} um for {probe}, probe support radius "
                f"{self.support_radius_px:.1f} px")
        return f"{text}; {self.note}" if self.note else text


def fast_size(limit: int) -> int:
    """The largest even 2^a 3^b (an FFT-friendly size) no larger than `limit`."""
    best = 2
    power2 = 2
    while power2 <= limit:
        value = power2
        while value <= limit:
            best = max(best, value)
            value *= 3
        power2 *= 2
    return best


def largest_crop(shape: tuple[int, int], centre_px: tuple[float, float]) -> int:
    """The largest even square around the centre that lies on the detector."""
    cy, cx = (int(round(c)) for c in centre_px)
    half = min(cy, shape[0] - cy, cx, shape[1] - cx)
    if half < MIN_SIZE // 2:
        raise ValueError(f"the diffraction centre {centre_px} lies within {half} px of the {shape} detector's "
                         "edge: no crop fits; check beam_center_px")
    return 2 * half


def probe_radii_from_model(model: ProbeModel, *, energy_ev: float, pixel_m: float, size: int,
                           held: tuple[float, ...] = (ENERGY_HELD, SUPPORT_HELD)) -> list[float]:
    """The radii (m) of the disks that hold each fraction `held` of the zone plate's probe's power,
    computed on `size` x `size` pixels of `pixel_m` (the widest window the detector allows)."""
    probe = optics.zone_plate_probe(model, energy_ev=energy_ev, size=size, pixel_m=pixel_m)
    intensity = np.abs(probe.astype(np.complex128)) ** 2
    y, x = np.indices(intensity.shape) - size // 2
    radius = np.hypot(y, x).ravel()
    order = np.argsort(radius)
    inside = np.cumsum(intensity.ravel()[order]) / intensity.sum()
    return [(radius[order][min(np.searchsorted(inside, f), len(inside) - 1)] + 1) * pixel_m for f in held]


def scan_step_m(positions_m: np.ndarray) -> float | None:
    """The median distance from each scan point to its nearest neighbour."""
    points = np.asarray(positions_m, float)
    if len(points) < 2:
        return None
    distances, _ = scipy.spatial.cKDTree(points).query(points, k=2)
    step = float(np.median(distances[:, 1]))
    return step if step > 0 else None


def choose(*, energy_ev: float, distance_m: float, pixel_m: float, detector_shape: tuple[int, int],
           centre_px: tuple[float, float], probe_model: ProbeModel | None = None,
           positions_m: np.ndarray | None = None, crop: int | None = None, size: int | None = None,
           max_size: int = 128) -> Geometry:
    """The crop, clean size and object pixel for a scan (see the module's docstring)."""
    wavelength = optics.wavelength_m(energy_ev)
    reach = wavelength * distance_m / pixel_m  # the window with no downsampling (f = 1)
    widest = largest_crop(detector_shape, centre_px)
    notes = []
    if crop is not None and crop > widest:
        notes.append(f"the pinned crop of {crop} px reaches past the detector's edge (masked there)")
    diameter, tails, source = None, None, "nothing known"
    if probe_model is not None:
        measure = min(widest, 2048)
        core, tails = probe_radii_from_model(probe_model, energy_ev=energy_ev, pixel_m=reach / measure, size=measure)
        diameter, source = 2 * core, "probe model"
    elif positions_m is not None and (step := scan_step_m(positions_m)) is not None:
        diameter, source = STEPS_PER_PROBE * step, "scan step"
        tails = 0.75 * diameter
    factor_max = min(MAX_BINNING, max(1, math.floor(reach / (WINDOW_PER_PROBE * diameter)))) if diameter else None
    if diameter and reach < WINDOW_PER_PROBE * diameter:
        notes.append(f"the detector's pixels ({pixel_m * 1e6:.3g} um at {distance_m:g} m) cannot oversample a "
                     f"probe this large: move the detector further or the sample nearer the focus")

    if crop is not None and size is None:
        factor = _divisor_at_most(crop, factor_max or max(1, crop // max_size), minimum_size=MIN_SIZE)
        size = crop // factor
        if size > max_size:
            notes.append(f"clean frames of {size} px (above the {max_size} px cap) to keep the pinned crop")
    elif size is not None and crop is None:
        factor = min(factor_max or 1, max(1, widest // size))
        crop = factor * size
    elif crop is None:  # neither pinned (both pinned: taken as given)
        factor = factor_max or min(MAX_BINNING, max(1, widest // max_size))
        size = fast_size(min(max_size, widest // factor))
        if size < MIN_SIZE:
            factor = max(1, widest // MIN_SIZE)
            size = fast_size(widest // factor)
        crop = factor * size
        if crop < widest and size == fast_size(max_size) and factor * fast_size(widest // factor) > crop:
            notes.append(f"crop {crop} px of the {widest} px the detector allows: clean frames are capped at "
                         f"{max_size} px (max_size)")
    object_pixel = wavelength * distance_m / (crop * pixel_m)
    window = size * object_pixel
    support = min(tails / object_pixel + 2, SUPPORT_MAX * size) if tails else size / 4
    return Geometry(crop=crop, size=size, object_pixel_m=object_pixel, window_m=window, probe_diameter_m=diameter,
                    probe_from=source, support_radius_px=round(float(support), 2), note="; ".join(notes))


def _divisor_at_most(crop: int, factor: int, *, minimum_size: int) -> int:
    """The largest divisor of `crop` no larger than `factor` that leaves frames of `minimum_size` or more."""
    for candidate in range(max(1, factor), 0, -1):
        if crop % candidate == 0 and crop // candidate >= min(minimum_size, crop):
            return candidate
    return 1
