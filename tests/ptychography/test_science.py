"""Known-answer tests of the ptychography science: pure functions, arrays in and out."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.fft

from libs.common.messages import ProbeModel
from libs.ptychography import optics
from libs.ptychography.quality import illuminated, score
from libs.simulation.ptycho import PtychoScan
from services.dark_worker.dark_statistics import DarkStatistics, centre_of_mass
from services.frame_worker.cleaning import bin_downsample, clean_frame, fourier_downsample, static_mask
from services.frame_worker.params import CleaningParams
from services.image_worker import stxm
from services.reconstruction_worker.raar import StreamingRaar

rng = np.random.default_rng(5)


def small_scan(**change) -> PtychoScan:
    return PtychoScan(**{"count": 36, "size": 32, "raw_shape": (160, 160), "n_dark": 4, **change})


def confined_probe(scan: PtychoScan) -> np.ndarray:
    """The scan's zone-plate probe on a `size` frame, cut inside a quarter of it: data a solver's
    model fits exactly (the simulator's own probe is untrimmed, over its whole window)."""
    n = scan.size
    probe = optics.zone_plate_probe(scan.probe_model, energy_ev=scan.energy_ev, size=n, pixel_m=scan.pixel_m)
    return probe * optics.soft_support(n, n / 4.5) * np.float32(np.sqrt(scan.photons))


def model_frames(scan: PtychoScan, *, whole: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Noise-free patterns |F(P O_j)|^2 of the confined probe, and the positions: rounded to whole
    pixels, or (`whole` False) where the scan has them, the probe shifted by the fraction."""
    n = scan.size
    probe = confined_probe(scan)
    centres = np.rint(scan.centres_px) if whole else scan.centres_px
    k = scipy.fft.fftfreq(n)
    frames = []
    for corner in centres - n / 2:
        y, x = np.floor(corner).astype(int)
        fy, fx = corner - np.floor(corner)
        shifted = scipy.fft.ifft2(scipy.fft.fft2(probe) * np.exp(-2j * np.pi * (k[:, None] * fy + k[None, :] * fx)))
        exit_wave = shifted * scan.object[y:y + n, x:x + n]
        frames.append(np.abs(scipy.fft.fftshift(scipy.fft.fft2(exit_wave, norm="ortho"))) ** 2)
    return np.array(frames), centres


# --- dark statistics ------------------------------------------------------------------------------

def test_dark_statistics_match_numpy_and_flag_stuck_and_hot_pixels():
    frames = rng.normal(1000, 3, (40, 16, 16))
    frames[:, 2, 3] = 1200          # stuck: no variance
    frames[:, 7, 7] += rng.normal(0, 60, 40)  # hot: far noisier than the rest
    stats = DarkStatistics((16, 16))
    for frame in frames:
        stats.update(frame)
    model = stats.result(hot_factor=10)
    np.testing.assert_allclose(model.mean, frames.mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(model.variance, frames.var(axis=0, ddof=1), rtol=1e-4)
    assert set(zip(*np.nonzero(model.bad), strict=True)) == {(2, 3), (7, 7)}
    assert model.count == 40


def test_darks_of_a_detector_without_read_noise_leave_its_pixels_good():
    """A photon-counting detector's darks are zeros: no variance is normal there, not stuck."""
    frames = np.zeros((20, 16, 16))
    frames[::2, 5, 9] = 3  # one pixel that counts in the dark
    stats = DarkStatistics((16, 16))
    for frame in frames:
        stats.update(frame)
    assert set(zip(*np.nonzero(stats.result().bad), strict=True)) == {(5, 9)}


def test_centre_of_mass_of_a_gaussian():
    y, x = np.indices((64, 80))
    spot = np.exp(-((y - 20.25) ** 2 + (x - 50.5) ** 2) / 18)
    assert centre_of_mass(spot) == pytest.approx((20.25, 50.5), abs=1e-6)


# --- frame cleaning ---------------------------------------------------------------------------------

def test_cleaning_turns_adu_into_binned_photons_around_the_centre_and_masks_bad_pixels():
    photons = rng.poisson(3.0, (64, 64)).astype(np.float32)
    dark = rng.normal(500, 10, (100, 120)).astype(np.float32)
    raw = np.rint(dark).astype(np.uint16)
    centre = (40, 70)
    raw[8:72, 38:102] += (photons * 7).astype(np.uint16)   # 7 ADU per photon, crop of 64 around the centre
    bad = np.zeros(raw.shape, bool)
    bad[10, 40] = True
    raw[60, 90] = 65535                                      # saturated
    params = CleaningParams(crop=64, size=16, downsample="bin", photon_threshold=0.5)
    clean, mask = clean_frame(raw, dark=np.rint(dark), bad=bad, centre=centre, adu_per_photon=7, params=params)
    expected = photons.copy()
    expected[2, 2] = expected[52, 52] = 0
    np.testing.assert_allclose(clean, expected.reshape(16, 4, 16, 4).sum(axis=(1, 3)), atol=1e-3)
    assert mask.dtype == np.uint8 and mask.shape == (16, 16)
    assert set(zip(*np.nonzero(mask == 0), strict=True)) == {(0, 0), (13, 13)}


@pytest.mark.parametrize("factor", [1, 2, 3, 4])
def test_binning_sums_each_block(factor):
    image = rng.random((12 * factor, 12 * factor)).astype(np.float32)
    blocks = [[image[i:i + factor, j:j + factor].sum() for j in range(0, 12 * factor, factor)]
              for i in range(0, 12 * factor, factor)]
    np.testing.assert_allclose(bin_downsample(image, factor), blocks, rtol=1e-6)


def test_cleaning_masks_what_lies_beyond_the_detector_edge():
    raw = np.full((40, 40), 100, np.uint16)
    clean, mask = clean_frame(raw, dark=None, bad=None, centre=(5, 20), adu_per_photon=1,
                              params=CleaningParams(crop=32, size=8, downsample="bin", photon_threshold=0))
    assert mask[:3].sum() == 0 and mask[3:].all()           # rows -11..0 of the crop are off the detector
    assert clean[4, 4] == pytest.approx(16 * 100)


def test_fourier_downsampling_is_exact_for_an_oversampled_pattern():
    """An exit wave confined to half the frame: cropping the fine pattern's spectrum gives the
    coarse pattern exactly, with the photon count preserved."""
    scan = small_scan()
    n = scan.size
    wave = confined_probe(scan) * scan.object[:n, :n]
    coarse = np.abs(scipy.fft.fftshift(scipy.fft.fft2(wave, norm="ortho"))) ** 2
    fine = np.abs(scipy.fft.fftshift(scipy.fft.fft2(wave, s=(4 * n, 4 * n), norm="ortho"))) ** 2
    downsampled = fourier_downsample(fine.astype(np.float32), n)
    assert np.linalg.norm(downsampled - coarse) / np.linalg.norm(coarse) < 1e-3
    assert downsampled.sum() == pytest.approx(fine.sum(), rel=1e-4)


def test_cleaning_parameters_refuse_a_crop_that_is_not_a_multiple_of_the_size():
    with pytest.raises(ValueError, match="multiple"):
        CleaningParams(crop=500, size=128)


# --- optics and STXM ---------------------------------------------------------------------------------

def test_zone_plate_probe_has_unit_power_and_grows_with_defocus():
    model = ProbeModel(outer_zone_width_m=50e-9, diameter_m=150e-6, central_stop_diameter_m=60e-6)

    def width(defocus: float) -> float:
        probe = optics.zone_plate_probe(model.model_copy(update={"defocus_m": defocus}), energy_ev=800,
                                        size=128, pixel_m=10e-9)
        assert np.sum(np.abs(probe) ** 2) == pytest.approx(1, rel=1e-5)
        y, x = np.indices(probe.shape) - 64
        return float(np.sqrt(np.sum(np.abs(probe) ** 2 * (y**2 + x**2))))

    assert width(0) < width(5e-6) < width(10e-6)


def test_frame_moments_give_the_total_and_the_deflection():
    frame = np.zeros((32, 32))
    frame[18, 13] = 4.0
    frame[18, 15] = 4.0
    assert stxm.frame_moments(frame) == (8.0, 2.0, -2.0)


def test_dpc_integration_recovers_a_known_phase():
    pixel = 10e-9
    y, x = np.indices((40, 50)) * pixel
    phase = np.exp(-((y - 2e-7) ** 2 + (x - 2.5e-7) ** 2) / (2 * (6e-8) ** 2)) + 0.3 * np.sin(x / 1e-7)
    grad_y, grad_x = np.gradient(phase, pixel)
    found = stxm.integrate_gradients(grad_y, grad_x, pixel)
    assert np.abs((found - found.mean()) - (phase - phase.mean())).max() < 0.02


def test_scattered_values_are_gridded_at_the_scan_step():
    yy, xx = np.meshgrid(np.arange(5), np.arange(6), indexing="ij")
    positions = np.stack([yy.ravel(), xx.ravel()], axis=1) * 1e-7
    grid = stxm.on_grid(positions, (yy * 10 + xx).ravel().astype(float), stxm.scan_step_m(positions))
    np.testing.assert_allclose(grid, yy * 10 + xx, atol=1e-9)


def test_probe_from_patterns_is_confined_and_normalised():
    scan = small_scan()
    frames, _ = model_frames(scan)
    probe = optics.probe_from_patterns(frames.mean(axis=0))
    y, x = np.indices(probe.shape) - scan.size // 2
    assert np.sum(np.abs(probe) ** 2) == pytest.approx(1, rel=1e-5)
    assert np.all(probe[y**2 + x**2 > (scan.size / 4) ** 2] == 0)


# --- reconstruction and scoring ----------------------------------------------------------------------

def test_scoring_removes_shift_scale_and_phase_ramp():
    scan = small_scan()
    truth = scan.object
    mask = np.zeros(truth.shape, bool)
    mask[10:-10, 10:-10] = True
    y, x = np.indices(truth.shape)
    moved = np.roll(truth, (3, -5), axis=(0, 1)) * 0.7 * np.exp(1j * (0.4 + 0.005 * y - 0.008 * x))
    result = score(np.pad(moved, 8), truth, mask)
    assert result.nrmse < 0.04
    assert result.baseline > 0.1
    assert score(np.ones_like(truth), truth, mask).nrmse > 4 * result.nrmse   # a flat object scores poorly


def test_raar_reconstructs_a_known_object_from_model_data():
    scan = small_scan(count=49)
    frames, centres = model_frames(scan)
    solver = StreamingRaar(centres_px=centres, probe=confined_probe(scan))
    for index, frame in enumerate(frames):
        solver.add(index, frame)
    mask = illuminated(confined_probe(scan), (centres - scan.size / 2).astype(int), scan.object.shape, fraction=0.3)
    before = score(solver.object, scan.object, mask).nrmse
    solver.iterate(80)
    after = score(solver.object, scan.object, mask)
    assert after.nrmse < 0.05 < before


def test_frames_not_yet_received_take_no_part():
    scan = small_scan()
    frames, centres = model_frames(scan)
    solver = StreamingRaar(centres_px=centres, probe=confined_probe(scan))
    for index in range(6):                       # the first row of the raster only
        solver.add(index, frames[index])
    solver.iterate(5)
    assert solver.frames == 6
    untouched = solver.corners[-1]
    far_corner = solver.object[untouched[0] + scan.size - 4, untouched[1] + scan.size - 4]
    assert far_corner == pytest.approx(1, abs=1e-6)  # never under a received frame: still the start value
    with pytest.raises(ValueError, match="already"):
        solver.add(0, frames[0])


def test_simulated_frames_are_poisson_photons_in_adu():
    scan = small_scan(count=4, background=0.0, read_noise_adu=0.5, bad_pixels=0, jitter=0.0)
    images = list(scan.images())
    assert len(images) == 8 and all(i.dtype == np.uint16 and i.shape == (160, 160) for i in images)
    darks = np.array(images[:4], float)
    assert abs(darks.mean() - scan.offset_adu) < 5
    photons = (images[4].astype(float) - darks.mean(axis=0)) / scan.adu_per_photon
    assert np.abs(photons - np.rint(photons)).max() < 0.5    # whole photons (noise << one photon)
    # The pattern's photons before Poisson sampling (Parseval): the exit wave's power over the window.
    n, corner = scan.window, scan.centres_px[0] - scan.window / 2
    (y, x), (fy, fx), k = np.floor(corner).astype(int), corner - np.floor(corner), scipy.fft.fftfreq(scan.window)
    probe = scipy.fft.ifft2(scipy.fft.fft2(scan.probe) * np.exp(-2j * np.pi * (k[:, None] * fy + k[None, :] * fx)))
    expected = np.sum(np.abs(probe * scan.object[y:y + n, x:x + n]) ** 2)
    assert np.rint(photons).sum() == pytest.approx(expected, rel=0.01)
    assert expected == pytest.approx(scan.photons * 0.6, rel=0.4)  # the object absorbs some


def test_the_static_mask_is_the_frames_mask_without_saturation():
    bad = np.zeros((100, 120), bool)
    bad[10, 40] = True
    params = CleaningParams(crop=64, size=16, downsample="bin")
    _, frame_mask = clean_frame(np.zeros((100, 120), np.uint16), dark=None, bad=bad, centre=(40, 70),
                                adu_per_photon=1, params=params)
    np.testing.assert_array_equal(static_mask(bad, centre=(40, 70), params=params), frame_mask)
    assert frame_mask[0, 0] == 0 and frame_mask.sum() == 255
