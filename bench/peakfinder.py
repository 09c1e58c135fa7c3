"""peakfinder8 benchmark: ours next to OM's own C++ extension, same frames, same process, one core.

Simulated hits (`surveyor simulate sx` frames, corrected as the peak stage does) on three layouts:
1 Mpx as one ASIC, 1 Mpx as 4 x 4 ASICs, and an Eiger-4M-like slab with module gaps (one ASIC,
the gaps masked). For each: milliseconds per frame (best and median over the frames, after a
warm-up) and ns per pixel, for ours and, when `om.algorithms._crystallography` is importable
(`pip install --no-deps ondamonitor==23.8.3`, Python 3.10/3.11), for OM's; and the fraction of
peaks that are identical (same fs, ss, intensity and local sigma, to the last bit) between the
two. On multi-ASIC layouts OM's stale-slot defect (reference/peakfinder8.md 5.1) merges some
peaks that ours keeps apart, so the fraction there measures that defect.

    python bench/peakfinder.py [--frames 8] [--repeats 3]

Prints one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from libs.crystallography.corrections import Corrections  # noqa: E402
from libs.crystallography.layouts import radius_map  # noqa: E402
from libs.crystallography.params import Peakfinder8Params  # noqa: E402
from libs.crystallography.peakfinder8 import PeakFinder8  # noqa: E402
from libs.simulation.sx import SxScan  # noqa: E402

PARAMS = Peakfinder8Params(max_num_peaks=2048, adc_threshold=20, minimum_snr=6, min_pixel_count=2,
                           max_pixel_count=40, local_bg_radius=4, min_res=30, max_res=1500)
OM_REFERENCE = {"ns_per_pixel": 16, "source": "reference/peakfinder8.md 11 (OM v23.8.3, one core)"}


def om_extension():
    try:
        from om.algorithms._crystallography import peakfinder_8
    except ImportError:
        return None
    return peakfinder_8


def timed(function, frames: list[np.ndarray], repeats: int) -> tuple[list, list[float]]:
    results, times = [], []
    function(frames[0])  # warm-up (compilation, caches)
    for _ in range(repeats):
        results = []
        for frame in frames:
            started = time.perf_counter()
            results.append(function(frame))
            times.append(time.perf_counter() - started)
    return results, times


def figures(times: list[float], pixels: int) -> dict:
    best, median = min(times), statistics.median(times)
    return {"ms_per_frame_best": round(best * 1e3, 2), "ms_per_frame_median": round(median * 1e3, 2),
            "ns_per_pixel_best": round(best / pixels * 1e9, 2), "ns_per_pixel_median": round(median / pixels * 1e9, 2)}


def bench_layout(layout: str, frames: int, repeats: int, om) -> dict:
    scan = SxScan(layout=layout, count=frames, hit_fraction=1.0)
    shape = scan.geometry.shape
    corrections = Corrections.build(shape, pixel_mask=scan.pixel_mask)
    data = [corrections.apply(scan.frame(i)) for i in range(frames)]
    radius = radius_map(shape, scan.beam_center_px)
    finder = PeakFinder8(scan.geometry, radius, corrections.good, PARAMS)
    ours, our_times = timed(finder.find, data, repeats)
    pixels = shape[0] * shape[1]
    result = {"layout": layout, "shape": list(shape), "asic_shape": list(scan.geometry.asic_shape),
              "peaks_per_frame": round(statistics.mean(len(p) for p in ours), 1),
              "ours": figures(our_times, pixels)}
    if om is None:
        return result
    (nay, nax), (ay, ax) = scan.geometry.asics, scan.geometry.asic_shape
    p = PARAMS

    def om_find(frame: np.ndarray):
        return om(p.max_num_peaks, frame, finder.mask, radius, 0, None, None, 0, ax, ay, nax, nay,
                  p.adc_threshold, p.minimum_snr, p.min_pixel_count, p.max_pixel_count, p.local_bg_radius)

    theirs, om_times = timed(om_find, data, repeats)
    same = union = 0
    for mine, other in zip(ours, theirs, strict=True):
        a = set(zip(mine.fs.tolist(), mine.ss.tolist(), mine.intensity.tolist(), mine.sigma.tolist(), strict=True))
        b = set(zip(other[0], other[1], other[2], other[6], strict=True))  # OM's "snr" is the local sigma
        same, union = same + len(a & b), union + len(a | b)
    result["om"] = figures(om_times, pixels)
    result["identical_peaks_fraction"] = round(same / max(union, 1), 5)
    result["speedup_vs_om_best"] = round(min(om_times) / min(our_times), 2)
    result["speedup_vs_om_median"] = round(statistics.median(om_times) / statistics.median(our_times), 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core for both
    om = om_extension()
    layouts = [bench_layout(name, args.frames, args.repeats, om) for name in ("1m", "asics", "4m")]
    print(json.dumps({"benchmark": "peakfinder8", "parameters": PARAMS.model_dump(), "frames": args.frames,
                      "repeats": args.repeats, "om_importable": om is not None,
                      "om_published": OM_REFERENCE, "layouts": layouts}, indent=2))


if __name__ == "__main__":
    main()
