"""Known answers for the crystallography science: peakfinder8, corrections, hits and sums."""

from __future__ import annotations

import numpy as np
import pytest

from libs.crystallography.corrections import Corrections
from libs.crystallography.hits import ClassSums, HitRate, add_to_powder, is_hit
from libs.crystallography.layouts import LAYOUTS, Layout, radius_map
from libs.crystallography.matching import matched
from libs.crystallography.params import Peakfinder8Params
from libs.crystallography.peakfinder8 import PeakFinder8
from libs.simulation.sx import SxScan

PARAMS = Peakfinder8Params(adc_threshold=20, minimum_snr=6, min_pixel_count=2, max_pixel_count=40,
                           local_bg_radius=4, min_res=30, max_res=1500)


def finder_for(scan: SxScan, params: Peakfinder8Params = PARAMS) -> tuple[PeakFinder8, Corrections]:
    corrections = Corrections.build(scan.geometry.shape, pixel_mask=scan.pixel_mask)
    radius = radius_map(scan.geometry.shape, scan.beam_center_px)
    return PeakFinder8(scan.geometry, radius, corrections.good, params), corrections


@pytest.mark.parametrize("layout", ["1m", "asics"])
def test_peaks_of_simulated_hits_are_found_with_recall_and_precision_above_095(layout):
    """1 Mpx frames with about 100 true peaks each, SNR above the threshold."""
    scan = SxScan(layout=layout, count=6, hit_fraction=1.0, peaks_per_hit=(90, 110))
    finder, corrections = finder_for(scan)
    found = true = pairs = 0
    for i in range(scan.count):
        _, spots = scan.truth(i)
        peaks = finder.find(corrections.apply(scan.frame(i)))
        pairs += matched(np.stack([peaks.fs, peaks.ss], axis=1), spots[:, :2], tolerance_px=1.0)
        found, true = found + len(peaks), true + len(spots)
    assert true >= 6 * 90
    assert pairs / true >= 0.95, f"recall {pairs / true:.3f}"
    assert pairs / found >= 0.95, f"precision {pairs / found:.3f}"


def checkerboard(shape: tuple[int, int], level: float = 10.0) -> np.ndarray:
    """A background of mean `level` and sigma exactly 1."""
    return (level + np.where(np.indices(shape).sum(axis=0) % 2, 1.0, -1.0)).astype(np.float32)


def test_one_peak_has_the_intensity_centroid_and_snr_of_the_definitions():
    shape = (64, 64)
    data = checkerboard(shape)
    block = np.array([[60.0, 30.0], [40.0, 20.0]], np.float32)
    data[30:32, 20:22] = block
    finder = PeakFinder8(Layout("t", shape, shape), radius_map(shape, (2.0, 2.0)), np.ones(shape, bool),
                         Peakfinder8Params(adc_threshold=15, minimum_snr=3, min_pixel_count=2, max_pixel_count=10,
                                           local_bg_radius=3))
    peaks = finder.find(data)
    assert len(peaks) == 1 and peaks.found == 1
    # Local background: the disc of radius 6 around the rounded centre, box [-6, 5], the peak left out.
    cy, cx = 30, 20  # the first centroid, rounded
    ys, xs = np.mgrid[-6:6, -6:6]
    disc = (ys ** 2 + xs ** 2 <= 36)
    values = [data[cy + y, cx + x] for y, x in zip(ys[disc], xs[disc], strict=True)
              if not (30 <= cy + y < 32 and 20 <= cx + x < 22)]
    offset, sigma = np.mean(values), np.std(values)
    assert peaks.intensity[0] == pytest.approx(block.sum() - 4 * offset, rel=1e-5)
    assert peaks.num_pixels[0] == 4
    assert peaks.fs[0] == pytest.approx((block * [20, 21]).sum() / block.sum(), rel=1e-6)  # raw-weighted
    assert peaks.ss[0] == pytest.approx((block.T * [30, 31]).sum() / block.sum(), rel=1e-6)
    assert peaks.sigma[0] == pytest.approx(sigma, rel=1e-4)
    assert peaks.snr[0] == pytest.approx(peaks.intensity[0] / sigma, rel=1e-4)
    assert peaks.max_pixel_intensity[0] == pytest.approx(60 - offset, rel=1e-5)


def test_size_limits_resolution_window_and_peak_cap_are_obeyed():
    shape = (128, 128)
    data = checkerboard(shape)
    data[20, 20] = 200                       # one pixel: below min_pixel_count 2
    data[40:42, 40:42] = 200                 # four pixels: a peak
    data[60:68, 60:68] = 200                 # 64 pixels: above max_pixel_count
    data[100:102, 100:102] = 200             # beyond max_res from the corner
    params = Peakfinder8Params(adc_threshold=15, minimum_snr=3, min_pixel_count=2, max_pixel_count=20,
                               local_bg_radius=3, max_res=120)
    peaks = PeakFinder8(Layout("t", shape, shape), radius_map(shape, (0.0, 0.0)), np.ones(shape, bool),
                        params).find(data)
    assert [(round(float(s)), round(float(f))) for s, f in zip(peaks.ss, peaks.fs, strict=True)] == [(40, 40)]
    data[10:12, 80:82] = 200
    capped = PeakFinder8(Layout("t", shape, shape), radius_map(shape, (0.0, 0.0)), np.ones(shape, bool),
                         params.model_copy(update={"max_num_peaks": 1})).find(data)
    assert len(capped) == 1 and capped.found == 2
    assert capped.ss[0] == pytest.approx(10.5, abs=0.01)  # scan order: the upper one first


def test_peaks_never_grow_across_an_asic_edge():
    shape = (64, 64)
    data = checkerboard(shape)
    data[20:22, 31:33] = 200   # a 2 x 2 spot split by the edge between ASIC columns 0 and 1
    params = Peakfinder8Params(adc_threshold=15, minimum_snr=3, min_pixel_count=2, max_pixel_count=20,
                               local_bg_radius=3)
    one = PeakFinder8(Layout("t", shape, shape), radius_map(shape, (0.0, 0.0)), np.ones(shape, bool), params)
    split = PeakFinder8(Layout("t", shape, (64, 32)), radius_map(shape, (0.0, 0.0)), np.ones(shape, bool), params)
    whole = one.find(data)
    assert len(whole) == 1 and whole.num_pixels[0] == 4
    halves = split.find(data)
    # Each half is 2 pixels on its ASIC's outermost column: no seed there, so nothing is found.
    assert len(halves) == 0


def test_masked_pixels_are_not_searched():
    scan = SxScan(count=1, hit_fraction=1.0, hot_pixels=30)
    finder, corrections = finder_for(scan)
    hot = scan.pixel_mask & 8 != 0
    peaks = finder.find(corrections.apply(scan.frame(0)))
    rows, cols = np.rint(peaks.ss).astype(int), np.rint(peaks.fs).astype(int)
    assert hot.sum() == 30 and not hot[rows, cols].any()
    without_mask = PeakFinder8(scan.geometry, radius_map(scan.geometry.shape, scan.beam_center_px),
                               np.ones(scan.geometry.shape, bool),
                               PARAMS.model_copy(update={"min_pixel_count": 1}))
    noisy = without_mask.find(scan.frame(0).astype(np.float32))
    assert hot[np.rint(noisy.ss).astype(int), np.rint(noisy.fs).astype(int)].sum() >= 25  # the mask matters


def test_om_peakfinder8_finds_the_same_peaks_on_a_single_asic_layout():
    """Against OM's own extension (pip install --no-deps ondamonitor==23.8.3), when importable."""
    om = pytest.importorskip("om.algorithms._crystallography")
    scan = SxScan(count=3, hit_fraction=1.0)
    finder, corrections = finder_for(scan)
    p = PARAMS
    ours_total = same = theirs_total = 0
    for i in range(scan.count):
        data = corrections.apply(scan.frame(i))
        peaks = finder.find(data)
        ny, nx = scan.geometry.shape
        theirs = om.peakfinder_8(p.max_num_peaks, data, finder.mask, radius_map((ny, nx), scan.beam_center_px),
                                 0, None, None, 0, nx, ny, 1, 1, p.adc_threshold, p.minimum_snr,
                                 p.min_pixel_count, p.max_pixel_count, p.local_bg_radius)
        ours = set(zip(peaks.fs.tolist(), peaks.ss.tolist(), peaks.intensity.tolist(), peaks.sigma.tolist(),
                       strict=True))
        om_peaks = set(zip(*(theirs[k] for k in (0, 1, 2, 6)), strict=True))  # OM's "snr" is the sigma
        same += len(ours & om_peaks)
        ours_total, theirs_total = ours_total + len(ours), theirs_total + len(om_peaks)
    assert same == ours_total == theirs_total > 100


def test_corrections_mask_dark_flatfield_and_the_top_of_the_range():
    shape = (4, 4)
    raw = np.full(shape, 100, np.uint16)
    raw[0, 0] = 0xFFFF                                # how an Eiger sends a masked pixel
    mask = np.zeros(shape, np.uint32)
    mask[1, 1] = 8                                    # hot
    flat = np.full(shape, 2.0, np.float32)
    flat[2, 2] = 0                                    # no flatfield there: no data
    dark = np.full(shape, 10.0)
    c = Corrections.build(shape, pixel_mask=mask, flatfield=flat, dark=dark)
    out = c.apply(raw)
    assert out.dtype == np.float32
    expected = np.full(shape, 180.0, np.float32)
    expected[0, 0] = expected[1, 1] = expected[2, 2] = 0
    np.testing.assert_array_equal(out, expected)
    assert not c.good[1, 1] and not c.good[2, 2] and c.good[0, 0]
    with pytest.raises(ValueError, match="pixel mask"):
        Corrections.build(shape, pixel_mask=np.zeros((3, 3)))


def test_hits_are_classified_inclusively_on_both_limits():
    assert [is_hit(n, 10, 20) for n in (9, 10, 15, 20, 21)] == [False, True, True, True, False]
    assert is_hit(0, 0, 0) and not is_hit(1, 0, 0)


def test_class_sums_travel_as_deltas_add_up_and_never_count_a_frame_twice():
    rng = np.random.default_rng(0)
    frames = rng.random((6, 8, 8)).astype(np.float32)
    hits = [True, False, False, True, True, False]
    total, worker = ClassSums((8, 8)), ClassSums((8, 8))
    for i, (frame, hit) in enumerate(zip(frames, hits, strict=True)):
        worker.add(frame, hit, number=i)
        if i in (1, 5):
            assert total.merge(worker.take())
    assert list(total.frames) == [3, 3] and total.numbers == set(range(6))
    np.testing.assert_allclose(total.sums[1], frames[[0, 3, 4]].sum(axis=0, dtype=np.float64), rtol=1e-12)
    np.testing.assert_allclose(total.sums[0], frames[[1, 2, 5]].sum(axis=0, dtype=np.float64), rtol=1e-12)
    assert worker.take().sums == {}  # nothing added since
    again = ClassSums((8, 8))
    again.add(frames[4], True, number=4)  # frame 4 processed a second time elsewhere
    again.add(frames[0] * 0 + 1, False, number=6)
    assert not total.merge(again.take())
    assert list(total.frames) == [3, 3]


def test_virtual_powder_and_hit_rate():
    powder = np.zeros((4, 4))
    add_to_powder(powder, fs=np.array([1.4, 1.6, 2.5]), ss=np.array([0.0, 0.0, 3.5]), intensity=np.array([1, 2, 4.0]))
    assert powder[0, 1] == 1 and powder[0, 2] == 2 and powder[3, 2] == 4  # 2.5 and 3.5 round to even
    preview = np.zeros((2, 2))
    add_to_powder(preview, fs=np.array([1.4, 1.6, 2.5]), ss=np.array([0.0, 0.0, 3.5]), intensity=np.array([1, 2, 4.0]),
                  binning=2)
    assert preview.tolist() == [[1, 2], [0, 4]]
    rate = HitRate(window=4)
    for hit in (True, True, False, False, False, True):
        rate.add(hit)
    assert rate.sample() == 0.25 and list(rate.history) == [0.25]


def test_layouts():
    eiger = LAYOUTS["4m"]
    gaps = eiger.gaps()
    assert eiger.shape == (2167, 2070) and eiger.asics == (1, 1)
    assert gaps[514:551, :].all() and gaps[:, 1030:1040].all() and not gaps[:514, :1030].any()
    assert gaps.sum() == 3 * 37 * 2070 + 10 * (2167 - 3 * 37)
    assert LAYOUTS["asics"].asics == (4, 4)
    with pytest.raises(ValueError, match="grid"):
        Layout("bad", (100, 100), (30, 30))


def test_a_new_threshold_retunes_the_finder_and_keeps_its_tables():
    """`configure` of a threshold costs nothing: the per-layout tables stay; a change of what they
    are built from is refused, so the service builds a new finder."""
    shape = (128, 128)
    data = checkerboard(shape)
    data[40:42, 40:42] = 200
    params = Peakfinder8Params(adc_threshold=15, minimum_snr=3, min_pixel_count=2, max_pixel_count=20,
                               local_bg_radius=3, max_res=120)
    finder = PeakFinder8(Layout("t", shape, shape), radius_map(shape, (0.0, 0.0)), np.ones(shape, bool), params)
    tables = finder._destination
    assert len(finder.find(data)) == 1
    finder.retune(params.model_copy(update={"adc_threshold": 500}))
    assert finder._destination is tables and len(finder.find(data)) == 0
    with pytest.raises(ValueError, match="build a new PeakFinder8"):
        finder.retune(params.model_copy(update={"max_res": 60}))
