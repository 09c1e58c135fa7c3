"""Known-answer tests of the SX frame simulator: its truth must match its pixels, frame by frame."""

from __future__ import annotations

import ast

import h5py
import numpy as np
import pytest

from libs.crystallography.layouts import LAYOUTS
from libs.simulation import KINDS, generator
from libs.simulation.sx import DEAD, GAP, HOT, SxScan


@pytest.fixture(scope="module")
def sharp() -> SxScan:
    """Narrow spots, so a 5 x 5 box holds all of a spot's photons (1 - 1e-4)."""
    return SxScan(count=20, peak_sigma_px=(0.5, 0.5), hit_fraction=0.5)


def test_frames_have_the_layout_shape_dtype_and_gap_values():
    for name in ("1m", "asics"):
        frame = SxScan(count=2, layout=name).frame(0)
        assert frame.shape == LAYOUTS[name].shape and frame.dtype == np.uint16
        assert frame.max() < 0xFFFF  # no gaps
    scan = SxScan(count=1, layout="4m", dtype="uint32")
    frame, gaps = scan.frame(0), LAYOUTS["4m"].gaps()
    assert scan.dtype == "<u4" and frame.shape == (2167, 2070) and frame.dtype == np.uint32
    assert gaps.sum() > 0 and np.all(frame[gaps] == 0xFFFFFFFF) and frame[~gaps].max() < 0xFFFFFFFF
    assert np.array_equal(scan.pixel_mask & GAP != 0, gaps)
    # Spots never come within 4 pixels of a gap.
    hit, peaks = next(scan.truth(i) for i in range(50) if scan.truth(i)[0])
    rows, cols = np.nonzero(gaps)
    for fs, ss, _ in peaks:
        assert np.min(np.maximum(abs(rows - ss), abs(cols - fs))) >= 4


def test_truth_matches_the_pixels(sharp: SxScan):
    checked = 0
    for i in range(sharp.count):
        hit, peaks = sharp.truth(i)
        if not hit:
            assert len(peaks) == 0
            continue
        frame = sharp.frame(i).astype(np.float64)
        for fs, ss, photons in peaks:
            r, c = round(ss), round(fs)
            box = np.s_[r - 2:r + 3, c - 2:c + 3]
            signal = frame[box] - sharp.background[box]
            # The brightest pixel stands far above the local background's noise.
            assert signal.max() > 10 * np.sqrt(sharp.background[box].max()) + 20
            assert abs(signal.sum() - photons) < 5 * np.sqrt(photons + sharp.background[box].sum())
            # The centroid lands on the true centre: fs is the column, ss the row.
            ys, xs = np.mgrid[box]
            assert abs((signal * xs).sum() / signal.sum() - fs) < 0.25
            assert abs((signal * ys).sum() / signal.sum() - ss) < 0.25
            checked += 1
    assert checked > 200


def test_spots_keep_their_distance_and_ranges():
    scan = SxScan(count=200)
    cy, cx = scan.beam_center_px
    counts = []
    for i in range(scan.count):
        hit, peaks = scan.truth(i)
        if hit:
            counts.append(len(peaks))
            fs, ss, photons = peaks.T
            gaps = np.hypot(fs[:, None] - fs, ss[:, None] - ss) + np.eye(len(fs)) * 1e9
            assert gaps.min() >= scan.min_separation_px
            assert np.all((photons >= 300) & (photons <= 5000))
            radius = np.hypot(ss - cy, fs - cx)
            assert radius.min() >= 39 and radius.max() <= scan.outer_radius_px + 1
    assert abs(len(counts) / scan.count - scan.hit_fraction) < 0.1
    assert min(counts) >= 5 and max(counts) <= 300 and np.mean(counts) > 100


def test_frames_are_reproducible_one_by_one_and_pooled():
    scan = SxScan(count=4)
    streamed = list(scan.images())
    fresh = SxScan(count=4)
    assert np.array_equal(fresh.frame(3), streamed[3])  # made alone, without frames 0-2
    assert np.array_equal(fresh.frame(3), fresh.frame(3))
    assert not np.array_equal(streamed[0], streamed[1])
    pooled = SxScan(count=6, pool=3, hit_fraction=1.0)
    assert np.array_equal(pooled.frame(4), pooled.frame(1)) and not np.array_equal(pooled.frame(0), pooled.frame(1))
    assert np.array_equal(pooled.truth(4)[1], pooled.truth(1)[1]) and len(pooled.truth(1)[1]) > 0
    frames = list(pooled.images())
    assert np.array_equal(frames[5], pooled.frame(2))


def test_bad_pixels_are_flagged_and_behave():
    scan = SxScan(count=2, layout="asics")
    mask, frame = scan.header().pixel_mask["data"], scan.frame(1)
    assert mask.dtype == np.uint32 and mask.shape == (1024, 1024)
    hot, dead = mask & HOT != 0, mask & DEAD != 0
    assert hot.sum() == scan.hot_pixels and dead.sum() == scan.dead_pixels and not (hot & dead).any()
    assert np.all(frame[hot] >= 20000) and np.all(frame[dead] == 0)
    assert frame[mask == 0].max() < 20000


def test_header_and_scan_describe_the_detector():
    scan = SxScan(count=7, layout="4m")
    header, description = scan.header(), scan.scan()
    assert header.info.shape == (2167, 2070) and header.info.dtype == "<u2" and header.info.n_images == 7
    assert header.info.beam_center_px == pytest.approx((1083 + 12.3, 1034.5 - 17.6))
    assert header.config == {"generator": "sx", "layout": "4m"}
    assert np.all(header.flatfield["data"] == 1)
    assert description.technique == "crystallography" and description.n_frames == 7
    assert description.adu_per_photon == 1.0 and description.metadata["asic_shape"] == [2167, 2070]


def test_write_truth_round_trips(tmp_path):
    scan = SxScan(count=30, layout="asics")
    path = tmp_path / "truth.h5"
    scan.write_truth(path)
    with h5py.File(path) as f:
        assert f.attrs["layout"] == "asics"
        assert ast.literal_eval(f.attrs["parameters"])["layout"] == "asics"
        assert np.array_equal(f["pixel_mask"][()], scan.pixel_mask)
        assert np.allclose(f["beam_center_px"][()], scan.beam_center_px)
        frame_of = f["peaks/frame"][()]
        assert f["n_peaks"].dtype == np.int32 and frame_of.dtype == np.int64
        for i in range(scan.count):
            hit, peaks = scan.truth(i)
            assert f["hit"][i] == hit and f["n_peaks"][i] == len(peaks)
            stored = np.column_stack([f[f"peaks/{k}"][()][frame_of == i] for k in ("fs", "ss", "intensity")])
            assert np.array_equal(stored, peaks)


def test_registered_and_parameters_checked():
    assert "sx" in KINDS
    scan = generator("sx", frames=3, series="9", params={"peak_photons": [100, 200], "dtype": "uint32"})
    assert isinstance(scan, SxScan) and scan.count == 3 and scan.peak_photons == (100.0, 200.0)
    for params, words in (({"layout": "9m"}, "'1m', '4m', 'asics'"), ({"dtype": "f4"}, "dtype"),
                          ({"hit_fraction": 1.5}, "[0, 1]"), ({"peaks_per_hit": [9, 3]}, "inverted"),
                          ({"peak_sigma_px": [0, 1]}, "above 0")):
        with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
            generator("sx", frames=3, series="1", params=params)
