"""`surveyor simulate ptycho`: a ptychography scan with known object and probe.

Recipe of reference/ptychography.md 5. A defocused Fresnel zone-plate probe (annular pupil with a
central stop) scans a complex test object (amplitude and phase features at three scales) on a
jittered raster or a Fermat spiral. The far field is computed on the detector's own pixels over a
window of M = `size` x `oversampling` raw pixels around the beam centre: the probe is the zone
plate's whole first order over the M x M real-space window that this sampling implies (nothing
trimmed to suit a solver: its tails and rings are all there, as behind an order-sorting
aperture, which passes the first order whole), each exit wave is M x M, photons are drawn from
Poisson statistics (never added to the noiseless pattern), a flat stray-light background is added
as Poisson photons over the whole detector, and the detector turns photons into uint16 ADU with a
per-pixel offset, read noise, gain and saturation, plus a few dead and hot pixels. Darks come
first: the same detector with no photons.

The optics scale with `size`: the bright-field disk's radius is 0.2 `size` detector pixels of
`oversampling` raw ones, and the defocus makes the probe's geometric beam about `size` / 3 object
pixels across (of lambda z / (M p)). The reconstruction chooses its own geometry from the scan.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Iterator

import h5py
import numpy as np
import scipy.fft
import scipy.ndimage

from libs.common.detector import DetectorInfo, SeriesStart
from libs.common.messages import ProbeModel, ScanDescription
from libs.ptychography import optics
from libs.ptychography.quality import illuminated


@dataclass
class PtychoScan:
    series: str = "1"
    count: int = 1600
    """Data frames (scan points); darks come on top."""
    scan_id: str = "ptycho"
    n_dark: int = 20
    size: int = 128
    """The optics' scale (see the module's docstring)."""
    oversampling: int = 4
    """The far-field window is `size` x `oversampling` raw pixels across."""
    raw_shape: tuple[int, int] = (1024, 1024)
    beam_offset_px: tuple[int, int] = (9, -13)
    """Where the diffraction centre lies relative to the raw frame's centre."""
    energy_ev: float = 800.0
    distance_m: float = 0.08
    raw_pixel_m: float = 25e-6
    photons: float = 2e6
    """Photons per frame in the probe."""
    background: float = 0.05
    """Flat stray-light background, photons per raw pixel."""
    adu_per_photon: float = 8.0
    offset_adu: float = 1000.0
    read_noise_adu: float = 2.0
    saturation_adu: int = 65535
    bright_field: float = 0.2
    """The zone plate's numerical aperture, as the bright-field disk's radius over `size` detector
    pixels (of `oversampling` raw ones)."""
    defocus_factor: float = 1.0
    """The defocus over the one that makes the beam `size` / 3 object pixels across; negative: the
    sample upstream of the focus."""
    pattern: str = "raster"
    """`raster` (with `jitter`) or `spiral` (Fermat)."""
    step_fraction: float = 0.3
    """Scan step as a fraction of the probe diameter (0.3 = 70 % linear overlap)."""
    jitter: float = 0.1
    bad_pixels: int = 24
    seed: int = 7
    presimulate: bool = False
    """Make (and compress) every frame before the stream starts, so that sending costs next to
    nothing: a source for benchmarks of the pipeline rather than of the simulator."""

    @property
    def pool(self) -> int:
        """How many frames the virtual detector makes before it streams (all of them, or none)."""
        return self.n_dark + self.count if self.presimulate else 0

    def __post_init__(self) -> None:
        half = self.size * self.oversampling // 2
        for axis in (0, 1):
            centre = self.raw_shape[axis] // 2 + self.beam_offset_px[axis]
            if centre - half < 0 or centre + half > self.raw_shape[axis]:
                raise ValueError(f"raw frames {self.raw_shape} cannot hold the {2 * half} px diffraction "
                                 f"window around the beam centre (offset {self.beam_offset_px})")
        if self.pattern not in ("raster", "spiral"):
            raise ValueError(f"pattern {self.pattern!r}: use 'raster' or 'spiral'")

    # --- geometry ---------------------------------------------------------------------------

    @property
    def window(self) -> int:
        """M: the far field's window on the detector (raw pixels), and the exit waves' size."""
        return self.size * self.oversampling

    @property
    def pixel_m(self) -> float:
        """The sample-plane pixel of the M x M window: lambda z / (M p), the truth's pixel."""
        return optics.object_pixel_m(energy_ev=self.energy_ev, distance_m=self.distance_m,
                                     detector_pixel_m=self.raw_pixel_m, size=self.window)

    @property
    def beam_center_px(self) -> tuple[int, int]:
        return (self.raw_shape[0] // 2 + self.beam_offset_px[0], self.raw_shape[1] // 2 + self.beam_offset_px[1])

    @cached_property
    def probe_model(self) -> ProbeModel:
        wavelength = optics.wavelength_m(self.energy_ev)
        aperture = self.bright_field / self.pixel_m * wavelength  # of `size` detector pixels
        diameter = self.size / 3 * self.pixel_m
        return ProbeModel(outer_zone_width_m=wavelength / (2 * aperture), diameter_m=150e-6,
                          central_stop_diameter_m=60e-6, defocus_m=self.defocus_factor * diameter / (2 * aperture))

    @cached_property
    def probe(self) -> np.ndarray:
        """The zone plate's probe over the whole M x M window, untrimmed; `photons` of power."""
        probe = optics.zone_plate_probe(self.probe_model, energy_ev=self.energy_ev, size=self.window,
                                        pixel_m=self.pixel_m)
        return probe * np.float32(math.sqrt(self.photons))

    @cached_property
    def centres_px(self) -> np.ndarray:
        """Probe centres on the object grid (pixels, float), one [y, x] per data frame."""
        rng = np.random.default_rng(self.seed)
        step = self.step_fraction * self.size / 3
        if self.pattern == "spiral":
            k = np.arange(self.count)
            radius, angle = step / math.sqrt(math.pi) * np.sqrt(k), k * math.radians(137.508)
            points = np.stack([radius * np.sin(angle), radius * np.cos(angle)], axis=1)
        else:
            side = math.ceil(math.sqrt(self.count))
            yy, xx = np.divmod(np.arange(self.count), side)
            points = np.stack([yy, xx], axis=1) * step
            points += rng.uniform(-self.jitter, self.jitter, points.shape) * step
        margin = self.window // 2 + 4
        return points - points.min(axis=0) + margin

    @cached_property
    def object(self) -> np.ndarray:
        """Amplitude 0.55-1 and phase 0-1.6 rad, with features about 2, 6 and 20 pixels wide."""
        rng = np.random.default_rng(self.seed + 1)
        shape = tuple(int(v) for v in np.ceil(self.centres_px.max(axis=0)) + self.window // 2 + 5)

        def features(weights: tuple[float, float, float]) -> np.ndarray:
            field_ = sum(w * _normalised(scipy.ndimage.gaussian_filter(rng.standard_normal(shape), s))
                         for w, s in zip(weights, (1.0, 3.0, 10.0), strict=True))
            return _normalised(field_)

        amplitude = 0.55 + 0.45 * features((0.2, 0.4, 0.4))
        phase = 1.6 * features((0.2, 0.3, 0.5))
        return (amplitude * np.exp(1j * phase)).astype(np.complex64)

    # --- Generator ----------------------------------------------------------------------------

    def header(self) -> SeriesStart:
        info = DetectorInfo(shape=self.raw_shape, dtype="<u2", n_images=self.n_dark + self.count,
                            energy_ev=self.energy_ev, distance_m=self.distance_m,
                            pixel_size_m=(self.raw_pixel_m, self.raw_pixel_m),
                            beam_center_px=tuple(float(v) for v in self.beam_center_px),
                            count_time_s=0.05, description="Surveyor simulated ptychography CCD")
        return SeriesStart(series=self.series, info=info, config={"generator": "ptycho"})

    def scan(self) -> ScanDescription:
        centre = self.centres_px.mean(axis=0)
        positions = (self.centres_px - centre) * self.pixel_m
        return ScanDescription(
            scan_id=self.scan_id, technique="ptychography", n_dark=self.n_dark, n_frames=self.count,
            energy_ev=self.energy_ev, distance_m=self.distance_m, pixel_size_m=self.raw_pixel_m,
            positions_m=[(float(y), float(x)) for y, x in positions], beam_center_px=self.beam_center_px,
            adu_per_photon=self.adu_per_photon, probe_model=self.probe_model,
            metadata={"simulation": "ptycho", "pattern": self.pattern, "photons": self.photons,
                      "size": self.size, "oversampling": self.oversampling})

    def images(self) -> Iterator[np.ndarray]:
        detector = _Detector(self)
        for _ in range(self.n_dark):
            yield detector.read(None)
        rng = np.random.default_rng(self.seed + 3)
        n = self.window
        probe_spectrum = scipy.fft.fft2(self.probe)
        k = scipy.fft.fftfreq(n)
        for centre in self.centres_px:
            corner = centre - n / 2
            whole = np.floor(corner).astype(int)
            fy, fx = corner - whole
            # Sub-pixel positions: shift the probe by the fraction, cut the object at whole pixels.
            ramp = np.exp(-2j * np.pi * (k[:, None] * fy + k[None, :] * fx))
            probe = scipy.fft.ifft2(probe_spectrum * ramp)
            exit_wave = probe * self.object[whole[0]:whole[0] + n, whole[1]:whole[1] + n]
            far = scipy.fft.fftshift(scipy.fft.fft2(exit_wave, norm="ortho"))
            photons = rng.poisson(np.abs(far) ** 2)
            yield detector.read(photons)

    def write_truth(self, path: Path) -> None:
        corners = np.floor(self.centres_px - self.window / 2).astype(int)
        with h5py.File(path, "w") as f:
            f["object"] = self.object
            f["probe"] = self.probe
            f["pixel_size_m"] = self.pixel_m
            f["positions_m"] = np.asarray(self.scan().positions_m)
            f["centres_px"] = self.centres_px
            f["illuminated"] = illuminated(self.probe, corners, self.object.shape)
            f["dark_offset_adu"] = _Detector(self).offset
            f.attrs["parameters"] = repr(asdict(self))


def _normalised(a: np.ndarray) -> np.ndarray:
    return (a - a.min()) / (a.max() - a.min())


class _Detector:
    """Photons to ADU: offset + gain * photons + read noise, clipped, uint16; dead and hot pixels."""

    def __init__(self, scan: PtychoScan) -> None:
        self.scan = scan
        rng = np.random.default_rng(scan.seed + 2)
        self.offset = (scan.offset_adu + rng.normal(0, 20, scan.raw_shape)).astype(np.float32)
        cy, cx = scan.beam_center_px
        half = scan.size * scan.oversampling // 2
        # Bad pixels in the middle of the diffraction window: half dead (stuck at 0), half hot (noisy).
        spots = rng.integers([cy - half // 2, cx - half // 2], [cy + half // 2, cx + half // 2],
                             (scan.bad_pixels, 2))
        self.dead = tuple(spots[: scan.bad_pixels // 2].T)
        self.hot = tuple(spots[scan.bad_pixels // 2:].T)
        self.window = np.s_[cy - half:cy + half, cx - half:cx + half]
        self.rng = np.random.default_rng(scan.seed + 4)

    def read(self, photons: np.ndarray | None) -> np.ndarray:
        scan, rng = self.scan, self.rng
        shape = scan.raw_shape
        adu = self.offset + rng.standard_normal(shape, dtype=np.float32) * np.float32(scan.read_noise_adu)
        if photons is not None:
            # Flat stray light: a Poisson total spread uniformly is exactly Poisson in every pixel.
            size = shape[0] * shape[1]
            stray = rng.integers(0, size, rng.poisson(scan.background * size))
            counts = np.bincount(stray, minlength=size).reshape(shape)
            counts[self.window] += photons
            adu += counts.astype(np.float32) * np.float32(scan.adu_per_photon)
        adu[self.hot] += rng.normal(0, 60 * scan.read_noise_adu, len(self.hot[0]))
        adu[self.dead] = 0
        return np.clip(np.rint(adu), 0, scan.saturation_adu).astype(np.uint16)
