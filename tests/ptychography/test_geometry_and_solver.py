"""The reconstruction's geometry follows the scan (detector, energy, distance, probe), and the
solver's sub-pixel positions and maximum-likelihood refinement do what they are for, on data whose
model is exact (so that each effect is measured alone)."""

from __future__ import annotations


import numpy as np
import pytest

from libs.common.messages import ProbeModel
from libs.ptychography import geometry, optics
from libs.ptychography.quality import illuminated, score
from services.reconstruction_worker.device import CPU, Device
from services.reconstruction_worker.ml import MaximumLikelihood
from services.reconstruction_worker.params import Params
from services.reconstruction_worker.raar import StreamingRaar
from services.reconstruction_worker.service import Engine
from tests.conftest import wait_for
from tests.ptychography.test_science import confined_probe, model_frames, small_scan

SCAN = dict(energy_ev=800.0, distance_m=0.08, pixel_m=25e-6)
ZONE_PLATE = ProbeModel(outer_zone_width_m=25e-9, diameter_m=150e-6, central_stop_diameter_m=60e-6, defocus_m=0.0)


def chosen(defocus_m: float, shape=(1024, 1024), **pins) -> geometry.Geometry:
    model = ZONE_PLATE.model_copy(update={"defocus_m": defocus_m})
    return geometry.choose(**SCAN, detector_shape=shape, centre_px=(shape[0] / 2, shape[1] / 2), probe_model=model,
                           **pins)


def test_the_window_holds_the_probe_twice_over_for_any_defocus_and_either_sign():
    for defocus in (2e-6, 8e-6, 30e-6):
        for sign in (1, -1):
            g = chosen(sign * defocus)
            assert g.window_m >= geometry.WINDOW_PER_PROBE * g.probe_diameter_m * 0.999, g.describe()
            assert g.crop % g.size == 0 and g.size <= 128 and g.crop <= 1024
            assert g.support_radius_px <= geometry.SUPPORT_MAX * g.size
        assert chosen(defocus).crop == chosen(-defocus).crop  # a Fresnel propagation either way: the same beam
    near, far = chosen(2e-6), chosen(30e-6)
    assert far.probe_diameter_m > 5 * near.probe_diameter_m and far.window_m > 3 * near.window_m
    # The tight focus would take 8 raw pixels a clean one: the binning cap gives it a wider window.
    assert near.crop // near.size == geometry.MAX_BINNING and near.window_m > 3 * near.probe_diameter_m
    assert far.object_pixel_m > near.object_pixel_m  # a larger window from the same clean size: coarser pixels


def test_a_detector_smaller_than_the_old_fixed_crop_and_pins_are_kept():
    small = chosen(8e-6, shape=(256, 256))
    assert small.crop <= 256 and small.size >= geometry.MIN_SIZE
    pinned = chosen(8e-6, crop=512, size=64)
    assert (pinned.crop, pinned.size) == (512, 64)
    assert chosen(8e-6, size=96).size == 96
    with pytest.raises(ValueError, match="edge"):
        geometry.choose(**SCAN, detector_shape=(256, 256), centre_px=(3, 128), probe_model=ZONE_PLATE)


def test_without_a_probe_model_the_probe_size_comes_from_the_scan_step():
    y, x = np.mgrid[0:10, 0:10] * 100e-9
    g = geometry.choose(**SCAN, detector_shape=(1024, 1024), centre_px=(512, 512),
                        positions_m=np.stack([y.ravel(), x.ravel()], axis=1))
    assert g.probe_from == "scan step" and g.probe_diameter_m == pytest.approx(3 * 100e-9)
    assert g.window_m >= 2 * g.probe_diameter_m


def reconstruct(scan, frames, centres, *, subpixel: bool = True, iterations: int = 60) -> StreamingRaar:
    solver = StreamingRaar(centres_px=centres, probe=confined_probe(scan), subpixel=subpixel)
    for index, frame in enumerate(frames):
        solver.add(index, frame)
    solver.refine_probe = False
    solver.iterate(iterations)
    return solver


def test_sub_pixel_positions_beat_rounding():
    scan = small_scan(count=64, jitter=0.3)
    frames, centres = model_frames(scan, whole=False)
    noisy = np.random.default_rng(1).poisson(frames).astype(np.float32)
    mask = illuminated(confined_probe(scan), (centres - scan.size / 2).astype(int), scan.object.shape, fraction=0.3)
    kept, rounded = (score(reconstruct(scan, noisy, centres, subpixel=s).object, scan.object, mask).nrmse
                     for s in (True, False))
    print(f"NRMSE with sub-pixel positions {kept:.4f}, rounded {rounded:.4f}")
    assert kept < 0.6 * rounded


def noisy_scan(count: int, seed: int):
    """A small jittered scan's Poisson frames of the exact model, its positions and the region scored."""
    scan = small_scan(count=count, jitter=0.3)
    frames, centres = model_frames(scan, whole=False)
    noisy = np.random.default_rng(seed).poisson(frames).astype(np.float32)
    mask = illuminated(confined_probe(scan), (centres - scan.size / 2).astype(int), scan.object.shape, fraction=0.3)
    return scan, noisy, centres, mask


def zone_plate_start(scan) -> np.ndarray:
    return optics.zone_plate_probe(scan.probe_model, energy_ev=scan.energy_ev, size=scan.size, pixel_m=scan.pixel_m)


def raar_start(scan, noisy, centres, *, support_radius: float, iterations: int, device: Device = CPU) -> StreamingRaar:
    """RAAR from the zone-plate model, every frame in, as the reconstruction stage starts."""
    solver = StreamingRaar(centres_px=centres, probe=zone_plate_start(scan),
                           support=optics.soft_support(scan.size, support_radius), device=device)
    for index, frame in enumerate(noisy):
        solver.add(index, frame)
    solver.scale_probe()
    solver.iterate(iterations)
    return solver


def test_a_slowly_streamed_scan_ends_as_good_as_a_fast_one():
    """A slow scan gives the solver thousands of iterations on the part that has come. Where the
    probe is faint (the edges, positions still to come) nothing constrains the object: it must stay
    free space there, not grow iteration by iteration until it ruins the probe's refinement (the
    failure mode: edges at |O| of 40-60, the probe collapsing onto them in the first iterations with
    all frames in). And the object-probe scale must not drift."""
    scan, noisy, centres, mask = noisy_scan(64, seed=2)
    n, start = scan.size, zone_plate_start(scan)

    def streamed(iterations_per_frame: int) -> tuple[StreamingRaar, float]:
        solver = StreamingRaar(centres_px=centres, probe=start, support=optics.soft_support(n, n / 4))
        for index, frame in enumerate(noisy):
            solver.add(index, frame)
            if index == 7:
                solver.scale_probe()
                power = float(np.sum(np.abs(solver.probe) ** 2))
            if index >= 7:
                solver.refine_probe = False
                solver.iterate(iterations_per_frame)
        edges = float(np.abs(solver.object).max())
        solver.restart()
        solver.refine_probe = True
        solver.iterate(30)
        assert np.sum(np.abs(solver.probe) ** 2) == pytest.approx(power, rel=1e-3)
        return solver, edges

    (fast, _), (slow, edges) = streamed(0), streamed(40)
    quick, slowly = (score(s.object, scan.object, mask).nrmse for s in (fast, slow))
    print(f"NRMSE streamed fast {quick:.4f}, slowly (40 iterations a frame) {slowly:.4f}; largest |O| before "
          f"the last iterations {edges:.2f}")
    assert edges < 3 and slowly < 1.2 * quick


def test_maximum_likelihood_refines_a_raar_start():
    scan, noisy, centres, mask = noisy_scan(64, seed=1)
    solver = raar_start(scan, noisy, centres, support_radius=scan.size / 4, iterations=15)
    before = score(solver.object, scan.object, mask).nrmse
    refinement = MaximumLikelihood(solver)
    first = refinement.iterate(1)
    last = refinement.iterate(29)
    after = score(solver.object, scan.object, mask).nrmse
    print(f"NRMSE after 15 RAAR iterations {before:.4f}, then 30 ML steps {after:.4f}")
    assert last < first and after < 0.6 * before


def test_maximum_likelihood_does_not_depend_on_the_object_probe_scale_the_data_leave_free():
    """c O and P / c fit the data alike: from either, the refinement must end at the same image (the
    conjugate gradient once weighed the probe's part by the fourth power of c)."""
    scan, noisy, centres, mask = noisy_scan(36, seed=3)
    results = []
    for c in (1.0, 3.0):
        solver = raar_start(scan, noisy, centres, support_radius=scan.size / 4, iterations=10)
        solver.object, solver.probe = solver.object * np.complex64(c), solver.probe / np.complex64(c)
        MaximumLikelihood(solver).iterate(20)
        results.append(score(solver.object, scan.object, mask).nrmse)
    print(f"NRMSE after 20 ML steps from the same RAAR result at scale 1 and 3: {results[0]:.5f}, {results[1]:.5f}")
    assert results[1] == pytest.approx(results[0], rel=0.01)


def test_maximum_likelihood_fits_the_probe_beyond_the_support_raar_keeps_it_in():
    """The support steadies RAAR's start, but the probe's tails beyond it are in every frame: the
    refinement fits them (cut to the support, the probe could not change where the support is 0)."""
    scan, noisy, centres, mask = noisy_scan(64, seed=1)
    # A support inside the truth's n / 4.5:
    solver = raar_start(scan, noisy, centres, support_radius=scan.size / 5.5, iterations=15)
    support = solver.support
    before, probe = score(solver.object, scan.object, mask).nrmse, solver.probe.copy()
    MaximumLikelihood(solver, smoothness=0.01).iterate(30)  # exact model data: a light prior
    after = score(solver.object, scan.object, mask).nrmse
    outside = support < 1e-6
    moved = float(np.abs(solver.probe - probe)[outside].max() / np.abs(probe).max())
    print(f"NRMSE after RAAR {before:.4f}, after 30 ML steps {after:.4f}; the probe moved {moved:.3g} outside")
    assert moved > 1e-3 and after < 0.8 * before


@pytest.mark.parametrize(("budget_s", "steps"), [(1e-9, 0), (600.0, 5)])
def test_maximum_likelihood_steps_stop_at_their_time_budget(budget_s, steps):
    """A large scan's result is not held back for ever: the steps end when their budget is spent."""
    scan = small_scan(count=16, jitter=0.3)
    frames, centres = model_frames(scan, whole=False)
    solver = reconstruct(scan, frames, centres, iterations=2)
    engine = Engine(solver, Params(ml_iterations=5, ml_budget_s=budget_s), total=len(frames))
    engine._refine()
    assert engine.ml_done == steps


def test_after_the_last_frame_the_solver_starts_again_from_free_space():
    """The image streamed while frames come is the live preview; fitted to part of the scan with the
    model probe held, it is a worse start than free space (the demo scan's frames: NRMSE 0.055
    against 0.034 after the same 40 RAAR and 42 ML steps). A successor that resumes after the
    last frame keeps its predecessor's image."""
    scan, noisy, centres, _ = noisy_scan(36, seed=5)

    def engine(after_last: int) -> tuple[Engine, StreamingRaar]:
        solver = StreamingRaar(centres_px=centres, probe=zone_plate_start(scan),
                               support=optics.soft_support(scan.size, scan.size / 4))
        return Engine(solver, Params(iterations=0, ml_iterations=0), total=len(noisy), after_last=after_last), solver

    streaming, solver = engine(after_last=0)
    for index, frame in enumerate(noisy[:-1]):
        streaming.inbox.put((index, frame, None))
    streaming.start()
    wait_for(lambda: solver.iterations >= 20, 60, "iterations on the frames that came")
    assert np.abs(solver.host()[0] - 1).max() > 0.1, "the streamed image is an image"
    streaming.inbox.put((len(noisy) - 1, noisy[-1], None))
    streaming.join(60)
    assert streaming.failure is None and not streaming.is_alive()
    np.testing.assert_array_equal(solver.host()[0], 1)  # no iterations asked for after the last frame

    resumed, solver = engine(after_last=1)
    solver.restore(np.full(solver.object.shape, 0.5), solver.probe, iterations=30)
    for index, frame in enumerate(noisy):
        resumed.inbox.put((index, frame, None))
    resumed.run()
    np.testing.assert_array_equal(solver.host()[0], np.complex64(0.5))
